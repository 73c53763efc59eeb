"""Blocked (flash-style) gated attention for the training view and prefill chunks.

One function serves the model's attention (keys carry keep flags), the gate's own causal
attention (no flags, optionally windowed) and a prefill chunk attending to the compacted
cache plus itself. Masks come from positions and segments, never from a [T, S] array:

  allowed[i, j] = k_pos[j] <= q_pos[i]  and  q_seg[i] == k_seg[j]
                  and (window is None or k_pos[j] > q_pos[i] - window)
  diagonal[i, j] = allowed[i, j] and k_pos[j] == q_pos[i]     (a token always sees itself)
  weight[i, j]   = allowed ? (diagonal ? 1 : keep[j]) : 0
  out_i = sum_j weight_ij exp(l_ij - M_i) v_j / sum_j weight_ij exp(l_ij - M_i),
  l = scale * q.k, M_i the max of l over the visible keys (weight > 0).

`keep` [B, K, S] is exactly 0/1 in the forward pass and may carry a straight-through
gradient: the custom VJP returns d out / d keep as if keep were a real multiplicative
weight, with a masked key's would-be exponent clipped at the visible max (exp(min(l - M,
0))). Unclipped, an evicted attention sink 20-30 logits above every visible key would get
a ~1e11 gradient and, through the global-norm clip, drown every other gate gradient.

Memory: the jnp version maps over query blocks and scans key blocks, so its temporaries
are [B, K, G, block_q, block_k], never [T, S] (nor [T, block_k]: at T = 4096 a [T, 512]
fp32 temporary per head is already an eighth of [T, T], and the backward holds several);
key blocks that positions put wholly outside a query block (the causal future, before the
window) are skipped, and in the forward pass also blocks with no visible key (all flags 0:
a prefill chunk's free cache slots; the backward keeps them, as flag-gradient sites). The
backward pass recomputes the logits block by block from the saved row max and row sum (both
[B, K, G, T]), carrying the key-side gradients across query blocks. Under an outer remat the
forward saves nothing internally (see `_blocked_fwd`).
The Pallas forward kernel (`gated_attention_kernel`) computes the same (out, row max, row
sum); the backward is this module's jnp scan on every backend. `gated_attention_dense` is
the plain statement of the semantics (tests, benchmarks).

Letters: B batch, T query time, S key time, K kv heads, G query heads per KV head, H head
dim. K/V are never repeated per query head.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.backend import resolve_backend

DEFAULT_BLOCK_K = 512
DEFAULT_BLOCK_Q = 512
_PAD_POSITION = 2**31 - 1  # int32 max: a padded key lies after every query


def _allowed(q_pos, k_pos, q_seg, k_seg, window):
  """q_pos, q_seg [B, T]; k_pos, k_seg [B, S] -> allowed, diagonal [B, T, S] bool."""
  qp, kp = q_pos[:, :, None], k_pos[:, None, :]
  allowed = (kp <= qp) & (q_seg[:, :, None] == k_seg[:, None, :])
  if window is not None:
    allowed &= kp > qp - window
  return allowed, allowed & (kp == qp)


def _logits(q, k, scale):
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  return jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32,
                    precision=precision) * scale


def _weights(allowed, diagonal, keep):
  """[B, T, S] masks and keep [B, K, S] or None -> weight [B, K, 1, T, S] f32."""
  allowed, diagonal = allowed[:, None, None], diagonal[:, None, None]
  if keep is None:
    return allowed.astype(jnp.float32)
  flags = keep.astype(jnp.float32)[:, :, None, None, :]
  return jnp.where(allowed, jnp.where(diagonal, 1.0, flags), 0.0)


def gated_attention_dense(q, k, v, q_positions, k_positions, q_segments, k_segments,
                          keep=None, *, window=None, scale=None):
  """The semantics above with a [B, K, G, T, S] score matrix: small shapes only.

  Differentiable by plain autodiff; its gradients define what the blocked VJP must give.
  """
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  allowed, diagonal = _allowed(q_positions, k_positions, q_segments, k_segments, window)
  logits = _logits(q, k, scale)                                    # [B, K, G, T, S]
  weights = _weights(allowed, diagonal, keep)                      # [B, K, 1, T, S]
  visible = lax.stop_gradient(weights) > 0
  row_max = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1, keepdims=True)
  row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  shifted = logits - row_max  # <= 0 on visible keys
  # Clip only masked keys, by a select: jnp.minimum would split the gradient of a tie at 0
  # (every row's strongest visible key) in half.
  clipped = jnp.where(visible | (shifted < 0.0), shifted, 0.0)
  unnormalised = weights * jnp.exp(jnp.where(allowed[:, None, None], clipped, -jnp.inf))
  total = jnp.sum(unnormalised, axis=-1, keepdims=True)
  probs = unnormalised / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Blocked jnp version with the straight-through VJP


def _pad_keys(block_k, k, v, k_pos, k_seg, keep):
  """Pad S to a multiple of block_k; padded keys get segment -1 (never allowed) and the
  largest position (so that a block of them is skipped as lying in every query's future)."""
  s = k.shape[1]
  pad = (-s) % block_k
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=_PAD_POSITION)
    k_seg = jnp.pad(k_seg, ((0, 0), (0, pad)), constant_values=-1)
    if keep is not None:
      keep = jnp.pad(keep, ((0, 0), (0, 0), (0, pad)))
  return k, v, k_pos, k_seg, keep


