"""decode_attention: the jnp reference against a numpy loop, the kernel against the reference.

The kernel class runs compiled on TPU/GPU and in Pallas interpret mode on CPU (BACKEND).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention, decode_attention_reference
from pallas_kernels.backend import clamp_block


def platform_backend() -> str:
  """The kernel backend this machine runs: compiled on accelerators, interpreted on CPU."""
  return {"tpu": "tpu", "gpu": "gpu"}.get(jax.default_backend(), "interpret")


def numpy_decode(q, k, v, length, scale):
  """float64 loop: out [B,H,G,D] and mass [B,H,S] over slots [0, length) only."""
  B, H, G, D = q.shape
  S = k.shape[2]
  out, mass = np.zeros((B, H, G, D)), np.zeros((B, H, S))
  for b in range(B):
    for h in range(H):
      n = int(length[b, h])
      for g in range(G):
        if n == 0:
          continue
        logits = [scale * float(np.dot(q[b, h, g], k[b, h, j])) for j in range(n)]
        w = np.exp(np.array(logits) - max(logits))
        p = w / w.sum()
        out[b, h, g] = p @ v[b, h, :n]
        mass[b, h, :n] += p
  return out, mass


def make_inputs(seed, B, H, G, S, D, dtype, lengths):
  """q [B,H,G,D]; k, v [B,H,S,D] with NaN / inf garbage in slots >= length; length [B,H]."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, H, G, D)) * 1.5  # sharp enough that a wrong mask shows
  k = rng.standard_normal((B, H, S, D))
  v = rng.standard_normal((B, H, S, D))
  length = np.asarray(lengths, np.int32).reshape(B, H)
  garbage = np.arange(S) >= length[..., None]  # [B,H,S]
  k_bad = np.where(garbage[..., None], np.nan, k)
  v_bad = np.where(garbage[..., None], np.inf, v)
  as_dtype = lambda x: jnp.asarray(x, dtype)  # noqa: E731
  clean = tuple(np.asarray(as_dtype(x), np.float64) for x in (q, k, v))  # rounded to dtype
  return (as_dtype(q), as_dtype(k_bad), as_dtype(v_bad), jnp.asarray(length)), clean


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("G,lengths", [(1, [0, 5, 16, 9]), (4, [16, 1, 3, 12]),
                                       (8, [7, 0, 16, 16])])
def test_reference_matches_numpy_loop(G, lengths):
  (q, k, v, length), (qc, kc, vc) = make_inputs(G, 2, 2, G, 16, 8, jnp.float32, lengths)
  out, mass = decode_attention_reference(q, k, v, length, return_mass=True)
  want_out, want_mass = numpy_decode(qc, kc, vc, np.asarray(length), scale=8**-0.5)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mass, want_mass, rtol=1e-5, atol=1e-5)


def test_reference_reads_the_given_layer_of_a_stack():
  (q, k, v, length), _ = make_inputs(3, 2, 2, 4, 16, 8, jnp.float32, [3, 16, 0, 9])
  k_all = jnp.stack([k * 0 + 7.0, k, -k])  # [L=3, B, H, S, D]
  v_all = jnp.stack([v * 0 - 7.0, v, -v])
  fn = jax.jit(functools.partial(decode_attention_reference, return_mass=True))
  for layer in (1, 2):
    got = fn(q, k_all, v_all, length, layer=jnp.int32(layer))
    want = fn(q, k_all[layer], v_all[layer], length)
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_layer_argument_shape_checks():
  (q, k, v, length), _ = make_inputs(4, 1, 2, 1, 8, 8, jnp.float32, [8, 8])
  with pytest.raises(ValueError, match="shape mismatch"):
    decode_attention(q, k, v, length, layer=0, backend="reference")  # k is not stacked
  with pytest.raises(ValueError, match="shape mismatch"):
    decode_attention(q, k[None], v[None], length, backend="reference")  # stacked, no layer


