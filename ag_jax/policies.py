"""Cache policies: which tokens a layer keeps, and how it ranks them when capacity overflows.

A policy is a small frozen (hashable, static under `jit`) object used by every layer:
  * prefill_attend  flags the prefill attention uses (None: plain causal attention);
  * prefill_select  which prompt tokens go into the cache and their scores;
  * decode_admit    whether the new token wants a slot, and its score;
  * decode_update   the scores after a decode step (H2O adds this step's attention mass);
  * eviction_score  what capacity overflow compares (lowest goes first).
One cache, one compaction kernel and one decode kernel serve every policy (DESIGN §2), so
ablations compare like with like. Arrays: B batch, K kv heads, T prompt, S cache slots.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Policy:
  uses_gate = False            # needs the model's gates (and the gate's own k/v cache)
  needs_prefill_probs = False  # prefill_select reads the prompt's attention probabilities
  needs_decode_mass = False    # decode_update reads each slot's attention mass
  evicts = True                # False: every token must fit (capacity >= context)

  @property
  def name(self) -> str:
    return type(self).__name__

  def prefill_attend(self, prob, flags, valid) -> Optional[jnp.ndarray]:
    """prob, flags, valid [B, K, T] (prob/flags None without a gate) -> [B, K, T] bool or None."""
    return None

  def prefill_select(self, prob, flags, valid, positions, probs):
    """positions [B, K, T]; probs [B, K, G, T, S] or None -> store [B, K, T] bool, score f32."""
    raise NotImplementedError

  def decode_admit(self, prob, flags, position):
    """prob, flags [B, K] (None without a gate); position [B, K] -> keep [B, K] bool, score."""
    raise NotImplementedError

  def decode_update(self, score, slot_position, mass, position):
    """score, slot_position, mass [B, K, S]; position [B, K] -> the slots' new scores."""
    return score

  def eviction_score(self, score, slot_position, position):
    return score

  def describe(self) -> str:
    fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
    return f"{self.name}({fields})"


@dataclasses.dataclass(frozen=True)
class AttentionGate(Policy):
  """The learned gate decides (DESIGN §1); overflow keeps the highest keep probabilities."""

  uses_gate = True

  def prefill_attend(self, prob, flags, valid):
    return flags

  def prefill_select(self, prob, flags, valid, positions, probs):
    return flags & valid, prob

  def decode_admit(self, prob, flags, position):
    return flags, prob


@dataclasses.dataclass(frozen=True)
class Full(Policy):
  """Keeps everything: the reference every eviction policy is compared with."""

  evicts = False

  def prefill_select(self, prob, flags, valid, positions, probs):
    return valid, positions.astype(jnp.float32)

  def decode_admit(self, prob, flags, position):
    return jnp.ones(position.shape, bool), position.astype(jnp.float32)


REGISTRY = {"ag": AttentionGate, "attention_gate": AttentionGate, "full": Full}


def make_policy(name: str, **kwargs) -> Policy:
  """A policy by name (`ag`, `full`, ...) with its knobs; unknown names list the known ones."""
  key = name.lower().replace("-", "_")
  if key not in REGISTRY:
    raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(sorted(REGISTRY))}")
  return REGISTRY[key](**kwargs)
