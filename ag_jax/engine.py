"""Batch inference with the evicting cache: `prefill`, `decode_step`, `generate` (DESIGN §4).

`generate` is one jitted program: prefill, then a `lax.while_loop` over decode steps on a
`flax.struct` state; no Python work per token. Prompts are right-padded with `lengths`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ag_jax.cache import KVCache, full_kv_nbytes, gate_slots, kept_ratio
from ag_jax.model import Llama
from ag_jax.policies import AttentionGate, Full, Policy, fit
from ag_jax.sampling import SamplingConfig, sample


class InferenceError(ValueError):
  """Bad inference input; the message says what is wrong and how to fix it."""


def default_policy(model: Llama) -> Policy:
  return AttentionGate() if model.gate is not None else Full()


def resolve_capacity(policy: Policy, context: int, capacity: int | None = None,
                     budget: float | None = None) -> int:
  """Cache slots per (layer, sequence, KV head): `capacity`, or `budget` x context, or all.

  A capacity above the context is honoured as given (the extra slots stay empty)."""
  if capacity is not None and budget is not None:
    raise InferenceError("give either capacity (tokens) or budget (a fraction), not both")
  if budget is not None:
    if not 0.0 < budget <= 1.0:
      raise InferenceError(f"budget must be a fraction in (0, 1], got {budget}")
    capacity = max(1, math.ceil(budget * context))
  capacity = context if capacity is None else int(capacity)
  if capacity < 1:
    raise InferenceError(f"capacity must be at least 1 token, got {capacity}")
  if not policy.evicts and capacity < context:
    raise InferenceError(
        f"the {policy.name} policy evicts nothing, so its cache needs capacity >= prompt + new "
        f"tokens = {context}; got {capacity}. Raise --capacity/--budget or choose an evicting policy")
  return capacity


def _check(model: Llama, policy: Policy, tokens: np.ndarray, lengths: np.ndarray):
  if tokens.ndim != 2:
    raise InferenceError(f"tokens must be [batch, time], got shape {tokens.shape}")
  if lengths.shape != (tokens.shape[0],):
    raise InferenceError(f"lengths must be [batch] = [{tokens.shape[0]}], got {lengths.shape}")
  if (lengths < 1).any():
    raise InferenceError(f"empty prompt in the batch (index {int(np.argmin(lengths))}): every "
                         "prompt needs at least one token (e.g. BOS)")
  if (lengths > tokens.shape[1]).any():
    raise InferenceError("a prompt length exceeds the padded prompt width")
  if policy.uses_gate and model.gate is None:
    raise InferenceError(f"the {policy.name} policy needs gates, but the model has none: "
                         "load trained gates (--gates) or choose another policy")


def planned_context(model: Llama, width: int, max_new_tokens: int = 0, reserve: int = 0) -> int:
  """Positions a cache for prompts of `width` must hold: width + max_new_tokens + reserve,
  checked against the model's max_position."""
  for name, n in (("max_new_tokens", max_new_tokens), ("reserve", reserve)):
    if int(n) < 0:
      raise InferenceError(f"{name} must be >= 0, got {n}")
  context = width + max_new_tokens + reserve
  if context > model.cfg.max_position:
    raise InferenceError(f"prompt ({width}) + max_new_tokens ({max_new_tokens}) + reserve "
                         f"({reserve}) = {context} exceeds the model's max_position "
                         f"{model.cfg.max_position}: shorten the prompts or the generation")
  return context


def _gate_slots(model: Llama, context: int) -> int:
  return gate_slots(model.gate, context) if model.gate is not None else context


@functools.partial(jax.jit, static_argnames=("model", "policy", "capacity", "gate_slots",
                                             "backend", "all_logits", "context", "reserve"))
def _prefill(variables, tokens, lengths, row_capacity=None, *, model, policy, capacity,
             gate_slots, backend, all_logits, context, reserve=0):
  logits, layers = model.apply(variables, tokens, lengths, policy, capacity, gate_slots,
                               backend, all_logits, reserve, row_capacity, method=Llama.prefill)
  # With reserved room the tokens after the prompt are all kept: the policy compressed
  # the prompt, decoding runs under Full (which never evicts below capacity).
  decode_policy = Full() if reserve else policy
  cache = KVCache(**layers, next_position=lengths.astype(jnp.int32),
                  seen=lengths.astype(jnp.int32), policy=decode_policy, backend=backend,
                  planned_context=context, row_capacity=None if reserve else row_capacity)
  return logits, cache


