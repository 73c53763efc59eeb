"""Continuous batching: a fixed set of cache rows ("slots") that a finished sequence hands
on to the next prompt at once (the prefill / insert / generate of JetStream's engine API).

A `SlotEngine` holds one evicting KVCache of `slots` rows, every row planned for the same
context (the longest prompt bucket + max_new_tokens) with the same capacity, so the decode
step compiles once. A prompt is prefilled alone at the width of its bucket (a few widths:
prefill compiles at most once per bucket) and its compacted cache row is inserted into a
free slot while the other rows go on decoding; a row ends at its own EOS or token limit.

Exactness: rows never interact (decode is row-wise, a finished or empty row writes
nothing), padding is never kept, and a row's gate ring never wraps unless the gate's own
window makes it, so each row's greedy tokens equal `generate` for that prompt alone with
the engine's capacity (under a budget: with that budget).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Iterable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ag_jax import engine
from ag_jax.cache import KVCache, full_kv_nbytes, gate_slots
from ag_jax.model import Llama
from ag_jax.policies import Policy, fit
from ag_jax.sampling import SamplingConfig, sample


@dataclasses.dataclass(frozen=True)
class Request:
  id: Any
  tokens: Sequence[int]              # the prompt, BOS included
  max_new_tokens: int | None = None  # None: the engine's max_new_tokens
  seed: int | None = None            # sampling key fold_in(engine seed, this); None: the
                                     # request's position in the stream given to `run`


@dataclasses.dataclass
class Completion:
  id: Any
  tokens: list[int]   # generated tokens, EOS included when it came
  stop: str           # "eos" or "length"
  kept: float         # kept / seen tokens of this row at its end (mean over layers, KV heads)
  prompt_tokens: int
  seconds: float = 0.0  # wall time from the start of its prefill to the end of its row


def prompt_buckets(max_prompt: int, smallest: int = 32, fine_from: int = 256,
                   per_octave: int = 4) -> tuple[int, ...]:
  """Prefill widths: powers of two from `smallest` up to `fine_from`, then `per_octave`
  evenly spaced widths per doubling (a prompt is padded by at most 1/per_octave of its
  width where the work is), then `max_prompt` itself; each prompt is padded to the first
  width that holds it. About 4 + per_octave * log2(max_prompt / fine_from) widths: one
  prefill compile each."""
  if max_prompt < 1:
    raise engine.InferenceError(f"the longest prompt must have at least 1 token, got {max_prompt}")
  widths, w = [], smallest
  while w < min(max_prompt, fine_from):
    widths.append(w)
    w *= 2
  while w < max_prompt:
    widths.append(w)
    w += max(1, (1 << (w.bit_length() - 1)) // per_octave)  # the octave [2^m, 2^m+1) / per_octave
  return tuple(widths) + (max_prompt,)


@flax.struct.dataclass
class SlotState:
  cache: KVCache
  last_token: jnp.ndarray  # [S] int32: fed to the next decode step
  active: jnp.ndarray      # [S] bool: decoding (an empty or finished slot is not)
  generated: jnp.ndarray   # [S] int32: tokens generated so far, EOS included
  limit: jnp.ndarray       # [S] int32: the row's max_new_tokens
  tokens: jnp.ndarray      # [S, M] int32: generated tokens
  keys: jax.Array          # [S] PRNG keys: token j of a row is sampled with fold_in(key, j)


def _sample_rows(logits, keys, index, sampling):
  """logits [S, V], keys [S], index [S] -> tokens [S]: each row from its own key."""
  if sampling.temperature == 0.0:
    return sample(logits, keys[0], sampling)  # greedy needs no key
  step_keys = jax.vmap(jax.random.fold_in)(keys, index)
  return jax.vmap(lambda l, k: sample(l[None], k, sampling)[0])(logits, step_keys)


@functools.partial(jax.jit, donate_argnames=("state",))
def _insert(state: SlotState, row: KVCache, slot, first, limit, key, eos_id) -> SlotState:
  """Put a prefilled row (a KVCache of batch 1 with the engine's shapes) into `slot`."""
  def put(big, small, axis=1):
    return jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), slot, axis)

  c = state.cache
  cache = c.replace(
      k=put(c.k, row.k), v=put(c.v, row.v), score=put(c.score, row.score),
      position=put(c.position, row.position), length=put(c.length, row.length),
      gate_k=None if c.gate_k is None else put(c.gate_k, row.gate_k),
      gate_v=None if c.gate_v is None else put(c.gate_v, row.gate_v),
      next_position=put(c.next_position, row.next_position, 0),
      seen=put(c.seen, row.seen, 0),
      row_capacity=None if c.row_capacity is None else put(c.row_capacity, row.row_capacity, 0))
  tokens = jnp.zeros_like(state.tokens[0]).at[0].set(first)
  return state.replace(
      cache=cache, last_token=state.last_token.at[slot].set(first),
      active=state.active.at[slot].set((first != eos_id) & (limit > 1)),
      generated=state.generated.at[slot].set(1), limit=state.limit.at[slot].set(limit),
      tokens=state.tokens.at[slot].set(tokens), keys=state.keys.at[slot].set(key))


