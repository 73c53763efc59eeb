"""Training checkpoints (orbax) and the gate export (safetensors + JSON)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import ag_jax
from ag_jax import checkpoint as ckpt_lib
from ag_jax import sharding as sharding_lib
from ag_jax import train_step as step_lib
from ag_jax.hf_checkpoint import CheckpointError
from ag_jax.sharding import MeshConfig


@pytest.fixture(scope="module")
def trained_gates(tiny_cfg, tiny_gate):
  """Gate params that differ from their init (so a loader returning the init would fail)."""
  model = ag_jax.Llama(tiny_cfg, gate=tiny_gate)
  params = ag_jax.init_variables(model, jax.random.key(0))["params"]
  rng = np.random.RandomState(0)
  gates = jax.tree.map(lambda x: np.asarray(x) + rng.standard_normal(x.shape).astype(np.float32),
                       params["layers"]["gate"])
  return model, params, gates


def test_export_and_load_round_trip(tmp_path, tiny_cfg, tiny_gate, trained_gates):
  model, params, gates = trained_gates
  path = ag_jax.export_gates(str(tmp_path / "gates"), tiny_gate, tiny_cfg, gates)
  assert sorted(os.listdir(path)) == ["gate_config.json", "gates.safetensors"]
  with safe_open(os.path.join(path, "gates.safetensors"), "numpy") as f:
    assert sorted(f.keys()) == ["layers.gate.bias", "layers.gate.k", "layers.gate.out",
                                "layers.gate.q", "layers.gate.v"]
  meta = json.load(open(os.path.join(path, "gate_config.json")))
  assert meta["target_keep"] == tiny_gate.target_keep and meta["model"]["dim"] == tiny_cfg.dim

  gate_cfg, loaded = ag_jax.load_gates(path, model_cfg=tiny_cfg)
  assert gate_cfg == tiny_gate
  jax.tree.map(np.testing.assert_array_equal, loaded, gates)
  # The loaded gates drive the model exactly as the originals do.
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 64, (2, 10)))
  with_original = {**params, "layers": {**params["layers"], "gate": gates}}
  with_loaded = {**params, "layers": {**params["layers"], "gate": loaded}}
  _, (p1, f1) = model.apply({"params": with_original}, tokens, return_gates=True)
  _, (p2, f2) = model.apply({"params": with_loaded}, tokens, return_gates=True)
  np.testing.assert_array_equal(np.asarray(p1), np.asarray(p2))
  assert 0 < float(np.mean(np.asarray(f1))) < 1  # the perturbed gates evict some tokens


def test_load_rejects_another_model(tmp_path, tiny_cfg, tiny_gate, trained_gates):
  path = ag_jax.export_gates(str(tmp_path / "gates"), tiny_gate, tiny_cfg, trained_gates[2])
  other = dataclasses.replace(tiny_cfg, rope_theta=500000.0, num_layers=3)
  with pytest.raises(CheckpointError, match="trained for a different model: num_layers: "
                     "gates trained for 2, model has 3; rope_theta"):
    ag_jax.load_gates(path, model_cfg=other)
  # dtype and max_position do not change what a gate computes.
  ag_jax.load_gates(path, model_cfg=dataclasses.replace(tiny_cfg, max_position=64, dtype="bfloat16"))


def test_load_rejects_tensors_that_do_not_fit_their_config(tmp_path, tiny_cfg, tiny_gate, trained_gates):
  path = ag_jax.export_gates(str(tmp_path / "gates"), tiny_gate, tiny_cfg, trained_gates[2])
  meta_file = os.path.join(path, "gate_config.json")
  meta = json.load(open(meta_file))
  json.dump({**meta, "num_heads": 4}, open(meta_file, "w"))
  with pytest.raises(CheckpointError, match=r"layers.gate.q has shape \(2, 32, 2, 8\), expected "
                     r"\(2, 32, 4, 8\)"):
    ag_jax.load_gates(path)
  with pytest.raises(CheckpointError, match="does not exist"):
    ag_jax.load_gates(str(tmp_path / "nowhere"))
  with pytest.raises(CheckpointError, match="do not match the gate config"):
    bad = dict(trained_gates[2], q=np.zeros((2, 32, 3, 8), np.float32))
    ag_jax.export_gates(str(tmp_path / "bad"), tiny_gate, tiny_cfg, bad)
  assert not os.path.exists(tmp_path / "bad")


def test_failed_export_leaves_the_previous_one_whole(tmp_path, monkeypatch, tiny_cfg, tiny_gate,
                                                     trained_gates):
  gates = trained_gates[2]
  path = ag_jax.export_gates(str(tmp_path / "gates"), tiny_gate, tiny_cfg, gates)
  import safetensors.numpy

  def crash(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
      f.write(b"half a file")
    raise OSError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save_file", crash)
  zeros = jax.tree.map(np.zeros_like, gates)
  with pytest.raises(OSError, match="disk full"):
    ag_jax.export_gates(path, tiny_gate, tiny_cfg, zeros)
  assert os.listdir(tmp_path) == ["gates"]  # no temp dir left behind
  _, loaded = ag_jax.load_gates(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, gates)


def test_train_checkpoint_round_trip_keeps_last_n(tmp_path, tiny_cfg, tiny_gate, trained_gates):
  model, _, gates = trained_gates
  mesh = sharding_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  gate_sh = sharding_lib.param_shardings(model, mesh)["layers"]["gate"]
  tx, _ = step_lib.make_optimizer(1e-3, total_steps=10)
  state_sh = step_lib.TrainState(sharding_lib.replicated(mesh), gate_sh,
                                 sharding_lib.optimizer_shardings(tx, gates, gate_sh, mesh))
  init = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)
  checkpointer = ckpt_lib.TrainCheckpointer(str(tmp_path / "ckpt"), every=1, keep=2)
  states = {}
  for step in range(1, 5):
    shifted = jax.tree.map(lambda x: x + step, gates)
    state = init(jax.device_put(shifted, gate_sh)).replace(step=jnp.asarray(step, jnp.int32))
    states[step] = jax.device_get(state)
    checkpointer.save(step, state, {"step": step, "rows": {"0": {"cursor": step}}},
                      {"run": {"steps": 4}})
  checkpointer.wait()
  assert checkpointer.all_steps() == [3, 4] and checkpointer.latest_step() == 4
  restored, data_state, config = checkpointer.restore(4, ckpt_lib.abstract_like(state))
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), states[4])
  assert int(restored.step) == 4
  assert restored.trainable["q"].sharding == state.trainable["q"].sharding  # placed as asked
  assert data_state == {"step": 4, "rows": {"0": {"cursor": 4}}} and config == {"run": {"steps": 4}}
