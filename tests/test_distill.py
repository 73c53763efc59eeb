"""Distillation to the full cache (`GateConfig.distill_weight`): the chunked KL against a
numpy statement, and the training loss's KL term against the KL between the logits of the
gated model and of the same base with no gate (nothing evicted), both from `Llama.apply`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ag_jax
from ag_jax import losses
from ag_jax import train_step as step_lib
from conftest import spread_variables, token_batch


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_kl(teacher_logits, student_logits, mask) -> float:
  """sum_t w_t KL(softmax(teacher_t) || softmax(student_t)) / sum_t w_t, in float64."""
  log_p = _log_softmax(np.asarray(teacher_logits, np.float64))
  log_q = _log_softmax(np.asarray(student_logits, np.float64))
  kl = np.sum(np.exp(log_p) * (log_p - log_q), -1)  # [B, T]
  m = np.asarray(mask, np.float64)
  return float(np.sum(kl * m) / max(m.sum(), 1.0))


@pytest.mark.parametrize("chunk", [1, 5, 12, None])  # T = 12
def test_chunked_kl_matches_numpy_and_the_teacher_gets_no_gradient(chunk):
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 12, 6)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 12, 6)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(2, 12)) * 3 * (rng.uniform(size=(2, 12)) > 0.3), jnp.float32)
  with jax.default_matmul_precision("highest"):
    kl, grads = jax.value_and_grad(losses.distill_kl_chunked, argnums=(0, 1))(
        hidden, teacher, head, mask, chunk)
  want = _numpy_kl(np.asarray(teacher) @ np.asarray(head), np.asarray(hidden) @ np.asarray(head),
                   mask)
  assert want > 0.1
  np.testing.assert_allclose(float(kl), want, rtol=1e-5)
  assert float(jnp.max(jnp.abs(grads[0]))) > 0 and float(jnp.max(jnp.abs(grads[1]))) == 0.0
  assert float(jnp.max(jnp.abs(grads[0] * (mask == 0)[..., None]))) == 0.0  # masked: no push
  zero = losses.distill_kl_chunked(hidden, teacher, head, jnp.zeros_like(mask), chunk)
  assert float(zero) == 0.0
  same = losses.distill_kl_chunked(hidden, hidden, head, mask, chunk)
  assert abs(float(same)) < 1e-6


def _weighted_batch():
  batch = token_batch()
  answers = np.arange(batch["tokens"].shape[1]) % 3 == 0  # every third position weighs 10
  batch["loss_mask"] = batch["loss_mask"] * jnp.where(answers, 10.0, 1.0)
  return batch


@pytest.mark.parametrize("init_keep_prob", [0.5, 0.95])
def test_loss_adds_the_kl_to_the_base_without_eviction(tiny_cfg, init_keep_prob):
  """The loss with distill_weight mu is the loss without it + mu x KL(no-gate logits ||
  gated logits); the gradient of that term reaches the gates when tokens are evicted, and
  vanishes when every flag keeps (the gated view is then the full cache)."""
  gate = ag_jax.GateConfig(num_heads=2, head_dim=8, init_keep_prob=init_keep_prob, window=None)
  mu = 0.7
  model = ag_jax.Llama(tiny_cfg, gate=dataclasses.replace(gate, distill_weight=mu))
  plain = ag_jax.Llama(tiny_cfg, gate=gate)
  params = spread_variables(model, seed=3)["params"]
  batch = _weighted_batch()
  trainable, frozen = step_lib.split_params(params, "gates")
  with jax.default_matmul_precision("highest"):
    student, (_, flags) = model.apply({"params": params}, batch["tokens"], batch["positions"],
                                      batch["segment_ids"], return_gates=True)
    teacher = ag_jax.Llama(tiny_cfg).apply({"params": frozen}, batch["tokens"],
                                           batch["positions"], batch["segment_ids"])
    (got, metrics), got_g = jax.value_and_grad(step_lib.make_loss_fn(model, "gates", 5),
                                               has_aux=True)(trainable, frozen, batch)
    (base, _), base_g = jax.value_and_grad(step_lib.make_loss_fn(plain, "gates", 5),
                                           has_aux=True)(trainable, frozen, batch)
  want_kl = _numpy_kl(teacher, student, batch["loss_mask"])
  np.testing.assert_allclose(float(metrics["distill_kl"]), want_kl, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(got), float(base) + mu * want_kl, rtol=1e-5)
  valid = np.asarray(batch["segment_ids"] > 0)[None, :, None, :]
  kl_grad = max(float(jnp.max(jnp.abs(g - b)))
                for g, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(base_g)))
  if init_keep_prob == 0.95:  # every flag keeps: the student is the teacher
    assert np.asarray(flags)[np.broadcast_to(valid, flags.shape)].all()
    assert want_kl < 1e-9 and kl_grad < 1e-6
  else:
    assert not np.asarray(flags)[np.broadcast_to(valid, flags.shape)].all()
    assert want_kl > 1e-3 and kl_grad > 1e-4


def test_distillation_off_budget_covers_only_the_rows_with_no_capacity(tiny_cfg):
  """gate.distill_under_budget=false: the KL is taken on the positions that train with no
  capacity (row 1 here, budget 1 drawn), where the view is the plain gated one; the row
  under a capacity (row 0) adds none. With it true, row 0 counts too."""
  gate = ag_jax.GateConfig(num_heads=2, head_dim=8, init_keep_prob=0.5, window=None,
                           train_budgets=(0.25, 1.0))
  mu = 0.7
  only = ag_jax.Llama(tiny_cfg, gate=dataclasses.replace(gate, distill_weight=mu,
                                                           distill_under_budget=False))
  every = ag_jax.Llama(tiny_cfg, gate=dataclasses.replace(gate, distill_weight=mu))
  params = spread_variables(only, seed=3)["params"]
  batch = _weighted_batch()
  batch["context_length"] = jnp.full(batch["tokens"].shape, 8, jnp.int32)
  batch["context_capacity"] = jnp.asarray([[2], [0]], jnp.int32) * jnp.ones_like(
      batch["context_length"])  # row 0: 2 of its 8 context tokens; row 1: no capacity
  trainable, frozen = step_lib.split_params(params, "gates")
  with jax.default_matmul_precision("highest"):
    plain_view = ag_jax.Llama(tiny_cfg, gate=gate).apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    teacher = ag_jax.Llama(tiny_cfg).apply({"params": frozen}, batch["tokens"],
                                           batch["positions"], batch["segment_ids"])
    _, got = step_lib.make_loss_fn(only, "gates", 5)(trainable, frozen, batch)
    _, wider = step_lib.make_loss_fn(every, "gates", 5)(trainable, frozen, batch)
  row_1 = batch["loss_mask"] * jnp.asarray([[0.0], [1.0]])
  want = _numpy_kl(teacher, plain_view, row_1)
  assert want > 1e-3
  np.testing.assert_allclose(float(got["distill_kl"]), want, rtol=1e-4)
  np.testing.assert_allclose(float(got["loss"]), float(got["lm_loss"]) + mu * want
                             + gate.eviction_weight * float(got["evict_loss"]), rtol=1e-5)
  assert abs(float(wider["distill_kl"]) - want) > 1e-4  # row 0 counts there


def test_distillation_refuses_a_trained_teacher(tiny_cfg):
  model = ag_jax.Llama(tiny_cfg, gate=ag_jax.GateConfig(num_heads=2, head_dim=8,
                                                         distill_weight=1.0))
  with pytest.raises(ValueError, match="trainable='gates'"):
    step_lib.make_loss_fn(model, "all")
