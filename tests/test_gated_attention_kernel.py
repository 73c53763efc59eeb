"""gated_attention_forward (the Pallas forward kernel) against a dense statement of the
semantics written here in numpy (float64).

The kernel class runs compiled on TPU and in Pallas interpret mode on CPU (BACKEND); the
TPU interpreter fills uninitialised buffers with NaN, so a scratch or output the kernel
forgot to write shows up in the comparison.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_attention_kernel import block_schedule, gated_attention_forward


def dense_reference(q, k, v, q_pos, k_pos, q_seg, k_seg, keep, window, scale):
  """The semantics with a [B, K, G, T, S] score matrix, in float64 numpy.

  q [B,T,K,G,H]; k, v [B,S,K,H]; keep [B,K,S] or None. Returns out [B,T,K,G,H], row_max,
  row_sum [B,K,G,T].
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  qp, kp = np.asarray(q_pos)[:, :, None], np.asarray(k_pos)[:, None, :]
  allowed = (kp <= qp) & (np.asarray(q_seg)[:, :, None] == np.asarray(k_seg)[:, None, :])
  if window is not None:
    allowed &= kp > qp - window
  diag = allowed & (kp == qp)  # [B,T,S]
  B, T, K, G, H = q.shape
  S = k.shape[1]
  keep = np.ones((B, K, S)) if keep is None else np.asarray(keep, np.float64)
  visible = allowed[:, None, None] & (diag[:, None, None] | (keep[:, :, None, None, :] > 0))
  logits = scale * np.einsum("btkgh,bskh->bkgts", q, k)  # [B,K,G,T,S]
  masked = np.where(visible, logits, -np.inf)
  any_visible = visible.any(-1)
  row_max = np.where(any_visible, masked.max(-1), 0.0)  # [B,K,G,T]
  p = np.where(visible, np.exp(logits - row_max[..., None]), 0.0)
  row_sum = p.sum(-1)
  out = np.einsum("bkgts,bskh->btkgh", p / np.where(row_sum > 0, row_sum, 1.0)[..., None], v)
  return out, row_max, row_sum


