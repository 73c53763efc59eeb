"""Continuous batching (ag_jax.serving): every row equals `generate` for its prompt alone."""

import numpy as np
import pytest

import ag_jax
from ag_jax import engine, policies, serving
from test_engine import half_evicting

MAX_NEW = 7
LENGTHS = [5, 19, 9, 5, 30, 9, 19]   # four widths, three buckets (8, 16, 32)
LIMITS = [7, 2, 5, 1, 7, 3, 6]       # each row's own max_new_tokens
CAPACITY = 10


@pytest.fixture(scope="module")
def world(tiny_cfg):
  model = ag_jax.Llama(tiny_cfg, gate=ag_jax.GateConfig(num_heads=2, head_dim=8))
  variables = half_evicting(model)
  rng = np.random.RandomState(3)
  requests = [serving.Request(f"r{i}", rng.randint(1, tiny_cfg.vocab_size, n).tolist(), m)
              for i, (n, m) in enumerate(zip(LENGTHS, LIMITS))]
  return model, variables, requests


def alone(model, variables, request, policy, capacity, eos_id=-1, prefill_chunk=None):
  """`generate` for one prompt; the first `max_new_tokens` tokens (up to EOS)."""
  out = ag_jax.generate(model, variables, [request.tokens], policy=policy, capacity=capacity,
                        max_new_tokens=MAX_NEW, eos_id=eos_id, prefill_chunk=prefill_chunk)
  tokens = out.tokens[0, :out.num_generated[0]].tolist()[:request.max_new_tokens]
  return tokens


def served(model, variables, requests, policy, capacity, slots=3, **kw):
  eng = serving.SlotEngine(model, variables, slots=slots, max_prompt_tokens=max(LENGTHS),
                           max_new_tokens=MAX_NEW, policy=policy, capacity=capacity,
                           buckets=(8, 16, 32), **kw)
  return eng, {c.id: c for c in eng.run(requests)}


@pytest.mark.parametrize("name", ["ag", "full", "h2o", "streaming_llm"])
def test_every_row_equals_generate_alone(world, name):
  """AG (gate ring per row), Full (no eviction, the widest plan), H2O (attention mass
  updated every step) and StreamingLLM (a window policy): 7 prompts through 3 slots, rows
  ending at their own limits and refilled while the others decode."""
  model, variables, requests = world
  policy = policies.make_policy(name)
  capacity = None if name == "full" else CAPACITY
  eng, got = served(model, variables, requests, policy, capacity)
  assert sorted(got) == sorted(r.id for r in requests)
  for r in requests:
    want = alone(model, variables, r, policy, eng.capacity if capacity else None)
    assert got[r.id].tokens == want, r.id
    assert got[r.id].stop == "length" and len(want) == r.max_new_tokens
  assert eng.compiles == 3 + 2  # one prefill per bucket, the insert, the decode loop
  kept = [got[r.id].kept for r in requests]
  assert (max(kept) <= 1.0) and (name == "full") == (min(kept) == 1.0)