def empty_cache(model: Llama, batch: int, slots: int, gate_slots: int, policy: Policy,
                backend=None) -> KVCache:
  """A cache holding nothing: `slots` per row (capacity + 1, plus any reserve), a gate ring
  of `gate_slots` when the policy uses the (attention) gate."""
  cfg, gate = model.cfg, model.gate
  rows = (cfg.num_layers, batch, cfg.num_kv_heads)
  gate_k = gate_v = None
  if policy.uses_gate and gate.kind == "attention":
    ring = (cfg.num_layers, batch, gate.kv_heads, gate_slots, gate.head_dim)
    gate_k, gate_v = jnp.zeros(ring, cfg.dtype), jnp.zeros(ring, cfg.dtype)  # two buffers
  return KVCache(
      k=jnp.zeros(rows + (slots, cfg.head_dim), cfg.dtype),
      v=jnp.zeros(rows + (slots, cfg.head_dim), cfg.dtype),
      score=jnp.zeros(rows + (slots,), jnp.float32), position=jnp.full(rows + (slots,), -1, jnp.int32),
      length=jnp.zeros(rows, jnp.int32), gate_k=gate_k, gate_v=gate_v,
      next_position=jnp.zeros((batch,), jnp.int32), seen=jnp.zeros((batch,), jnp.int32),
      policy=policy, backend=backend)


@functools.partial(jax.jit, static_argnames=("model", "policy", "capacity", "gate_slots",
                                             "backend", "all_logits", "context", "reserve",
                                             "chunk"), donate_argnames=("cache",))
def _prefill_chunked(variables, tokens, lengths, cache=None, row_capacity=None, *, model, policy,
                     capacity, gate_slots, backend, all_logits, context, reserve, chunk):
  """`_prefill` in chunks of `chunk` tokens (tokens [B, T]): a scan over the T // chunk full
  chunks whose carry is the compacted cache, so only one chunk's K/V exist beside it, then
  one ragged chunk of the T % chunk tokens left (a width need not be a multiple of the
  chunk: padding a 520-token prompt to 1024 would double its work). `cache`: an
  `empty_cache` to fill in place (donated; built here when None)."""
  b, t = tokens.shape
  n, rest = divmod(t, chunk)
  if cache is None:
    cache = empty_cache(model, b, capacity + reserve + 1, gate_slots, policy, backend)

  def step(carry, xs):
    cache, last = carry
    chunk_tokens, start = xs
    width = chunk_tokens.shape[1]
    x, cache = model.apply(variables, chunk_tokens, start, lengths, cache, policy, capacity,
                           backend, row_capacity, method=Llama.prefill_chunk)  # x [B, width, E]
    index = lengths - 1 - start  # each row's last prompt token, if in this chunk
    picked = jnp.take_along_axis(x, jnp.clip(index, 0, width - 1)[:, None, None], axis=1)[:, 0]
    last = jnp.where(((index >= 0) & (index < width))[:, None], picked, last)
    logits = model.apply(variables, x, method=Llama.logits) if all_logits else None
    return (cache, last), logits

  carry = (cache, jnp.zeros((b, model.cfg.dim), model.cfg.dtype))
  pieces = []  # all_logits: [B, width, V] per piece
  if n:
    xs = (tokens[:, :n * chunk].reshape(b, n, chunk).transpose(1, 0, 2),
          jnp.arange(n, dtype=jnp.int32) * chunk)
    carry, chunk_logits = jax.lax.scan(step, carry, xs)
    if all_logits:  # [n, B, C, V] -> [B, n * C, V]
      pieces.append(chunk_logits.transpose(1, 0, 2, 3).reshape(b, n * chunk, -1))
  if rest:
    carry, rest_logits = step(carry, (tokens[:, n * chunk:], jnp.int32(n * chunk)))
    pieces.append(rest_logits)
  cache, last = carry
  if all_logits:
    logits = jnp.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]
  else:
    logits = model.apply(variables, last[:, None], method=Llama.logits)[:, 0]
  cache = cache.replace(next_position=lengths.astype(jnp.int32), seen=lengths.astype(jnp.int32),
                        policy=Full() if reserve else policy, planned_context=context,
                        row_capacity=None if reserve else row_capacity)
  return logits, cache


