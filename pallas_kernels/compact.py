"""Stable per-row compaction of a KV cache by keep flags, with a capacity rule.

For every (batch, head) row: if the row keeps <= capacity tokens, all kept tokens move to
the front in their original order; otherwise the `capacity` highest-scoring kept tokens
stay (ties: the earlier token wins), still in original order. Slots >= length are garbage.
An optional per-row limit `row_capacity` [B] (each <= capacity) lowers the capacity of
batch row b to row_capacity[b]: rows of one batch can then keep different counts (kvpress
sizes each prompt's cache by its own length) under one static shape.

Split of work: the destination plan (which source token lands in which slot) is computed
in XLA with static shapes (two sorts per row); the kernel only moves k/v rows. The score
row is 1/D of the traffic and is gathered in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.backend import clamp_block, gpu_kernel, resolve_backend, tpu_call_kwargs

_TPU_BLOCK_SLOTS = 512  # slots per grid step: bounds the SMEM holding their source indices
_GPU_BLOCK_SLOTS = 64  # slots per CTA: more CTAs, shorter serial copy loops
_DMA_WINDOW = 32  # row copies in flight per program and tensor (TPU)


def compaction_plan(score, keep, capacity: int, slots: int, row_capacity=None):
  """Where each row's tokens go. score [B,H,T] f32, keep [B,H,T] bool, row_capacity [B]
  int32 or None.

  Returns src [B,H,slots] int32 (source token of each slot, -1 for slots >= length) and
  length [B,H] int32 = min(count(keep), capacity, row_capacity).
  """
  B, H, T = keep.shape
  length = jnp.minimum(keep.sum(-1, dtype=jnp.int32), capacity)  # [B,H]
  if row_capacity is not None:
    length = jnp.minimum(length, jnp.asarray(row_capacity, jnp.int32)[:, None])
  n = min(capacity, T)  # no row can fill more slots than this
  t = lax.broadcasted_iota(jnp.int32, (B, H, T), 2)
  # Rank: kept first, then higher score, then earlier token (lax.sort is stable and
  # treats -0.0 == 0.0, so equal scores tie and the earlier token wins).
  _, _, order = lax.sort(((~keep).astype(jnp.int32), -score.astype(jnp.float32), t),
                         dimension=2, num_keys=3)  # order [B,H,T]
  winners = order[..., :n]  # [B,H,n] the first `length` entries are the kept set
  rank = lax.broadcasted_iota(jnp.int32, (B, H, n), 2)
  winners = jnp.where(rank < length[..., None], winners, T)  # losers sort last
  src = jnp.sort(winners, axis=-1)  # [B,H,n] kept set back in original order
  src = jnp.where(src == T, -1, src)
  src = jnp.pad(src, ((0, 0), (0, 0), (0, slots - n)), constant_values=-1)
  return src, length  # [B,H,slots], [B,H]


def _check(k, v, score, keep, capacity, slots, out, row_capacity=None):
  slots = capacity + 1 if slots is None else slots
  if capacity < 1 or slots < capacity:
    raise ValueError(f"need 1 <= capacity <= slots, got capacity={capacity}, slots={slots}")
  B, H, T, _ = k.shape
  if v.shape[:3] != (B, H, T) or score.shape != (B, H, T) or keep.shape != (B, H, T):
    raise ValueError(f"shape mismatch: k {k.shape} v {v.shape} score {score.shape}"
                     f" keep {keep.shape}")
  if row_capacity is not None and jnp.shape(row_capacity) != (B,):
    raise ValueError(f"row_capacity must have shape ({B},), got {jnp.shape(row_capacity)}")
  if out is not None:
    want = ((B, H, slots, k.shape[3]), (B, H, slots, v.shape[3]), (B, H, slots))
    if tuple(o.shape for o in out) != want:
      raise ValueError(f"out buffers must have shapes {want}")
  return slots


def _gather_score(score, src, score_buf):
  """score_out [B,H,slots] f32: the score of each slot's source token."""
  got = jnp.take_along_axis(score.astype(jnp.float32), jnp.maximum(src, 0), axis=2)
  valid = src >= 0  # [B,H,slots] == slot < length
  fill = jnp.zeros_like(got) if score_buf is None else score_buf.astype(jnp.float32)
  return jnp.where(valid, got, fill)


