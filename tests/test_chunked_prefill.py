"""Chunked prefill: the prompt in chunks of C tokens, each attending to the kept tokens plus
itself and then compacted into the cache, equals one-shot prefill and the training view.

AG's flags are causal per token, so chunking changes nothing even while it evicts; the
capacity-rule baselines keep the same tokens whenever their scores depend on positions
only (StreamingLLM, Local, Random) and are equal outright while nothing overflows.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import ag_jax
from ag_jax import engine, policies
from test_engine import LENGTHS, STEPS, half_evicting, sequences


def make_world(cfg, window, sink_tokens=0):
  gate = ag_jax.GateConfig(num_heads=2, head_dim=8, window=window, sink_tokens=sink_tokens)
  model = ag_jax.Llama(cfg, gate=gate)
  variables = half_evicting(model, seed=4)
  prompts, continuation, joined = sequences(cfg.vocab_size, seed=4)
  train_logits, (_, flags) = model.apply(variables, jnp.asarray(joined), return_gates=True)
  return model, variables, prompts, continuation, np.asarray(train_logits), np.asarray(flags)


@pytest.fixture(scope="module", params=[(None, 0), (4, 2)],
                ids=["gate_whole_context", "gate_window_4_sinks_2"])
def world(request, tiny_cfg):
  return make_world(tiny_cfg, *request.param)


@pytest.fixture(scope="module")
def windowed(tiny_cfg):
  return make_world(tiny_cfg, 4)


def kept(cache):
  """{(layer, row, head): kept positions} of a cache."""
  length, position = np.asarray(cache.length), np.asarray(cache.position)
  return {idx: position[idx][:length[idx]].tolist() for idx in np.ndindex(*length.shape)}


def decode_all(model, variables, cache, continuation):
  steps = []
  for j in range(STEPS):
    logits, cache = ag_jax.decode_step(model, variables, cache, continuation[:, j])
    steps.append(np.asarray(logits))
  return steps, cache


@pytest.mark.parametrize("chunk", [1, 7, 32])
def test_chunked_gate_prefill_equals_one_shot_and_training_view(world, chunk):
  model, variables, prompts, continuation, train_logits, flags = world
  one_logits, one = ag_jax.prefill(model, variables, prompts, LENGTHS, max_new_tokens=STEPS,
                                   all_logits=True)
  logits, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, max_new_tokens=STEPS,
                                 all_logits=True, chunk=chunk)
  assert logits.shape == one_logits.shape
  assert kept(cache) == kept(one)
  assert 0.2 < np.asarray(cache.length).sum() / (LENGTHS.sum() * 4) < 0.8  # it evicts
  sinks = list(range(model.gate.sink_tokens))
  assert all(row[:len(sinks)] == sinks for row in kept(cache).values())
  for name in ("k", "v", "gate_k", "gate_v"):  # kept slots (and the whole gate ring) agree
    a, b = np.asarray(getattr(cache, name)), np.asarray(getattr(one, name))
    if name in ("k", "v"):
      held = np.arange(a.shape[3]) < np.asarray(cache.length)[..., None]
      a, b = a[held], b[held]
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
  steps, cache = decode_all(model, variables, cache, continuation)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(np.asarray(logits)[b, :n], train_logits[b, :n], atol=1e-4)
    for j in range(STEPS):
      np.testing.assert_allclose(steps[j][b], train_logits[b, n + j], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(cache.length)[:, b], flags[:, b, :, :n + STEPS].sum(-1))


@pytest.mark.parametrize("policy", [policies.Full(), policies.StreamingLLM(sink=2),
                                    policies.Local(), policies.Random(), policies.Knorm()],
                         ids=lambda p: p.name)
def test_chunked_baselines(windowed, policy):
  """Ample capacity: equal to one-shot. Half the context: the same kept tokens where the
  score is a function of the position (Knorm: layer 0, whose keys eviction cannot touch)."""
  model, variables, prompts, continuation, _, _ = windowed
  one_logits, one = ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy,
                                   max_new_tokens=STEPS, all_logits=True)
  logits, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy,
                                 max_new_tokens=STEPS, all_logits=True, chunk=5)
  assert kept(cache) == kept(one)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(np.asarray(logits)[b, :n], np.asarray(one_logits)[b, :n], atol=1e-5)
  a, _ = decode_all(model, variables, cache, continuation)
  b_, _ = decode_all(model, variables, one, continuation)
  np.testing.assert_allclose(np.stack(a), np.stack(b_), atol=1e-5)
  if not policy.evicts:
    return
  _, one = ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy, budget=0.25,
                          max_new_tokens=STEPS)
  _, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy, budget=0.25,
                            max_new_tokens=STEPS, chunk=3)
  got, want = kept(cache), kept(one)
  if isinstance(policy, policies.Knorm):
    got, want = ({i: v for i, v in d.items() if i[0] == 0} for d in (got, want))
  assert got == want
  assert max(len(v) for v in want.values()) == cache.capacity  # the capacity rule was used


def test_overflowing_gates_keep_the_one_shot_top_scores(windowed):
  """Top-c of a union is top-c of (top-c so far) and the chunk: with more flags than slots
  the first layer (whose gate reads only embeddings) keeps the one-shot set."""
  model, variables, prompts, _, _, _ = windowed
  _, one = ag_jax.prefill(model, variables, prompts, LENGTHS, capacity=3)
  _, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, capacity=3, chunk=2)
  layer0 = lambda d: {i: v for i, v in d.items() if i[0] == 0}
  assert layer0(kept(cache)) == layer0(kept(one))
  assert int(np.asarray(one.length).max()) == 3


def test_chunking_refused_for_attention_scored_policies(windowed):
  model, variables, prompts, _, _, _ = windowed
  for policy in (policies.H2O(), policies.SnapKV(), policies.TOVA(), policies.ObservedAttention()):
    with pytest.raises(engine.InferenceError, match="one-shot only"):
      ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy, budget=0.5, chunk=4)
  with pytest.raises(engine.InferenceError, match="chunk must be a positive"):
    ag_jax.prefill(model, variables, prompts, LENGTHS, chunk=0)


def test_generate_with_prefill_chunk_equals_one_shot(windowed):
  model, variables, prompts, _, _, _ = windowed
  rows = [list(p[:n]) for p, n in zip(prompts, LENGTHS)]
  one = ag_jax.generate(model, variables, rows, max_new_tokens=5, budget=0.5)
  chunked = ag_jax.generate(model, variables, rows, max_new_tokens=5, budget=0.5, prefill_chunk=5)
  np.testing.assert_array_equal(chunked.tokens, one.tokens)
  np.testing.assert_array_equal(chunked.kept_ratio, one.kept_ratio)


@pytest.mark.parametrize("policy", [policies.StreamingLLM(sink=2), policies.Random()],
                         ids=lambda p: p.name)
def test_row_capacity_keeps_each_rows_own_count_in_chunks_too(windowed, policy):
  """row_capacity [B] under one static capacity: each row keeps what a batch of that row
  alone keeps with its own capacity, one-shot and in chunks."""
  model, variables, prompts, _, _, _ = windowed
  row_capacity = np.array([2, 6, 4])
  _, one = ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy, capacity=6,
                          reserve=2, row_capacity=row_capacity)
  _, chunked = ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy, capacity=6,
                              reserve=2, row_capacity=row_capacity, chunk=3)
  assert kept(chunked) == kept(one)
  np.testing.assert_array_equal(np.asarray(one.length),
                                np.broadcast_to(np.minimum(row_capacity, LENGTHS)[None, :, None],
                                                one.length.shape))
  for b, cap in enumerate(row_capacity):
    _, alone = ag_jax.prefill(model, variables, prompts[b:b + 1], LENGTHS[b:b + 1],
                              policy=policy, capacity=int(cap), reserve=2)
    want = {(l, h): v for (l, _, h), v in kept(alone).items()}
    assert {(l, h): v for (l, r, h), v in kept(one).items() if r == b} == want


@pytest.mark.parametrize("policy", [policies.StreamingLLM(sink=2), policies.AttentionGate(),
                                    policies.H2O(), policies.H2O(heavy=0.25)],
                         ids=["StreamingLLM", "AttentionGate", "H2O", "H2O_quarter_heavy"])
def test_row_capacity_holds_in_decode(windowed, policy):
  """Decoding through the policy, each row stays within its own capacity and gives the
  logits that row gives alone with that capacity (H2O: its split of that capacity too)."""
  model, variables, prompts, continuation, _, _ = windowed
  row_capacity = np.array([2, 6, 4])
  _, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy, capacity=6,
                            max_new_tokens=STEPS, row_capacity=row_capacity)
  steps, cache = decode_all(model, variables, cache, continuation)
  assert (np.asarray(cache.length) <= row_capacity[None, :, None]).all()
  assert (np.asarray(cache.length)[:, 0] == 2).any()  # row 0 was held at its capacity
  for b, cap in enumerate(row_capacity):
    _, alone = ag_jax.prefill(model, variables, prompts[b:b + 1], LENGTHS[b:b + 1],
                              policy=policy, capacity=int(cap), max_new_tokens=STEPS)
    alone_steps, _ = decode_all(model, variables, alone, continuation[b:b + 1])
    np.testing.assert_allclose(np.stack(steps)[:, b], np.stack(alone_steps)[:, 0], atol=1e-5)


def test_generate_with_row_capacity_equals_each_row_alone(windowed):
  model, variables, prompts, _, _, _ = windowed
  rows = [list(p[:n]) for p, n in zip(prompts, LENGTHS)]
  row_capacity = np.array([2, 6, 4])
  together = ag_jax.generate(model, variables, rows, policy=policies.StreamingLLM(sink=2),
                             capacity=6, max_new_tokens=STEPS, row_capacity=row_capacity,
                             prefill_chunk=4)
  for b, cap in enumerate(row_capacity):
    alone = ag_jax.generate(model, variables, rows[b:b + 1], policy=policies.StreamingLLM(sink=2),
                            capacity=int(cap), max_new_tokens=STEPS, prefill_chunk=4)
    np.testing.assert_array_equal(together.tokens[b], alone.tokens[0])


def test_a_budget_is_each_prompts_own(windowed):
  """Under a budget each prompt keeps budget x (its own length + new tokens), whatever the
  batch around it: generate over the batch equals generate over each prompt alone."""
  model, variables, prompts, _, _, _ = windowed
  rows = [list(p[:n]) for p, n in zip(prompts, LENGTHS)]
  for policy in (policies.StreamingLLM(sink=1), policies.H2O()):
    together = ag_jax.generate(model, variables, rows, policy=policy, budget=0.5,
                               max_new_tokens=STEPS, return_cache=True)
    for b, n in enumerate(LENGTHS):
      alone = ag_jax.generate(model, variables, rows[b:b + 1], policy=policy, budget=0.5,
                              max_new_tokens=STEPS, return_cache=True)
      np.testing.assert_array_equal(together.tokens[b], alone.tokens[0])
      np.testing.assert_array_equal(np.asarray(together.cache.length)[:, b],
                                    np.asarray(alone.cache.length)[:, 0])
      assert alone.capacity == -(-(n + STEPS) // 2)
