"""Teacher-forced scoring through the evicting cache, perplexity, and cache statistics.

A row is a prefix (prefilled: the policy selects from the prompt and the cache is cut to
capacity) and a continuation whose tokens are fed one decode step at a time, so every
continuation token is predicted from the cache the policy left, exactly as in generation.
One jitted program per shape: prefill (engine.prefill), then a `lax.scan` of decode steps.

A budget is a fraction of each row's own context (prefix + continuation): rows of one
batch keep different counts under one static capacity (`engine.prefill(row_capacity=)`),
so a row scores the same in any batch. Rows are sorted by length before batching; array
widths are rounded up to `bucket` tokens so that few shapes compile (each distinct batch
capacity compiles too: pass `capacity` for one fixed cache size).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ag_jax import engine, policies
from ag_jax.cache import full_kv_nbytes, kept_ratio
from ag_jax.model import Llama
from ag_jax.policies import Policy


def resolve_setting(model: Llama, policy: Policy | None, context: int, capacity: int | None = None,
                    budget: float | None = None) -> tuple[Policy, int]:
  """(policy, capacity) for a cache of `context` tokens: the engine's capacity rule, then
  `policies.fit` (window policies shrink the cache, H2O's knobs become token counts)."""
  policy = policy or engine.default_policy(model)
  return policies.fit(policy, engine.resolve_capacity(policy, context, capacity, budget))


def batch_setting(settings: Sequence[tuple[Policy, int]]) -> tuple[Policy, int, np.ndarray]:
  """Rows of one batch, each with its own (bound policy, capacity) -> (the policy bound to
  the batch's largest capacity, that capacity, each row's capacity [B] int32 for
  `engine.prefill(row_capacity=)`): one prefill holds every row to its own capacity."""
  caps = np.array([cap for _, cap in settings], np.int32)
  largest = int(caps.argmax())
  return settings[largest][0], int(caps[largest]), caps


@dataclasses.dataclass
class CacheStats:
  """What the caches of an evaluation held, over all its batches."""

  capacity: int = 0             # the largest capacity used (slots per row)
  kept_ratio: np.ndarray | None = None  # [L, K] kept / seen tokens, mean over rows
  kv_bytes: int = 0             # k and v buffers of the largest batch
  cache_bytes: int = 0          # every cache buffer (k, v, scores, positions, gate cache)
  full_kv_bytes: int = 0        # k and v of a full cache for that batch
  rows: int = 0
  describe: str = ""            # the policy as run (knobs resolved) in the largest batch

  def add(self, policy: Policy, capacity, kept_ratio, kv_bytes, cache_bytes, full_bytes, rows):
    kept = np.asarray(kept_ratio, np.float64)
    self.kept_ratio = kept if self.kept_ratio is None else \
        (self.kept_ratio * self.rows + kept * rows) / (self.rows + rows)
    self.rows += rows
    self.capacity = max(self.capacity, int(capacity))
    if kv_bytes > self.kv_bytes:
      self.kv_bytes, self.cache_bytes, self.full_kv_bytes = kv_bytes, cache_bytes, full_bytes
      self.describe = policy.describe()

  def as_dict(self) -> dict:
    kept = self.kept_ratio if self.kept_ratio is not None else np.zeros((0, 0))
    return {"describe": self.describe, "capacity": self.capacity, "kept": float(kept.mean()) if kept.size else 0.0,
            "kept_per_layer_head": kept.tolist(), "kv_mib": self.kv_bytes / 2 ** 20,
            "cache_mib": self.cache_bytes / 2 ** 20, "full_kv_mib": self.full_kv_bytes / 2 ** 20}


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _teacher_forced(variables, cache, first_logits, targets, active, *, model):
  """first_logits [B, V] predict targets[:, 0]; feeding targets[:, j] predicts targets[:, j+1].

  targets int32 [B, N], active bool [B, N] (real target tokens, a prefix of each row)
  -> log-probabilities [B, N] f32 (0 where inactive), greedy [B, N] bool (the target was the
  argmax: teacher-forced greedy decoding), and the cache after the last step.
  """
  def score(logits, token):  # [B, V], [B] -> ([B] f32, [B] bool)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    return logp, jnp.argmax(logits, axis=-1) == token

  def step(cache, xs):
    token, target, live = xs  # [B] each; finished rows neither advance nor keep anything
    logits, cache = model.apply(variables, token, cache, live, method=Llama.decode)
    return cache, score(logits, target)

  xs = (targets[:, :-1].T, targets[:, 1:].T, active[:, 1:].T)  # [N-1, B] each
  cache, (rest, rest_greedy) = jax.lax.scan(step, cache, xs)  # [N-1, B] each
  first, first_greedy = score(first_logits, targets[:, 0])
  logp = jnp.concatenate([first[:, None], rest.T], axis=1)
  greedy = jnp.concatenate([first_greedy[:, None], rest_greedy.T], axis=1)
  return jnp.where(active, logp, 0.0), greedy & active, cache


def _round_up(n: int, bucket: int) -> int:
  return max(bucket, -(-n // bucket) * bucket)


def padded_batches(prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                   batch_size: int, bucket: int, pad_id: int):
  """Rows sorted by total length, in batches: yields (row indices, tokens [B, W], lengths
  [B], targets [B, N], active [B, N] bool), widths rounded up to `bucket` so few shapes
  compile."""
  order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]) + len(continuations[i]))
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = _round_up(max(len(prefixes[i]) for i in rows), bucket)
    steps = _round_up(max(len(continuations[i]) for i in rows), bucket)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    targets = np.full((len(rows), steps), pad_id, np.int32)
    active = np.zeros((len(rows), steps), bool)
    for r, i in enumerate(rows):
      tokens[r, :len(prefixes[i])] = prefixes[i]
      targets[r, :len(continuations[i])] = continuations[i]
      active[r, :len(continuations[i])] = True
    yield rows, tokens, np.array([len(prefixes[i]) for i in rows], np.int32), targets, active


