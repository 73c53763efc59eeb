"""Blocked gated attention (pallas_kernels.gated_attention, the jnp scan with its
straight-through VJP) against the dense statement of the same function: values and the
gradients to q, k, v and the keep flags, on random shapes (GQA groups 1, 4, 8; packed
segments; gate windows; flags all kept, all evicted, mixed; fp32 and bf16; key blocks that
do not divide the sequence)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_attention, gated_attention_dense


def _inputs(seed, b, t, kv, g, h, dtype, keep_kind, packed):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, kv, g, h)) * 2, dtype)
  k = jnp.asarray(rng.normal(size=(b, t, kv, h)) * 2, dtype)
  v = jnp.asarray(rng.normal(size=(b, t, kv, h)), dtype)
  pos = np.broadcast_to(np.arange(t), (b, t)).copy()
  seg = np.ones((b, t), np.int32)
  if packed:  # two documents per row, positions restart in the second
    cut = t // 2 + 1
    seg[:, cut:] = 2
    pos[:, cut:] -= cut
  prob = {"mixed": rng.uniform(size=(b, kv, t)), "kept": np.full((b, kv, t), 0.9),
          "evicted": np.full((b, kv, t), 0.1)}[keep_kind]
  return q, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(seg), jnp.asarray(prob, jnp.float32)


def _straight_through(prob):
  return (prob > 0.5).astype(jnp.float32) + prob - jax.lax.stop_gradient(prob)


CASES = [  # (group, keep, packed, window, dtype)
    (1, "mixed", False, None, jnp.float32),
    (4, "kept", True, None, jnp.float32),
    (8, "evicted", False, 5, jnp.float32),
    (4, "mixed", True, 7, jnp.float32),
    (4, "mixed", False, None, jnp.bfloat16),
    (8, "kept", True, 6, jnp.bfloat16),
]


@pytest.mark.parametrize("group,keep_kind,packed,window,dtype", CASES)
def test_blocked_equals_dense_values_and_gradients(group, keep_kind, packed, window, dtype):
  q, k, v, pos, seg, prob = _inputs(group, 2, 29, 2, group, 8, dtype, keep_kind, packed)
  weights = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)

  def loss(fn, **kw):
    def f(q, k, v, prob):
      out = fn(q, k, v, pos, pos, seg, seg, _straight_through(prob), window=window, **kw)
      return jnp.sum(out.astype(jnp.float32) * weights), out
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, prob)

  with jax.default_matmul_precision("highest"):
    (_, want), want_grads = loss(gated_attention_dense)
    (_, got), got_grads = loss(gated_attention, block_k=8)  # 29 keys: a ragged last block
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol, rtol=tol)
  for name, g_got, g_want in zip("qkvp", got_grads, want_grads):
    g_got, g_want = np.asarray(g_got, np.float32), np.asarray(g_want, np.float32)
    scale = max(np.abs(g_want).max(), 1.0)  # all-evicted rows: q gets exactly 0
    assert np.abs(g_got - g_want).max() / scale < (1e-5 if dtype == jnp.float32 else 6e-2), name
  if keep_kind == "evicted":  # every non-diagonal key masked: only the diagonal is read
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.broadcast_to(v[:, :, :, None], q.shape)),
                               atol=1e-6)
  assert np.abs(np.asarray(got_grads[3])).max() > 0  # the flags get a gradient


def test_prefill_chunk_shape_equals_dense():
  """Queries of a chunk over [cache slots with earlier positions ; the chunk itself]."""
  rng = np.random.default_rng(3)
  b, t, s_cache, kv, g, h = 2, 6, 9, 2, 4, 8
  q = jnp.asarray(rng.normal(size=(b, t, kv, g, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, s_cache + t, kv, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s_cache + t, kv, h)), jnp.float32)
  q_pos = jnp.broadcast_to(jnp.arange(20, 20 + t), (b, t)).astype(jnp.int32)
  k_pos = jnp.concatenate([jnp.asarray(rng.integers(0, 20, size=(b, s_cache)), jnp.int32), q_pos], 1)
  q_seg, k_seg = jnp.ones((b, t), jnp.int32), jnp.ones((b, s_cache + t), jnp.int32)
  keep = jnp.asarray(rng.uniform(size=(b, kv, s_cache + t)) > 0.4, jnp.float32)
  with jax.default_matmul_precision("highest"):
    want = gated_attention_dense(q, k, v, q_pos, k_pos, q_seg, k_seg, keep)
    got = gated_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, keep, block_k=4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