def prefill(model: Llama, variables, tokens, lengths=None, *, policy: Policy | None = None,
            capacity: int | None = None, budget: float | None = None, max_new_tokens: int = 0,
            reserve: int = 0, chunk: int | None = None, backend: str | None = None,
            all_logits: bool = False, row_capacity=None):
  """Right-padded prompts tokens [B, T] (lengths [B]) -> (logits, KVCache).

  logits: [B, V] predicting each prompt's next token, or [B, T, V] with all_logits.
  The cache is planned for T + max_new_tokens positions, decoded through the policy, with
  room for `capacity` kept tokens per row (or, under a `budget`, budget x (T_b +
  max_new_tokens) for the row of T_b prompt tokens, in slots sized for the longest). Or, the
  kvpress protocol: `reserve` R > 0 compresses the prompt alone to `capacity` (or budget x
  T_b) kept tokens and adds R slots, so the next R tokens are all kept (the cache's policy
  becomes Full). decode_step refuses to go past the plan. `row_capacity` [B] (ints in
  [1, capacity]) lowers row b's kept tokens to row_capacity[b] under the same shapes, in
  prefill and (without reserve) in every decode step: rows sized by their own lengths, as
  kvpress keeps max(1, int(T_b * budget)) of each prompt's own T_b tokens.

  `chunk` C: the prompt goes through in chunks of C tokens, each attending to the kept
  tokens plus itself and then compacted into the cache, so memory is O(capacity + C) per
  layer instead of O(T). Exact (equal to one-shot) for AttentionGate, Full, StreamingLLM,
  Local, Random and Knorm while the kept tokens fit the capacity; policies that score by
  the prompt's attention (H2O, SnapKV, ObservedAttention, TOVA) are one-shot only.
  """
  policy = policy or default_policy(model)
  tokens = np.asarray(tokens, np.int32)
  lengths = np.full(tokens.shape[:1], tokens.shape[1], np.int32) if lengths is None \
      else np.asarray(lengths, np.int32)
  _check(model, policy, tokens, lengths)
  if max_new_tokens and reserve:
    raise InferenceError("give max_new_tokens (decoded through the policy) or reserve (kept "
                         "whole, the kvpress protocol), not both")
  context = planned_context(model, tokens.shape[1], max_new_tokens, reserve)
  compressed = tokens.shape[1] + max_new_tokens  # what the policy's capacity applies to
  policy, capacity = fit(policy, resolve_capacity(policy, compressed, capacity, budget))
  if row_capacity is None:
    row_capacity = budget_rows(policy, lengths + max_new_tokens, budget)
  row_capacity = _check_row_capacity(row_capacity, tokens.shape[0], capacity, policy)
  if chunk is not None:
    chunk = _check_chunk(policy, chunk)
    slots = _gate_slots(model, compressed)
    # Filled in place: the scan's carry is this buffer, not a second copy of the cache.
    empty = empty_cache(model, tokens.shape[0], capacity + reserve + 1, slots, policy, backend)
    logits, cache = _prefill_chunked(
        variables, jnp.asarray(tokens), jnp.asarray(lengths), empty, row_capacity,
        model=model, policy=policy,
        capacity=capacity, gate_slots=slots, backend=backend,
        all_logits=all_logits, context=context, reserve=int(reserve), chunk=chunk)
    return logits, cache
  return _prefill(variables, jnp.asarray(tokens), jnp.asarray(lengths), row_capacity, model=model,
                  policy=policy, capacity=capacity, gate_slots=_gate_slots(model, compressed),
                  backend=backend, all_logits=all_logits, context=context, reserve=int(reserve))


def budget_rows(policy: Policy, tokens_per_row, budget: float | None) -> np.ndarray | None:
  """Under a budget, each row's own capacity: the capacity rule applied to that row's
  tokens (its prompt + new tokens), so a prompt keeps the same share in any batch. None
  without a budget, or for a policy that evicts nothing (it must hold the whole batch)."""
  if budget is None or not policy.evicts:
    return None
  return np.array([fit(policy, resolve_capacity(policy, int(n), None, budget))[1]
                   for n in np.asarray(tokens_per_row)], np.int32)


def _check_row_capacity(row_capacity, batch: int, capacity: int, policy: Policy):
  """None, or row_capacity as int32 [B] after checking each is in [1, capacity] and that
  the policy evicts (a cap below a row's tokens would make a Full cache evict)."""
  if row_capacity is None:
    return None
  if not policy.evicts:
    raise InferenceError(f"the {policy.name} policy evicts nothing, so its rows cannot be "
                         "held below the capacity: drop row_capacity, or choose an evicting "
                         "policy")
  rows = np.asarray(row_capacity)
  if rows.shape != (batch,) or not np.issubdtype(rows.dtype, np.integer):
    raise InferenceError(f"row_capacity must be {batch} integers (one per prompt), got "
                         f"shape {rows.shape} of {rows.dtype}")
  if rows.min() < 1 or rows.max() > capacity:
    raise InferenceError(f"row_capacity must lie in [1, capacity={capacity}], got "
                         f"{rows.min()}..{rows.max()}: raise the capacity or lower the rows'")
  return jnp.asarray(rows, jnp.int32)