def score_continuations(model: Llama, variables, prefixes: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], *, policy: Policy | None = None,
                        capacity: int | None = None, budget: float | None = None,
                        batch_size: int = 16, bucket: int = 16, pad_id: int = 0,
                        backend: str | None = None) -> tuple[list[np.ndarray], CacheStats]:
  """Log-probability of each continuation token given its prefix, through the cache.

  Returns ([len(continuation_i)] float arrays in input order, CacheStats).
  """
  scores, _, stats = score_and_greedy(
      model, variables, prefixes, continuations, policy=policy, capacity=capacity,
      budget=budget, batch_size=batch_size, bucket=bucket, pad_id=pad_id, backend=backend)
  return scores, stats


def score_and_greedy(model: Llama, variables, prefixes: Sequence[Sequence[int]],
                     continuations: Sequence[Sequence[int]], *, policy: Policy | None = None,
                     capacity: int | None = None, budget: float | None = None,
                     batch_size: int = 16, bucket: int = 16, pad_id: int = 0,
                     backend: str | None = None):
  """`score_continuations`, plus per token whether it was the greedy (argmax) choice.

  Returns (log-probs [len(c_i)] f32, greedy [len(c_i)] bool, in input order; CacheStats).
  """
  if len(prefixes) != len(continuations):
    raise ValueError(f"{len(prefixes)} prefixes but {len(continuations)} continuations")
  for i, (p, c) in enumerate(zip(prefixes, continuations)):
    if not p or not c:
      raise ValueError(f"row {i}: prefix and continuation need at least one token each")
  scores: list[np.ndarray | None] = [None] * len(prefixes)
  greedy: list[np.ndarray | None] = [None] * len(prefixes)
  stats = CacheStats()
  for rows, tokens, lengths, targets, active in padded_batches(
      prefixes, continuations, batch_size, bucket, pad_id):
    width, steps = tokens.shape[1], targets.shape[1]
    # The budget is a fraction of each row's own context + continuation, not of the
    # batch's longest or of the padding: a row scores the same in any batch.
    settings = [resolve_setting(model, policy, len(prefixes[i]) + len(continuations[i]),
                                capacity, budget) for i in rows]
    bound, cap, row_cap = batch_setting(settings)
    if not bound.evicts:
      cap, row_cap = width + steps, None  # a non-evicting cache also holds the padding steps
    logits, cache = engine.prefill(model, variables, tokens, lengths, policy=bound, capacity=cap,
                                   max_new_tokens=steps, backend=backend, row_capacity=row_cap)
    score_batch(model, variables, cache, logits, rows, continuations, targets, active,
                width=width, policy=bound, capacity=cap, out=(scores, greedy, stats))
  return scores, greedy, stats


def score_batch(model: Llama, variables, cache, first_logits, rows: Sequence[int],
                continuations: Sequence[Sequence[int]], targets: np.ndarray,
                active: np.ndarray, *, width: int, policy: Policy, capacity, out) -> None:
  """Teacher-force one padded batch (targets, active [B, steps], as `padded_batches`
  yields them) from its prefilled cache and first_logits [B, V].

  out = (scores, greedy, stats): the batch's input `rows` of the two lists are filled, and
  the cache (prompts `width` tokens wide, sized for `policy` and `capacity`) is added to
  the CacheStats.
  """
  scores, greedy, stats = out
  cfg = model.cfg
  logp, hits, cache = _teacher_forced(variables, cache, first_logits, jnp.asarray(targets),
                                      jnp.asarray(active), model=model)
  logp, hits = np.asarray(logp), np.asarray(hits)
  for r, i in enumerate(rows):
    scores[i] = logp[r, :len(continuations[i])]
    greedy[i] = hits[r, :len(continuations[i])]
  stats.add(policy, capacity, kept_ratio(cache), cache.kv_nbytes, cache.nbytes,
            full_kv_nbytes(cfg.num_layers, len(rows), cfg.num_kv_heads, cfg.head_dim,
                           width + targets.shape[1], cfg.dtype), len(rows))


def perplexity(model: Llama, variables, token_rows: Sequence[Sequence[int]], *,
               prefix_fraction: float = 0.5, prefix_tokens: int | None = None, **kwargs) -> dict:
  """Perplexity of each row's tokens after its prefix, teacher-forced through the cache.

  The prefix is `prefix_tokens` tokens, or `prefix_fraction` of the row (at least 1);
  the rest is decoded one token at a time. Returns {"perplexity", "nll" (mean per
  token), "tokens", **cache statistics}. kwargs go to `score_continuations`.
  """
  prefixes, continuations = [], []
  for i, row in enumerate(token_rows):
    row = list(row)
    cut = prefix_tokens if prefix_tokens is not None else int(len(row) * prefix_fraction)
    cut = min(max(cut, 1), len(row) - 1)
    if len(row) < 2:
      raise ValueError(f"row {i} has {len(row)} token(s); perplexity needs at least 2")
    prefixes.append(row[:cut])
    continuations.append(row[cut:])
  scores, stats = score_continuations(model, variables, prefixes, continuations, **kwargs)
  total = -float(sum(s.sum() for s in scores))
  count = sum(len(s) for s in scores)
  nll = total / count
  return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, **stats.as_dict()}