@functools.partial(jax.jit, static_argnames=("model", "sampling", "steps"),
                   donate_argnames=("state",))
def _decode(variables, state: SlotState, eos_id, pad_id, stop_on_finish, *, model, sampling,
            steps) -> SlotState:
  """Up to `steps` decode steps of every active row; with stop_on_finish, stop after the
  step in which some row ends (so its slot can be refilled at once)."""
  rows = jnp.arange(state.active.shape[0])

  def cond(carry):
    i, s, ended_any = carry
    return (i < steps) & jnp.any(s.active) & ~(stop_on_finish & ended_any)

  def body(carry):
    i, s, ended_any = carry
    logits, cache = model.apply(variables, s.last_token, s.cache, s.active, method=Llama.decode)
    token = jnp.where(s.active, _sample_rows(logits, s.keys, s.generated, sampling), pad_id)
    at = jnp.minimum(s.generated, s.tokens.shape[1] - 1)  # an inactive row rewrites its own
    tokens = s.tokens.at[rows, at].set(jnp.where(s.active, token, s.tokens[rows, at]))
    generated = s.generated + s.active.astype(jnp.int32)
    ended = s.active & ((token == eos_id) | (generated >= s.limit))
    s = s.replace(cache=cache, last_token=jnp.where(s.active, token, s.last_token),
                  active=s.active & ~ended, generated=generated, tokens=tokens)
    return i + 1, s, ended_any | jnp.any(ended)

  _, state, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), state, jnp.bool_(False)))
  return state


@jax.jit
def _kept(cache: KVCache) -> jnp.ndarray:
  """[S] kept / seen tokens per row (mean over layers and KV heads)."""
  seen = jnp.maximum(cache.seen, 1).astype(jnp.float32)
  return jnp.mean(cache.length / seen[None, :, None], axis=(0, 2))