def compact_reference(k, v, score, keep, capacity: int, *, slots: int | None = None,
                      out=None, row_capacity=None):
  """Pure-jnp compaction (take_along_axis). Defines the semantics of `compact`.

  Slots >= length hold `out`'s old contents when `out` is given, else zeros.
  """
  slots = _check(k, v, score, keep, capacity, slots, out, row_capacity)
  src, length = compaction_plan(score, keep, capacity, slots, row_capacity)
  idx = jnp.maximum(src, 0)[..., None]  # [B,H,slots,1]
  valid = (src >= 0)[..., None]
  k_buf, v_buf, score_buf = (None, None, None) if out is None else out
  k_out = jnp.where(valid, jnp.take_along_axis(k, idx, axis=2),
                    0 if k_buf is None else k_buf).astype(k.dtype)  # [B,H,slots,D]
  v_out = jnp.where(valid, jnp.take_along_axis(v, idx, axis=2),
                    0 if v_buf is None else v_buf).astype(v.dtype)
  return k_out, v_out, _gather_score(score, src, score_buf), src, length


def _tpu_kernel(len_ref, src_ref, k_hbm, v_hbm, *refs, block_slots: int):
  """One (b, h, slot block): DMA each kept row HBM -> HBM into its slot.

  len_ref [B,H] (SMEM, scalar prefetch); src_ref [1,block_slots] (SMEM, this block's
  source indices); k/v and the outputs stay in HBM (no VMEM staging: rows are copied as is).
  """
  *_, k_out, v_out, sems = refs  # refs = ([k_buf, v_buf,] k_out, v_out, sems); bufs alias
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  first = j * block_slots
  n = jnp.clip(len_ref[b, h] - first, 0, block_slots)  # slots of this block to fill
  pairs = ((k_hbm, k_out, sems.at[0]), (v_hbm, v_out, sems.at[1]))

  def wait_one():
    for src, dst, sem in pairs:  # a wait needs a descriptor of the same size only
      pltpu.make_async_copy(src.at[b, h, pl.ds(0, 1)], dst.at[b, h, pl.ds(0, 1)], sem).wait()

  def start(i, carry):
    t = src_ref[0, i]
    for src, dst, sem in pairs:
      pltpu.make_async_copy(src.at[b, h, pl.ds(t, 1)], dst.at[b, h, pl.ds(first + i, 1)],
                            sem).start()
    pl.when(i >= _DMA_WINDOW)(wait_one)  # keep at most _DMA_WINDOW copies in flight
    return carry

  lax.fori_loop(0, n, start, 0)
  lax.fori_loop(0, jnp.minimum(n, _DMA_WINDOW), lambda i, c: (wait_one(), c)[1], 0)


def _gather_rows_tpu(backend, k, v, src, length, bufs, block_slots):
  B, H, T, _ = k.shape
  slots = src.shape[2]
  bs = min(block_slots or _TPU_BLOCK_SLOTS, slots)  # TPU: a multiple of 128, or all slots
  n_blocks = pl.cdiv(slots, bs)

  def src_map(b, h, j, len_ref):  # blocks past the length copy nothing: fetch nothing
    return b, h, 0, clamp_block(j, len_ref[b, h], bs)

  hbm = pl.BlockSpec(memory_space=pl.ANY)
  rows = B * H * min(slots, T)  # upper bound on rows moved
  row_bytes = k.shape[3] * k.dtype.itemsize + v.shape[3] * v.dtype.itemsize
  kwargs = tpu_call_kwargs(
      backend, grid=(B, H, n_blocks), num_scalar_prefetch=1,
      # src travels as [B,H,1,slots] so its block's last two dims (1, bs) are legal on TPU.
      in_specs=[pl.BlockSpec((None, None, 1, bs), src_map, memory_space=pltpu.SMEM), hbm, hbm]
      + [hbm] * len(bufs),
      out_specs=[hbm, hbm],
      scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
      dimension_semantics=("parallel", "parallel", "parallel"),
      cost_estimate=pl.CostEstimate(flops=0, transcendentals=0,
                                    bytes_accessed=2 * rows * row_bytes + src.size * 4))
  out_shape = [jax.ShapeDtypeStruct((B, H, slots, k.shape[3]), k.dtype),
               jax.ShapeDtypeStruct((B, H, slots, v.shape[3]), v.dtype)]
  # Operand indices count the scalar-prefetch operand: (length, src, k, v, k_buf, v_buf).
  aliases = {4: 0, 5: 1} if bufs else {}
  call = pl.pallas_call(functools.partial(_tpu_kernel, block_slots=bs), out_shape=out_shape,
                        input_output_aliases=aliases, **kwargs)
  return call(length, src[:, :, None, :], k, v, *bufs)