def _pad_time(x, axis, pad, value=0):
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _split(x, axis, n):
  """Cut `axis` into n blocks and lead with the block axis: [..., n * blk, ...] ->
  [n, ..., blk, ...] (the layout lax.scan / lax.map iterate over)."""
  x = x.reshape(*x.shape[:axis], n, x.shape[axis] // n, *x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _merge(x, axis):
  """The inverse of `_split(., axis, n)`."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])


def _key_blocks(block_k, k, v, k_pos, k_seg, keep):
  """Leading block axis for lax.scan: k, v [n, B, bk, K, H]; pos, seg [n, B, bk]; keep
  [n, B, K, bk] (or None)."""
  n = k.shape[1] // block_k
  blocks = tuple(_split(x, 1, n) for x in (k, v, k_pos, k_seg))
  return blocks + (None if keep is None else _split(keep, 2, n),)


def _skip(q_pos, k_pos, window):
  """True when, by positions alone, no key of the block is allowed to any query of the block
  (all in the future, or all before the window): the block adds exactly nothing, in the
  forward pass (alpha = 1, p = 0) as in the backward (probs = 0, no flag site)."""
  skip = jnp.min(k_pos) > jnp.max(q_pos)
  if window is not None:
    skip |= jnp.max(k_pos) <= jnp.min(q_pos) - window
  return skip


def _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, keep, window, scale, block_k,
             block_q=DEFAULT_BLOCK_Q):
  """-> out [B, T, K, G, H] (q.dtype), row_max, row_sum [B, K, G, T] f32.

  Query blocks (lax.map) x key blocks (lax.scan, online softmax): temporaries are
  [B, K, G, block_q, block_k]; key blocks wholly outside a query block are skipped.
  """
  b, t, kh, g, h = q.shape
  keys = _key_blocks(block_k, *_pad_keys(block_k, k, v, k_pos, k_seg, keep))
  pad = (-t) % block_q
  nq = (t + pad) // block_q
  # Padded queries get segment -2: no key matches it, so their rows stay empty (out 0).
  rows_in = (_split(_pad_time(q, 1, pad), 1, nq), _split(_pad_time(q_pos, 1, pad), 1, nq),
             _split(_pad_time(q_seg, 1, pad, -2), 1, nq))

  def rows(args):
    qb, qp, qs = args                                               # [B, bq, K, G, H], [B, bq]

    def step(carry, block):
      kb, vb, kp, ks, keepb = block

      def update(carry, visible):
        m, l, acc = carry
        logits = jnp.where(visible, _logits(qb, kb, scale), -jnp.inf)  # [B, K, G, bq, bk]
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m - m_safe)  # 0 while m is still -inf
        p = jnp.exp(logits - m_safe[..., None])                     # 0 where not visible
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(vb.dtype), vb,
                        preferred_element_type=jnp.float32)
        return m_new, l, alpha[..., None] * acc + pv

      def visit(carry):
        allowed, diagonal = _allowed(qp, kp, qs, ks, window)
        visible = _weights(allowed, diagonal, keepb) > 0            # [B, K, 1, bq, bk]
        # A block without one visible key adds exactly nothing either: e.g. the free slots
        # of a prefill chunk's cache (held 0), so a chunk costs O(held + chunk), not
        # O(capacity + chunk).
        return lax.cond(jnp.any(visible), lambda c: update(c, visible), lambda c: c, carry)

      return lax.cond(_skip(qp, kp, window), lambda c: c, visit, carry), None

    bq = qb.shape[1]
    init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32))
    return lax.scan(step, init, keys)[0]

  m, l, acc = lax.map(rows, rows_in)                                # [nq, B, K, G, bq(, H)]
  m, l, acc = _merge(m, 3)[..., :t], _merge(l, 3)[..., :t], _merge(acc, 3)[..., :t, :]
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]                  # [B, K, G, T, H]
  row_max = jnp.where(jnp.isfinite(m), m, 0.0)
  return jnp.einsum("BKGTH->BTKGH", out).astype(q.dtype), row_max, l


def _backward(q, k, v, q_pos, k_pos, q_seg, k_seg, keep, out, row_max, row_sum, d_out,
              window, scale, block_k, block_q=DEFAULT_BLOCK_Q):
  """Gradients to q, k, v and keep (None without keep): query blocks (outer scan, carrying
  the key-side gradients) x key blocks (inner scan, carrying d_q), temporaries
  [B, K, G, block_q, block_k], never [T, S]."""
  t, s = q.shape[1], k.shape[1]
  k, v, k_pos, k_seg, keep_p = _pad_keys(block_k, k, v, k_pos, k_seg, keep)
  keys = _key_blocks(block_k, k, v, k_pos, k_seg, keep_p)
  d_out32 = d_out.astype(jnp.float32)
  # D_i = sum_j p_ij dp_ij = dO_i . O_i
  delta = jnp.einsum("BTKGH,BTKGH->BKGT", d_out32, out.astype(jnp.float32))
  inv_sum = 1.0 / jnp.where(row_sum > 0, row_sum, 1.0)             # [B, K, G, T]
  pad = (-t) % block_q
  nq = (t + pad) // block_q
  rows_in = (_split(_pad_time(q, 1, pad), 1, nq), _split(_pad_time(q_pos, 1, pad), 1, nq),
             _split(_pad_time(q_seg, 1, pad, -2), 1, nq), _split(_pad_time(d_out32, 1, pad), 1, nq),
             *(_split(_pad_time(x, 3, pad), 3, nq) for x in (row_max, inv_sum, delta)))

  def rows(key_grads, args):
    qb, qp, qs, dob, mb, isb, db = args  # [B, bq, K, G, H], [B, bq] x2, [B, bq, K, G, H], [B, K, G, bq] x3
    q32 = qb.astype(jnp.float32)

    def step(d_q, block):
      kb, vb, kp, ks, keepb = block

      def grads(d_q):
        allowed, diagonal = _allowed(qp, kp, qs, ks, window)
        weights = _weights(allowed, diagonal, keepb)                # [B, K, 1, bq, bk]
        shifted = _logits(qb, kb, scale) - mb[..., None]            # [B, K, G, bq, bk]
        # exp(min(l - M, 0)) on allowed keys: a visible key's weight is exp(l - M) <= 1; a
        # masked key's would-be weight is clipped at the strongest visible key's.
        e = jnp.where(allowed[:, None, None], jnp.exp(jnp.minimum(shifted, 0.0)), 0.0)
        probs = weights * e * isb[..., None]                        # 0 on masked keys
        d_probs = jnp.einsum("BTKGH,BSKH->BKGTS", dob, vb.astype(jnp.float32))
        centred = d_probs - db[..., None]                           # dp_ij - D_i
        d_logits = probs * centred * scale                          # [B, K, G, bq, bk]
        d_q = d_q + jnp.einsum("BKGTS,BSKH->BTKGH", d_logits, kb.astype(jnp.float32))
        d_k = jnp.einsum("BKGTS,BTKGH->BSKH", d_logits, q32)
        d_v = jnp.einsum("BKGTS,BTKGH->BSKH", probs, dob)
        if keepb is None:
          return d_q, (d_k, d_v, None)
        flag_site = (allowed & ~diagonal)[:, None, None]            # [B, 1, 1, bq, bk]
        d_keep = jnp.sum(jnp.where(flag_site, e * centred * isb[..., None], 0.0), axis=(2, 3))
        return d_q, (d_k, d_v, d_keep)

      def nothing(d_q):
        zero = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)
        return d_q, (zero(kb), zero(vb), zero(keepb))

      return lax.cond(_skip(qp, kp, window), nothing, grads, d_q)

    d_q, block_grads = lax.scan(step, jnp.zeros(qb.shape, jnp.float32), keys)
    return jax.tree.map(jnp.add, key_grads, block_grads), d_q

  zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)
  init = (zeros(keys[0]), zeros(keys[1]), zeros(keys[4]))           # [n, B, bk, K, H], [n, B, K, bk]
  (d_k, d_v, d_keep), d_q = lax.scan(rows, init, rows_in)
  d_q = _merge(d_q, 1)[:, :t]
  d_k, d_v = _merge(d_k, 1)[:, :s].astype(k.dtype), _merge(d_v, 1)[:, :s].astype(v.dtype)
  if d_keep is not None:  # [n, B, K, bk] -> [B, K, S]
    d_keep = _merge(d_keep, 2)[..., :s].astype(keep.dtype)
  return d_q.astype(q.dtype), d_k, d_v, d_keep


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _blocked(q, k, v, keep, q_pos, k_pos, q_seg, k_seg, window, scale, blocks, forward):
  return forward(q, k, v, q_pos, k_pos, q_seg, k_seg, keep, window, scale, *blocks)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _opaque_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, keep, window, scale, block_k, block_q,
                    forward):
  """`forward` as one opaque equation for remat's partial evaluation (see `_blocked_fwd`)."""
  return forward(q, k, v, q_pos, k_pos, q_seg, k_seg, keep, window, scale, block_k, block_q)


def _no_second_derivative(*args):
  raise NotImplementedError("gated_attention: second derivatives are not implemented")


_opaque_forward.defvjp(_no_second_derivative, _no_second_derivative)


def _blocked_fwd(q, k, v, keep, q_pos, k_pos, q_seg, k_seg, window, scale, blocks, forward):
  # Under an outer jax.checkpoint / nn.remat whose policy saves dots (checkpoint_dots),
  # remat's partial evaluation recurses into the forward's scans and saves their per-block
  # logits for the recomputation, stacked over blocks: a whole [B, K, G, T, S] fp32 array.
  # The backward reads only (out, row max, row sum), so the forward is one opaque equation
  # (a custom_vjp call, which partial evaluation does not enter): saved whole or recomputed
  # whole. (An inner jax.checkpoint would not do: its policy yields to the outer one.)
  out, row_max, row_sum = _opaque_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, keep, window,
                                          scale, *blocks, forward)
  return out, (q, k, v, keep, q_pos, k_pos, q_seg, k_seg, out, row_max, row_sum)