class SlotEngine:
  """`slots` cache rows decoding together (or as many as fit in `memory_bytes`);
  `run(requests)` yields `Completion`s as rows end.

  The cache is planned for `max_prompt_tokens + max_new_tokens` positions per row with
  `capacity` kept tokens (or `budget` x that context); under a budget each row keeps at
  most budget x (its own prompt + max_new_tokens), as `generate` gives that prompt alone.
  """

  def __init__(self, model: Llama, variables, *, max_prompt_tokens: int, max_new_tokens: int,
               slots: int | None = None, memory_bytes: float | None = None, policy: Policy | None = None, capacity: int | None = None,
               budget: float | None = None, buckets: Sequence[int] | None = None,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0, eos_id: int = -1,
               pad_id: int = 0, backend: str | None = None, prefill_chunk: int | None = None,
               steps_per_sync: int = 32):
    if (slots is None) == (memory_bytes is None):
      raise engine.InferenceError("give the number of slots or a memory limit for them, not "
                                  "both and not neither")
    if slots is not None and slots < 1:
      raise engine.InferenceError(f"slots must be >= 1, got {slots}")
    if max_new_tokens < 1:
      raise engine.InferenceError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    self.model, self.variables = model, variables
    self.policy = policy or engine.default_policy(model)
    self.buckets = tuple(sorted(set(buckets))) if buckets else prompt_buckets(max_prompt_tokens)
    if self.buckets[-1] < max_prompt_tokens:
      raise engine.InferenceError(f"the widest prompt bucket ({self.buckets[-1]}) is narrower "
                                  f"than the longest prompt ({max_prompt_tokens})")
    self.max_new_tokens = int(max_new_tokens)
    self.context = engine.planned_context(model, self.buckets[-1], self.max_new_tokens)
    self.bound_policy, self.capacity = fit(
        self.policy, engine.resolve_capacity(self.policy, self.context, capacity, budget))
    # Under a budget each row keeps budget x (its prompt + max_new_tokens), as `generate`
    # gives it alone; the slots are sized for the longest.
    self.budget = budget if self.bound_policy.evicts else None
    if self.policy.uses_gate and model.gate is None:
      raise engine.InferenceError(f"the {self.policy.name} policy needs gates, but the model has "
                                  "none: load trained gates (--gates) or choose another policy")
    self.gate_slots = gate_slots(model.gate, self.context) if model.gate is not None \
        else self.context
    if slots is None:
      slots = slots_for_memory(memory_bytes, self.slot_bytes,
                               f"capacity {self.capacity}, context {self.context}")
    self.slots, self.sampling, self.seed = int(slots), sampling, seed
    self.eos_id, self.pad_id, self.backend = eos_id, pad_id, backend
    # A policy that cannot prefill in chunks is refused here, before any prompt runs.
    self.prefill_chunk = None if prefill_chunk is None else \
        engine._check_chunk(self.policy, prefill_chunk)  # pylint: disable=protected-access
    self.steps_per_sync = int(steps_per_sync)
    self.widths_used: set[int] = set()

  # -- sizes -------------------------------------------------------------------------------

  def _empty(self, batch: int) -> KVCache:
    cache = engine.empty_cache(self.model, batch, self.capacity + 1, self.gate_slots,
                               self.bound_policy, self.backend)
    row_capacity = None if self.budget is None else jnp.full((batch,), self.capacity, jnp.int32)
    return cache.replace(planned_context=self.context, row_capacity=row_capacity)

  @property
  def slot_bytes(self) -> int:
    """Bytes of one slot's cache buffers (kv + gate ring + bookkeeping), not allocated."""
    return slot_bytes(self.model, self.capacity, self.gate_slots, self.bound_policy)

  @property
  def cache_bytes(self) -> int:
    return self.slots * self.slot_bytes

  @property
  def full_kv_bytes(self) -> int:
    """k and v of full caches for the same slots and context."""
    cfg = self.model.cfg
    return full_kv_nbytes(cfg.num_layers, self.slots, cfg.num_kv_heads, cfg.head_dim,
                          self.context, cfg.dtype)

  @property
  def compiles(self) -> int:
    """Programs compiled so far: one prefill per bucket used, the insert, the decode loop."""
    return len(self.widths_used) + 2

  # -- running -----------------------------------------------------------------------------

  def _bucket(self, n: int) -> int:
    for w in self.buckets:
      if n <= w:
        return w
    raise engine.InferenceError(f"a prompt of {n} tokens is longer than the widest bucket "
                                f"({self.buckets[-1]}): plan the engine for longer prompts")

  def _prefill(self, request: Request, index: int):
    n = len(request.tokens)
    if n < 1:
      raise engine.InferenceError(f"prompt {request.id!r} is empty: every prompt needs at "
                                  "least one token (e.g. BOS)")
    limit = self.max_new_tokens if request.max_new_tokens is None else int(request.max_new_tokens)
    if not 1 <= limit <= self.max_new_tokens:
      raise engine.InferenceError(f"prompt {request.id!r} asks for {limit} new tokens; the engine "
                                  f"was planned for 1 to {self.max_new_tokens}")
    width = self._bucket(n)
    self.widths_used.add(width)
    tokens = np.full((1, width), self.pad_id, np.int32)
    tokens[0, :n] = request.tokens
    # max_new_tokens fills the plan to the engine's context, so the row's capacity, gate
    # ring and planned positions are the slot's.
    logits, row = engine.prefill(
        self.model, self.variables, tokens, np.array([n], np.int32), policy=self.policy,
        capacity=self.capacity, max_new_tokens=self.context - width, chunk=self.prefill_chunk,
        backend=self.backend,
        row_capacity=engine.budget_rows(self.bound_policy, [n + self.max_new_tokens], self.budget))
    key = jax.random.fold_in(jax.random.key(self.seed),
                             index if request.seed is None else request.seed)
    first = _sample_rows(logits, key[None], jnp.zeros((1,), jnp.int32), self.sampling)[0]
    return row, first, limit, key

  def run(self, requests: Iterable[Request]) -> Iterator[Completion]:
    """Decode every request; yields each `Completion` as its row ends (not in input order)."""
    s = self.slots
    state = SlotState(
        cache=self._empty(s), last_token=jnp.zeros((s,), jnp.int32),
        active=jnp.zeros((s,), bool), generated=jnp.zeros((s,), jnp.int32),
        limit=jnp.ones((s,), jnp.int32), tokens=jnp.zeros((s, self.max_new_tokens), jnp.int32),
        keys=jax.random.split(jax.random.key(self.seed), s))
    queue = iter(enumerate(requests))
    occupant: list[Request | None] = [None] * s
    started = [0.0] * s
    free = collections.deque(range(s))
    exhausted = False
    eos, pad = jnp.int32(self.eos_id), jnp.int32(self.pad_id)
    while True:
      while free and not exhausted:
        item = next(queue, None)
        if item is None:
          exhausted = True
          break
        index, request = item
        slot = free.popleft()
        started[slot] = time.perf_counter()
        row, first, limit, key = self._prefill(request, index)
        state = _insert(state, row, jnp.int32(slot), first, jnp.int32(limit), key, eos)
        occupant[slot] = request
      if all(o is None for o in occupant):
        return
      state = _decode(self.variables, state, eos, pad, jnp.bool_(not exhausted),
                      model=self.model, sampling=self.sampling, steps=self.steps_per_sync)
      active = np.asarray(state.active)
      ended = [i for i, o in enumerate(occupant) if o is not None and not active[i]]
      if not ended:
        continue
      tokens, generated = np.asarray(state.tokens), np.asarray(state.generated)
      kept = np.asarray(_kept(state.cache))
      now = time.perf_counter()
      for i in ended:
        out = tokens[i, :generated[i]].tolist()
        stop = "eos" if out and out[-1] == self.eos_id else "length"
        yield Completion(occupant[i].id, out, stop, float(kept[i]), len(occupant[i].tokens),
                         now - started[i])
        occupant[i] = None
        free.append(i)


def slot_bytes(model: Llama, capacity: int, ring_slots: int, policy: Policy) -> int:
  """Bytes of one cache row (all layers) with `capacity` kept tokens and a gate ring of
  `ring_slots`: computed from the shapes, nothing allocated."""
  shapes = jax.eval_shape(lambda: engine.empty_cache(model, 1, capacity + 1, ring_slots, policy))
  arrays = [shapes.k, shapes.v, shapes.score, shapes.position, shapes.length, shapes.gate_k,
            shapes.gate_v]
  return int(sum(a.size * np.dtype(a.dtype).itemsize for a in arrays if a is not None))


def slots_for_memory(memory_bytes: float, per_slot: int, what: str = "") -> int:
  """How many slots of `per_slot` bytes fit in `memory_bytes`; refused when none does."""
  n = int(memory_bytes // per_slot)
  if n < 1:
    raise engine.InferenceError(
        f"{memory_bytes / 2**30:.3g} GiB fits no slot: one slot needs {per_slot / 2**20:.3f} MiB"
        f"{' (' + what + ')' if what else ''}; raise the memory limit or lower the "
        "capacity, the budget or the planned context")
  return n
