"""The policy protocol, `fit`, and the two policies of the method itself: AttentionGate, Full.

See `ag_jax.policies` for what each hook does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

# Pinned StreamingLLM sinks score above every position (positions < 2**24 are exact in f32).
SINK_SCORE = float(2 ** 30)


class PolicyError(ValueError):
  """A policy knob is out of range or unresolved; the message says what to set."""


@dataclasses.dataclass(frozen=True)
class Policy:
  uses_gate = False            # needs the model's gates (and the gate's own k/v cache)
  needs_prefill_probs = False  # prefill_select reads the prompt's attention probabilities
  needs_prefill_keys = False   # prefill_select reads the prompt's keys [B, K, T, H]
  needs_decode_mass = False    # decode_update reads each slot's attention mass
  evicts = True                # False: every token must fit (capacity >= context)
  # prefill_select and eviction_score take `capacity=` [B, K, 1] int32, each row's own
  # capacity (a policy whose knobs are shares of the capacity: H2O)
  splits_capacity = False

  @property
  def name(self) -> str:
    return type(self).__name__

  @property
  def max_kept(self) -> Optional[int]:
    """Most tokens a row may ever hold (a window policy's window); None: no bound."""
    return None

  def bind(self, capacity: int) -> "Policy":
    """This policy with its capacity-dependent knobs resolved to token counts."""
    return self

  def prefill_attend(self, prob, flags, valid) -> Optional[jnp.ndarray]:
    """prob, flags, valid [B, K, T] (prob/flags None without a gate) -> [B, K, T] bool or None."""
    return None

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None):
    """positions [B, K, T]; probs [B, K, G, T, S] or None; keys [B, K, T, H] (post-RoPE, as
    cached) or None -> store [B, K, T] bool, score f32."""
    raise NotImplementedError

  @property
  def chunkable(self) -> bool:
    """Whether prefill may run in chunks with the same kept set as one-shot: a policy that
    scores tokens by the whole prompt's attention (H2O, SnapKV, ...) must see it at once."""
    return not self.needs_prefill_probs

  def chunk_select(self, prob, flags, valid, positions, keys=None):
    """prefill_select for one chunk of the prompt (arrays [B, K, C]): the chunk's tokens
    compete with the kept ones by score, and top-`capacity` of a union is top-`capacity` of
    (the kept top-`capacity`) and the chunk, so the kept set is the one-shot one."""
    return self.prefill_select(prob, flags, valid, positions, None, keys=keys)

  def decode_admit(self, prob, flags, position, key=None):
    """prob, flags [B, K] (None without a gate); position [B, K]; key [B, K, H] (the new
    token's post-RoPE key) or None -> keep [B, K] bool, score."""
    raise NotImplementedError

  def decode_update(self, score, slot_position, mass, position):
    """score, slot_position, mass [B, K, S]; position [B, K] -> the slots' new scores."""
    return score

  def eviction_score(self, score, slot_position, position):
    return score

  def describe(self) -> str:
    fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                       if f.repr)
    return f"{self.name}({fields})"


def fit(policy: Policy, capacity: int) -> tuple[Policy, int]:
  """(policy, capacity) to build the cache with: a window policy needs no more slots than
  its window (and must not have more: decode evicts only when a row is full), and knobs
  that depend on the capacity are resolved against the final capacity."""
  if policy.max_kept is not None:
    capacity = min(capacity, policy.max_kept)
  return policy.bind(capacity), capacity


def row_length(valid):
  """valid [B, K, T] -> [B, K, 1] int32: each prompt's real length."""
  return jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.int32)


def admit_all(position):
  return jnp.ones(position.shape, bool)


@dataclasses.dataclass(frozen=True)
class AttentionGate(Policy):
  """The learned gate decides (DESIGN §1); overflow keeps the highest keep probabilities."""

  uses_gate = True

  def prefill_attend(self, prob, flags, valid):
    return flags

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None):
    return flags & valid, prob

  def decode_admit(self, prob, flags, position, key=None):
    return flags, prob


@dataclasses.dataclass(frozen=True)
class Full(Policy):
  """Keeps everything: the reference every eviction policy is compared with."""

  evicts = False

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None):
    return valid, positions.astype(jnp.float32)

  def decode_admit(self, prob, flags, position, key=None):
    return jnp.ones(position.shape, bool), position.astype(jnp.float32)
