"""Decode attention: one query token per sequence over a ragged, GQA-shaped KV cache.

Each (batch, KV head) row attends over its slots [0, length); slots >= length hold garbage
(possibly NaN/inf) and never touch the result. The G query heads that share a KV head are
processed together, so K/V are read once per KV head, and never repeated.

Kernel plan (TPU, also run interpreted on CPU): grid (B, Hkv, num_splits, blocks_per_split).
Blocks past a row's length are skipped: the K/V index maps clamp to the row's last valid
block, so the pipeline sees an unchanged block index and issues no DMA, and `pl.when` skips
the compute. Each split runs an online softmax and writes partial (max, sum, acc); XLA
merges the splits with a log-sum-exp merge.

Attention mass (for H2O): the kernel also writes the masked, scaled logits [B,Hkv,G,S]
(G*S*4 bytes, ~1/16 of the K bytes at G=4, D=128 bf16 — cheaper than a second pass that
re-reads K), and XLA turns them into probabilities with the merged max and sum.

The Mosaic GPU version (`_gpu_body`, opt-in) follows the same plan with one CTA per
(b, h, split) and a loop over the split's valid blocks; it shares the XLA merge.

Stacked caches: with `layer=l`, k and v are the whole [L,B,Hkv,S,D] buffers of a model's
cache and the kernels read layer l in place (its index is a prefetched scalar that the
K/V index maps / loads use), so a decode step does not first copy the layer out of the
stack with a dynamic slice (a read and a write of the layer's K/V per step).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import clamp_block, gpu_kernel, resolve_backend, tpu_call_kwargs

_TPU_BLOCK = 512  # slots per step; must be a multiple of 128 or all of S on TPU
_GPU_BLOCK = 64  # rows of a WGMMA-layout tile (the register layout needs a multiple of 64)
_HIGHEST = lax.Precision.HIGHEST  # fp32 matmuls on the TPU MXU must not drop to bf16


def decode_attention_reference(q, k, v, length, *, scale=None, return_mass=False, layer=None):
  """Pure-jnp decode attention; defines the semantics. Shapes as in `decode_attention`."""
  if layer is not None:  # XLA may fuse this slice into its consumers (or copy the layer)
    k = lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)
    v = lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)
  D, S = q.shape[-1], k.shape[2]
  scale = 1.0 / math.sqrt(D) if scale is None else scale
  valid = jnp.arange(S) < length[..., None]  # [B,H,S]
  logits = jnp.einsum("BHGD,BHSD->BHGS", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=_HIGHEST) * scale  # [B,H,G,S]
  logits = jnp.where(valid[:, :, None], logits, -jnp.inf)  # also drops NaN garbage
  m = logits.max(-1, keepdims=True)  # [B,H,G,1]; -inf for an empty row
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))  # [B,H,G,S], 0 where invalid
  l = p.sum(-1, keepdims=True)
  probs = p / jnp.where(l > 0, l, 1.0)  # empty row -> all zeros
  v_clean = jnp.where(valid[..., None], v.astype(jnp.float32), 0.0)  # 0 * NaN is NaN
  out = jnp.einsum("BHGS,BHSD->BHGD", probs, v_clean, precision=_HIGHEST).astype(q.dtype)
  return (out, probs.sum(2)) if return_mass else out  # mass [B,H,S]


def _tpu_kernel(len_ref, layer_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *logits_ref,
                scale: float, block_size: int, blocks_per_split: int):
  """One (b, h, split, block) step. q [G,D]; k, v [bs,D]; m, l [G,1]; acc [G,D] (f32).

  layer_ref [1] (SMEM) is only read by the K/V index maps.

  m/l/acc are the split's output blocks: their index does not change along the block
  axis, so they stay in VMEM and serve as the online-softmax accumulators.
  """
  b, h, s, i = (pl.program_id(a) for a in range(4))
  length = len_ref[b, h]
  start = (s * blocks_per_split + i) * block_size  # first slot of this block

  @pl.when(i == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(start < length)
  def _step():
    q = q_ref[...].astype(jnp.float32)  # [G,D]
    k = k_ref[...].astype(jnp.float32)  # [bs,D]
    logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                             preferred_element_type=jnp.float32) * scale  # [G,bs]
    col = start + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    logits = jnp.where(col < length, logits, -jnp.inf)  # [G,bs]
    if logits_ref:
      logits_ref[0][...] = logits
    row = start + lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
    v = jnp.where(row < length, v_ref[...].astype(jnp.float32), 0.0)  # [bs,D]
    m_prev = m_ref[...]  # [G,1]
    m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))  # finite: start < length
    alpha = jnp.exp(m_prev - m_new)  # [G,1]; 0 on the first valid block
    p = jnp.exp(logits - m_new)  # [G,bs]
    m_ref[...] = m_new
    l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p, v, precision=_HIGHEST,
                                                  preferred_element_type=jnp.float32)


def _tpu_call(backend, q, k, v, length, layer, scale, bs, num_splits, return_mass):
  """k, v [L,B,H,S,D]; layer [1] int32: the layer read."""
  B, H, G, D = q.shape
  S = k.shape[3]
  bps = pl.cdiv(pl.cdiv(S, bs), num_splits)  # blocks per split

  def kv_map(b, h, s, i, len_ref, layer_ref):  # skipped steps re-name the last valid block
    return layer_ref[0], b, h, clamp_block(s * bps + i, len_ref[b, h], bs), 0

  def logits_map(b, h, s, i, len_ref, _):
    return b, h, 0, clamp_block(s * bps + i, len_ref[b, h], bs)

  stat_spec = pl.BlockSpec((None, None, None, G, 1), lambda b, h, s, i, *_: (b, h, s, 0, 0))
  out_specs = [stat_spec, stat_spec,
               pl.BlockSpec((None, None, None, G, D), lambda b, h, s, i, *_: (b, h, s, 0, 0))]
  out_shape = [jax.ShapeDtypeStruct((B, H, num_splits, G, 1), jnp.float32)] * 2 + [
      jax.ShapeDtypeStruct((B, H, num_splits, G, D), jnp.float32)]
  if return_mass:
    out_specs.append(pl.BlockSpec((None, None, G, bs), logits_map))
    out_shape.append(jax.ShapeDtypeStruct((B, H, G, S), jnp.float32))
  bytes_accessed = (q.nbytes + (k.nbytes + v.nbytes) // k.shape[0] + length.nbytes
                    + sum(math.prod(o.shape) * 4 for o in out_shape))
  kwargs = tpu_call_kwargs(
      backend, grid=(B, H, num_splits, bps), num_scalar_prefetch=2,
      in_specs=[pl.BlockSpec((None, None, G, D), lambda b, h, s, i, *_: (b, h, 0, 0)),
                pl.BlockSpec((None, None, None, bs, D), kv_map),
                pl.BlockSpec((None, None, None, bs, D), kv_map)],
      out_specs=out_specs,
      # With mass, consecutive splits of a row may share a logits block (the clamp), so
      # splits must run in order on one core; without it they are independent.
      dimension_semantics=("parallel", "parallel",
                           "arbitrary" if return_mass else "parallel", "arbitrary"),
      cost_estimate=pl.CostEstimate(flops=4 * B * H * G * S * D,
                                    transcendentals=B * H * G * S,
                                    bytes_accessed=int(bytes_accessed)))
  kernel = functools.partial(_tpu_kernel, scale=scale, block_size=bs, blocks_per_split=bps)
  return pl.pallas_call(kernel, out_shape=out_shape, **kwargs)(length, layer, q, k, v)


def _gpu_body(len_ref, layer_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *logits_ref,
              scale: float, block_size: int, blocks_per_split: int):
  """Mosaic GPU: one CTA (one warpgroup) per (b, h, split); K/V tiles go to registers.

  The loop runs only over the split's valid blocks (dynamic trip count), so skipped
  blocks cost nothing. Tiles are [bs, D] in the WGMMA register layout; row vectors
  (one slot each) and column vectors (one feature each) are its reductions. G is small,
  so q.k and p.v are broadcast-multiply-reduce, not MMA. The last block is shifted back
  to end at S instead of running past the array (GMEM has no padding); slots it revisits
  are masked out of the softmax. k_ref, v_ref are [L,B,H,S,D]; layer_ref [1] picks L.
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu
  tile = plgpu.Layout.WGMMA
  rows, cols = tile.reduce(1), tile.reduce(0)  # [bs] per slot, [D] per feature
  b, h, s = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
  G, D = q_ref.shape[2], q_ref.shape[3]
  S, bs = k_ref.shape[3], block_size
  length, layer = len_ref[b, h], layer_ref[0]
  first = s * blocks_per_split  # first block of this split
  n_blocks = jnp.clip(pl.cdiv(length, bs) - first, 0, blocks_per_split)
  qs = [plgpu.load(q_ref, (b, h, g), layout=cols, optimized=False).astype(jnp.float32)
        for g in range(G)]  # G x [D]

  def step(i, carry):
    ms, ls, accs = carry
    nominal = (first + i) * bs
    start = jnp.minimum(nominal, S - bs)
    kt = plgpu.load(k_ref, (layer, b, h, pl.ds(start, bs)), layout=tile, optimized=False)
    vt = plgpu.load(v_ref, (layer, b, h, pl.ds(start, bs)), layout=tile, optimized=False)
    slot = start + plgpu.broadcasted_iota(jnp.int32, (bs,), 0, layout=rows)  # [bs]
    new = (slot >= nominal) & (slot < length)  # not yet seen and valid
    vt = jnp.where(lax.broadcast_in_dim(new, (bs, D), [0]), vt.astype(jnp.float32), 0.0)
    kt = kt.astype(jnp.float32)
    out = ([], [], [])
    for g in range(G):
      logit = jnp.sum(kt * lax.broadcast_in_dim(qs[g], (bs, D), [1]), axis=1) * scale
      if logits_ref:  # revisited slots get the same value again
        logits_ref[0][b, h, g, pl.ds(start, bs)] = jnp.where(slot < length, logit, -jnp.inf)
      logit = jnp.where(new, logit, -jnp.inf)
      m_new = jnp.maximum(ms[g], jnp.max(logit))  # finite: the block has a new slot
      p = jnp.exp(logit - m_new)  # [bs]
      alpha = jnp.exp(ms[g] - m_new)
      out[0].append(m_new)
      out[1].append(alpha * ls[g] + jnp.sum(p))
      out[2].append(alpha * accs[g]
                    + jnp.sum(vt * lax.broadcast_in_dim(p, (bs, D), [0]), axis=0))
    return out

  zeros = plgpu.layout_cast(jnp.zeros((D,), jnp.float32), cols)
  init = ([jnp.float32(-jnp.inf)] * G, [jnp.float32(0.0)] * G, [zeros] * G)
  ms, ls, accs = lax.fori_loop(0, n_blocks, step, init)
  for g in range(G):
    m_ref[b, h, s, g, 0] = ms[g]
    l_ref[b, h, s, g, 0] = ls[g]
    acc_ref[b, h, s, g] = accs[g]


