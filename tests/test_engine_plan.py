"""The cache keeps to the plan made at prefill, or says so (issue: no silent wrong answers).

A cache is planned for prompt width + max_new_tokens (+ reserve) positions; decoding past
that is refused, a capacity above it is honoured, finished rows change nothing, and the
kvpress protocol's reserved room keeps every token after the prompt.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ag_jax
from ag_jax import engine, policies
from test_engine import LENGTHS, STEPS, half_evicting, sequences


@pytest.fixture(scope="module")
def gated(tiny_cfg):
  model = ag_jax.Llama(tiny_cfg, gate=ag_jax.GateConfig(num_heads=2, head_dim=8))
  return model, half_evicting(model, seed=1)


def test_decode_past_the_plan_is_refused(gated):
  model, variables = gated
  prompts, continuation, _ = sequences(model.cfg.vocab_size, seed=1)
  for policy in (policies.AttentionGate(), policies.Full()):
    _, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy, max_new_tokens=2)
    assert cache.planned_context == prompts.shape[1] + 2
    for j in range(2):  # the longest row reaches exactly the planned end
      _, cache = ag_jax.decode_step(model, variables, cache, continuation[:, j])
    with pytest.raises(engine.InferenceError, match="past the 14 positions .* larger max_new_tokens"):
      ag_jax.decode_step(model, variables, cache, continuation[:, 2])


def test_capacity_above_the_plan_is_honoured_not_clamped(gated):
  model, variables = gated
  prompts, continuation, _ = sequences(model.cfg.vocab_size, seed=1)
  width = prompts.shape[1]
  logits, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, capacity=width + 41)
  assert cache.capacity == width + 41
  same, small = ag_jax.prefill(model, variables, prompts, LENGTHS, capacity=width)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(same))
  np.testing.assert_array_equal(np.asarray(cache.length), np.asarray(small.length))
  with pytest.raises(engine.InferenceError, match="planned for at prefill"):
    ag_jax.decode_step(model, variables, cache, continuation[:, 0])


def test_prefill_checks_max_position(gated):
  model, variables = gated
  prompts, _, _ = sequences(model.cfg.vocab_size, seed=1)
  over = model.cfg.max_position - prompts.shape[1] + 1
  with pytest.raises(engine.InferenceError, match="exceeds the model's max_position 256"):
    ag_jax.prefill(model, variables, prompts, LENGTHS, max_new_tokens=over)
  with pytest.raises(engine.InferenceError, match="max_new_tokens must be >= 0"):
    ag_jax.prefill(model, variables, prompts, LENGTHS, max_new_tokens=-1)


@pytest.mark.parametrize("policy", [policies.AttentionGate(), policies.H2O(), policies.Full()],
                         ids=lambda p: p.name)
def test_finished_rows_change_nothing(gated, policy):
  """An inactive row's buffers stay bit for bit (gate ring, K/V, scores, positions), so a
  row paused for a step and then resumed decodes exactly as if it had never paused."""
  model, variables = gated
  prompts, continuation, _ = sequences(model.cfg.vocab_size, seed=1)
  decode = jax.jit(lambda v, t, c, a: model.apply(v, t, c, a, method=ag_jax.Llama.decode))
  _, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy,
                            max_new_tokens=STEPS, budget=0.5 if policy.evicts else None)
  before = jax.tree_util.tree_map(np.asarray, cache)
  _, cache = decode(variables, jnp.asarray(continuation[:, 0]), cache,
                    jnp.array([True, False, True]))  # row 1 is paused this step
  after = jax.tree_util.tree_map(np.asarray, cache)
  for name in ("k", "v", "score", "position", "length", "gate_k", "gate_v"):
    old, new = getattr(before, name), getattr(after, name)
    if old is None:
      continue
    np.testing.assert_array_equal(new[:, 1], old[:, 1], err_msg=name)
    if name in ("k", "length", "gate_k"):
      assert not np.array_equal(new[:, 0], old[:, 0]), f"an active row's {name} must change"
  assert after.next_position[1] == before.next_position[1]
  # Resume row 1: its logits equal those of a cache that never paused.
  _, fresh = ag_jax.prefill(model, variables, prompts, LENGTHS, policy=policy,
                            max_new_tokens=STEPS, budget=0.5 if policy.evicts else None)
  ones = jnp.ones(3, bool)
  paused, _ = decode(variables, jnp.asarray(continuation[:, 0]), cache, ones)
  straight, _ = decode(variables, jnp.asarray(continuation[:, 0]), fresh, ones)
  np.testing.assert_array_equal(np.asarray(paused)[1], np.asarray(straight)[1])


def test_reserve_keeps_every_token_after_the_compressed_prompt(gated):
  """The kvpress protocol: the prompt compressed by the gates, the next R tokens all kept.
  Equals the training view with the prefill's kept set forced for the prompt and every
  continuation token kept."""
  model, variables = gated
  prompts, continuation, joined = sequences(model.cfg.vocab_size, seed=1)
  width, reserve = prompts.shape[1], STEPS
  logits, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, capacity=width,
                                 reserve=reserve, all_logits=True)
  assert cache.capacity == width + reserve and cache.policy == policies.Full()
  prompt_kept = np.asarray(cache.length)  # [L, B, K]
  position = np.asarray(cache.position)
  keep = np.zeros((model.cfg.num_layers, len(LENGTHS), model.cfg.num_kv_heads, joined.shape[1]), bool)
  for l, b, k in np.ndindex(*prompt_kept.shape):
    keep[l, b, k, position[l, b, k, :prompt_kept[l, b, k]]] = True
    keep[l, b, k, LENGTHS[b]:LENGTHS[b] + STEPS] = True
  assert prompt_kept.sum() < 0.8 * LENGTHS.sum() * keep.shape[0] * keep.shape[2]  # evicted some
  reference = np.asarray(model.apply(variables, jnp.asarray(joined), keep=jnp.asarray(keep)))
  steps = []
  for j in range(reserve):
    step_logits, cache = ag_jax.decode_step(model, variables, cache, continuation[:, j])
    steps.append(np.asarray(step_logits))
  np.testing.assert_array_equal(np.asarray(cache.length), prompt_kept + reserve)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(np.asarray(logits)[b, :n], reference[b, :n], atol=1e-4)
    for j in range(reserve):
      np.testing.assert_allclose(steps[j][b], reference[b, n + j], atol=1e-4)
  with pytest.raises(engine.InferenceError, match="planned for at prefill"):
    ag_jax.decode_step(model, variables, cache, continuation[:, 0])
  with pytest.raises(engine.InferenceError, match="not both"):
    ag_jax.prefill(model, variables, prompts, LENGTHS, reserve=2, max_new_tokens=2)


def test_bf16_views_agree(tiny_cfg):
  """In bf16 both views keep identical tokens and their logits agree to a bf16 tolerance."""
  cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16")
  model = ag_jax.Llama(cfg, gate=ag_jax.GateConfig(num_heads=2, head_dim=8))
  variables = half_evicting(model, seed=2)
  prompts, continuation, joined = sequences(cfg.vocab_size, seed=2)
  train_logits, (_, flags) = model.apply(variables, jnp.asarray(joined), return_gates=True)
  train_logits, flags = np.asarray(train_logits), np.asarray(flags)
  logits, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, max_new_tokens=STEPS,
                                 all_logits=True)
  steps = []
  for j in range(STEPS):
    step_logits, cache = ag_jax.decode_step(model, variables, cache, continuation[:, j])
    steps.append(np.asarray(step_logits))
  length, position = np.asarray(cache.length), np.asarray(cache.position)
  worst, scale = 0.0, np.abs(train_logits).max()
  for b, n in enumerate(LENGTHS):
    np.testing.assert_array_equal(length[:, b], flags[:, b, :, :n + STEPS].sum(-1))
    for l, k in np.ndindex(length.shape[0], length.shape[2]):
      np.testing.assert_array_equal(position[l, b, k, :length[l, b, k]],
                                    np.nonzero(flags[l, b, k, :n + STEPS])[0])
    worst = max(worst, np.abs(np.asarray(logits)[b, :n] - train_logits[b, :n]).max())
    for j in range(STEPS):
      worst = max(worst, np.abs(steps[j][b] - train_logits[b, n + j]).max())
  print(f"bf16: max |prefill+decode - training view| = {worst:.3g} (logit scale {scale:.3g})")
  assert worst < 0.05 * scale
