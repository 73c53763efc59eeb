"""The chunked LM loss (`losses.lm_loss_chunked`) against the dense statement: the same loss
and the same gradients (to the hidden states, the output projection and, through a tiny
model's training step, the gate parameters), with masks and chunks that do and do not
divide the sequence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ag_jax
from ag_jax import losses
from ag_jax import train_step as step_lib
from conftest import token_batch


def _case(seed=0, b=2, t=12, e=6, v=11):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(b, t, e)) * 2, jnp.float32)
  head = jnp.asarray(rng.normal(size=(e, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = jnp.asarray(rng.uniform(size=(b, t)) > 0.3, jnp.float32)
  return hidden, head, targets, mask


def _dense(hidden, head, targets, mask):
  logits = jnp.einsum("BTE,EV->BTV", hidden, head, preferred_element_type=jnp.float32)
  return losses.lm_loss(logits, targets, mask)


def _numpy_loss(hidden, head, targets, mask):
  logits = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)  # [B, T, V]
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  nll = log_z - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  m = np.asarray(mask, np.float64)
  return np.sum(nll * m) / max(m.sum(), 1.0)


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 7, 12, 40, None])  # T = 12
def test_chunked_equals_dense_loss_and_gradients(chunk):
  hidden, head, targets, mask = _case()
  with jax.default_matmul_precision("highest"):
    (want, want_n), want_g = jax.value_and_grad(_dense, argnums=(0, 1), has_aux=True)(
        hidden, head, targets, mask)
    (got, got_n), got_g = jax.value_and_grad(
        lambda h, w, y, m: losses.lm_loss_chunked(h, w, y, m, chunk), argnums=(0, 1),
        has_aux=True)(hidden, head, targets, mask)
  np.testing.assert_allclose(float(got), _numpy_loss(hidden, head, targets, mask), rtol=1e-6)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert float(got_n) == float(want_n) == float(np.sum(np.asarray(mask)))
  for name, g, w in zip(("hidden", "head"), got_g, want_g):
    assert float(jnp.max(jnp.abs(w))) > 0, name
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-6, err_msg=name)
  # masked positions get exactly no gradient
  assert float(jnp.max(jnp.abs(got_g[0] * (1 - mask)[..., None]))) == 0.0


def test_chunked_ignores_masked_positions_and_all_masked_is_zero():
  hidden, head, targets, mask = _case(seed=1)
  poisoned = jnp.where(mask[..., None] > 0, hidden, 1e30)  # masked rows: inf logits
  loss, _ = losses.lm_loss_chunked(poisoned, head, targets, mask, 5)
  want, _ = _dense(hidden, head, targets, mask)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  zero, n = losses.lm_loss_chunked(hidden, head, targets, jnp.zeros_like(mask), 5)
  assert float(zero) == 0.0 and float(n) == 0.0


def test_chunked_backward_never_holds_whole_logits():
  """The compiled gradient program's temporaries stay below one [B, T, V] fp32 array."""
  b, t, e, v = 1, 2048, 16, 4096
  shapes = [jax.ShapeDtypeStruct(s, d) for s, d in
            (((b, t, e), jnp.float32), ((e, v), jnp.float32), ((b, t), jnp.int32),
             ((b, t), jnp.float32))]
  grad = jax.jit(jax.grad(lambda *a: losses.lm_loss_chunked(*a, 128)[0], argnums=(0, 1)))
  temp = grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes
  assert temp < b * t * v * 4 / 4, temp


@pytest.mark.parametrize("tie", [False, True])
def test_train_loss_fn_equals_dense_logits_loss_and_gate_gradients(tiny_cfg, tiny_gate, tie):
  """make_loss_fn (chunked, via training_forward) against the model's own logits (`apply`)
  + the dense lm_loss: loss, metrics and gradients w.r.t. the gates (and, trainable=all,
  every parameter), chunks 4 (T = 13: ragged) and 13."""
  cfg = dataclasses.replace(tiny_cfg, tie_embeddings=tie)
  model = ag_jax.Llama(cfg, gate=tiny_gate)
  params = ag_jax.init_variables(model, jax.random.key(1))["params"]
  batch = token_batch()

  def dense_loss(trainable_params, frozen, kind):
    p = step_lib.merge_params(trainable_params, frozen, kind)
    logits, (probs, _) = model.apply({"params": p}, batch["tokens"], batch["positions"],
                                     batch["segment_ids"], return_gates=True)
    lm, _ = losses.lm_loss(logits, batch["targets"], batch["loss_mask"])
    evict = losses.eviction_loss(probs, batch["segment_ids"] > 0, tiny_gate)
    return lm + tiny_gate.eviction_weight * evict, lm

  with jax.default_matmul_precision("highest"):
    for kind in ("gates", "all"):
      trainable, frozen = step_lib.split_params(params, kind)
      (want, want_lm), want_g = jax.value_and_grad(dense_loss, has_aux=True)(trainable, frozen,
                                                                             kind)
      for chunk in (4, 13):
        loss_fn = step_lib.make_loss_fn(model, kind, loss_chunk=chunk)
        (got, metrics), got_g = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen,
                                                                          batch)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["lm_loss"]), float(want_lm), rtol=1e-6)
        leaves_got, leaves_want = jax.tree.leaves(got_g), jax.tree.leaves(want_g)
        assert len(leaves_got) == len(leaves_want)
        assert max(float(jnp.max(jnp.abs(w))) for w in leaves_want) > 0
        for g, w in zip(leaves_got, leaves_want):
          np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-6)
