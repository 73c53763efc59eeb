"""kvpress's score-only presses on our cache: ObservedAttention, Knorm, TOVA.

Each returns store = valid and a score; the capacity rule keeps the top scores per row as
kvpress's ScorerPress keeps its top `int(T * (1 - compression_ratio))`. Arrays: B batch,
K kv heads, G query heads per KV head, T prompt, S cache slots, H head dim.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ag_jax.policies.base import Policy, PolicyError, admit_all, row_length


@dataclasses.dataclass(frozen=True)
class ObservedAttention(Policy):
  """kvpress ObservedAttentionPress: a token's score is the attention it receives, averaged
  over the queries that can see it (key j of an n-token prompt: n - j queries) and over the
  query heads of its KV head (kept as the group's sum: the same ranking, and the
  decode kernel's mass is a group sum); no protected window (H2O is the paper's rule beside it).
  Decode keeps that running mean: each step adds the new query's attention (group mean).
  Needs the prompt's probabilities: one-shot prefill only, not chunked prefill.
  """

  needs_prefill_probs = True
  needs_decode_mass = True

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None):
    real_queries = valid[:, :, None, :, None]                                   # [B, K, 1, T, 1]
    mass = jnp.sum(jnp.where(real_queries, probs, 0.0), axis=(2, 3))  # [B, K, S]
    seen_by = jnp.maximum(row_length(valid) - positions, 1).astype(jnp.float32)  # [B, K, T]
    return valid, jnp.where(valid, mass / seen_by, 0.0)

  def decode_admit(self, prob, flags, position, key=None):
    return admit_all(position), jnp.zeros(position.shape, jnp.float32)

  def decode_update(self, score, slot_position, mass, position):
    seen = jnp.maximum(position[..., None] - slot_position, 0).astype(jnp.float32)  # before now
    return (score * seen + mass) / (seen + 1.0)


@dataclasses.dataclass(frozen=True)
class Knorm(Policy):
  """kvpress KnormPress: keep the keys with the lowest L2 norm (score = -||k||, in fp32).
  Decode admits every token; a full row replaces its highest-norm key with a lower one."""

  needs_prefill_keys = True

  @staticmethod
  def _score(keys):
    if keys is None:
      raise PolicyError("Knorm needs the keys: the engine must pass keys=/key= to the policy")
    k = keys.astype(jnp.promote_types(keys.dtype, jnp.float32))
    return -jnp.sqrt(jnp.sum(k * k, axis=-1))

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None):
    return valid, self._score(keys)

  def decode_admit(self, prob, flags, position, key=None):
    return admit_all(position), self._score(key)


@dataclasses.dataclass(frozen=True)
class TOVA(Policy):
  """kvpress TOVAPress (Oren et al. 2024, arXiv 2401.06104): score = the last prompt token's
  attention, averaged over all query heads of the layer (the same score, so the same kept
  set, for every KV head, as kvpress repeats it); the last token itself is protected.
  Decode rescores every slot with the new token's attention (head mean) and protects the
  newcomer: a full row drops its lowest-scored slot. Needs the prompt's probabilities:
  one-shot prefill only, not chunked prefill.
  """

  needs_prefill_probs = True
  needs_decode_mass = True

  def prefill_select(self, prob, flags, valid, positions, probs, keys=None):
    last = (positions == row_length(valid) - 1) & valid                       # [B, K, T]
    row = jnp.einsum("BKGTS,BKT->BKGS", probs, last.astype(probs.dtype))     # [B, K, G, S]
    score = jnp.mean(row, axis=(1, 2), keepdims=True)[:, :, 0]               # [B, 1, S]
    score = jnp.broadcast_to(score, valid.shape)
    return valid, jnp.where(last, 2.0, score)  # attention <= 1: the last token ranks first

  def decode_admit(self, prob, flags, position, key=None):
    return admit_all(position), jnp.full(position.shape, 2.0, jnp.float32)

  def decode_update(self, score, slot_position, mass, position):
    # mass [B, K, S] is summed over each group; every KV head holds the same tokens in the
    # same slots (identical scores and decisions), so the mean over K is the head mean.
    return jnp.broadcast_to(jnp.mean(mass, axis=1, keepdims=True), mass.shape)

  def eviction_score(self, score, slot_position, position):
    return jnp.where(slot_position == position[..., None], jnp.inf, score)