def _gpu_row_load(ref, idx, d: int):
  """Load one [D] row from GMEM in a layout the Mosaic GPU lowering accepts for any D."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  if d % 128 == 0:  # one warpgroup, strided: every thread moves D/128 elements
    return ref[idx]
  # Otherwise use the column layout of a WGMMA tile (D % 8 == 0). It is replicated across
  # warps, so the store is redundant but correct; Llama head dims are 64 or 128.
  return plgpu.load(ref, idx, layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)


def _gpu_body(len_ref, src_ref, k_hbm, v_hbm, k_out, v_out, *, block_slots: int):
  """One CTA per (b, h, slot block): copy its kept rows through registers."""
  b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
  first = j * block_slots
  n = jnp.clip(len_ref[b, h] - first, 0, block_slots)

  @pl.loop(0, n)
  def _(i):
    t = src_ref[b, h, first + i]
    k_out[b, h, first + i] = _gpu_row_load(k_hbm, (b, h, t), k_hbm.shape[3])
    v_out[b, h, first + i] = _gpu_row_load(v_hbm, (b, h, t), v_hbm.shape[3])


def _gather_rows_gpu(k, v, src, length, bufs, block_slots):
  B, H, T, _ = k.shape
  slots = src.shape[2]
  bs = min(block_slots or _GPU_BLOCK_SLOTS, slots)
  row_bytes = k.shape[3] * k.dtype.itemsize + v.shape[3] * v.dtype.itemsize
  cost = pl.CostEstimate(flops=0, transcendentals=0,
                         bytes_accessed=2 * B * H * min(slots, T) * row_bytes)
  body = functools.partial(_gpu_body, block_slots=bs)
  grid, names = (B, H, pl.cdiv(slots, bs)), ("b", "h", "j")
  if not bufs:
    out_type = [jax.ShapeDtypeStruct((B, H, slots, x.shape[3]), x.dtype) for x in (k, v)]
    return tuple(gpu_kernel(body, out_type=out_type, grid=grid, grid_names=names,
                            cost_estimate=cost)(length, src, k, v))
  # Refs passed in are aliased in and out of the kernel: the (donated) buffers are filled
  # in place and slots >= length keep their old contents.
  k_ref, v_ref = jax.new_ref(bufs[0]), jax.new_ref(bufs[1])
  gpu_kernel(body, out_type=(), grid=grid, grid_names=names,
             cost_estimate=cost)(length, src, k, v, k_ref, v_ref)
  return k_ref[...], v_ref[...]


def compact(k, v, score, keep, capacity: int, *, slots: int | None = None, out=None,
            backend: str | None = None, block_slots: int | None = None, row_capacity=None):
  """Compacts each (batch, head) row of a KV cache. See the module docstring for the rule.

  k, v: [B,H,T,D]; score: [B,H,T] f32; keep: [B,H,T] bool. `slots` (default capacity + 1,
  >= capacity) sizes the outputs' slot axis. `out=(k_buf, v_buf, score_buf)` are optional
  destination buffers [B,H,slots,(D)] written in place (donate them to avoid a copy; they
  must not alias k/v). Kernels leave their slots >= length untouched.
  `block_slots` tunes how many slots one grid step handles. `row_capacity` [B] int32
  (optional, each in [1, capacity]): batch row b keeps at most row_capacity[b] tokens.

  Returns k_out, v_out [B,H,slots,D]; score_out [B,H,slots] f32; src [B,H,slots] int32
  (source token of each slot, -1 for slots >= length); length [B,H] int32.
  """
  slots = _check(k, v, score, keep, capacity, slots, out, row_capacity)
  backend = resolve_backend(backend)
  if backend == "reference":
    return compact_reference(k, v, score, keep, capacity, slots=slots, out=out,
                             row_capacity=row_capacity)
  src, length = compaction_plan(score, keep, capacity, slots, row_capacity)
  bufs = () if out is None else (out[0].astype(k.dtype), out[1].astype(v.dtype))
  if backend == "gpu":
    k_out, v_out = _gather_rows_gpu(k, v, src, length, bufs, block_slots)
  else:
    k_out, v_out = _gather_rows_tpu(backend, k, v, src, length, bufs, block_slots)
  score_buf = None if out is None else out[2]
  return k_out, v_out, _gather_score(score, src, score_buf), src, length