def test_a_budget_is_each_rows_own(world):
  """Under a budget each slot keeps budget x (its prompt + max_new_tokens), as `generate`
  gives that prompt alone with the budget; the slots are sized for the longest."""
  model, variables, requests = world
  for name in ("streaming_llm", "h2o"):
    policy = policies.make_policy(name)
    eng, got = served(model, variables, requests, policy, None, budget=0.5)
    assert eng.capacity == -(-(32 + MAX_NEW) // 2)  # the widest bucket's
    for r in requests:
      out = ag_jax.generate(model, variables, [r.tokens], policy=policy, budget=0.5,
                            max_new_tokens=MAX_NEW)
      assert got[r.id].tokens == out.tokens[0, :r.max_new_tokens].tolist(), (name, r.id)


def test_eos_and_chunked_prefill(world):
  """A row that meets EOS ends there (and its slot is refilled); with chunked prefill each
  row equals `generate` alone with the same chunk (the prompt padded to its bucket adds
  chunks of padding only, which write nothing)."""
  model, variables, requests = world
  policy = policies.make_policy("ag")
  first = alone(model, variables, requests[0], policy, CAPACITY)
  eos = first[2]  # the first prompt's third token: some rows stop early
  _, got = served(model, variables, requests, policy, CAPACITY, slots=2, eos_id=eos,
                  prefill_chunk=4)
  stops = []
  for r in requests:
    want = alone(model, variables, r, policy, CAPACITY, eos_id=eos, prefill_chunk=4)
    assert got[r.id].tokens == want, r.id
    stops.append(got[r.id].stop)
  assert got["r0"].stop == "eos" and got["r0"].tokens[-1] == eos
  assert "length" in stops


def test_memory_limit_sizes_the_slots(world):
  model, variables, _ = world
  kw = dict(max_prompt_tokens=30, max_new_tokens=MAX_NEW, capacity=CAPACITY)
  one = serving.SlotEngine(model, variables, slots=1, **kw)
  # Computed from the shapes: k, v in fp32, score and position per slot, length per row,
  # the gate ring (its k/v heads of 8 over the whole planned context, under its window).
  cfg = model.cfg
  kv = 2 * cfg.num_layers * cfg.num_kv_heads * (CAPACITY + 1) * cfg.head_dim * 4
  book = cfg.num_layers * cfg.num_kv_heads * ((CAPACITY + 1) * 8 + 4)
  ring = 2 * cfg.num_layers * model.gate.kv_heads * (30 + MAX_NEW) * 8 * 4
  assert one.slot_bytes == kv + book + ring
  sized = serving.SlotEngine(model, variables, memory_bytes=5.5 * one.slot_bytes, **kw)
  assert sized.slots == 5 and sized.cache_bytes <= 5.5 * one.slot_bytes
  with pytest.raises(engine.InferenceError, match="fits no slot"):
    serving.SlotEngine(model, variables, memory_bytes=0.5 * one.slot_bytes, **kw)


@pytest.mark.parametrize("kwargs,message", [
    (dict(slots=0), "slots must be >= 1"),
    (dict(slots=2, memory_bytes=1e6), "not both"),
    (dict(slots=2, max_prompt_tokens=250), "exceeds the model's max_position"),
    (dict(slots=2, buckets=(8, 16)), "narrower than the longest prompt"),
    (dict(slots=2, policy=policies.Full(), capacity=8), "evicts nothing"),
    (dict(slots=2, policy=policies.make_policy("h2o"), capacity=8, prefill_chunk=4),
     "one-shot only"),
])
def test_bad_plans_are_refused(world, kwargs, message):
  model, variables, _ = world
  args = {"max_prompt_tokens": 30, "max_new_tokens": MAX_NEW, **kwargs}
  with pytest.raises(engine.InferenceError, match=message):
    serving.SlotEngine(model, variables, **args)


def test_requests_outside_the_plan_are_refused(world):
  model, variables, requests = world
  eng = serving.SlotEngine(model, variables, slots=2, max_prompt_tokens=30,
                           max_new_tokens=MAX_NEW, capacity=CAPACITY)
  with pytest.raises(engine.InferenceError, match="asks for 9 new tokens"):
    list(eng.run([serving.Request("a", [1, 2], 9)]))
  with pytest.raises(engine.InferenceError, match="longer than the widest bucket"):
    list(eng.run([serving.Request("b", list(range(1, 40)))]))
  assert serving.prompt_buckets(100) == (32, 64, 100) and serving.prompt_buckets(20) == (20,)


def test_prompt_buckets_pad_long_prompts_by_at_most_a_quarter():
  widths = serving.prompt_buckets(6000)
  assert widths[:4] == (32, 64, 128, 256) and widths[-1] == 6000
  assert list(widths) == sorted(set(widths)) and len(widths) <= 4 + 4 * 5
  for n in range(257, 6001, 37):  # the padding a prompt of n tokens gets
    assert next(w for w in widths if w >= n) - n <= n / 4, n


def test_sampling_key_follows_the_request_seed(world):
  """A row samples from fold_in(seed, request.seed), not from its slot or its place in the
  stream: a prompt resumed alone draws the tokens it drew among the others."""
  from ag_jax.sampling import SamplingConfig
  model, variables, requests = world
  kw = dict(max_prompt_tokens=30, max_new_tokens=MAX_NEW, capacity=CAPACITY, buckets=(8, 16, 32),
            sampling=SamplingConfig(temperature=1.0))
  seeded = [serving.Request(r.id, r.tokens, MAX_NEW, seed=i) for i, r in enumerate(requests)]
  eng = serving.SlotEngine(model, variables, slots=3, **kw)
  together = {c.id: c.tokens for c in eng.run(seeded)}
  last = serving.SlotEngine(model, variables, slots=1, **kw)
  alone_last = {c.id: c.tokens for c in last.run(seeded[-1:])}
  assert alone_last[requests[-1].id] == together[requests[-1].id]
  unseeded = {c.id: c.tokens for c in last.run([serving.Request("x", requests[-1].tokens,
                                                                 MAX_NEW)])}
  assert unseeded["x"] != together[requests[-1].id]  # position 0's key: other draws