def _blocked_bwd(window, scale, blocks, forward, residuals, d_out):
  q, k, v, keep, q_pos, k_pos, q_seg, k_seg, out, row_max, row_sum = residuals
  d_q, d_k, d_v, d_keep = _backward(q, k, v, q_pos, k_pos, q_seg, k_seg, keep, out, row_max,
                                    row_sum, d_out, window, scale, *blocks)
  return d_q, d_k, d_v, d_keep, None, None, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def gated_attention_reference(q, k, v, q_positions, k_positions, q_segments, k_segments,
                              keep=None, *, window=None, scale=None, block_k=DEFAULT_BLOCK_K,
                              block_q=DEFAULT_BLOCK_Q):
  """The blocked jnp version: O(block_q x block_k) temporaries, straight-through VJP."""
  return gated_attention(q, k, v, q_positions, k_positions, q_segments, k_segments, keep,
                         window=window, scale=scale, block_k=block_k, block_q=block_q,
                         backend="reference")


def _check(q, k, v, q_positions, k_positions, q_segments, k_segments, keep):
  b, t, kh, _, h = q.shape
  s = k.shape[1]
  expected = {"k": (k.shape, (b, s, kh, h)), "v": (v.shape, (b, s, kh, h)),
              "q_positions": (q_positions.shape, (b, t)), "q_segments": (q_segments.shape, (b, t)),
              "k_positions": (k_positions.shape, (b, s)), "k_segments": (k_segments.shape, (b, s))}
  if keep is not None:
    expected["keep"] = (keep.shape, (b, kh, s))
  for name, (got, want) in expected.items():
    if tuple(got) != want:
      raise ValueError(f"gated_attention: {name} has shape {tuple(got)}, expected {want} "
                       f"for q {tuple(q.shape)} [B, T, K, G, H]")


