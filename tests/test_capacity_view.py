"""Budget-aware training (issue 14): the capacity rule inside the training view equals the
kvpress protocol's cache (prefill, compress to c, read the rest with room), and its pieces
(the per-segment top-c rank, the straight-through keep, the data's context lengths and drawn
capacities) against numpy statements."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ag_jax
from ag_jax import capacity_view, policies
from ag_jax.config import ConfigError, GateConfig
from ag_jax.data import DataIterator, packing
from test_engine import LENGTHS, STEPS, half_evicting, run_cache, sequences


def capped_reference(prob, flags, positions, segments, context_length, capacity):
  """numpy: per (row, head, segment), the flagged context tokens sorted by (-prob, time),
  the first `capacity` of them."""
  b, k, t = prob.shape
  out = np.zeros((b, k, t), bool)
  for r, h in np.ndindex(b, k):
    for s in set(segments[r].tolist()) - {0}:
      members = [j for j in range(t) if segments[r, j] == s
                 and positions[r, j] < context_length[r, j]]
      chosen = sorted((j for j in members if flags[r, h, j]), key=lambda j: (-prob[r, h, j], j))
      for j in chosen[:capacity[r, members[0]]] if members else []:
        out[r, h, j] = True
  return out


def packed_rows(rng, t=40):
  """Rows of 2-3 segments, some with a context (and a question after it), some plain,
  padding at the end."""
  b = 3
  positions, segments = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  context_length, capacity = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for r in range(b):
    start = 0
    for s in range(1, 4):
      n = int(rng.integers(6, 14))
      if start + n > t - 2:
        break
      positions[r, start:start + n] = np.arange(n)
      segments[r, start:start + n] = s
      draw = rng.random()
      if draw < 0.8:  # a context of n - 3 tokens, then a 3-token question
        context_length[r, start:start + n] = n - 3
        # capacity 0 (budget 1): the plain view, as for a segment without a context
        capacity[r, start:start + n] = int(rng.integers(1, n - 2)) if draw < 0.6 else 0
      start += n
  return positions, segments, context_length, capacity


def test_capped_flags_match_numpy_reference():
  rng = np.random.default_rng(0)
  positions, segments, context_length, capacity = packed_rows(rng)
  b, t, k = *positions.shape, 2
  # Probabilities on a coarse grid: ties happen, and the earlier token must win them.
  prob = rng.integers(0, 6, (b, k, t)).astype(np.float32) / 5.0
  flags = prob > 0.3
  got = capacity_view.capped_flags(jnp.asarray(prob), jnp.asarray(flags), jnp.asarray(positions),
                                   jnp.asarray(segments), jnp.asarray(context_length),
                                   jnp.asarray(capacity))
  want = capped_reference(prob, flags, positions, segments, context_length, capacity)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert want.sum() < (flags & (positions < context_length)[:, None]).sum()  # the cap binds


def test_after_context_keep_is_straight_through():
  """Forward exactly 0/1 (the capped flags on context tokens, 1 elsewhere); backward the
  identity to the keep probability of every context token, kept or cut, nothing elsewhere."""
  rng = np.random.default_rng(1)
  positions, segments, context_length, capacity = packed_rows(rng)
  b, t, k = *positions.shape, 2
  prob = jnp.asarray(rng.uniform(0, 1, (b, k, t)).astype(np.float32))
  args = (jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(context_length),
          jnp.asarray(capacity))
  keep = capacity_view.after_context_keep(prob, prob > 0.5, *args)
  in_context, after = (np.asarray(x) for x in capacity_view.regions(args[0], args[2], args[3]))
  plain = ~(in_context | after)[:, None]  # [B, 1, T]
  capped = np.asarray(capacity_view.capped_flags(prob, prob > 0.5, *args))
  flags = np.asarray(prob) > 0.5
  np.testing.assert_array_equal(np.asarray(keep),
                                np.where(in_context[:, None], capped, 1.0).astype(np.float32))
  weights = jnp.asarray(rng.standard_normal((b, k, t)).astype(np.float32))
  grad = jax.grad(lambda p: jnp.sum(capacity_view.after_context_keep(p, p > 0.5, *args)
                                    * weights))(prob)
  np.testing.assert_allclose(np.asarray(grad), np.where(in_context[:, None], weights, 0.0))
  assert (in_context[:, None] & ~capped & flags).any()  # some were cut
  assert (plain & (context_length > 0)[:, None]).any()  # a context under budget 1


@pytest.fixture(scope="module")
def gated(tiny_cfg):
  model = ag_jax.Llama(tiny_cfg, gate=GateConfig(num_heads=2, head_dim=8))
  return model, half_evicting(model, seed=1)


def test_budget_view_equals_the_kvpress_cache(gated):
  """The invariant extended to the capacity rule: prefill the prompt (the context), compress
  it to c kept tokens per row, read the continuation with room kept for it: the logits equal
  the training view with context_length = the prompt and capacity = c, at every position."""
  model, variables = gated
  prompts, continuation, joined = sequences(model.cfg.vocab_size, seed=1)
  capacity = 3
  with jax.default_matmul_precision("highest"):
    logits, cache = ag_jax.prefill(model, variables, prompts, LENGTHS, capacity=capacity,
                                   reserve=STEPS, all_logits=True)
    assert cache.policy == policies.Full()
    steps = []
    for j in range(STEPS):
      step_logits, cache = ag_jax.decode_step(model, variables, cache, continuation[:, j])
      steps.append(np.asarray(step_logits))
    t = joined.shape[1]
    context_length = np.repeat(LENGTHS[:, None], t, axis=1).astype(np.int32)
    view, (_, flags) = model.apply(variables, jnp.asarray(joined), return_gates=True,
                                   context_length=jnp.asarray(context_length),
                                   capacity=jnp.full((len(LENGTHS), t), capacity, jnp.int32))
    plain = np.asarray(model.apply(variables, jnp.asarray(joined)))
    # capacity 0 (budget 1 drawn): the plain view, exactly
    unbounded = np.asarray(model.apply(variables, jnp.asarray(joined),
                                       context_length=jnp.asarray(context_length),
                                       capacity=jnp.zeros((len(LENGTHS), t), jnp.int32)))
  np.testing.assert_array_equal(unbounded, plain)
  view, flags = np.asarray(view), np.asarray(flags)
  flagged = np.stack([flags[:, b, :, :n].sum(-1) for b, n in enumerate(LENGTHS)], 1)  # [L, B, K]
  assert (flagged > capacity).any(), "the capacity must bind somewhere"
  np.testing.assert_array_equal(np.asarray(cache.length), np.minimum(flagged, capacity) + STEPS)
  worst_plain = 0.0
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(np.asarray(logits)[b, :n], view[b, :n], atol=1e-4)
    for j in range(STEPS):
      np.testing.assert_allclose(steps[j][b], view[b, n + j], atol=1e-4)
      worst_plain = max(worst_plain, np.abs(steps[j][b] - plain[b, n + j]).max())
  assert worst_plain > 1e-2  # the gates' flags alone are another function


def test_budget_view_refuses_what_it_cannot_honour(gated, tiny_cfg):
  model, variables = gated
  tokens = jnp.ones((1, 8), jnp.int32)
  n = jnp.full((1, 8), 5, jnp.int32)
  with pytest.raises(ValueError, match="together"):
    model.apply(variables, tokens, context_length=n)
  with pytest.raises(ValueError, match="no forced keep"):
    model.apply(variables, tokens, context_length=n, capacity=n,
                keep=jnp.ones((tiny_cfg.num_layers, 1, tiny_cfg.num_kv_heads, 8), bool))
  plain = ag_jax.Llama(tiny_cfg)
  with pytest.raises(ValueError, match="it needs gates"):
    plain.apply(ag_jax.init_variables(plain, jax.random.key(0)), tokens, context_length=n,
                capacity=n)


def test_sinks_are_kept_first_in_every_view(tiny_cfg):
  """GateConfig.sink_tokens: the first positions keep probability 1 in the training view,
  prefill and decode (here a linear gate, and 8 sinks, so row 0's first decode steps are
  sinks too); the invariant holds, and under a capacity of 2 every row keeps positions 0, 1.
  The same weights without sinks evict some of those positions (the guard)."""
  sinks = 8
  gate = GateConfig(kind="linear", sink_tokens=sinks)
  model = ag_jax.Llama(tiny_cfg, gate=gate)
  variables = ag_jax.init_variables(model, jax.random.key(3))
  rng = np.random.default_rng(3)  # a linear gate: logits far from 0, about half below it
  g = dict(variables["params"]["layers"]["gate"])
  g = {name: jnp.asarray(rng.normal(0, 4.0, np.shape(w)).astype(np.float32)) for name, w in g.items()}
  variables["params"]["layers"]["gate"] = g
  prompts, continuation, joined = sequences(tiny_cfg.vocab_size, seed=3)
  with jax.default_matmul_precision("highest"):
    view, (probs, flags) = model.apply(variables, jnp.asarray(joined), return_gates=True)
    _, (_, plain_flags) = ag_jax.Llama(tiny_cfg, gate=GateConfig(kind="linear")).apply(
        variables, jnp.asarray(joined), return_gates=True)
    (logits, *steps), cache = run_cache(model, variables, prompts, continuation, backend=None)
    _, capped = ag_jax.prefill(model, variables, prompts, LENGTHS, capacity=2, reserve=STEPS)
  probs, flags, view = np.asarray(probs), np.asarray(flags), np.asarray(view)
  assert (probs[..., :sinks] == 1.0).all() and flags[..., :sinks].all()
  assert not np.asarray(plain_flags)[..., :sinks].all()
  assert 0.2 < flags[..., sinks:].mean() < 0.8  # the rest is gated
  position, length = np.asarray(cache.position), np.asarray(cache.length)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(np.asarray(logits)[b, :n], view[b, :n], atol=1e-4)
    for j in range(STEPS):
      np.testing.assert_allclose(steps[j][b], view[b, n + j], atol=1e-4)
    np.testing.assert_array_equal(length[:, b], flags[:, b, :, :n + STEPS].sum(-1))
    held = min(sinks, n + STEPS)
    assert (position[:, b, :, :held] == np.arange(held)).all()
  assert (np.asarray(capped.position)[..., :2] == [0, 1]).all()
  np.testing.assert_array_equal(np.asarray(capped.length), 2)


@pytest.mark.parametrize("sink_tokens", [-1, 1.5, True, "2"])
def test_bad_sink_tokens_are_refused(sink_tokens):
  with pytest.raises(ConfigError, match="sink_tokens"):
    GateConfig(sink_tokens=sink_tokens)


def test_packing_marks_each_segments_context():
  doc = lambda n, ctx: (np.arange(1, n + 1, dtype=np.int32), 0, None, ctx)
  row = packing.build_row([doc(6, 4), doc(5, 0), doc(4, 3)], seq_len=20, pad_id=0)
  np.testing.assert_array_equal(row["context_length"],
                                [4] * 6 + [0] * 5 + [3] * 4 + [0] * 5)
  # A document cut across rows loses its context (its question lands in another segment).
  packer = packing.RowPacker(seq_len=6, pad_id=0)
  docs = iter([(0, np.arange(1, 10, dtype=np.int32), 0, None, 5)])
  first = packer.next_row(lambda: next(docs, None))
  assert (first["context_length"] == 0).all()


class ContextDocs:
  """Documents of 8 + i % 5 tokens with a context of all but the last 3."""

  def __len__(self):
    return 64

  def __getitem__(self, i):
    n = 8 + i % 5
    return {"text": "x" * (n - 2), "context_tokens": n - 3}


def test_iterator_draws_capacities_per_global_row():
  from ag_jax.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  budgets = (0.25, 0.5, 1.0)
  kwargs = dict(seq_len=16, batch_size=4, seed=3, shuffle=True, budgets=budgets)
  whole = DataIterator(ContextDocs(), tok, **kwargs)
  halves = [DataIterator(ContextDocs(), tok, process_index=p, process_count=2, **kwargs)
            for p in range(2)]
  for _ in range(3):
    batch = next(whole)
    parts = [next(h) for h in halves]
    np.testing.assert_array_equal(batch["context_capacity"],
                                  np.concatenate([p["context_capacity"] for p in parts]))
    n = batch["context_length"]
    assert (n > 0).any()
    allowed = [max(1, int(m * b)) if b < 1 else 0 for m in range(1, 17) for b in budgets]
    assert all(c in allowed for c in batch["context_capacity"][n > 0])
    assert np.all(batch["context_capacity"][n == 0] == 0)
  plain = next(DataIterator(ContextDocs(), tok, seq_len=16, batch_size=4, seed=3))
  assert "context_capacity" not in plain


def test_ruler_contexts_are_the_prompts_first_tokens():
  from ag_jax.data import ruler_mix
  from ag_jax.tokenizer import load_tokenizer
  tok = load_tokenizer("stdlib_bpe:2048")
  source = ruler_mix.open_spec("ruler:tasks=niah_multikey+niah_multivalue+niah_multiquery+vt,"
                               "min_length=96,max_length=200,lm_fraction=0.2,questions=2", "train")
  seen = 0
  for i in range(12):
    full = source.mix.example(tok, "train", i)
    ex = source[i]
    n = packing.example_context_tokens(ex)
    if full["task"] == "lm":
      assert n == 0
      continue
    ids, _, _ = packing.tokenize_weighted(ex, tok, response_weight=5.0)
    assert list(ids[:n]) == tok.encode(full["context"], add_bos=True) and len(ids) > n
    seen += 1
  assert seen >= 6


@pytest.mark.parametrize("budgets", [(), (0.0,), (1.5,), ("0.25",), (True,)])
def test_bad_train_budgets_are_refused(budgets):
  with pytest.raises(ConfigError, match="train_budgets"):
    GateConfig(train_budgets=budgets)


def test_question_in_context_marks_the_whole_prompt_for_a_share_of_examples():
  """gate recipes for the decode protocol: a drawn share of task examples compresses context +
  question (their marked context is the prompt's first tokens, the answer after it); the
  examples' texts are those of the mix without the knob, and the rest mark the context alone."""
  from ag_jax.data import ruler_mix
  from ag_jax.tokenizer import load_tokenizer
  tok = load_tokenizer("stdlib_bpe:2048")
  spec = ("ruler:tasks=niah_multikey+niah_multivalue+niah_multiquery+vt,min_length=96,"
          "max_length=200,lm_fraction=0.2")
  plain = ruler_mix.open_spec(spec, "train")
  mixed = ruler_mix.open_spec(spec + ",question_in_context=0.5", "train")
  marks = []
  for i in range(24):
    full, ex, before = mixed.mix.example(tok, "train", i), mixed[i], plain[i]
    assert ex["text"] == before["text"]
    n = packing.example_context_tokens(ex)
    if full["task"] == "lm":
      assert n == 0
      continue
    ids, _, _ = packing.tokenize_weighted(ex, tok, response_weight=5.0)
    prompt = tok.encode(full["prompt"], add_bos=True)
    if n == packing.example_context_tokens(before):
      assert list(ids[:n]) == tok.encode(full["context"], add_bos=True)
      marks.append("context")
    else:
      assert n == len(prompt) and list(ids[:n]) == prompt and len(ids) > n
      marks.append("prompt")
  assert {"context", "prompt"} == set(marks)
  with pytest.raises(ValueError, match="question_in_context"):
    ruler_mix.parse_spec(spec + ",question_in_context=1.5")