def make_inputs(seed, *, B, T, S, K, G, H, dtype, q_pos, k_pos, q_seg, k_seg, keep):
  """Random q, k, v in dtype (sharp logits so that a wrong mask shows) plus int32 arrays."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, K, G, H)) * 1.5, dtype)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  ints = [jnp.asarray(np.broadcast_to(x, shape), jnp.int32) for x, shape in
          ((q_pos, (B, T)), (k_pos, (B, S)), (q_seg, (B, T)), (k_seg, (B, S)))]
  if isinstance(keep, str):
    keep = {"ones": np.ones((B, K, S)), "zeros": np.zeros((B, K, S)),
            "random": rng.random((B, K, S)) < 0.5, "none": None}[keep]
  keep = None if keep is None else jnp.asarray(keep, jnp.float32)
  return (q, k, v, *ints, keep)


def packed_segments(rng, B, T, n_segments):
  """Training view of packed sequences: segment ids and positions restarting per segment."""
  seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(1, T), n_segments - 1, replace=False))
    seg[b] = np.searchsorted(cuts, np.arange(T), side="right")
    starts = np.concatenate([[0], cuts])[seg[b]]
    pos[b] = np.arange(T) - starts
  return pos, seg


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}  # bf16: p is rounded to bf16 for p @ v


class TestGatedAttentionKernel:
  BACKEND = "tpu" if jax.default_backend() == "tpu" else "interpret"

  def check(self, args, dtype, *, window=None, scale=None, block_q=16, block_k=16):
    q, k, v, qp, kp, qs, ks, keep = args
    H = q.shape[-1]
    scale_val = H ** -0.5 if scale is None else scale
    fn = jax.jit(functools.partial(gated_attention_forward, window=window, scale=scale,
                                   block_q=block_q, block_k=block_k, backend=self.BACKEND))
    with jax.default_matmul_precision("highest"):
      out, row_max, row_sum = fn(q, k, v, qp, kp, qs, ks, keep)
    want_out, want_max, want_sum = dense_reference(q, k, v, qp, kp, qs, ks, keep, window,
                                                   scale_val)
    assert out.shape == q.shape and out.dtype == q.dtype
    B, T, K, G, _ = q.shape
    assert row_max.shape == row_sum.shape == (B, K, G, T)
    assert row_max.dtype == row_sum.dtype == jnp.float32
    tol = TOL[dtype]
    out32 = np.asarray(out, np.float32)
    assert np.isfinite(out32).all()
    np.testing.assert_allclose(out32, want_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(row_max, want_max, rtol=tol, atol=tol)
    np.testing.assert_allclose(row_sum, want_sum, rtol=tol, atol=tol)
    # Rows that see nothing are exact zeros (out, max and sum).
    empty = want_sum == 0  # [B,K,G,T]
    assert (np.asarray(row_max)[empty] == 0).all() and (np.asarray(row_sum)[empty] == 0).all()
    assert (out32.transpose(0, 2, 3, 1, 4)[empty] == 0).all()
    return empty

  @pytest.mark.parametrize("G,keep,dtype", [(1, "random", jnp.float32),
                                            (4, "ones", jnp.float32),
                                            (8, "random", jnp.bfloat16),
                                            (4, "zeros", jnp.bfloat16),
                                            (4, "none", jnp.float32)])
  def test_training_view_gqa(self, G, keep, dtype):
    # T == S = 40: not a multiple of the 16-row blocks; positions 0..T-1, one segment.
    B, T, K, H = 2, 40, 2, 16
    pos = np.arange(T)
    args = make_inputs(G, B=B, T=T, S=T, K=K, G=G, H=H, dtype=dtype, q_pos=pos, k_pos=pos,
                       q_seg=0, k_seg=0, keep=keep)
    self.check(args, dtype)

  @pytest.mark.parametrize("window,keep", [(None, "random"), (5, "ones"), (12, "random")])
  def test_packed_segments_and_windows(self, window, keep):
    rng = np.random.default_rng(7)
    B, T, K, G, H = 2, 48, 2, 4, 8
    pos, seg = packed_segments(rng, B, T, 3)
    args = make_inputs(11, B=B, T=T, S=T, K=K, G=G, H=H, dtype=jnp.float32, q_pos=pos,
                       k_pos=pos, q_seg=seg, k_seg=seg, keep=keep)
    self.check(args, jnp.float32, window=window, block_q=16, block_k=16)

  @pytest.mark.parametrize("dtype,window", [(jnp.float32, None), (jnp.bfloat16, 9)])
  def test_prefill_chunk(self, dtype, window):
    # S = a 'cache' part (slots holding arbitrary earlier positions, unsorted, some slots
    # of another segment) plus the chunk itself; T != S, neither a block multiple.
    rng = np.random.default_rng(3)
    B, T, C, K, G, H = 2, 13, 21, 2, 4, 16
    start = 30
    q_pos = start + np.arange(T)[None].repeat(B, 0)
    cache_pos = rng.integers(0, start, (B, C))
    cache_seg = np.where(rng.random((B, C)) < 0.2, 5, 0)  # a few slots of another sequence
    k_pos = np.concatenate([cache_pos, q_pos], 1)
    k_seg = np.concatenate([cache_seg, np.zeros((B, T), int)], 1)
    keep = rng.random((B, K, C + T)) < 0.6
    args = make_inputs(5, B=B, T=T, S=C + T, K=K, G=G, H=H, dtype=dtype, q_pos=q_pos,
                       k_pos=k_pos, q_seg=0, k_seg=k_seg, keep=keep)
    self.check(args, dtype, window=window, block_q=16, block_k=16)

  def test_blocks_larger_than_axes_and_scale(self):
    # One block per axis (the wrapper shrinks the blocks), a custom scale, keep all 0.
    B, T, K, G, H = 1, 7, 2, 2, 8
    pos = np.arange(T)
    args = make_inputs(9, B=B, T=T, S=T, K=K, G=G, H=H, dtype=jnp.float32, q_pos=pos,
                       k_pos=pos, q_seg=0, k_seg=0, keep="zeros")
    self.check(args, jnp.float32, scale=0.7, block_q=128, block_k=128)

  def test_rows_that_see_nothing(self):
    # Queries of a segment no key has, and queries before every key: all-zero rows; other
    # rows mixed in the same blocks still match.
    B, T, S, K, G, H = 1, 20, 24, 2, 4, 8
    q_pos = np.arange(T) + 4
    q_seg = np.where(np.arange(T) % 3 == 0, 9, 0)
    k_pos = np.arange(S) + 10
    args = make_inputs(13, B=B, T=T, S=S, K=K, G=G, H=H, dtype=jnp.float32, q_pos=q_pos,
                       k_pos=k_pos, q_seg=q_seg, k_seg=0, keep="random")
    empty = self.check(args, jnp.float32)
    assert empty.any() and not empty.all()


def dense_block_allowed(q_pos, k_pos, q_seg, k_seg, window, bq, bk):
  """[B, n_q, n_k]: whether a block pair holds at least one allowed (i, j), in numpy."""
  qp, kp = q_pos[:, :, None], k_pos[:, None, :]
  allowed = (kp <= qp) & (q_seg[:, :, None] == k_seg[:, None, :])
  if window is not None:
    allowed &= kp > qp - window
  B, T, S = allowed.shape
  pad = np.zeros((B, -(-T // bq) * bq, -(-S // bk) * bk), bool)
  pad[:, :T, :S] = allowed
  return pad.reshape(B, pad.shape[1] // bq, bq, pad.shape[2] // bk, bk).any((2, 4))


def schedule(q_pos, k_pos, q_seg, k_seg, window, bq, bk):
  """block_schedule on padded inputs the way the wrapper pads them."""
  (B, T), S = q_pos.shape, k_pos.shape[1]
  Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
  pad = lambda x, n, c: np.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=c)  # noqa
  _, _, active, hull = block_schedule(
      jnp.asarray(pad(q_pos, Tp, 0)), jnp.asarray(pad(q_seg, Tp, 0)),
      jnp.asarray(pad(k_pos, Sp, 2**31 - 1)), jnp.asarray(pad(k_seg, Sp, -1)), T, S, bq,
      bk, window)
  return np.asarray(active), np.asarray(hull)


@pytest.mark.parametrize("case", ["causal", "packed", "window", "offset", "prefill"])
def test_block_schedule_is_sound_and_skips(case):
  # Every block pair holding an allowed pair is active (soundness); in the training view
  # the active set is exactly the blocks that hold an allowed pair (no wasted steps).
  rng = np.random.default_rng(1)
  B, T, bq, bk, window = 2, 70, 16, 16, None
  pos = np.arange(T)[None].repeat(B, 0)
  q_pos, k_pos, q_seg, k_seg = pos, pos, np.zeros_like(pos), np.zeros_like(pos)
  if case == "packed":
    q_pos, q_seg = packed_segments(rng, B, T, 4)
    k_pos, k_seg = q_pos, q_seg
  elif case == "window":  # 18: block pair (a, a - 2) holds exactly one pair in the window
    window = 18
  elif case == "offset":  # key block 0 starts at the query block's last position
    q_pos, k_pos = pos[:, :16], pos + 15
    q_seg = q_seg[:, :16]
  elif case == "prefill":
    cache = rng.integers(0, 50, (B, 40))
    q_pos = 50 + pos[:, :20]
    k_pos = np.concatenate([cache, q_pos], 1)
    q_seg, k_seg = np.zeros_like(q_pos), np.where(rng.random(k_pos.shape) < 0.1, 3, 0)
  active, hull = schedule(q_pos, k_pos, q_seg, k_seg, window, bq, bk)
  need = dense_block_allowed(q_pos, k_pos, q_seg, k_seg, window, bq, bk)
  assert (active >= need).all()
  if case in ("causal", "packed", "window", "offset"):
    np.testing.assert_array_equal(active, need)
  if case in ("causal", "window"):
    assert not active.all()  # the future (and the out-of-window past) is skipped
  # The K/V index maps name clamp(ki, first, last): the block index changes once per
  # key block of the hull, so steps outside the hull issue no copy.
  n_k = active.shape[-1]
  for b in range(B):
    for qb in range(active.shape[1]):
      first, last = hull[b, qb]
      steps = np.clip(np.arange(n_k), first, last)
      fetches = 1 + int((steps[1:] != steps[:-1]).sum())
      assert fetches == last - first + 1
      on = np.flatnonzero(active[b, qb])
      if on.size:
        assert (first, last) == (on[0], on[-1])


def test_tpu_block_size_check():
  sd = jax.ShapeDtypeStruct
  args = (sd((1, 256, 1, 1, 128), jnp.bfloat16), sd((1, 256, 1, 128), jnp.bfloat16),
          sd((1, 256, 1, 128), jnp.bfloat16)) + (sd((1, 256), jnp.int32),) * 4
  fn = functools.partial(gated_attention_forward, block_q=128, block_k=64, backend="tpu")
  with pytest.raises(ValueError, match="block_k"):
    jax.eval_shape(fn, *args)


@pytest.mark.parametrize("G,window,with_keep", [(1, None, True), (4, 128, True),
                                                (8, None, False)])
def test_kernel_lowers_for_tpu(G, window, with_keep):
  """Pallas -> Mosaic lowering (block shapes, ops) runs on CPU at training-like shapes;
  only the final Mosaic compile needs a TPU."""
  B, T, S, K, H = 1, 300, 300, 2, 128
  sd = jax.ShapeDtypeStruct
  args = [sd((B, T, K, G, H), jnp.bfloat16), sd((B, S, K, H), jnp.bfloat16),
          sd((B, S, K, H), jnp.bfloat16), sd((B, T), jnp.int32), sd((B, S), jnp.int32),
          sd((B, T), jnp.int32), sd((B, S), jnp.int32),
          sd((B, K, S), jnp.float32) if with_keep else None]
  fn = jax.jit(functools.partial(gated_attention_forward, window=window, backend="tpu"))
  text = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text
