"""`python -m ag_jax.evaluation.checkpoint_selection`: a gate run's checkpoints scored on the
validation split, the best exported.

A two-step run of the shipped gate recipe on the embedded base saves both steps. The scores
are checked against `python -m ag_jax.evaluate` on the exported gates (an independent path:
the gate export, the loader and the evaluation CLI), the export against train.py's own export
of the last step and the choice against the rule (highest mean, ties to the later step)."""

import json
import os

import jax
import numpy as np
import pytest

import ag_jax
from ag_jax import default_world, evaluate
from ag_jax.checkpoint import TrainCheckpointer
from ag_jax.evaluation import checkpoint_selection as selection
from ag_jax.train import train
from ag_jax.train_config import load_train_config
from test_cli_errors import _error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(default_world.ASSET_DIR, "model")
ARGS = ["--lengths", "256", "--budgets", "1,0.25", "--num-examples", "2",
        "--tasks", "niah_multikey"]


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
  assert selection.main([gate_run, *ARGS, "--out", out]) == 0
  with open(os.path.join(out, "selection.json")) as f:
    return out, json.load(f)


def test_every_saved_step_is_scored_and_the_best_chosen(selected):
  _, sel = selected
  assert [r["step"] for r in sel["steps"]] == [1, 2]
  assert sel["split"] == "validation" and sel["protocol"] == "kvpress"
  for r in sel["steps"]:
    assert set(r["cells"]) == {"niah_multikey@256 b1", "niah_multikey@256 b0.25"}
    assert r["mean_accuracy"] == pytest.approx(np.mean(list(r["cells"].values())))
  best = max(sel["steps"], key=lambda r: (r["mean_accuracy"], r["step"]))
  assert sel["chosen_step"] == best["step"]


def test_choose_takes_the_highest_mean_and_the_later_step_on_a_tie():
  rows = [{"step": 100, "mean_accuracy": 0.8}, {"step": 200, "mean_accuracy": 0.9},
          {"step": 300, "mean_accuracy": 0.9}, {"step": 400, "mean_accuracy": 0.7}]
  assert selection.choose(rows)["step"] == 300
  assert selection.choose(rows[:2] + rows[3:])["step"] == 200


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
  jax.tree.map(np.testing.assert_array_equal, steps[sel["chosen_step"]], exported)


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
  assert not os.path.exists(os.path.join(gate_run, "gates_selected"))
