"""compact: the jnp reference against a numpy loop, the kernel against the reference.

The kernel class runs compiled on TPU/GPU and in Pallas interpret mode on CPU (BACKEND).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import compact, compact_reference, resolve_backend
from pallas_kernels.compact import compaction_plan


def platform_backend() -> str:
  """The kernel backend this machine runs: compiled on accelerators, interpreted on CPU."""
  return {"tpu": "tpu", "gpu": "gpu"}.get(jax.default_backend(), "interpret")


def numpy_compact(score, keep, capacity, slots, row_capacity=None):
  """The rule, loop by loop: returns src [B,H,slots] (-1 past length) and length [B,H].
  row_capacity [B]: batch row b's own capacity (the static one when None)."""
  B, H, T = keep.shape
  src = np.full((B, H, slots), -1, np.int64)
  length = np.zeros((B, H), np.int64)
  for b in range(B):
    cap = capacity if row_capacity is None else int(row_capacity[b])
    for h in range(H):
      kept = [t for t in range(T) if keep[b, h, t]]
      if len(kept) > cap:  # best scores; Python compares -0.0 == 0.0, then t
        kept = sorted(sorted(kept, key=lambda t: (-score[b, h, t], t))[:cap])
      src[b, h, :len(kept)] = kept
      length[b, h] = len(kept)
  return src, length


def make_inputs(seed, B, H, T, D, dtype, keep_prob, score_levels=3):
  """k, v [B,H,T,D]; score [B,H,T] with few distinct values (ties); keep [B,H,T]."""
  rng = np.random.default_rng(seed)
  k = jnp.asarray(rng.standard_normal((B, H, T, D)), dtype)
  v = jnp.asarray(rng.standard_normal((B, H, T, D)), dtype)
  score = jnp.asarray(rng.integers(0, score_levels, (B, H, T)), jnp.float32)
  keep = jnp.asarray(rng.random((B, H, T)) < keep_prob)
  return k, v, score, keep


@functools.cache
def jitted_reference(capacity, slots):
  return jax.jit(functools.partial(compact_reference, capacity=capacity, slots=slots))


@settings(max_examples=25, deadline=None)
@given(capacity=st.sampled_from([1, 3, 7, 12, 14]), extra_slots=st.sampled_from([0, 2]),
       data=st.data())
def test_reference_matches_numpy_loop(capacity, extra_slots, data):
  # One token shape (12 tokens, 2x3 rows) and few capacities keep compiles rare; the
  # contents (flags, tied scores including -0.0 vs 0.0) are what hypothesis explores.
  B, H, T = 2, 3, 12
  slots = capacity + extra_slots
  keep = np.array(data.draw(st.lists(st.booleans(), min_size=B * H * T,
                                     max_size=B * H * T))).reshape(B, H, T)
  score = np.array(data.draw(st.lists(st.sampled_from([-1.0, -0.0, 0.0, 0.5, 2.0]),
                                      min_size=B * H * T, max_size=B * H * T)),
                   np.float32).reshape(B, H, T)
  k = np.arange(B * H * T * 2, dtype=np.float32).reshape(B, H, T, 2)
  src, length = numpy_compact(score, keep, capacity, slots)
  k_out, v_out, s_out, got_src, got_len = jitted_reference(capacity, slots)(
      jnp.asarray(k), jnp.asarray(-k), jnp.asarray(score), jnp.asarray(keep))
  np.testing.assert_array_equal(got_src, src)
  np.testing.assert_array_equal(got_len, length)
  valid = src >= 0  # [B,H,slots]
  idx = np.maximum(src, 0)
  want_k = np.take_along_axis(k, idx[..., None], axis=2)
  np.testing.assert_array_equal(np.asarray(k_out)[valid], want_k[valid])
  np.testing.assert_array_equal(np.asarray(v_out)[valid], -want_k[valid])
  np.testing.assert_array_equal(np.asarray(s_out)[valid],
                                np.take_along_axis(score, idx, axis=2)[valid])


