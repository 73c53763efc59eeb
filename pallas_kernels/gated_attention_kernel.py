"""Forward Pallas kernel of blocked (flash-style) gated attention.

Computes (out, row_max, row_sum) of the semantics stated in `gated_attention.py`:

  allowed[i, j] = k_pos[j] <= q_pos[i] and q_seg[i] == k_seg[j]
                  and (window is None or k_pos[j] > q_pos[i] - window)
  diag[i, j]    = allowed[i, j] and k_pos[j] == q_pos[i]
  visible[h, i, j] = allowed[i, j] and (diag[i, j] or keep[h, j] > 0)
  l = scale * q.k (fp32 accumulation), row_max = max of l over visible keys (0 if none),
  row_sum = sum of exp(l - row_max) over visible keys (0 if none),
  out = sum of exp(l - row_max) v / row_sum (0 if none), in q.dtype.

Kernel plan (TPU, also run interpreted on CPU): grid (B, K, query blocks, key blocks), the
key axis "arbitrary". One step takes the [G, block_q, H] query tile of all G query heads of
kv head h (seen as a [G*block_q, H] matrix, so K/V are loaded once per group and never
repeated), a [block_k, H] K/V tile and runs one online-softmax update into VMEM scratch
(m, l [G*block_q, 1], acc [G*block_q, H], fp32). The last key step writes the outputs.

Layouts: the wrapper transposes q to [B, K, G, T, H] and k, v to [B, K, S, H] (XLA
transposes, O(size) against the kernel's O(T * S) work) so every block is a plain tile
whose last two dims are (rows, H); row_max / row_sum are written as [B, K, G, T, 1] and
reshaped for free. T and S are padded up to the block multiples: padded keys get
segment -1 and position INT32_MAX (so k_pos <= q_pos never holds for them) and zero K/V;
padded query rows are cut off.

Block skipping is data-dependent (positions and segments are arbitrary arrays): XLA
computes per-block summaries (position min/max, segment min/max and the lexicographic
(segment, position) min of a key block / max of a query block, over real rows only) and
passes them as scalar prefetch. A (query block, key block) pair is active only if some
pair in it could be allowed, using necessary conditions of `allowed`:
  min k_pos <= max q_pos                        (not wholly in the future)
  segment ranges overlap
  lexmin_k (seg, pos) <= lexmax_q (seg, pos)    (allowed => k_seg == q_seg, k_pos <= q_pos;
                                                 skips future blocks of packed sequences
                                                 whose positions restart per segment)
  window: max k_pos > min q_pos - window        (not wholly out of the window)
Inactive pairs are skipped with `pl.when` (no compute). For the memory traffic, XLA also
computes per (b, query block) the first and last active key block, and the K/V/keep
index maps clamp the key-block index into that range: steps before the first active block
already name it (its copy is then reused), steps after the last re-name the last one, so
Pallas, which copies a block only when its index changes, issues no DMA for them. Inactive
blocks strictly inside that hull (rare: e.g. a segment gap) are fetched but not computed.

Precision: bf16 operands stay bf16 on the MXU with fp32 accumulation (p is cast to v's
dtype for p @ v, as flash attention does); fp32 inputs use HIGHEST precision.
K/V at keys that are not visible must be finite (0 * NaN in p @ v would poison a row);
the padding the wrapper adds is zeros.

Backends: "tpu" (Mosaic, compiled) and "interpret" (the same kernel in the Pallas TPU
interpreter, for CPU tests). "gpu" is not implemented here (NotImplementedError): the
dispatcher falls back to the jnp blocked reference.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.backend import tpu_call_kwargs

_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min
_PAD_SEGMENT = -1  # segment of padded keys (their position is INT32_MAX: never allowed)
_N_INFO = 5  # per-block summary: pos min, pos max, seg min, seg max, lex position


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _block_info(pos, seg, valid, block, *, query: bool):
  """Per-block summaries [B, n, 5] int32 over the valid rows of pos, seg [B, N].

  Columns: pos min, pos max, seg min, seg max, and the position of the lexicographic
  (seg, pos) extreme: for a query block the max position among rows with seg == seg max,
  for a key block the min position among rows with seg == seg min. A block with no valid
  row gets empty ranges (min = INT_MAX, max = INT_MIN), so it is never active.
  """
  B, N = pos.shape
  n = N // block
  pos, seg, valid = (x.reshape(B, n, block) for x in (pos, seg, valid))
  big, small = jnp.int32(_INT_MAX), jnp.int32(_INT_MIN)
  pos_min = jnp.where(valid, pos, big).min(-1)
  pos_max = jnp.where(valid, pos, small).max(-1)
  seg_min = jnp.where(valid, seg, big).min(-1)
  seg_max = jnp.where(valid, seg, small).max(-1)
  if query:
    lex = jnp.where(valid & (seg == seg_max[..., None]), pos, small).max(-1)
  else:
    lex = jnp.where(valid & (seg == seg_min[..., None]), pos, big).min(-1)
  return jnp.stack([pos_min, pos_max, seg_min, seg_max, lex], axis=-1)


def _active(qi, ki, window):
  """Whether a (query block, key block) pair may hold an allowed pair.

  qi, ki: per-block summaries (sequences of 5 int32 scalars or arrays that broadcast).
  Empty blocks fail the first test (INT_MAX <= INT_MIN is false).
  """
  q_pmin, q_pmax, q_smin, q_smax, q_lex = qi
  k_pmin, k_pmax, k_smin, k_smax, k_lex = ki
  active = ((k_pmin <= q_pmax) & (k_smin <= q_smax) & (k_smax >= q_smin)
            & ((k_smin < q_smax) | (k_lex <= q_lex)))  # lexmin_k <= lexmax_q
  if window is not None:
    # k_pos > q_pos - window for some pair  <=>  k_pmax > q_pmin - window (written as a
    # difference; empty key blocks may wrap here but already failed the first test).
    active &= k_pmax - q_pmin > -window
  return active


def block_schedule(q_pos, q_seg, k_pos, k_seg, T, S, block_q, block_k, window):
  """The data-dependent block schedule, computed in XLA.

  q_pos, q_seg [B, Tp]; k_pos, k_seg [B, Sp] (padded to the block multiples; rows >= T,
  keys >= S are padding). Returns qinfo [B, n_q, 5], kinfo [B, n_k, 5] (the summaries the
  kernel reads), active [B, n_q, n_k] bool (the pairs the kernel computes) and hull
  [B, n_q, 2] int32: the first and last active key block of each query block (0, 0 if
  none), to which the K/V index maps clamp the key-block index.
  """
  B, Tp = q_pos.shape
  Sp = k_pos.shape[1]
  n_k = Sp // block_k
  q_valid = jnp.broadcast_to(jnp.arange(Tp) < T, (B, Tp))
  k_valid = jnp.broadcast_to(jnp.arange(Sp) < S, (B, Sp))
  qinfo = _block_info(q_pos, q_seg, q_valid, block_q, query=True)  # [B, n_q, 5]
  kinfo = _block_info(k_pos, k_seg, k_valid, block_k, query=False)  # [B, n_k, 5]
  active = _active([qinfo[:, :, None, c] for c in range(_N_INFO)],
                   [kinfo[:, None, :, c] for c in range(_N_INFO)], window)  # [B, nq, nk]
  blocks = jnp.arange(n_k, dtype=jnp.int32)
  first = jnp.where(active, blocks, n_k).min(-1)
  last = jnp.where(active, blocks, -1).max(-1)
  none = last < 0
  hull = jnp.stack([jnp.where(none, 0, first), jnp.where(none, 0, last)], -1)
  return qinfo, kinfo, active, hull.astype(jnp.int32)


def _kernel(qinfo_ref, kinfo_ref, hull_ref, qps_ref, kps_ref, *refs, scale: float,
            window: int | None, has_keep: bool, n_q: int, n_k: int, block_q: int,
            block_k: int, precision):
  """One (b, h, qi, ki) step.

  qinfo_ref [B*n_q*5], kinfo_ref [B*n_k*5], hull_ref [B*n_q*2] (SMEM scalar prefetch;
  hull is read by the index maps only). qps_ref [block_q, 2] (positions, segments of the
  query rows), kps_ref [2, block_k] (same for the keys), keep_ref [1, block_k] (if
  has_keep), q_ref [G, block_q, H], k_ref, v_ref [block_k, H]; outputs o_ref
  [G, block_q, H], max_ref, sum_ref [G, block_q, 1]; scratch m, l [G*block_q, 1], acc
  [G*block_q, H] fp32.
  """
  if has_keep:
    keep_ref, q_ref, k_ref, v_ref, o_ref, max_ref, sum_ref, m_ref, l_ref, acc_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, max_ref, sum_ref, m_ref, l_ref, acc_ref = refs
    keep_ref = None
  del hull_ref
  b, qb, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  G, bq, H = q_ref.shape
  rows = G * bq

  @pl.when(kb == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  q_off = (b * n_q + qb) * _N_INFO
  k_off = (b * n_k + kb) * _N_INFO
  qi = [qinfo_ref[q_off + c] for c in range(_N_INFO)]
  ki = [kinfo_ref[k_off + c] for c in range(_N_INFO)]

  @pl.when(_active(qi, ki, window))
  def _step():
    q = q_ref[...].reshape(rows, H)
    k = k_ref[...]
    logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32) * scale  # [rows, bk]
    q_pos, q_seg = qps_ref[:, 0:1], qps_ref[:, 1:2]  # [bq, 1]
    k_pos, k_seg = kps_ref[0:1, :], kps_ref[1:2, :]  # [1, bk]
    allowed = (k_pos <= q_pos) & (q_seg == k_seg)
    if window is not None:
      allowed &= k_pos - q_pos > -window
    if keep_ref is not None:
      visible = allowed & ((k_pos == q_pos) | (keep_ref[...] > 0))  # [bq, bk]
    else:
      visible = allowed
    # Mask in [G, bq, bk] (a free split of the f32 rows, bq % 8 == 0): the bool mask is
    # only broadcast along the leading G axis, never reshaped.
    logits = jnp.where(visible[None], logits.reshape(G, bq, block_k), -jnp.inf).reshape(
        rows, block_k)
    m_prev = m_ref[...]  # [rows, 1]
    m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
    alpha = jnp.exp(m_prev - m_safe)  # 0 while m_prev is -inf
    p = jnp.exp(logits - m_safe)  # 0 where not visible
    m_ref[...] = m_new
    l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
    v = v_ref[...]
    acc_ref[...] = alpha * acc_ref[...] + lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32)

  @pl.when(kb == pl.num_programs(3) - 1)
  def _finish():
    l = l_ref[...]
    seen = l > 0  # l >= 1 as soon as one key is visible
    o_ref[...] = (acc_ref[...] / jnp.where(seen, l, 1.0)).reshape(G, bq, H).astype(
        o_ref.dtype)
    max_ref[...] = jnp.where(seen, m_ref[...], 0.0).reshape(G, bq, 1)
    sum_ref[...] = l.reshape(G, bq, 1)


def gated_attention_forward(q, k, v, q_positions, k_positions, q_segments, k_segments,
                            keep=None, *, window=None, scale=None, block_q=128, block_k=128,
                            backend="interpret"):
  """Forward pass of gated attention as one Pallas kernel.

  q [B, T, K, G, H]; k, v [B, S, K, H]; q_positions, q_segments [B, T] int32; k_positions,
  k_segments [B, S] int32; keep [B, K, S] float32 of exact 0.0 / 1.0, or None (all kept);
  window None or int; scale defaults to 1/sqrt(H).
  Returns out [B, T, K, G, H] in q.dtype, row_max and row_sum [B, K, G, T] float32.
  backend: "tpu" (compiled) or "interpret" (the same kernel interpreted, any platform).
  On TPU block_q must be a multiple of 16 and block_k of 128 unless one block covers all
  of T (resp. S).
  """
  B, T, K, G, H = q.shape
  S = k.shape[1]
  if (k.shape != (B, S, K, H) or v.shape != k.shape or q_positions.shape != (B, T)
      or q_segments.shape != (B, T) or k_positions.shape != (B, S)
      or k_segments.shape != (B, S) or (keep is not None and keep.shape != (B, K, S))):
    raise ValueError(
        f"shape mismatch: q {q.shape} k {k.shape} v {v.shape} q_positions"
        f" {q_positions.shape} q_segments {q_segments.shape} k_positions"
        f" {k_positions.shape} k_segments {k_segments.shape}"
        f" keep {None if keep is None else keep.shape}")
  if backend == "gpu":
    raise NotImplementedError("gated_attention_forward has no Mosaic GPU kernel yet; use"
                              " the jnp blocked reference on GPU")
  if backend not in ("tpu", "interpret"):
    raise ValueError(f"backend must be 'tpu', 'interpret' or 'gpu', got {backend!r}")
  scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
  window = None if window is None else int(window)
  if window is not None and window <= 0:
    raise ValueError(f"window must be positive, got {window}")

  # Blocks: one block covers a short axis (rounded up to the bf16 sublane tile).
  bq = min(int(block_q), _round_up(T, 16))
  bk = min(int(block_k), _round_up(S, 16))
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  n_q, n_k = Tp // bq, Sp // bk
  if backend == "tpu" and ((n_q > 1 and bq % 16) or (n_k > 1 and bk % 128)):
    raise ValueError(f"on TPU block_q must be a multiple of 16 and block_k of 128 (or"
                     f" cover the axis), got {bq}, {bk}")

  i32 = jnp.int32
  q_pos = jnp.pad(q_positions.astype(i32), ((0, 0), (0, Tp - T)))
  q_seg = jnp.pad(q_segments.astype(i32), ((0, 0), (0, Tp - T)))
  k_pos = jnp.pad(k_positions.astype(i32), ((0, 0), (0, Sp - S)), constant_values=_INT_MAX)
  k_seg = jnp.pad(k_segments.astype(i32), ((0, 0), (0, Sp - S)),
                  constant_values=_PAD_SEGMENT)
  qinfo, kinfo, _, hull = block_schedule(q_pos, q_seg, k_pos, k_seg, T, S, bq, bk,
                                          window)

  qps = jnp.stack([q_pos, q_seg], axis=-1)  # [B, Tp, 2]
  kps = jnp.stack([k_pos, k_seg], axis=1)  # [B, 2, Sp]
  q_t = jnp.pad(jnp.transpose(q, (0, 2, 3, 1, 4)),
                ((0, 0), (0, 0), (0, 0), (0, Tp - T), (0, 0)))  # [B, K, G, Tp, H]
  pad_kv = ((0, 0), (0, 0), (0, Sp - S), (0, 0))
  k_t = jnp.pad(jnp.transpose(k, (0, 2, 1, 3)), pad_kv)  # [B, K, Sp, H]
  v_t = jnp.pad(jnp.transpose(v, (0, 2, 1, 3)), pad_kv)

  def fetch(b, qb, kb, hull_ref):  # the key block to name at step kb: clamped to the hull
    base = (b * n_q + qb) * 2
    return jnp.minimum(jnp.maximum(kb, hull_ref[base]), hull_ref[base + 1])

  def kv_map(b, h, qb, kb, qinfo_ref, kinfo_ref, hull_ref):
    return b, h, fetch(b, qb, kb, hull_ref), 0

  def kps_map(b, h, qb, kb, qinfo_ref, kinfo_ref, hull_ref):
    return b, 0, fetch(b, qb, kb, hull_ref)

  def keep_map(b, h, qb, kb, qinfo_ref, kinfo_ref, hull_ref):
    return b, h, 0, fetch(b, qb, kb, hull_ref)

  q_row_map = lambda b, h, qb, kb, *_: (b, h, 0, qb, 0)  # noqa: E731
  in_specs = [pl.BlockSpec((None, bq, 2), lambda b, h, qb, kb, *_: (b, qb, 0)),
              pl.BlockSpec((None, 2, bk), kps_map)]
  operands = [qps, kps]
  has_keep = keep is not None
  if has_keep:
    keep_t = jnp.pad(keep.astype(jnp.float32), ((0, 0), (0, 0), (0, Sp - S)))
    in_specs.append(pl.BlockSpec((None, None, 1, bk), keep_map))
    operands.append(keep_t.reshape(B, K, 1, Sp))
  in_specs += [pl.BlockSpec((None, None, G, bq, H), q_row_map),
               pl.BlockSpec((None, None, bk, H), kv_map),
               pl.BlockSpec((None, None, bk, H), kv_map)]
  operands += [q_t, k_t, v_t]
  stat_spec = pl.BlockSpec((None, None, G, bq, 1), q_row_map)
  out_specs = [pl.BlockSpec((None, None, G, bq, H), q_row_map), stat_spec, stat_spec]
  out_shape = [jax.ShapeDtypeStruct((B, K, G, Tp, H), q.dtype),
               jax.ShapeDtypeStruct((B, K, G, Tp, 1), jnp.float32),
               jax.ShapeDtypeStruct((B, K, G, Tp, 1), jnp.float32)]

  # Dense upper bound (skipped pairs are data-dependent): q.k and p.v per visible pair.
  flops = 4 * B * K * G * Tp * Sp * H
  bytes_accessed = (2 * q_t.nbytes  # q in, out back
                    + n_q * (k_t.nbytes + v_t.nbytes + kps.nbytes
                             + (B * K * Sp * 4 if has_keep else 0))
                    + qps.nbytes + 2 * B * K * G * Tp * 4)
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kwargs = tpu_call_kwargs(
      backend, grid=(B, K, n_q, n_k), num_scalar_prefetch=3, in_specs=in_specs,
      out_specs=out_specs,
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
      cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(B * K * G * Tp * Sp),
                                    bytes_accessed=int(bytes_accessed)),
      scratch_shapes=[pltpu.VMEM((G * bq, 1), jnp.float32),
                      pltpu.VMEM((G * bq, 1), jnp.float32),
                      pltpu.VMEM((G * bq, H), jnp.float32)])
  kernel = functools.partial(_kernel, scale=scale, window=window, has_keep=has_keep,
                             n_q=n_q, n_k=n_k, block_q=bq, block_k=bk, precision=precision)
  out, row_max, row_sum = pl.pallas_call(kernel, out_shape=out_shape, **kwargs)(
      qinfo.reshape(-1), kinfo.reshape(-1), hull.reshape(-1), *operands)
  out = jnp.transpose(out[:, :, :, :T], (0, 3, 1, 2, 4))  # [B, T, K, G, H]
  return out, row_max[:, :, :, :T, 0], row_sum[:, :, :, :T, 0]
