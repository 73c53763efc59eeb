"""The gate ablations command: variants of one recipe trained and scored in one run, a table
of mean and worst over seeds, continued without retraining, bad input one error line."""

import json
import os

import pytest

from ag_jax import default_world
from ag_jax.evaluation import ablations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ("ruler:tasks=niah_multikey,min_length=96,max_length=160,min_needles=2,max_needles=3,"
         "lm_fraction=0.2")


def args(out):
  return ["--config", os.path.join(ROOT, "configs", "train", "ruler_gates.yaml"),
          "--variants", "recipe,gate kind: linear", "--steps", "2", "--seeds", "0",
          "--set", f"model.hf_path={os.path.join(default_world.ASSET_DIR, 'model')}",
          "--set", f"data.source={SHORT}", "--set", "data.seq_len=256",
          "--set", "data.batch_size=8", "--set", "data.eval_split=null",
          "--set", "checkpoint.every=0", "--lengths", "128", "--budgets", "1,0.25",
          "--num-examples", "2", "--out", str(out)]


def test_variants_train_and_table(tmp_path, capsys, monkeypatch):
  written = []  # rows per write: the table after each variant, so a stopped run leaves one
  write = ablations.write
  monkeypatch.setattr(ablations, "write", lambda rows, out: written.append(len(rows)) or
                      write(rows, out))
  assert ablations.main(args(tmp_path)) == 0
  assert written == [2, 4]
  rows = json.load(open(tmp_path / "results.json"))
  assert [(r["variant"], r["budget"]) for r in rows] == [
      ("recipe", 1.0), ("recipe", 0.25), ("gate kind: linear", 1.0), ("gate kind: linear", 0.25)]
  kinds = {r["variant"]: r["gate"]["kind"] for r in rows}
  assert kinds == {"recipe": "attention", "gate kind: linear": "linear"}
  assert all(0.0 <= r["accuracy"] <= 1.0 and r["train_seconds"] > 0 for r in rows)
  # budget 0.25 caps what the cache keeps of the context (kept counts question + answer too)
  assert all(r["kept"] < 0.6 for r in rows if r["budget"] == 0.25)
  table = (tmp_path / "results.md").read_text()
  assert "| recipe |" in table and "| gate kind: linear |" in table and "budget 0.25" in table
  # The same command again finds the trained gates and only scores them; the training time
  # and keep ratio are read back, not lost.
  assert ablations.main(args(tmp_path)) == 0
  again = json.load(open(tmp_path / "results.json"))
  for key in ("accuracy", "train_seconds", "train_keep_ratio"):
    assert [r[key] for r in again] == [r[key] for r in rows]


@pytest.mark.parametrize("flags,message", [
    (["--variants", "gate kind: lstm"], "unknown"),
    (["--budgets", "0,0.5"], "budget must be in"),
    (["--budgets", "half"], "--budgets must be comma-separated numbers"),
    (["--tasks", "niah_multikey,needle"], "--tasks: unknown ['needle']"),
    (["--set", "model.hf_path=" + os.path.join(default_world.ASSET_DIR, "model"),
      "--lengths", "8"], "--lengths 8"),
    (["--config", os.path.join(ROOT, "configs", "train", "ruler_base.yaml")], "does not train gates"),
])
def test_bad_input_is_one_error_line(flags, message, tmp_path, capsys):
  assert ablations.main(["--out", str(tmp_path)] + flags) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_every_variant_is_a_valid_change_of_the_recipe(tmp_path):
  """Each variant builds a TrainConfig that differs from the recipe's in what it names."""
  recipe = os.path.join(ROOT, "configs", "train", "ruler_gates.yaml")
  base = ablations.variant_config(recipe, (), None, 0, str(tmp_path))
  for name, changes in ablations.VARIANTS.items():
    cfg = ablations.variant_config(recipe, changes, 3, 1, str(tmp_path / "v"))
    assert cfg.run.steps == 3 and cfg.run.seed == 1 and cfg.data.seed == 1
    for change in changes:
      section, key = change.split("=")[0].split(".")
      assert getattr(getattr(cfg, section), key) != getattr(getattr(base, section), key), \
          (name, change)


def test_table_gives_mean_and_worst_over_seeds_and_one_seed_alone():
  row = lambda seed, budget, acc, kept: {"variant": "recipe", "seed": seed, "task": "vt",
                                         "length": 512, "budget": budget, "accuracy": acc,
                                         "kept": kept}
  two = ablations.markdown([row(0, 1.0, 0.50, 0.4), row(1, 1.0, 0.75, 0.5),
                            row(0, 0.25, 0.25, 0.2), row(1, 0.25, 0.50, 0.2)])
  assert "seeds 0,1: mean, worst" in two
  assert "| recipe | 62.5, 50.0 (kept 45%) | 37.5, 25.0 (kept 20%) |" in two
  one = ablations.markdown([row(3, 1.0, 0.50, 0.4), row(3, 0.25, 0.25, 0.2)])
  assert "(kvpress protocol, AG; seed 3)" in one
  assert "| recipe | 50.0 (kept 40%) | 25.0 (kept 20%) |" in one
