"""`python -m ag_jax.evaluation.checkpoint_selection`: a gate run's checkpoints scored on the
validation split, the best exported.

A two-step run of the shipped gate recipe on the embedded base saves both steps. The scores
are checked against `python -m ag_jax.evaluate` on the exported gates (an independent path:
the gate export, the loader and the evaluation CLI), the export against train.py's own export
of the last step and the choice against the rule (highest mean, ties to the later step). The
`--average` candidate is checked against the numpy mean of the restored checkpoints, exported
by hand and scored by the evaluation CLI."""

import json
import os

import jax
import numpy as np
import pytest

import ag_jax
from ag_jax import default_world, evaluate, train_config
from ag_jax.checkpoint import TrainCheckpointer, export_gates
from ag_jax.evaluation import checkpoint_selection as selection
from ag_jax.train import train
from ag_jax.train_config import load_train_config
from test_cli_errors import _error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(default_world.ASSET_DIR, "model")
ARGS = ["--lengths", "256", "--budgets", "1,0.25", "--num-examples", "2",
        "--tasks", "niah_multikey"]


def _mean_of_two(a: dict, b: dict) -> dict:
  return jax.tree.map(lambda x, y: ((np.asarray(x, np.float32) + np.asarray(y, np.float32)) / 2)
                      .astype(np.asarray(x).dtype), a, b)


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gate_run")
  cfg = load_train_config(os.path.join(ROOT, "configs", "train", "ruler_gates.yaml"), [
      f"model.hf_path={BASE}", f"run.out_dir={out}", "run.steps=2", "run.eval_every=0",
      "data.eval_split=null", "data.seq_len=128", "data.batch_size=8", "checkpoint.every=1",
      "checkpoint.keep=5", "checkpoint.async_save=false", "run.progress=false",
      "optim.lr=0.05"])  # steps far apart, so the two checkpoints' gates differ
  train(cfg)
  return str(out)


@pytest.fixture(scope="module")
def selected(gate_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("selected") / "gates")
  assert selection.main([gate_run, *ARGS, "--average", "1,2", "--out", out]) == 0
  with open(os.path.join(out, "selection.json")) as f:
    return out, json.load(f)


def test_every_saved_step_is_scored_and_the_best_chosen(selected):
  _, sel = selected
  assert [r["step"] for r in sel["steps"]] == [1, 2, None]
  assert sel["steps"][2]["average_of"] == [1, 2]
  assert sel["split"] == "validation" and sel["protocol"] == "kvpress"
  for r in sel["steps"]:
    assert set(r["cells"]) == {"niah_multikey@256 b1", "niah_multikey@256 b0.25"}
    assert r["mean_accuracy"] == pytest.approx(np.mean(list(r["cells"].values())))
  best = selection.choose(sel["steps"])
  assert (sel["chosen_step"], sel["chosen_average_of"]) == (best["step"], best.get("average_of"))


def test_choose_takes_the_highest_mean_and_the_later_step_on_a_tie():
  rows = [{"step": 100, "mean_accuracy": 0.8}, {"step": 200, "mean_accuracy": 0.9},
          {"step": 300, "mean_accuracy": 0.9}, {"step": 400, "mean_accuracy": 0.7}]
  assert selection.choose(rows)["step"] == 300
  assert selection.choose(rows[:2] + rows[3:])["step"] == 200
  # An average ties just after the single step it ends with, and wins when it scores higher.
  mean = {"step": None, "average_of": [200, 300], "mean_accuracy": 0.9}
  assert selection.choose(rows + [mean])["step"] == 300
  assert selection.choose(rows[:2] + [mean])["average_of"] == [200, 300]
  assert selection.choose(rows + [{**mean, "mean_accuracy": 0.95}])["step"] is None


def test_average_params_is_the_elementwise_mean_in_each_leafs_dtype():
  trees = [{"w": np.full((2, 3), v, np.float32), "b": np.full((3,), v, np.float16)}
           for v in (1.0, 2.0, 4.5)]
  mean = selection.average_params(trees)
  np.testing.assert_array_equal(mean["w"], np.full((2, 3), 2.5, np.float32))
  assert mean["b"].dtype == np.float16 and float(mean["b"][0]) == 2.5