def test_row_capacity_caps_each_batch_row_as_its_own_capacity():
  # Three rows of one batch, one static capacity (8 slots), limits 8 / 3 / 1: each row is
  # what the numpy rule gives with that row's capacity, the kernel equal to the reference.
  B, H, T, capacity = 3, 2, 12, 8
  k, v, score, keep = make_inputs(7, B=B, H=H, T=T, D=8, dtype=jnp.float32, keep_prob=0.8,
                                  score_levels=3)
  limits = np.array([8, 3, 1], np.int32)
  src, length = numpy_compact(np.asarray(score), np.asarray(keep), capacity, capacity + 1,
                              limits)
  assert len(set(length.ravel())) > 1  # the limits bind differently per row
  want = jax.jit(functools.partial(compact_reference, capacity=capacity))(
      k, v, score, keep, row_capacity=jnp.asarray(limits))
  np.testing.assert_array_equal(want[3], src)
  np.testing.assert_array_equal(want[4], length)
  got = jax.jit(functools.partial(compact, capacity=capacity,
                                  backend=platform_backend()))(
      k, v, score, keep, row_capacity=jnp.asarray(limits))
  np.testing.assert_array_equal(got[3], src)
  np.testing.assert_array_equal(got[4], length)
  valid = src >= 0  # [B,H,slots]
  for g, w in zip(got[:3], want[:3]):  # k, v, score of the kept slots
    np.testing.assert_array_equal(np.asarray(g)[valid], np.asarray(w)[valid])
  with pytest.raises(ValueError, match="row_capacity must have shape"):
    compact_reference(k, v, score, keep, capacity, row_capacity=jnp.ones((2,), jnp.int32))


def test_plan_handles_slots_beyond_tokens():
  # capacity and slots larger than T: every kept token fits, the tail is -1.
  keep = jnp.array([[[True, False, True]]])
  src, length = compaction_plan(jnp.zeros((1, 1, 3)), keep, capacity=6, slots=8)
  np.testing.assert_array_equal(src, [[[0, 2, -1, -1, -1, -1, -1, -1]]])
  np.testing.assert_array_equal(length, [[2]])


