"""The evicting cache computes exactly the training view (DESIGN §1 invariant), and really evicts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ag_jax
from ag_jax import engine, policies
from conftest import spread_variables

LENGTHS = np.array([5, 12, 9])  # prompts of different lengths, right-padded to 12
STEPS = 6                        # teacher-forced continuation


def half_evicting(model, seed=0, gate_scale=25.0):
  """Spread base weights; gates biased to evict about half, with probabilities far from 0.5
  (so a float rounding difference can never flip a flag between the two views)."""
  variables = spread_variables(model, seed=seed)
  gate = dict(variables["params"]["layers"]["gate"])
  gate["bias"] = jnp.zeros_like(gate["bias"])
  gate["out"] = gate["out"] * gate_scale
  gate["v"] = gate["v"] * 10.0
  variables["params"]["layers"]["gate"] = gate
  return variables


def sequences(vocab, seed=0):
  rng = np.random.RandomState(seed)
  full = rng.randint(0, vocab, size=(len(LENGTHS), LENGTHS.max() + STEPS))
  prompts = np.where(np.arange(LENGTHS.max())[None] < LENGTHS[:, None], full[:, :LENGTHS.max()], 0)
  continuation = np.stack([full[b, n:n + STEPS] for b, n in enumerate(LENGTHS)])
  # The training view sees each prompt followed directly by its continuation.
  joined = np.zeros_like(full)
  for b, n in enumerate(LENGTHS):
    joined[b, :n + STEPS] = np.concatenate([full[b, :n], continuation[b]])
  return prompts, continuation, joined


@pytest.fixture(scope="module", params=[(None, 0), (4, 1)],
                ids=["gate_whole_context", "gate_window_4_sink_1"])
def world(request, tiny_cfg):
  window, sink_tokens = request.param
  gate = ag_jax.GateConfig(num_heads=2, head_dim=8, window=window, sink_tokens=sink_tokens)
  model = ag_jax.Llama(tiny_cfg, gate=gate)
  variables = half_evicting(model)
  prompts, continuation, joined = sequences(tiny_cfg.vocab_size)
  logits, (probs, flags) = jax.jit(
      lambda v, t: model.apply(v, t, return_gates=True))(variables, jnp.asarray(joined))
  return model, variables, prompts, continuation, np.asarray(logits), np.asarray(flags)


def run_cache(model, variables, prompts, continuation, backend, capacity=None):
  logits, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, max_new_tokens=STEPS,
                                 capacity=capacity, backend=backend, all_logits=True)
  outs = [np.asarray(logits)]
  for j in range(STEPS):
    step_logits, cache = ag_jax.decode_step(model, variables, cache, continuation[:, j])
    outs.append(np.asarray(step_logits))
  return outs, cache


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_prefill_decode_equals_training_view(world, backend):
  model, variables, prompts, continuation, train_logits, flags = world
  kept = flags[..., :-1].mean()
  assert 0.25 < kept < 0.75, f"the gates should evict about half, keep {kept:.2f}"
  # Highest matmul precision: on TPU/GPU the default would round f32 matmuls to bf16 passes.
  with jax.default_matmul_precision("highest"):
    (prefill_logits, *steps), cache = run_cache(model, variables, prompts, continuation, backend)
  worst = 0.0
  for b, n in enumerate(LENGTHS):
    worst = max(worst, np.abs(prefill_logits[b, :n] - train_logits[b, :n]).max())
    for j in range(STEPS):
      worst = max(worst, np.abs(steps[j][b] - train_logits[b, n + j]).max())
  print(f"{backend}: max |prefill+decode - training view| = {worst:.2e}")
  assert worst < 1e-4
  # Physically evicted: each row holds exactly the tokens the training view keeps.
  length = np.asarray(cache.length)  # [L, B, K]
  for b, n in enumerate(LENGTHS):
    np.testing.assert_array_equal(length[:, b], flags[:, b, :, :n + STEPS].sum(-1))
  position = np.asarray(cache.position)
  for l, b, k in [(0, 0, 0), (1, 2, 1)]:
    expected = np.nonzero(flags[l, b, k, :LENGTHS[b] + STEPS])[0]
    np.testing.assert_array_equal(position[l, b, k, :length[l, b, k]], expected)
  if model.gate.sink_tokens:  # the sink is in every view, and in every row of the cache
    assert flags[..., 0].all()
    assert (position[..., 0] == 0).all()


def test_without_eviction_the_flags_matter(world):
  """Guard for the test above: the full-cache model gives other logits on these inputs."""
  model, variables, prompts, continuation, train_logits, _ = world
  plain = ag_jax.Llama(model.cfg).apply(variables, jnp.asarray(sequences(model.cfg.vocab_size)[2]))
  assert np.abs(np.asarray(plain) - train_logits).max() > 1e-2


def test_capacity_overflow_keeps_highest_scores(tiny_cfg):
  gate = ag_jax.GateConfig(num_heads=2, head_dim=8)
  model = ag_jax.Llama(tiny_cfg, gate=gate)
  variables = half_evicting(model, seed=3)
  prompts, continuation, joined = sequences(tiny_cfg.vocab_size, seed=3)
  capacity = 3
  _, (probs, flags) = model.apply(variables, jnp.asarray(joined), return_gates=True)
  probs, flags = np.asarray(probs), np.asarray(flags)
  _, cache = run_cache(model, variables, prompts, continuation, "reference", capacity=capacity)
  # Layer 0's gate reads only embeddings, so its probabilities do not depend on eviction
  # upstream: simulate the capacity rule on them with numpy.
  for b, n in enumerate(LENGTHS):
    for k in range(tiny_cfg.num_kv_heads):
      p, f = probs[0, b, k], flags[0, b, k]
      kept = [t for t in range(n) if f[t]]
      if len(kept) > capacity:  # prefill: the highest probabilities, ties to the earlier
        kept = sorted(sorted(kept, key=lambda t: (-p[t], t))[:capacity])
      for t in range(n, n + STEPS - 1):  # decode: replace the lowest if the newcomer is higher
        if not f[t]:
          continue
        if len(kept) < capacity:
          kept.append(t)
        else:
          victim = min(kept, key=lambda s: p[s])
          if p[t] > p[victim]:
            kept[kept.index(victim)] = t
      last = n + STEPS - 1  # the last decoded token also went through the cache
      if f[last]:
        if len(kept) < capacity:
          kept.append(last)
        else:
          victim = min(kept, key=lambda s: p[s])
          if p[last] > p[victim]:
            kept[kept.index(victim)] = last
      got = np.asarray(cache.position)[0, b, k, :int(cache.length[0, b, k])]
      assert sorted(got.tolist()) == sorted(kept), (b, k, got, kept)
  assert int(np.asarray(cache.length).max()) == capacity


def test_full_policy_generate_equals_greedy_loop(tiny_cfg):
  model = ag_jax.Llama(tiny_cfg)
  variables = spread_variables(model, seed=5)
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
  result = ag_jax.generate(model, variables, prompts, policy=policies.Full(), max_new_tokens=5)
  # Reference: the plain model re-run on the whole growing sequence, fixed padded shape.
  width = max(map(len, prompts)) + 5
  seqs = np.zeros((len(prompts), width), np.int32)
  for b, prompt in enumerate(prompts):
    seqs[b, :len(prompt)] = prompt
  apply = jax.jit(model.apply)
  for step in range(5):
    logits = np.asarray(apply(variables, jnp.asarray(seqs)))
    for b, prompt in enumerate(prompts):
      seqs[b, len(prompt) + step] = np.argmax(logits[b, len(prompt) + step - 1])
  for b, prompt in enumerate(prompts):
    assert result.tokens[b].tolist() == seqs[b, len(prompt):len(prompt) + 5].tolist()
  assert result.kept_ratio.min() == 1.0 and result.kv_bytes <= result.full_kv_bytes * 1.2


def test_generate_with_gates_matches_step_by_step_and_saves_memory(world):
  model, variables, prompts, _, _, _ = world
  prompt_lists = [list(p[:n]) for p, n in zip(prompts, LENGTHS)]
  result = ag_jax.generate(model, variables, prompt_lists, max_new_tokens=STEPS, budget=0.5)
  logits, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, max_new_tokens=STEPS,
                                 budget=0.5)
  manual = [np.argmax(np.asarray(logits), -1)]
  for _ in range(STEPS - 1):
    logits, cache = ag_jax.decode_step(model, variables, cache, manual[-1])
    manual.append(np.argmax(np.asarray(logits), -1))
  np.testing.assert_array_equal(result.tokens, np.stack(manual, 1))
  assert result.kv_bytes < 0.6 * result.full_kv_bytes
  assert 0.0 < result.kept_ratio.mean() < 0.8


def test_eos_stops_each_sequence(tiny_cfg):
  model = ag_jax.Llama(tiny_cfg)
  variables = spread_variables(model, seed=5)
  prompts = [[1, 2, 3], [4, 5, 6, 7]]
  free = ag_jax.generate(model, variables, prompts, policy=policies.Full(), max_new_tokens=6)
  eos = int(free.tokens[0, 2])
  stopped = ag_jax.generate(model, variables, prompts, policy=policies.Full(), max_new_tokens=6,
                            eos_id=eos, pad_id=63)
  first_eos = int(np.argmax(free.tokens[0] == eos))
  assert stopped.num_generated[0] == first_eos + 1
  assert (stopped.tokens[0, first_eos + 1:] == 63).all()
  np.testing.assert_array_equal(stopped.tokens[0, :first_eos + 1], free.tokens[0, :first_eos + 1])


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[[1, 2], []]), "empty prompt"),
    (dict(prompts=[[1, 2]], policy=policies.Full(), capacity=2), "needs capacity >= prompt \\+ new tokens = 6"),
    (dict(prompts=[[1, 2]], policy=policies.AttentionGate()), "needs gates"),
    (dict(prompts=[[1, 2]], budget=1.5), "budget must be a fraction"),
])
def test_bad_input_is_one_clear_error(tiny_cfg, kwargs, message):
  model = ag_jax.Llama(tiny_cfg)
  variables = spread_variables(model, seed=5)
  with pytest.raises(engine.InferenceError, match=message):
    ag_jax.generate(model, variables, max_new_tokens=4, **kwargs)
  with pytest.raises(ValueError, match="unknown policy 'bogus'; known policies"):
    policies.make_policy("bogus")
