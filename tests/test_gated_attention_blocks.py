"""Blocked gated attention over several query blocks and key blocks (ragged last blocks,
skipped blocks) and under the model's remat policies, against the dense statement
(`gated_attention_dense`): values and the gradients to q, k, v and the keep flags."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_attention, gated_attention_dense

REMAT = {"full": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.checkpoint_dots,
         "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


def _inputs(seed, b, t, s, kv, g, h, packed):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, kv, g, h)) * 2, jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, s, kv, h)) * 2, jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, kv, h)), jnp.float32)
  pos = np.broadcast_to(np.arange(t), (b, t)).copy()
  seg = np.ones((b, t), np.int32)
  if packed:
    seg[:, 11:] = 2
    pos[:, 11:] -= 11
  prob = jnp.asarray(rng.uniform(size=(b, kv, s)), jnp.float32)
  return q, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(seg), prob


def _st(prob):
  return (prob > 0.5).astype(jnp.float32) + prob - jax.lax.stop_gradient(prob)


def _value_and_grads(fn, q, k, v, q_pos, k_pos, q_seg, k_seg, prob, weights, wrap=None, **kw):
  def f(q, k, v, prob):
    out = fn(q, k, v, q_pos, k_pos, q_seg, k_seg, _st(prob), **kw)
    return out

  if wrap is not None:
    f = jax.checkpoint(f, policy=wrap, prevent_cse=False)
  loss = lambda *a: (jnp.sum(f(*a) * weights), f(*a))
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, prob)


def _assert_close(got, want, tol=1e-5):
  (_, out_got), grads_got = got
  (_, out_want), grads_want = want
  np.testing.assert_allclose(np.asarray(out_got), np.asarray(out_want), atol=tol, rtol=tol)
  for name, g, w in zip("qkvp", grads_got, grads_want):
    g, w = np.asarray(g), np.asarray(w)
    assert np.abs(w).max() > 0, name
    assert np.abs(g - w).max() / max(np.abs(w).max(), 1.0) < tol, name


@pytest.mark.parametrize("block_q,block_k,packed,window", [
    (5, 8, False, None), (8, 4, True, None), (4, 7, False, 6), (29, 3, True, 5), (1, 29, False, None)])
def test_query_and_key_blocks_equal_dense(block_q, block_k, packed, window):
  q, k, v, pos, seg, prob = _inputs(0, 2, 29, 29, 2, 4, 8, packed)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  args = (q, k, v, pos, pos, seg, seg, prob, weights)
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(gated_attention_dense, *args, window=window)
    got = _value_and_grads(gated_attention, *args, window=window, block_q=block_q,
                           block_k=block_k)
    dense_backend = _value_and_grads(gated_attention, *args, window=window, backend="dense")
  _assert_close(got, want)
  _assert_close(dense_backend, want, tol=1e-7)


def test_prefill_chunk_over_cache_slots_in_any_order_with_blocks():
  """Keys at arbitrary earlier positions (a compacted cache) then the chunk: the position
  skip must never drop a block that holds a visible key."""
  rng = np.random.default_rng(3)
  b, t, s_cache, kv, g, h = 2, 9, 13, 2, 2, 8
  q = jnp.asarray(rng.normal(size=(b, t, kv, g, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, s_cache + t, kv, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s_cache + t, kv, h)), jnp.float32)
  q_pos = jnp.broadcast_to(jnp.arange(30, 30 + t), (b, t)).astype(jnp.int32)
  cache_pos = jnp.asarray(rng.permutation(30)[:s_cache][None].repeat(b, 0), jnp.int32)
  k_pos = jnp.concatenate([cache_pos, q_pos], 1)
  q_seg, k_seg = jnp.ones((b, t), jnp.int32), jnp.ones((b, s_cache + t), jnp.int32)
  prob = jnp.asarray(rng.uniform(size=(b, kv, s_cache + t)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  args = (q, k, v, q_pos, k_pos, q_seg, k_seg, prob, weights)
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(gated_attention_dense, *args, window=12)
    got = _value_and_grads(gated_attention, *args, window=12, block_q=4, block_k=5)
  _assert_close(got, want)


@pytest.mark.parametrize("policy", sorted(REMAT))
def test_under_remat_policies_equal_dense(policy):
  q, k, v, pos, seg, prob = _inputs(2, 1, 29, 29, 2, 2, 8, True)
  weights = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)
  args = (q, k, v, pos, pos, seg, seg, prob, weights)
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(gated_attention_dense, *args)
    got = jax.jit(lambda *a: _value_and_grads(gated_attention, *a, wrap=REMAT[policy],
                                              block_q=8, block_k=8))(*args)
  _assert_close(got, want)


@pytest.mark.parametrize("policy", [None, "dots"])
def test_backward_program_holds_no_score_matrix(policy):
  """The compiled gradient program's temporaries stay below a quarter of one [T, S] fp32
  score matrix (one head), also under a remat policy that saves dots: before query blocks
  and the opaque forward, checkpoint_dots saved the forward's logits for all blocks."""
  t, h = 4096, 64
  shapes = [jax.ShapeDtypeStruct(s, d) for s, d in (
      ((1, t, 1, 1, h), jnp.float32), ((1, t, 1, h), jnp.float32), ((1, t, 1, h), jnp.float32),
      ((1, 1, t), jnp.float32), ((1, t), jnp.int32), ((1, t), jnp.int32))]

  def attn(q, k, v, keep, pos, seg):
    return gated_attention(q, k, v, pos, pos, seg, seg, keep)  # default blocks (512)

  if policy:
    attn = jax.checkpoint(attn, policy=REMAT[policy], prevent_cse=False)
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(attn(*a)), argnums=(0, 1, 2, 3)))
  temp = grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes
  assert temp < t * t * 4 / 4, temp


def test_default_blocks_are_balanced_and_exact():
  """Past the largest block, the default blocks split T evenly (T = 520: two blocks of 264,
  not 512 + a padded 512), and the result is still the dense statement's."""
  from pallas_kernels.gated_attention import DEFAULT_BLOCK_Q, _balanced_block
  assert _balanced_block(520, DEFAULT_BLOCK_Q) == 264
  assert _balanced_block(1088, 512) == 368 and _balanced_block(4096, 512) == 512
  assert all(_balanced_block(n, 512) % 8 == 0 and
             -(-n // _balanced_block(n, 512)) == -(-n // 512) for n in range(1, 3000, 7))
  q, k, v, pos, seg, prob = _inputs(5, 1, 520, 520, 1, 1, 8, packed=True)
  weights = jnp.asarray(np.random.default_rng(6).normal(size=q.shape), jnp.float32)
  got = _value_and_grads(gated_attention, q, k, v, pos, pos, seg, seg, prob, weights,
                         backend="reference")
  want = _value_and_grads(gated_attention_dense, q, k, v, pos, pos, seg, seg, prob, weights)
  _assert_close(got, want)
