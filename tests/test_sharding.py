"""Mesh, logical-to-mesh rules, and one sharded train step against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ag_jax
from ag_jax import sharding as sharding_lib
from ag_jax import train_step as step_lib
from ag_jax.config import ConfigError
from ag_jax.sharding import MeshConfig
from conftest import spread_variables


@pytest.fixture(scope="module")
def mesh222():
  return sharding_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def test_mesh_config_resolves_and_explains():
  assert MeshConfig().shape(8) == (8, 1, 1)
  assert MeshConfig(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
  assert MeshConfig(data=1, fsdp=-1, tensor=4).shape(8) == (1, 2, 4)
  with pytest.raises(ConfigError, match="uses 4 devices but 8 are available"):
    MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
  with pytest.raises(ConfigError, match="cannot fill 8 devices"):
    MeshConfig(data=-1, fsdp=3).shape(8)
  with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
    MeshConfig(data=-1, fsdp=-1).shape(8)
  with pytest.raises(ConfigError, match="mesh.tensor must be a positive integer"):
    MeshConfig(tensor=0).shape(8)


def test_make_mesh_axes(mesh222):
  assert mesh222.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh222.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding_lib.make_mesh().devices.size == jax.device_count()


def test_logical_rules_and_fallbacks(mesh222):
  to_mesh = sharding_lib.logical_to_mesh
  assert to_mesh(P("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8), mesh222) == \
      P(None, "fsdp", "tensor", None)
  assert to_mesh(P("embed", "mlp"), (32, 64), mesh222) == P("fsdp", "tensor")
  assert to_mesh(P("batch", None), (8, 16), mesh222) == P(("data", "fsdp"), None)
  # 259 (the byte vocab) does not divide by tensor=2: replicated on that dim only.
  assert to_mesh(P("vocab", "embed"), (259, 32), mesh222) == P(None, "fsdp")
  # Gate heads never split; a batch of 2 cannot split 4 ways.
  assert to_mesh(P("layers", "embed", "gate_heads", "gate_head_dim"), (2, 32, 2, 8), mesh222) == \
      P(None, "fsdp", None, None)
  assert to_mesh(P("batch", None), (2, 16), mesh222) == P(None, None)
  # Axes of size 1 are dropped, so a pure data-parallel mesh replicates every param.
  data_only = sharding_lib.make_mesh(MeshConfig())
  assert to_mesh(P("embed", "mlp"), (32, 64), data_only) == P(None, None)
  with pytest.raises(ValueError, match="no rule"):
    to_mesh(P("experts"), (4,), mesh222)


def test_llama2_7b_recipe_mesh_splits_every_large_weight():
  """The paper recipe's mesh (data=1, fsdp=-1) on 8 devices: each device holds ~1/8 of the
  7B params and gates (shapes only, nothing is allocated)."""
  from ag_jax.train_config import load_train_config
  cfg = load_train_config("configs/train/cpt_llama2_7b.yaml")
  model = ag_jax.Llama(ag_jax.config.preset("llama2_7b"), gate=cfg.gate)
  mesh = sharding_lib.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  shardings = sharding_lib.param_shardings(model, mesh)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
  abstract = jax.tree.map(lambda x: getattr(x, "value", x), abstract,
                          is_leaf=lambda x: hasattr(x, "value"))
  total = sum(x.size for x in jax.tree.leaves(abstract))
  per_device = sum(int(np.prod(s.shard_shape(x.shape))) for s, x in
                   zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)))
  assert 6.7e9 < total < 6.8e9
  assert per_device < 1.01 * total / 8
  gate_sh = shardings["layers"]["gate"]["q"]  # [layers, embed, gate_heads, gate_head_dim]
  assert gate_sh.spec == P(None, "fsdp", None, None)


def test_single_process_feeds_all_rows(mesh222):
  assert sharding_lib.process_batch_slice(mesh222, 8) == (0, 1)
  assert sharding_lib.data_parallel_processes(mesh222) == (0, 1)
  with pytest.raises(ConfigError, match="multiple of mesh data x fsdp"):
    sharding_lib.process_batch_slice(mesh222, 6)


def test_distributed_needs_all_three_flags(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
              "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert sharding_lib.maybe_initialize_distributed() is False  # one host: nothing to join
  with pytest.raises(ConfigError, match="go together"):
    sharding_lib.maybe_initialize_distributed(coordinator="localhost:1234")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert sharding_lib.distributed_environment()


# ---------------------------------------------------------------------------------------------
# One train step: (2, 2, 2) mesh of 8 devices == 1 device


def _batch(seed=0, b=8, t=16, vocab=64):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (b, t)).astype(np.int32)
  segment_ids = np.ones((b, t), np.int32)
  segment_ids[:, 9:] = 2          # two packed documents per row ...
  segment_ids[::2, 14:] = 0       # ... and padding on every other row
  positions = np.where(segment_ids == 2, np.arange(t) - 9, np.arange(t)).astype(np.int32)
  positions[segment_ids == 0] = 0
  targets = np.roll(tokens, -1, axis=1)
  loss_mask = ((segment_ids > 0) & (np.roll(segment_ids, -1, 1) == segment_ids)).astype(np.float32)
  loss_mask[:, -1] = 0
  return dict(tokens=tokens, targets=targets.astype(np.int32), positions=positions,
              segment_ids=segment_ids, loss_mask=loss_mask)


@pytest.fixture(scope="module")
def gated_model(tiny_cfg, tiny_gate):
  model = ag_jax.Llama(tiny_cfg, gate=tiny_gate)
  params = spread_variables(model, seed=0, scale=0.15)["params"]
  # Spread the gates too, with bias 0, so that flags differ between tokens and heads.
  rng = np.random.RandomState(7)
  params["layers"]["gate"] = jax.tree.map(
      lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32),
      params["layers"]["gate"])
  params["layers"]["gate"]["bias"] = jnp.zeros_like(params["layers"]["gate"]["bias"])
  return model, jax.device_get(params)


def _step_on(mesh, model, params, batch_np):
  tx, schedule = step_lib.make_optimizer(1e-2, total_steps=10)
  shardings = sharding_lib.param_shardings(model, mesh)
  trainable_sh, frozen_sh = step_lib.split_params(shardings, "gates")
  trainable, frozen = step_lib.split_params(params, "gates")
  trainable, frozen = jax.device_put(trainable, trainable_sh), jax.device_put(frozen, frozen_sh)
  replicated = sharding_lib.replicated(mesh)
  state_sh = step_lib.TrainState(replicated, trainable_sh, sharding_lib.optimizer_shardings(
      tx, trainable, trainable_sh, mesh))
  state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(trainable)
  batch = sharding_lib.global_batch(batch_np, mesh)
  batch_sh = sharding_lib.batch_sharding(mesh)
  grad_fn = jax.jit(jax.grad(step_lib.make_loss_fn(model, "gates"), has_aux=True),
                    in_shardings=(trainable_sh, frozen_sh, batch_sh),
                    out_shardings=(trainable_sh, replicated))
  grads, _ = grad_fn(trainable, frozen, batch)
  step = step_lib.jit_train_step(step_lib.make_train_step(model, tx, schedule), state_sh,
                                 frozen_sh, batch_sh, replicated)
  old_gate_leaf = state.trainable["q"]
  new_state, metrics = step(state, frozen, batch)
  return dict(grads=grads, metrics=metrics, state=new_state, frozen=frozen, batch=batch,
              old_gate_leaf=old_gate_leaf)


@pytest.fixture(scope="module")
def one_vs_eight(gated_model, mesh222):
  model, params = gated_model
  batch = _batch()
  one = sharding_lib.make_mesh(MeshConfig(), devices=jax.devices()[:1])
  return _step_on(one, model, params, batch), _step_on(mesh222, model, params, batch)


def test_sharded_step_equals_single_device(one_vs_eight):
  single, sharded = one_vs_eight
  m1, m8 = jax.device_get(single["metrics"]), jax.device_get(sharded["metrics"])
  assert 0.2 < float(m1["keep_ratio"]) < 0.8  # the flags really vary, so masking is exercised
  for key in ("loss", "lm_loss", "evict_loss", "keep_ratio", "grad_norm", "tokens"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(m8["keep_ratio_per_head"], m1["keep_ratio_per_head"], atol=1e-6)
  g1, g8 = jax.device_get(single["grads"]), jax.device_get(sharded["grads"])
  assert float(np.abs(g1["q"]).max()) > 1e-4  # gradients reach the gate's own projections
  for name in g1:
    np.testing.assert_allclose(g8[name], g1[name], rtol=1e-5, atol=1e-6, err_msg=name)
  s1, s8 = jax.device_get(single["state"].trainable), jax.device_get(sharded["state"].trainable)
  for name in s1:
    np.testing.assert_allclose(s8[name], s1[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_base_params_and_batch_are_really_sharded(one_vs_eight, tiny_cfg):
  sharded = one_vs_eight[1]
  frozen, batch = sharded["frozen"], sharded["batch"]
  q = frozen["layers"]["attn"]["q"]  # [layers, embed, heads, head_dim]: fsdp x tensor
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {
      (tiny_cfg.num_layers, tiny_cfg.dim // 2, tiny_cfg.num_heads // 2, tiny_cfg.head_dim)}
  wi = frozen["layers"]["mlp"]["wi_0"]
  assert {s.data.shape for s in wi.addressable_shards} == {
      (tiny_cfg.num_layers, tiny_cfg.dim // 2, tiny_cfg.mlp_dim // 2)}
  embed = frozen["embed"]  # [vocab 64, embed 32]
  assert {s.data.shape for s in embed.addressable_shards} == {(32, 16)}
  assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(2, 16)}  # 8 rows / 4
  # Optimizer moments are sharded exactly like the gates they follow.
  state = sharded["state"]
  adam = state.opt_state[1][0]
  for name, leaf in state.trainable.items():
    assert adam.mu[name].sharding == leaf.sharding == adam.nu[name].sharding, name
  assert state.trainable["q"].sharding.spec == P(None, "fsdp", None, None)


def test_train_state_is_donated(one_vs_eight):
  for result in one_vs_eight:
    assert result["old_gate_leaf"].is_deleted()  # updated in place, no second copy
