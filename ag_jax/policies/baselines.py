"""Training-free baselines on the same cache: StreamingLLM, Local, Random, H2O, SnapKV.

Each compresses the way kvpress does: prefill attends over the whole prompt, then the cache
keeps what the policy selects; decode admits every new token and a full row replaces its
lowest-ranked slot. Arrays: B batch, K kv heads, G query heads per KV head, T prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax.numpy as jnp
from jax import lax

from ag_jax.policies.base import SINK_SCORE, Policy, PolicyError, admit_all, row_length

@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
  """Attention sinks + a recent window (Xiao et al. 2023, arXiv 2309.17453).

  The first `sink` tokens of every sequence are pinned; the rest is a window of the most
  recent tokens: `window` of them, or (None) as many as the capacity leaves. Prefill keeps
  the sinks and the prompt's last tokens; decode admits every token and, when the row is
  full, the newcomer replaces the oldest non-sink. Score = position, sinks SINK_SCORE.
  """

  sink: int = 4
  window: Optional[int] = None

  def __post_init__(self):
    if self.sink < 0:
      raise PolicyError(f"StreamingLLM sink must be >= 0, got {self.sink}")
    if self.window is not None and self.window < 1:
      raise PolicyError(f"StreamingLLM window must be >= 1 or None, got {self.window}")

  @property
  def max_kept(self):
    return None if self.window is None else self.sink + self.window

  def _score(self, position):
    return jnp.where(position < self.sink, SINK_SCORE, position.astype(jnp.float32))

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None):
    store = valid
    if self.window is not None:
      recent = positions >= row_length(valid) - self.window
      store = valid & ((positions < self.sink) | recent)
    return store, self._score(positions)

  def chunk_select(self, prob, flags, valid, positions, keys=None):
    # The window's start depends on the prompt's end, unknown in a chunk; by score the
    # sinks and then the latest tokens win, which is the same set.
    return valid, self._score(positions)

  def decode_admit(self, prob, flags, position, key=None):
    return admit_all(position), self._score(position)


@dataclasses.dataclass(frozen=True)
class Local(Policy):
  """Only the last `window` tokens (None: as many as the capacity holds): StreamingLLM
  without sinks. Decode slides the window: a full row drops its oldest token."""

  window: Optional[int] = None

  def __post_init__(self):
    if self.window is not None and self.window < 1:
      raise PolicyError(f"Local window must be >= 1 or None, got {self.window}")

  @property
  def max_kept(self):
    return self.window

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None):
    return StreamingLLM(0, self.window).prefill_select(prob, flags, valid, positions, probs)

  def chunk_select(self, prob, flags, valid, positions, keys=None):
    return StreamingLLM(0, self.window).chunk_select(prob, flags, valid, positions)

  def decode_admit(self, prob, flags, position, key=None):
    return admit_all(position), position.astype(jnp.float32)


def _uniform_hash(seed: int, position, head):
  """A uniform number in [0, 1) per (seed, position, head): murmur3's 32-bit finaliser
  over a mix of the three, so no RNG key has to travel through the cache."""
  u32 = jnp.uint32
  x = (position.astype(u32) * u32(0x9E3779B1) + head.astype(u32) * u32(0x85EBCA77)
       + u32((seed * 0xC2B2AE3D) % 2 ** 32))
  x = (x ^ (x >> 16)) * u32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * u32(0xC2B2AE35)
  x = x ^ (x >> 16)
  return (x >> 8).astype(jnp.float32) * (1.0 / 2 ** 24)  # 24 bits: exact in f32


@dataclasses.dataclass(frozen=True)
class Random(Policy):
  """Random scores (kvpress RandomPress): score = a hash of (seed, position, KV head),
  deterministic, the same in prefill and decode and in every layer; the capacity rule keeps
  the top scores, so by default (ratio 1) the budget fills with a uniform random subset.
  `ratio` < 1 also admits each token only with that probability (a cap below the budget)."""

  ratio: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not 0.0 < self.ratio <= 1.0:
      raise PolicyError(f"Random ratio must be in (0, 1], got {self.ratio}")

  def _draw(self, position):
    head = lax.broadcasted_iota(jnp.int32, position.shape, 1)  # axis 1 is the KV head
    u = _uniform_hash(self.seed, position, head)
    return u < self.ratio, u

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None):
    keep, u = self._draw(positions)
    return valid & keep, u

  def decode_admit(self, prob, flags, position, key=None):
    return self._draw(position)


Count = Optional[Union[int, float]]


def _check_knob(knob: Count, what: str) -> None:
  if isinstance(knob, float) and not 0.0 <= knob <= 1.0:
    raise PolicyError(f"H2O {what}={knob}: a float is a fraction of the capacity, in [0, 1]")
  if isinstance(knob, int) and knob < 0:
    raise PolicyError(f"H2O {what} must be >= 0 tokens, got {knob}")


def _tokens(knob: Count, capacity):
  """An int knob is a token count, a float one a fraction of the capacity (rounded half
  to even, in float32 whether `capacity` is an int or an array: one rule for both)."""
  if isinstance(knob, float):
    return jnp.round(jnp.float32(knob) * jnp.asarray(capacity, jnp.float32)).astype(jnp.int32)
  return knob


def split_capacity(heavy: Count, recent: Count, capacity):
  """H2O's (heavy, recent) token counts for a cache of `capacity` (an int or an int32
  array of per-row capacities): None splits the capacity as the paper does, `recent` half
  of it (or what `heavy` leaves), `heavy` the rest."""
  heavy, recent = _tokens(heavy, capacity), _tokens(recent, capacity)
  if recent is None:
    recent = capacity // 2 if heavy is None else jnp.maximum(capacity - heavy, 0)
  recent = jnp.minimum(recent, capacity)
  heavy = capacity - recent if heavy is None else jnp.minimum(heavy, capacity - recent)
  return heavy, recent


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
  """Heavy hitters + recent tokens (Zhang et al. 2023, arXiv 2306.14048).

  A token's score is the attention it has received, accumulated over every query since it
  arrived (column sums of the prompt's attention at prefill, then the decode kernel's
  per-slot mass each step), summed over the query heads of its KV head. The `recent` most
  recent tokens are protected; `heavy` tokens with the highest score fill the rest.
  Knobs: int = tokens, float = fraction of the capacity; None splits the capacity as the
  paper does: `recent` half of it (or what `heavy` leaves), `heavy` the rest. Prefill
  keeps the prompt's last `recent` tokens and its `heavy` highest-scoring others; decode
  admits every token, and a full row evicts its lowest-scoring non-recent slot. Rows of one
  batch with their own capacities (`engine.prefill(row_capacity=)`) are each split by
  their own: the layer passes each row's capacity to the hooks (`splits_capacity`).
  """

  heavy: Count = None
  recent: Count = None
  # The knobs as given, kept by `bind` so that each row can be split by its own capacity;
  # not a knob (repr=False keeps it out of describe() and make_policy).
  given: Optional[tuple] = dataclasses.field(default=None, repr=False)
  needs_prefill_probs = True
  needs_decode_mass = True
  splits_capacity = True

  def __post_init__(self):
    _check_knob(self.heavy, "heavy"), _check_knob(self.recent, "recent")

  @property
  def _given(self) -> tuple:
    return self.given or (self.heavy, self.recent)

  def bind(self, capacity):
    heavy, recent = split_capacity(*self._given, capacity)
    return H2O(heavy=int(heavy), recent=int(recent), given=self._given)

  def _counts(self, capacity=None):
    """(heavy, recent): split from each row's capacity ([B, K, 1]) when given, else the
    bound token counts."""
    if capacity is not None:
      return split_capacity(*self._given, capacity)
    if not all(isinstance(x, int) for x in (self.heavy, self.recent)):
      raise PolicyError(f"{self.describe()} needs token counts: resolve None and fractions "
                        "against the capacity with ag_jax.policies.fit(policy, capacity)")
    return self.heavy, self.recent

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None, capacity=None):
    heavy, recent = self._counts(capacity)
    real_queries = valid[:, :, None, :, None]                          # [B, K, 1, T, 1]
    mass = jnp.sum(jnp.where(real_queries, probs, 0.0), axis=(2, 3))   # [B, K, S]
    is_recent = valid & (positions >= row_length(valid) - recent)
    candidate = valid & ~is_recent
    order = jnp.argsort(-jnp.where(candidate, mass, -jnp.inf), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)  # 0 = heaviest candidate; ties: the earlier token
    return is_recent | (candidate & (rank < heavy)), mass

  def decode_admit(self, prob, flags, position, key=None):
    return admit_all(position), jnp.zeros(position.shape, jnp.float32)

  def decode_update(self, score, slot_position, mass, position):
    return score + mass  # the newcomer's slot includes its attention to itself

  def eviction_score(self, score, slot_position, position, capacity=None):
    _, recent = self._counts(capacity)
    return jnp.where(slot_position > position[..., None] - recent, jnp.inf, score)


@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
  """Observation-window voting (Li et al. 2024, arXiv 2404.14469).

  The last `window` prompt tokens of each sequence (prompts are right-padded: the window
  ends at each row's own length) vote for earlier tokens with their attention, averaged
  over the window queries and the KV head's query heads; the votes are pooled along keys
  (`pooling` "max" or "avg", `kernel` odd, "same" padding as in the paper's code) so that
  neighbours of a hit survive too. Prefill keeps the window and the best-voted earlier
  tokens up to the capacity. Decode appends generated tokens as the paper does; when a
  row is full, the newcomer replaces the worst-voted prompt token, then (once only the
  window and generated tokens are left) the oldest token.
  Score (kvpress SnapKVPress, defaults window 64, kernel 5, avg): the window queries' mean
  attention, pooled per query head, averaged over the group, in [0, 1]; window and
  generated tokens 2 + position. Needs the prompt's probabilities: one-shot prefill only.
  """

  window: int = 64
  kernel: int = 5
  pooling: str = "avg"
  needs_prefill_probs = True

  def __post_init__(self):
    if self.window < 1:
      raise PolicyError(f"SnapKV window must be >= 1, got {self.window}")
    if self.kernel < 1 or self.kernel % 2 == 0:
      raise PolicyError(f"SnapKV kernel must be odd and >= 1, got {self.kernel}")
    if self.pooling not in ("max", "avg"):
      raise PolicyError(f"SnapKV pooling must be 'max' or 'avg', got {self.pooling!r}")

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None):
    observe = valid & (positions >= row_length(valid) - self.window)  # [B, K, T]
    # kvpress order: mean over the window queries per query head, pool per query head,
    # then mean over the KV head's group (avg pooling commutes with that mean).
    votes = jnp.einsum("BKGTS,BKT->BKGS", probs, observe.astype(probs.dtype)) / self.window
    if self.pooling == "max":  # not in kvpress: the paper's max pooling of the group's votes
      votes = jnp.mean(votes, axis=2, keepdims=True)
    prefix = (valid & ~observe)[:, :, None, :]  # [B, K, 1, S] the tokens that can be evicted
    window = (1, 1, 1, self.kernel)
    if self.pooling == "max":
      pooled = lax.reduce_window(jnp.where(prefix, votes, -jnp.inf), -jnp.inf, lax.max,
                                 window, (1, 1, 1, 1), "SAME")
    else:  # zero padding counted in the mean, as avg_pool1d(count_include_pad=True)
      pooled = lax.reduce_window(jnp.where(prefix, votes, 0.0), 0.0, lax.add, window,
                                 (1, 1, 1, 1), "SAME") / self.kernel
    pooled = jnp.mean(pooled, axis=2)  # [B, K, S], each in [0, 1]
    # The window (kvpress: the max score + 1) ranks above every vote, latest first.
    score = jnp.where(observe, 2.0 + positions.astype(jnp.float32), pooled)
    return valid, score

  def decode_admit(self, prob, flags, position, key=None):
    return admit_all(position), 2.0 + position.astype(jnp.float32)