def _check_chunk(policy: Policy, chunk) -> int:
  if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise InferenceError(f"chunk must be a positive number of tokens, got {chunk!r}")
  if not policy.chunkable:
    raise InferenceError(
        f"the {policy.name} policy scores tokens by the whole prompt's attention, so its "
        "prefill is one-shot only: drop the prefill chunk (--prefill-chunk) for it, or choose "
        "a chunkable policy (attention_gate, full, streaming_llm, local, random, knorm)")
  return int(chunk)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _decode_step(variables, cache, next_tokens, *, model):
  return model.apply(variables, next_tokens, cache, method=Llama.decode)


def decode_step(model: Llama, variables, cache: KVCache, next_tokens):
  """next_tokens [B] -> (logits [B, V], cache). The input cache is donated (updated in place).

  Refused past the positions the cache was planned for at prefill: there its gate ring would
  wrap and a non-evicting cache would start evicting, a function nobody trained or asked for.
  """
  if cache.planned_context is not None:
    furthest = int(jax.device_get(jnp.max(cache.next_position)))
    if furthest >= cache.planned_context:
      raise InferenceError(
          f"decoding position {furthest} goes past the {cache.planned_context} positions this "
          f"cache was planned for at prefill (prompt width + max_new_tokens + reserve): "
          f"prefill with a larger max_new_tokens")
  return _decode_step(variables, cache, jnp.asarray(next_tokens, jnp.int32), model=model)


@flax.struct.dataclass
class DecodeState:
  step: jnp.ndarray         # [] int32: tokens generated so far (all rows)
  done: jnp.ndarray         # [B] bool: hit EOS
  last_token: jnp.ndarray   # [B] int32: fed to the next decode step
  tokens: jnp.ndarray       # [B, max_new_tokens] int32
  generated: jnp.ndarray    # [B] int32: tokens generated per row, EOS included
  cache: KVCache
  rng: jax.Array


@functools.partial(jax.jit, static_argnames=("model", "policy", "capacity", "gate_slots", "backend",
                                             "max_new_tokens", "sampling", "context", "chunk"))
def _generate(variables, tokens, lengths, rng, eos_id, pad_id, row_capacity=None, *, model,
              policy, capacity, gate_slots, backend, max_new_tokens, sampling, context,
              chunk=None):
  prefill_args = dict(model=model, policy=policy, capacity=capacity, gate_slots=gate_slots,
                      backend=backend, all_logits=False, context=context, reserve=0)
  if chunk is None:
    logits, cache = _prefill(variables, tokens, lengths, row_capacity, **prefill_args)
  else:
    logits, cache = _prefill_chunked(variables, tokens, lengths, None, row_capacity, chunk=chunk,
                                     **prefill_args)
  rng, key = jax.random.split(rng)
  first = sample(logits, key, sampling)
  b = tokens.shape[0]
  state = DecodeState(
      step=jnp.int32(1), done=first == eos_id, last_token=first,
      tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first),
      generated=jnp.ones((b,), jnp.int32), cache=cache, rng=rng)

  def cond(s: DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: DecodeState):
    logits, cache = model.apply(variables, s.last_token, s.cache, ~s.done, method=Llama.decode)
    rng, key = jax.random.split(s.rng)
    token = jnp.where(s.done, pad_id, sample(logits, key, sampling))
    return DecodeState(step=s.step + 1, done=s.done | (token == eos_id), last_token=token,
                       tokens=s.tokens.at[:, s.step].set(token),
                       generated=s.generated + (~s.done).astype(jnp.int32), cache=cache, rng=rng)

  final = jax.lax.while_loop(cond, body, state)
  return final.tokens, final.generated, final.cache


@dataclasses.dataclass
class GenerateResult:
  tokens: np.ndarray        # [B, max_new_tokens] int32, pad after EOS
  num_generated: np.ndarray  # [B] tokens generated per sequence (EOS included)
  kept_ratio: np.ndarray    # [L, K] kept / seen tokens per layer and KV head (batch mean)
  capacity: int             # kept-token slots per row
  cache_bytes: int          # every cache buffer really allocated (kv + gate + bookkeeping)
  kv_bytes: int             # the k and v buffers
  gate_cache_bytes: int
  full_kv_bytes: int        # k and v of a full cache for the same batch and context
  policy: str
  compile_seconds: float = 0.0  # 0 when this shape was compiled before
  run_seconds: float = 0.0
  cache: KVCache | None = None

  @property
  def tokens_per_second(self) -> float:
    return float(self.num_generated.sum()) / max(self.run_seconds, 1e-9)

  def texts(self, tokenizer) -> list[str]:
    return [tokenizer.decode(row[:n]) for row, n in zip(self.tokens, self.num_generated)]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> right-padded tokens [B, T] and lengths [B]."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.full((len(prompts), max(1, int(lengths.max(initial=1)))), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, lengths