def _gpu_call(q, k, v, length, layer, scale, bs, num_splits, return_mass):
  """k, v [L,B,H,S,D]; layer [1] int32: the layer read."""
  B, H, G, D = q.shape
  if D % 8:
    raise NotImplementedError(f"backend='gpu' needs head_dim % 8 == 0, got {D}")
  S = k.shape[3]
  if S < bs:  # tiny cache: pad one layer to a tile (padded slots are >= length: never read)
    pad = ((0, 0), (0, 0), (0, 0), (0, bs - S), (0, 0))
    k = jnp.pad(lax.dynamic_slice_in_dim(k, layer[0], 1, axis=0), pad)
    v = jnp.pad(lax.dynamic_slice_in_dim(v, layer[0], 1, axis=0), pad)
    layer = jnp.zeros_like(layer)
  out_type = [jax.ShapeDtypeStruct((B, H, num_splits, G, 1), jnp.float32)] * 2 + [
      jax.ShapeDtypeStruct((B, H, num_splits, G, D), jnp.float32)]
  if return_mass:
    out_type.append(jax.ShapeDtypeStruct((B, H, G, k.shape[3]), jnp.float32))
  body = functools.partial(_gpu_body, scale=scale, block_size=bs,
                           blocks_per_split=pl.cdiv(pl.cdiv(k.shape[3], bs), num_splits))
  cost = pl.CostEstimate(flops=4 * B * H * G * S * D, transcendentals=B * H * G * S,
                         bytes_accessed=int(q.nbytes + (k.nbytes + v.nbytes) // k.shape[0]))
  outs = gpu_kernel(body, out_type=out_type, grid=(B, H, num_splits),
                    grid_names=("b", "h", "s"), cost_estimate=cost)(length, layer, q, k, v)
  if return_mass:
    outs[3] = outs[3][..., :S]
  return outs


def _merge(length, m, l, acc, logits, dtype):
  """Log-sum-exp merge of the splits. m, l [B,H,NS,G,1]; acc [B,H,NS,G,D] (f32)."""
  m_max = m.max(axis=2)  # [B,H,G,1]; -inf where no split saw a valid slot
  m_safe = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
  w = jnp.exp(m - m_safe[:, :, None])  # [B,H,NS,G,1]; 0 for empty splits
  l_tot = (w * l).sum(axis=2)  # [B,H,G,1]
  l_safe = jnp.where(l_tot > 0, l_tot, 1.0)  # length 0 -> output 0
  out = ((w * acc).sum(axis=2) / l_safe).astype(dtype)  # [B,H,G,D]
  if logits is None:
    return out
  valid = jnp.arange(logits.shape[-1]) < length[..., None]  # [B,H,S]
  probs = jnp.exp(logits - m_safe) / l_safe  # [B,H,G,S]
  return out, jnp.where(valid, probs.sum(axis=2), 0.0)  # mass [B,H,S]


def decode_attention(q, k, v, length, *, scale=None, return_mass=False, block_size=None,
                     num_splits=None, backend=None, layer=None):
  """Attention of one query token per sequence over a ragged cache.

  q: [B,Hkv,G,D] (G query heads per KV head; G=1 is MHA); k, v: [B,Hkv,S,D], or with
  `layer` (an int32 scalar, may be traced) the stacked [L,B,Hkv,S,D] buffers of which
  layer `layer` is read in place; length: [B,Hkv] int32, the number of valid slots.
  scale defaults to 1/sqrt(D).
  Returns out [B,Hkv,G,D] in q.dtype (softmax in fp32; zeros where length == 0) and, if
  return_mass, mass [B,Hkv,S] f32: each slot's probability summed over the G heads.
  block_size: slots per step (TPU: a multiple of 128, or S; GPU: 64). num_splits: split-K
  factor (default 1 on TPU, where the grid runs serially; on GPU enough to fill the SMs).
  """
  B, H, G, D = q.shape
  stacked = k.shape[:-4] if layer is not None else ()  # (L,) or ()
  S = k.shape[-2]
  if (k.shape != (*stacked, B, H, S, D) or len(stacked) != (layer is not None)
      or v.shape != k.shape or length.shape != (B, H)):
    raise ValueError(f"shape mismatch: q {q.shape} k {k.shape} v {v.shape}"
                     f" length {length.shape} layer {layer}")
  scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
  backend = resolve_backend(backend)
  if backend == "reference":
    return decode_attention_reference(q, k, v, length, scale=scale, return_mass=return_mass,
                                      layer=layer)
  length = jnp.clip(length.astype(jnp.int32), 0, S)  # kernels trust 0 <= length <= S
  if layer is None:  # one code path: a single-layer stack (a free reshape)
    k, v, layer = k[None], v[None], 0
  layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, k.shape[0] - 1).reshape(1)
  if backend == "gpu":
    bs = block_size or _GPU_BLOCK
    if bs % 64:
      raise ValueError(f"backend='gpu' needs block_size % 64 == 0, got {bs}")
    n_blocks = pl.cdiv(max(S, bs), bs)
    splits = num_splits or max(1, min(n_blocks, 264 // (B * H)))  # ~2 CTAs per H100 SM
    m, l, acc, *logits = _gpu_call(q, k, v, length, layer, scale, bs, splits, return_mass)
  else:
    bs = min(block_size or _TPU_BLOCK, S)
    if backend == "tpu" and bs != S and bs % (128 if return_mass else 8):
      raise ValueError(f"on TPU block_size must be S or a multiple of"
                       f" {128 if return_mass else 8}, got {bs}")
    splits = min(num_splits or 1, pl.cdiv(S, bs))
    m, l, acc, *logits = _tpu_call(backend, q, k, v, length, layer, scale, bs, splits,
                                   return_mass)
  return _merge(length, m, l, acc, logits[0] if logits else None, q.dtype)