def gated_attention(q, k, v, q_positions, k_positions, q_segments, k_segments, keep=None, *,
                    window=None, scale=None, block_k=None, block_q=None, backend=None):
  """Blocked gated attention (module doc): q [B, T, K, G, H]; k, v [B, S, K, H]; positions
  and segments int32 [B, T] / [B, S]; keep None or [B, K, S] float (0/1, straight-through).
  Returns out [B, T, K, G, H] in q.dtype.

  backend: "reference" (the jnp scan), or "tpu" / "gpu" / "interpret" for the Pallas
  forward kernel; the backward is the jnp scan on every backend. "dense" (explicit only)
  runs `gated_attention_dense`, the [T, S] statement, by plain autodiff: the baseline of
  benchmarks/train_step.py.
  """
  _check(q, k, v, q_positions, k_positions, q_segments, k_segments, keep)
  if backend == "dense":
    return gated_attention_dense(q, k, v, q_positions, k_positions, q_segments, k_segments,
                                 keep, window=window, scale=scale)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  block_k = block_k or _balanced_block(k.shape[1], DEFAULT_BLOCK_K)
  block_q = block_q or _balanced_block(q.shape[1], DEFAULT_BLOCK_Q)
  block_k, block_q = min(block_k, max(k.shape[1], 1)), min(block_q, max(q.shape[1], 1))
  backend = resolve_backend(backend)
  # The Pallas forward exists for the TPU-style kernel (tpu, interpret); no Mosaic GPU
  # variant yet, so "gpu" runs the jnp scan here while the other kernels use their GPU bodies.
  forward = _kernel_forward(backend) if backend in ("tpu", "interpret") else _forward
  ints = [jnp.asarray(x, jnp.int32) for x in (q_positions, k_positions, q_segments, k_segments)]
  return _blocked(q, k, v, keep, *ints, window, scale, (block_k, block_q), forward)


def _balanced_block(n: int, largest: int) -> int:
  """The smallest block (a multiple of 8) that covers n in as few blocks of <= `largest`
  as possible: n = 1088 takes 3 blocks of 368 (padding 16), not 3 of 512 (padding 448,
  which costs more than the 1088 real rows at these sizes)."""
  count = max(1, -(-n // largest))
  return min(largest, -(-(-(-n // count)) // 8) * 8)


@functools.lru_cache(maxsize=None)
def _kernel_forward(backend: str):
  """The Pallas forward kernel with `_forward`'s signature (hashable: a custom_vjp static)."""
  from pallas_kernels import gated_attention_kernel

  def forward(q, k, v, q_pos, k_pos, q_seg, k_seg, keep, window, scale, block_k, block_q):
    del block_q  # the kernel's own grid
    return gated_attention_kernel.gated_attention_forward(
        q, k, v, q_pos, k_pos, q_seg, k_seg, keep, window=window, scale=scale,
        block_k=min(block_k, 128), backend=backend)

  return forward