class TestCompactKernel:
  BACKEND = platform_backend()

  def run(self, k, v, score, keep, capacity, *, slots=None, out=None, block_slots=None):
    if self.BACKEND == "tpu" and block_slots and block_slots % 128:
      pytest.skip(f"block_slots {block_slots} is not a TPU block size")
    fn = functools.partial(compact, capacity=capacity, slots=slots, backend=self.BACKEND,
                           block_slots=block_slots)
    return jax.jit(fn)(k, v, score, keep, out=out)

  def check(self, k, v, score, keep, capacity, *, slots=None, block_slots=None):
    """Runs the kernel into NaN-poisoned buffers and compares with the reference."""
    B, H, T, D = k.shape
    n = capacity + 1 if slots is None else slots
    poison = (jnp.full((B, H, n, D), jnp.nan, k.dtype), jnp.full((B, H, n, D), jnp.nan, v.dtype),
              jnp.full((B, H, n), jnp.nan, jnp.float32))
    got = self.run(k, v, score, keep, capacity, slots=slots, out=poison,
                   block_slots=block_slots)
    want = jitted_reference(capacity, n)(k, v, score, keep)
    np.testing.assert_array_equal(got[3], want[3])  # src
    np.testing.assert_array_equal(got[4], want[4])  # length
    valid = np.asarray(want[3]) >= 0  # [B,H,slots]: slots < length
    for g, w in zip(got[:3], want[:3]):
      g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
      assert np.isfinite(g[valid]).all(), "a slot < length was not written"
      np.testing.assert_array_equal(g[valid], w[valid])  # data movement is exact
      assert np.isnan(g[~valid]).all(), "a slot >= length was written"
    return got

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_random_rows(self, dtype):
    k, v, score, keep = make_inputs(0, B=2, H=3, T=24, D=16, dtype=dtype, keep_prob=0.5)
    self.check(k, v, score, keep, capacity=10)

  def test_nothing_kept(self):
    k, v, score, keep = make_inputs(1, B=2, H=2, T=16, D=8, dtype=jnp.float32, keep_prob=0.0)
    got = self.check(k, v, score, keep, capacity=8)
    assert (np.asarray(got[4]) == 0).all()

  def test_everything_kept_fits(self):
    k, v, score, keep = make_inputs(2, B=1, H=2, T=12, D=8, dtype=jnp.float32, keep_prob=1.0)
    got = self.check(k, v, score, keep, capacity=12, slots=16)
    np.testing.assert_array_equal(got[0][:, :, :12], k)

  def test_overflow_with_ties(self):
    # Everything kept, 2 score levels: the kernel must take the earliest of the tied.
    # 40 rows per program also run the TPU kernel's DMA window (32 in flight) full circle.
    k, v, score, keep = make_inputs(3, B=2, H=2, T=64, D=16, dtype=jnp.bfloat16,
                                    keep_prob=1.0, score_levels=2)
    got = self.check(k, v, score, keep, capacity=40)
    assert (np.asarray(got[4]) == 40).all()

  def test_capacity_one_single_row(self):
    k, v, score, keep = make_inputs(4, B=1, H=1, T=10, D=8, dtype=jnp.float32, keep_prob=0.7)
    self.check(k, v, score, keep, capacity=1)

  def test_many_slot_blocks_and_ragged_lengths(self):
    # block_slots=4 splits the 21 slots into 6 grid steps; rows of very different lengths
    # exercise the clamped index map for blocks past a row's length.
    k, v, score, keep = make_inputs(5, B=2, H=4, T=40, D=32, dtype=jnp.float32,
                                    keep_prob=0.4)
    keep = keep.at[0, 0].set(False).at[1, 3].set(True)
    got = self.check(k, v, score, keep, capacity=20, slots=21, block_slots=4)
    assert set(np.asarray(got[4]).ravel()) >= {0, 20}

  def test_without_out_buffers(self):
    k, v, score, keep = make_inputs(6, B=2, H=2, T=16, D=8, dtype=jnp.float32, keep_prob=0.6)
    got = self.run(k, v, score, keep, capacity=6)
    want = jitted_reference(6, 7)(k, v, score, keep)
    valid = np.asarray(want[3]) >= 0
    for g, w in zip(got[:3], want[:3]):
      np.testing.assert_array_equal(np.asarray(g)[valid], np.asarray(w)[valid])


@pytest.mark.parametrize("backend,platform,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("gpu", "cuda", "mosaic_gpu")])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_lowers_for_accelerator(backend, platform, marker, D):
  """Pallas -> Mosaic lowering (block shapes, layouts, ops) runs on this CPU-only machine
  at cache-like shapes; only the final Mosaic/XLA compile needs the accelerator."""
  B, H, T, capacity = 2, 4, 1000, 600  # 601 slots: two ragged TPU slot blocks
  sd = jax.ShapeDtypeStruct
  args = (sd((B, H, T, D), jnp.bfloat16),) * 2 + (sd((B, H, T), jnp.float32),
                                                  sd((B, H, T), jnp.bool_))
  bufs = (sd((B, H, capacity + 1, D), jnp.bfloat16),) * 2 + (sd((B, H, capacity + 1),
                                                               jnp.float32),)
  for out in (None, bufs):
    fn = jax.jit(lambda k, v, s, kp, out: compact(k, v, s, kp, capacity, out=out,
                                                  backend=backend, block_slots=512),
                 donate_argnums=4)
    text = fn.trace(*args, out).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text


def test_resolve_backend(monkeypatch):
  monkeypatch.delenv("AG_JAX_KERNEL_BACKEND", raising=False)
  auto = {"tpu": "tpu"}.get(jax.default_backend(), "reference")
  assert resolve_backend(None) == resolve_backend("auto") == auto
  assert resolve_backend("interpret") == "interpret"
  monkeypatch.setenv("AG_JAX_KERNEL_BACKEND", "gpu")
  assert resolve_backend(None) == "gpu"
  assert resolve_backend("reference") == "reference"  # an explicit name wins
  with pytest.raises(ValueError, match="interpret"):
    resolve_backend("cuda")
  monkeypatch.setenv("AG_JAX_KERNEL_BACKEND", "triton")
  with pytest.raises(ValueError):
    resolve_backend(None)
