"""Gate-only training: the trainable filter, the optimizer state, the tiny recipe, resume,
and pretraining a base model with trainable=all."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ag_jax
from ag_jax import train_step as step_lib
from ag_jax.train import train
from ag_jax.train_config import load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "train", "tiny.yaml")
# The tiny recipe shrunk further, so that one run compiles and trains in seconds.
SMALL = ["model.overrides={num_layers: 2, dim: 32, mlp_dim: 64, head_dim: 8, num_heads: 4, "
         "num_kv_heads: 2}", "gate.num_heads=2", "gate.head_dim=8", "data.source=recall:doc_len=60",
         "data.seq_len=64", "data.batch_size=8", "run.progress=false", "run.eval_batches=1"]


def _size(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def model_and_params(tiny_cfg, tiny_gate):
  model = ag_jax.Llama(tiny_cfg, gate=tiny_gate)
  return model, ag_jax.init_variables(model, jax.random.key(0))["params"]


def _batch(b=4, t=32, vocab=64):
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, vocab, (b, t)), jnp.int32)
  return dict(tokens=tokens, targets=jnp.roll(tokens, -1, 1),
              positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
              segment_ids=jnp.ones((b, t), jnp.int32), loss_mask=jnp.ones((b, t)))


def test_split_and_merge_params(model_and_params):
  _, params = model_and_params
  gates, frozen = step_lib.split_params(params, "gates")
  assert gates is params["layers"]["gate"] and "gate" not in frozen["layers"]
  assert set(frozen["layers"]) == {"attn", "attn_norm", "mlp", "mlp_norm"}
  merged = step_lib.merge_params(gates, frozen, "gates")
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  everything, nothing = step_lib.split_params(params, "all")
  assert everything is params and nothing == {}


def test_optimizer_state_holds_gate_leaves_only(model_and_params):
  _, params = model_and_params
  gates, frozen = step_lib.split_params(params, "gates")
  tx, _ = step_lib.make_optimizer(1e-3, total_steps=10, weight_decay=0.1)
  opt_state = tx.init(gates)
  # Adam's two moments over the gates, plus a few scalar counters: about 2x, never the base.
  ratio = _size(opt_state) / _size(gates)
  # The 1% slack is smaller than any base leaf (the smallest, a norm scale, is 2% here).
  assert 2.0 <= ratio < 2.01, ratio
  assert min(_size(x) for x in jax.tree.leaves(frozen)) > 0.01 * _size(gates)
  mu = opt_state[1][0].mu  # clip state, then (adam, mask, schedule)
  assert jax.tree.structure(mu) == jax.tree.structure(gates)


def test_step_changes_gates_only_and_skips_weight_gradients(model_and_params):
  model, params = model_and_params
  batch = _batch()
  flops = {}
  for kind in ("gates", "all"):
    tx, schedule = step_lib.make_optimizer(1e-2, total_steps=10)
    trainable, frozen = step_lib.split_params(params, kind)
    state = step_lib.init_state(trainable, tx)
    step = jax.jit(step_lib.make_train_step(model, tx, schedule, kind))
    lowered = step.lower(state, frozen, batch)
    cost = lowered.cost_analysis()  # of the program as traced, before XLA optimises it
    flops[kind] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    if kind == "gates":
      frozen_before = jax.device_get(frozen)
      new_state, metrics = lowered.compile()(state, frozen, batch)
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), frozen_before)
      changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                             new_state.trainable, params["layers"]["gate"])
      assert all(jax.tree.leaves(changed)), changed
      assert int(new_state.step) == 1 and math.isfinite(float(metrics["loss"]))
      np.testing.assert_allclose(float(metrics["loss"]),
                                 float(metrics["lm_loss"]) + float(metrics["evict_loss"]), rtol=1e-6)
  # No weight gradients of the frozen base are even traced: the gate step does clearly less.
  assert flops["gates"] < 0.85 * flops["all"], flops


def test_schedule_warms_up_then_decays():
  _, schedule = step_lib.make_optimizer(1.0, total_steps=110, warmup=10, end_lr_fraction=0.1)
  lrs = np.array([float(schedule(s)) for s in range(111)])
  np.testing.assert_allclose(lrs[[0, 5, 10]], [0.0, 0.5, 1.0], atol=1e-6)
  assert np.all(np.diff(lrs[10:]) <= 1e-7)
  np.testing.assert_allclose(lrs[110], 0.1, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Whole runs (in process, on the 8 simulated devices)


def test_tiny_recipe_loss_falls_and_keep_ratio_reaches_target(tmp_path):
  # The recipe's own model, shortened: fewer steps at a higher learning rate.
  cfg = load_train_config(RECIPE, [
      f"run.out_dir={tmp_path}", "run.steps=60", "run.log_every=10", "run.eval_every=0",
      "optim.lr=1e-2", "data.seq_len=128", "data.source=recall:doc_len=100",
      "run.eval_batches=1", "run.progress=false", "checkpoint.every=0"])
  result = train(cfg)
  losses = [h["loss"] for h in result.history]
  keeps = [h["keep_ratio"] for h in result.history]
  print("tiny recipe (step, loss, keep):",
        [(h["step"], round(h["loss"], 4), round(h["keep_ratio"], 3)) for h in result.history])
  assert keeps[0] == 1.0  # an untrained gate keeps everything
  assert losses[-1] < losses[0] - 0.1
  # The loss steers the mean probability; the hard ratio follows it within a few percent.
  assert abs(np.mean(keeps[-2:]) - cfg.gate.target_keep) < 0.1
  assert abs(result.eval_history[-1]["keep_ratio"] - cfg.gate.target_keep) < 0.15
  per_layer = result.history[-1]["keep_ratio_per_layer"]
  assert len(per_layer) == 2 and all(0.3 < k < 0.7 for k in per_layer)
  # Outputs: gates, metrics, TensorBoard events.
  gate_cfg, gates = ag_jax.load_gates(os.path.join(tmp_path, "gates"))
  assert gate_cfg == cfg.gate
  np.testing.assert_array_equal(gates["q"], result.trainable["q"])
  kinds = [json.loads(line)["kind"] for line in open(tmp_path / "metrics.jsonl")]
  assert kinds.count("train") == 6 and kinds.count("eval") == 1
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def _checkpoint_json(ckpt_dir, step, item):
  from ag_jax.checkpoint import TrainCheckpointer
  import orbax.checkpoint as ocp
  manager = TrainCheckpointer(str(ckpt_dir), every=1, keep=5).manager
  return manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]


def test_resume_continues_exactly(tmp_path):
  common = SMALL + ["run.steps=6", "run.log_every=1", "optim.warmup=2", "optim.lr=1e-2",
                    "data.eval_split=null", "checkpoint.every=3", "checkpoint.keep=5",
                    "checkpoint.async_save=true"]
  straight = train(load_train_config(RECIPE, common + [f"run.out_dir={tmp_path / 'a'}"]))
  # A second run starts from the straight run's step-3 checkpoint, with fresh objects.
  os.makedirs(tmp_path / "b" / "checkpoints")
  shutil.copytree(tmp_path / "a" / "checkpoints" / "3", tmp_path / "b" / "checkpoints" / "3")
  resumed = train(load_train_config(RECIPE, common + [f"run.out_dir={tmp_path / 'b'}"]))
  assert [h["step"] for h in resumed.history] == [4, 5, 6]
  for a, b in zip(straight.history[3:], resumed.history):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
    np.testing.assert_allclose(b["keep_ratio_per_head"], a["keep_ratio_per_head"], atol=1e-7)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, atol=1e-6),
               straight.trainable, resumed.trainable)
  # The data order continued too: both runs end with the same iterator state.
  state_a = _checkpoint_json(tmp_path / "a" / "checkpoints", 6, "data")
  state_b = _checkpoint_json(tmp_path / "b" / "checkpoints", 6, "data")
  assert state_a == state_b and state_a["step"] == 6
  assert _checkpoint_json(tmp_path / "b" / "checkpoints", 6, "config")["run"]["steps"] == 6


def test_trainable_all_pretrains_a_base_model(tmp_path):
  cfg = load_train_config(RECIPE, SMALL + [
      f"run.out_dir={tmp_path}", "gate=null", "run.trainable=all", "run.steps=30", "run.remat=full",
      "run.log_every=10", "optim.lr=1e-2", "optim.warmup=5", "data.eval_split=null",
      "checkpoint.every=0"])
  result = train(cfg)
  lm = [h["lm_loss"] for h in result.history]
  assert lm[0] > 4.5 and lm[-1] < lm[0] - 1.0, lm  # from ~log(259) toward byte statistics
  assert result.gates_dir is None and "evict_loss" not in result.history[0]
  model_cfg, loaded = ag_jax.load_hf_llama(result.model_dir)
  assert model_cfg.dim == 32 and model_cfg.num_layers == 2 and model_cfg.vocab_size == 259
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), x, atol=1e-6),
               result.trainable, loaded)
