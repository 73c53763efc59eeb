"""The capacity rule inside the training view: budget-aware gate training (DESIGN §1, issue 14).

At inference under the kvpress protocol a prompt's context is prefilled with the gates' flags,
then each (layer, KV head) row keeps at most `c = max(1, int(n * budget))` of the n context
tokens: the flagged ones with the highest keep probability, ties to the earlier token
(`pallas_kernels.compact`); the question and answer that follow are all kept. Gates trained
for their flags alone met, under a tight budget, a ranking they never learned.

This module states that rule for the training view, so the gates train under it:

  * a context token j (position < n in its segment) stays visible to the queries *after* the
    context iff it is flagged and ranks < c among its segment's flagged context tokens;
  * the tokens after the context are always visible to later ones (nothing evicts them);
  * the queries *inside* the context see the gates' flags as before (prefill attends that way).

A segment with capacity 0 (budget 1 drawn, plain text, no context) gets the plain view: the
gates' flags everywhere, question and answer included, as the decode protocol without
overflow computes it. Mixing those rows in keeps the question's own flags trained (the
decode protocol caches the question under the gates too).

With the straight-through gradient a needle cut by the capacity still gets the gradient of
its keep probability, so the LM loss of the answer raises it above the tokens that won.
Arrays: B batch, K KV heads, T time. `context_length` [B, T] is each token's segment's n
(0: a segment with no context to compress, e.g. plain text); `capacity` [B, T] its c.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def kvpress_capacity(context_tokens, budget):
  """kvpress's rounding, max(1, int(n * budget)), in float64 as Python computes it (the
  evaluation's `ruler_eval.kvpress_capacity` calls this); arrays broadcast."""
  return np.maximum(1, np.floor(np.asarray(context_tokens, np.float64) * budget)).astype(np.int32)


def draw_capacity(context_length: np.ndarray, budgets, seed: int, step: int,
                  rows) -> np.ndarray:
  """context_length [B, T] int -> capacity [B, T] int32: row r of the global batch trains
  under one budget drawn from `budgets` by (seed, step, r), so the draw does not depend on
  how many processes feed the batch, and a resumed run draws the same. 0 (the plain view)
  where there is no context or the budget is 1. `rows`: the global row index of each of
  the B local rows."""
  chosen = np.asarray([budgets[np.random.default_rng([seed, step, r, 0xCA9]).integers(
      len(budgets))] for r in rows], np.float64)[:, None]  # [B, 1]
  capacity = kvpress_capacity(context_length, chosen)
  return np.where((np.asarray(context_length) > 0) & (chosen < 1.0), capacity, 0).astype(np.int32)


def regions(positions, context_length, capacity):
  """positions, context_length, capacity [B, T] -> (in_context, after_context) [B, T] bool
  of the segments under a capacity (capacity 0: the plain view, neither)."""
  has_context = (context_length > 0) & (capacity > 0)
  return has_context & (positions < context_length), has_context & (positions >= context_length)


def capped_flags(prob, flags, positions, segments, context_length, capacity):
  """prob [B, K, T] f32, flags [B, K, T] bool -> [B, K, T] bool: which context tokens the
  capacity rule keeps (False outside the context). Per (row, head, segment): flagged first,
  then higher prob, then earlier token, as `compaction_plan` ranks."""
  in_context, _ = regions(positions, context_length, capacity)
  b, k, t = prob.shape
  candidate = flags & in_context[:, None, :]  # [B, K, T]
  # Sort each (row, head) by (segment, not candidate, -prob, time); a non-context token
  # sorts after every context token (segment key t + 1 > any segment id in a row of t).
  segment_key = jnp.where(in_context, segments, t + 1).astype(jnp.int32)
  segment_key = jnp.broadcast_to(segment_key[:, None, :], (b, k, t))
  time = lax.broadcasted_iota(jnp.int32, (b, k, t), 2)
  _, _, _, order = lax.sort((segment_key, (~candidate).astype(jnp.int32),
                             -prob.astype(jnp.float32), time), dimension=2, num_keys=4)
  rank_overall = jnp.argsort(order, axis=-1).astype(jnp.int32)  # [B, K, T] sorted index of t
  # A segment's context tokens start, in sorted order, after the context tokens of the
  # segments before it (segments are contiguous and increasing along a packed row):
  # the context tokens before the segment's first position, t - positions[t].
  before = jnp.cumsum(in_context.astype(jnp.int32), axis=-1) - in_context.astype(jnp.int32)
  first = jnp.clip(lax.broadcasted_iota(jnp.int32, (b, t), 1) - positions, 0, t - 1)
  start = jnp.take_along_axis(before, first, axis=-1)  # [B, T]
  rank = rank_overall - start[:, None, :]  # rank within the segment's context
  return candidate & (rank < capacity[:, None, :])


def after_context_keep(prob, flags, positions, segments, context_length, capacity):
  """The key flags the queries after a context see, [B, K, T] f32: on context tokens the
  capped flags with the straight-through gradient of `prob` (forward exactly 0/1), 1
  elsewhere (the tokens after the context; other segments' keys are masked by segment, and
  queries of a segment without a capacity never read these flags)."""
  in_context, _ = regions(positions, context_length, capacity)
  capped = capped_flags(prob, flags, positions, segments, context_length, capacity)
  straight = capped.astype(prob.dtype) + (prob - jax.lax.stop_gradient(prob))
  return jnp.where(in_context[:, None, :], straight, 1.0)