class TestDecodeAttentionKernel:
  BACKEND = platform_backend()

  def run(self, q, k, v, length, *, block_size=None, num_splits=None, return_mass=True,
          scale=None):
    S = k.shape[2]
    if self.BACKEND == "gpu":
      block_size = None  # the GPU kernel has one tile height (64)
    if self.BACKEND == "tpu" and block_size not in (None, S) and block_size % (
        128 if return_mass else 8):
      pytest.skip(f"block_size {block_size} is not a TPU block size")
    fn = functools.partial(decode_attention, block_size=block_size, num_splits=num_splits,
                           return_mass=return_mass, scale=scale, backend=self.BACKEND)
    return jax.jit(fn)(q, k, v, length)

  def check(self, q, k, v, length, dtype, **kwargs):
    """Kernel vs reference on inputs with NaN/inf in slots >= length.

    The TPU interpreter starts every VMEM buffer as NaN and reuses it across grid steps,
    so a partial result the kernel forgot to write shows up as NaN or as another row's
    numbers, which the comparison catches.
    """
    got_out, got_mass = self.run(q, k, v, length, **kwargs)
    want_out, want_mass = jax.jit(functools.partial(
        decode_attention_reference, return_mass=True))(q, k, v, length)
    tol = TOL[dtype]
    assert got_out.dtype == q.dtype and got_mass.dtype == jnp.float32
    assert np.isfinite(np.asarray(got_out, np.float32)).all(), "garbage leaked into out"
    np.testing.assert_allclose(np.asarray(got_out, np.float32),
                               np.asarray(want_out, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(got_mass, want_mass, rtol=tol, atol=tol)
    # Per query head the probabilities sum to 1: the mass of a row sums to G (0 if empty),
    # and slots >= length carry exactly none.
    n, G = np.asarray(length), q.shape[2]
    np.testing.assert_allclose(np.asarray(got_mass).sum(-1), np.where(n > 0, G, 0),
                               rtol=1e-4)
    assert (np.asarray(got_mass)[np.arange(k.shape[2]) >= n[..., None]] == 0).all()
    np.testing.assert_array_equal(np.asarray(got_out)[n == 0], 0)

  @pytest.mark.parametrize("G,dtype", [(1, jnp.float32), (4, jnp.bfloat16),
                                       (4, jnp.float32), (8, jnp.bfloat16)])
  def test_gqa_groups_and_dtypes(self, G, dtype):
    # block_size 16 does not divide S=40 nor most lengths; 2 splits; lengths 0 and S.
    (q, k, v, length), _ = make_inputs(10 + G, 2, 2, G, 40, 16, dtype, [0, 40, 23, 5])
    self.check(q, k, v, length, dtype, block_size=16, num_splits=2)

  @pytest.mark.parametrize("block_size,num_splits", [(None, None), (8, 3), (16, 1),
                                                      (24, 2), (8, 8)])
  def test_blocks_and_splits(self, block_size, num_splits):
    # Splits past a row's length see no valid block at all and must merge in as nothing.
    (q, k, v, length), _ = make_inputs(20, 2, 3, 2, 64, 32, jnp.float32,
                                       [0, 64, 1, 33, 17, 8])
    self.check(q, k, v, length, jnp.float32, block_size=block_size, num_splits=num_splits)

  def test_single_row_without_mass(self):
    (q, k, v, length), _ = make_inputs(30, 1, 1, 1, 24, 8, jnp.float32, [24])
    got = self.run(q, k, v, length, return_mass=False, scale=0.3)
    want = decode_attention_reference(q, k, v, length, scale=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  @pytest.mark.parametrize("layer", [0, 2])
  def test_stacked_layer_read_in_place(self, layer):
    # The other layers hold NaN/inf: reading any slot of them would show in the result.
    (q, k, v, length), _ = make_inputs(40 + layer, 2, 2, 4, 40, 16, jnp.float32,
                                       [0, 40, 23, 5])
    k_all = jnp.full((3,) + k.shape, jnp.nan, k.dtype).at[layer].set(k)
    v_all = jnp.full((3,) + v.shape, jnp.inf, v.dtype).at[layer].set(v)
    block_size = None if self.BACKEND == "gpu" else 16
    fn = jax.jit(functools.partial(decode_attention, return_mass=True, block_size=block_size,
                                   num_splits=2, backend=self.BACKEND))
    got_out, got_mass = fn(q, k_all, v_all, length, layer=jnp.int32(layer))  # traced layer
    want_out, want_mass = decode_attention_reference(q, k, v, length, return_mass=True)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_mass, want_mass, rtol=1e-5, atol=1e-5)

  def test_empty_row_gives_zeros(self):
    (q, k, v, length), _ = make_inputs(31, 1, 1, 4, 24, 8, jnp.bfloat16, [0])
    out, mass = self.run(q, k, v, length, num_splits=2)
    assert (np.asarray(out, np.float32) == 0).all() and (np.asarray(mass) == 0).all()


@pytest.mark.parametrize("backend,platform,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("gpu", "cuda", "mosaic_gpu")])
@pytest.mark.parametrize("G,D", [(1, 128), (4, 64), (8, 128)])
def test_kernel_lowers_for_accelerator(backend, platform, marker, G, D):
  """Pallas -> Mosaic lowering (block shapes, layouts, ops) runs on this CPU-only machine
  at cache-like shapes; only the final Mosaic/XLA compile needs the accelerator."""
  B, H, S = 2, 2, 1025  # capacity 1024 + the spare slot: a ragged last block
  sd = jax.ShapeDtypeStruct
  args = (sd((B, H, G, D), jnp.bfloat16), sd((B, H, S, D), jnp.bfloat16),
          sd((B, H, S, D), jnp.bfloat16), sd((B, H), jnp.int32))
  stacked = (sd((3, B, H, S, D), jnp.bfloat16),) * 2  # [L, B, H, S, D] read at a traced layer
  for return_mass in (False, True):
    fn = jax.jit(functools.partial(decode_attention, return_mass=return_mass,
                                   num_splits=2, backend=backend))
    text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text
    text = fn.trace(args[0], *stacked, args[3], layer=sd((), jnp.int32)).lower(
        lowering_platforms=(platform,)).as_text()
    assert marker in text


@pytest.mark.parametrize("length", [0, 1, 16, 17, 40, 64])
def test_skipped_blocks_are_not_fetched(length):
  # Pallas copies a block only when its index changes between consecutive grid steps.
  # Over a row's (split, block) steps the clamped K/V index must change exactly once per
  # valid block, whatever the split layout.
  block_size, splits, per_split = 16, 3, 2  # 6 steps cover 96 >= 64 slots
  steps = [int(clamp_block(s * per_split + i, length, block_size))
           for s in range(splits) for i in range(per_split)]
  fetches = 1 + sum(a != b for a, b in zip(steps, steps[1:]))
  assert fetches == max(-(-length // block_size), 1)
  assert steps[:fetches] == list(range(fetches))