def test_the_export_is_the_chosen_checkpoint(gate_run, selected):
  out, sel = selected
  checkpointer = TrainCheckpointer(os.path.join(gate_run, "checkpoints"), 0, 5, async_save=False)
  steps = {s: checkpointer.restore_trainable(s)[0] for s in (1, 2)}
  checkpointer.close()
  # restore_trainable against train.py's export of its last step (orbax vs safetensors).
  _, last = ag_jax.load_gates(os.path.join(gate_run, "gates"))
  jax.tree.map(np.testing.assert_array_equal, steps[2], last)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(steps[1]),
                                                       jax.tree.leaves(steps[2])))
  _, exported = ag_jax.load_gates(out)
  mean = _mean_of_two(steps[1], steps[2])
  chosen = steps[sel["chosen_step"]] if sel["chosen_step"] is not None else mean
  jax.tree.map(np.testing.assert_array_equal, chosen, exported)


def test_a_chosen_average_is_exported_and_recorded(gate_run, monkeypatch, tmp_path):
  # Whether the average wins on two examples is up to the scores; force the choice so the
  # export of the averaged gates is checked whatever they are.
  monkeypatch.setattr(selection, "choose", lambda scored: next(r for r in scored
                                                               if r["step"] is None))
  out = str(tmp_path / "gates")
  assert selection.main([gate_run, *ARGS, "--steps", "2", "--average", "1,2", "--out", out]) == 0
  sel = json.loads((tmp_path / "gates" / "selection.json").read_text())
  assert sel["chosen_step"] is None and sel["chosen_average_of"] == [1, 2]
  checkpointer = TrainCheckpointer(os.path.join(gate_run, "checkpoints"), 0, 5, async_save=False)
  mean = _mean_of_two(checkpointer.restore_trainable(1)[0], checkpointer.restore_trainable(2)[0])
  checkpointer.close()
  _, exported = ag_jax.load_gates(out)
  jax.tree.map(np.testing.assert_array_equal, mean, exported)


def test_the_average_scores_as_the_evaluation_cli_scores_the_mean_gates(gate_run, selected,
                                                                        tmp_path):
  _, sel = selected
  checkpointer = TrainCheckpointer(os.path.join(gate_run, "checkpoints"), 0, 5, async_save=False)
  (one, config), (two, _) = checkpointer.restore_trainable(1), checkpointer.restore_trainable(2)
  checkpointer.close()
  mean = _mean_of_two(one, two)
  model_cfg, _ = ag_jax.load_hf_llama(BASE)
  gates = str(tmp_path / "mean_gates")
  export_gates(gates, train_config.from_dict(config).gate, model_cfg, mean)
  assert evaluate.main(["--model", BASE, "--gates", gates, "--task", "ruler", "--subtasks",
                        "niah_multikey", "--lengths", "256", "--budgets", "1,0.25",
                        "--num-examples", "2", "--split", "validation", "--protocol", "kvpress",
                        "--policy", "ag", "--quiet", "--out", str(tmp_path / "eval")]) == 0
  rows = json.loads((tmp_path / "eval" / "results.json").read_text())
  averaged = sel["steps"][2]
  assert {selection.cell_name(r): r["accuracy"] for r in rows} == pytest.approx(averaged["cells"])


def test_scores_equal_the_evaluation_cli_on_the_exported_gates(selected, tmp_path):
  out, sel = selected
  assert evaluate.main(["--model", BASE, "--gates", out, "--task", "ruler", "--subtasks",
                        "niah_multikey", "--lengths", "256", "--budgets", "1,0.25",
                        "--num-examples", "2", "--split", "validation", "--protocol", "kvpress",
                        "--policy", "ag", "--quiet", "--out", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "results.json").read_text())
  chosen = next(r for r in sel["steps"] if r["step"] == sel["chosen_step"])
  assert {selection.cell_name(r): r["accuracy"] for r in rows} == pytest.approx(chosen["cells"])


def test_bad_runs_and_steps_are_refused(gate_run, tmp_path, capsys):
  assert "does not exist" in _error(capsys, selection.main([str(tmp_path), *ARGS]))
  line = _error(capsys, selection.main([gate_run, *ARGS, "--steps", "7"]))
  assert "[7] not saved" in line and "[1, 2]" in line
  assert "--tasks" in _error(capsys, selection.main([gate_run, "--tasks", "cwe"]))
  assert "--budgets" in _error(capsys, selection.main([gate_run, "--budgets", "1.5"]))
  assert "at least two" in _error(capsys, selection.main([gate_run, *ARGS, "--average", "2"]))
  assert "[9] not saved" in _error(capsys, selection.main([gate_run, *ARGS, "--average", "1,9"]))
  assert not os.path.exists(os.path.join(gate_run, "gates_selected"))