def generate(model: Llama, variables, prompts, *, policy: Policy | None = None,
             max_new_tokens: int = 32, capacity: int | None = None, budget: float | None = None,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0, eos_id: int = -1,
             pad_id: int = 0, backend: str | None = None, return_cache: bool = False,
             lengths=None, prefill_chunk: int | None = None,
             row_capacity=None) -> GenerateResult:
  """Generate for a batch of prompts (token lists, or tokens [B, T] with `lengths`).

  prefill_chunk: prefill the prompts in chunks of that many tokens (see `prefill`'s chunk).
  A budget gives each prompt its own capacity, budget x (its length + max_new_tokens),
  under one static cache sized for the longest (`row_capacity` [B], see `prefill`, sets
  them by hand)."""
  if max_new_tokens < 1:
    raise InferenceError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  policy = policy or default_policy(model)
  if lengths is None and not isinstance(prompts, np.ndarray):
    if any(len(p) == 0 for p in prompts):
      raise InferenceError("empty prompt in the batch: every prompt needs at least one token")
    tokens, lengths = pad_prompts(prompts, pad_id)
  else:
    tokens = np.asarray(prompts, np.int32)
    lengths = np.full(tokens.shape[:1], tokens.shape[1], np.int32) if lengths is None \
        else np.asarray(lengths, np.int32)
  _check(model, policy, tokens, lengths)
  context = planned_context(model, tokens.shape[1], max_new_tokens)
  policy, capacity = fit(policy, resolve_capacity(policy, context, capacity, budget))
  if row_capacity is None:
    row_capacity = budget_rows(policy, lengths + max_new_tokens, budget)
  row_capacity = _check_row_capacity(row_capacity, tokens.shape[0], capacity, policy)
  if prefill_chunk is not None:
    prefill_chunk = _check_chunk(policy, prefill_chunk)
  args = (variables, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
          jnp.int32(eos_id), jnp.int32(pad_id), row_capacity)
  statics = dict(model=model, policy=policy, capacity=capacity,
                 gate_slots=_gate_slots(model, context), backend=backend,
                 max_new_tokens=max_new_tokens, sampling=sampling, context=context,
                 chunk=prefill_chunk)
  start = time.perf_counter()
  compiled = _compile(_generate, args, statics)
  compile_seconds = time.perf_counter() - start
  out, generated, cache = jax.block_until_ready(compiled(*args))
  run_seconds = time.perf_counter() - start - compile_seconds
  cfg = model.cfg
  return GenerateResult(
      tokens=np.asarray(out), num_generated=np.asarray(generated),
      kept_ratio=np.asarray(kept_ratio(cache)), capacity=capacity, cache_bytes=cache.nbytes,
      kv_bytes=cache.kv_nbytes, gate_cache_bytes=cache.gate_nbytes,
      full_kv_bytes=full_kv_nbytes(cfg.num_layers, tokens.shape[0], cfg.num_kv_heads,
                                   cfg.head_dim, context, cfg.dtype),
      policy=policy.describe(), compile_seconds=compile_seconds, run_seconds=run_seconds,
      cache=cache if return_cache else None)


_COMPILED: dict = {}


def clear_compiled() -> None:
  """Drops every compiled program, the engine's and jax's. A long sweep compiles one per
  shape, capacity and policy, and on CPU each holds a few memory mappings (~3.5): the
  README's policy table reached 34k of the 65530 a process may map by default
  (vm.max_map_count) a third of the way through, and the next mapping fails."""
  _COMPILED.clear()
  jax.clear_caches()


def _compile(jitted, args, statics):
  """Ahead-of-time compile once per (static arguments, argument shapes), so the time of a
  call can be split into compilation and running."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  key = (jitted, tuple(sorted(statics.items(), key=lambda kv: kv[0])), tree,
         tuple((x.shape, str(x.dtype)) for x in leaves))
  if key not in _COMPILED:
    _COMPILED[key] = jitted.lower(*args, **statics).compile()
  return _COMPILED[key]
