"""data.response_weight: response tokens (the RULER answers) weigh W in the LM loss, the
rest 1; W = 1 is the old 0/1 mask exactly, and the weighted loss is sum(w * nll) / sum(w)."""

import numpy as np
import pytest

from ag_jax.data import DataIterator
from ag_jax.data.packing import pack_documents, tokenize_example, tokenize_weighted
from ag_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
DOCS = [{"text": "abc: 12", "prompt": "abc:", "response": " 12"},
        {"text": "plain text only", "prompt": "plain text only", "response": ""},
        {"text": "xy= 7", "prompt": "xy=", "response": " 7"}]


def _rows(docs, seq_len, **kw):
  return list(pack_documents(docs, TOK, seq_len, **kw))


def test_weight_one_is_the_old_mask():
  old = _rows(DOCS, 24)
  new = _rows(DOCS, 24, response_weight=1.0)
  assert len(old) == len(new)
  for a, b in zip(old, new):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  ids, num_prompt, weights = tokenize_weighted(DOCS[0], TOK)
  np.testing.assert_array_equal(ids, tokenize_example(DOCS[0], TOK)[0])
  assert num_prompt == 0 and weights is None


def test_weights_land_on_the_response_tokens_exactly():
  w = 5.0
  (row,) = _rows(DOCS, 64, response_weight=w)
  seg, mask, targets = row["segment_ids"], row["loss_mask"], row["targets"]
  for s, doc in zip((1, 2, 3), DOCS):
    at = np.flatnonzero(seg == s)
    prompt = TOK.encode(doc["prompt"], add_bos=True)
    response = TOK.encode(doc["response"], add_bos=False, add_eos=True)
    # the same tokens as the whole text (bytes split anywhere)
    np.testing.assert_array_equal(row["tokens"][at],
                                  TOK.encode(doc["text"], add_bos=True, add_eos=True))
    expected = np.ones(len(at), np.float32)
    expected[-1] = 0.0  # a segment's last token has no target
    if doc["response"]:
      # position t predicts token t + 1: the last prompt token predicts the first response
      # token; the EOS after the response weighs w too
      expected[len(prompt) - 1:len(prompt) + len(response) - 1] = w
      np.testing.assert_array_equal(targets[at][mask[at] == w], response)
    np.testing.assert_array_equal(mask[at], expected)
  assert not mask[seg == 0].any()


def test_sft_keeps_prompts_untrained_and_chunks_keep_weights():
  (row,) = _rows(DOCS[:1], 32, sft=True, response_weight=3.0)
  n_prompt = len(TOK.encode(DOCS[0]["prompt"], add_bos=True))
  mask = row["loss_mask"]
  assert not mask[:n_prompt - 1].any() and (mask[n_prompt - 1:n_prompt + 3] == 3.0).all()
  # a document longer than a row: the chunks carry their slice of the weights
  long = {"text": "x" * 20 + " 42", "prompt": "x" * 20, "response": " 42"}
  rows = _rows([long], 8, response_weight=2.0)
  weighted = [int(t) for r in rows for t, m in zip(r["targets"], r["loss_mask"]) if m == 2.0]
  assert weighted == TOK.encode(" 42", add_bos=False, add_eos=True)
  assert sum(float((r["loss_mask"] > 0).sum()) for r in rows) == len(TOK.encode(
      long["text"], add_bos=True, add_eos=True)) - 1  # every prediction trained once


def test_iterator_resumes_with_weights():
  docs = DOCS * 8
  kw = dict(seq_len=16, batch_size=2, seed=1, response_weight=4.0)
  it = DataIterator(docs, TOK, **kw)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = DataIterator(docs, TOK, **kw)
  resumed.set_state(state)
  for a, b in zip(expected, (next(resumed) for _ in range(3))):
    np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
  assert (np.concatenate([b["loss_mask"] for b in expected]) == 4.0).any()
  with pytest.raises(ValueError, match="response_weight"):
    DataIterator(docs, TOK, seq_len=16, batch_size=2, response_weight=0.0)
  plain = DataIterator(docs, TOK, seq_len=16, batch_size=2, seed=1)
  with pytest.raises(ValueError, match="response_weight"):
    plain.set_state(state)  # the batches would differ


def test_ruler_response_tokens_match_the_whole_text():
  """The RULER examples tokenize the same apart and whole, so weighting changes no token."""
  from ag_jax.data import ruler, ruler_mix
  from ag_jax.tokenizer import load_tokenizer
  tok = load_tokenizer("stdlib_bpe:2048")
  mix = ruler_mix.RulerMix(min_length=64, max_length=96, min_needles=2, max_needles=4)
  for i in range(8):
    ex = mix.example(tok, "train", i)
    ids, _, weights = tokenize_weighted(ex, tok, response_weight=10.0)
    np.testing.assert_array_equal(ids, tok.encode(ex["text"], add_bos=True, add_eos=True))
    n_resp = len(tok.encode(ex["response"], add_bos=False, add_eos=True))
    assert (weights == 10.0).sum() == n_resp and (weights[-n_resp:] == 10.0).all()


def test_weighted_lm_loss_is_the_weighted_mean():
  import jax.numpy as jnp
  from ag_jax import losses
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, size=(2, 5)), jnp.int32)
  w = jnp.asarray([[1, 1, 4, 4, 0], [1, 0, 1, 4, 1]], jnp.float32)
  nll = -jnp.take_along_axis(jax_log_softmax(logits), targets[..., None], -1)[..., 0]
  want = float(jnp.sum(nll * w) / jnp.sum(w))
  got, total = losses.lm_loss(logits, targets, w)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  assert float(total) == float(jnp.sum(w))
  hidden = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
  full, _ = losses.lm_loss(hidden @ head, targets, w)
  chunked, _ = losses.lm_loss_chunked(hidden, head, targets, w, chunk=2)
  np.testing.assert_allclose(float(chunked), float(full), rtol=1e-5)


def jax_log_softmax(x):
  import jax
  return jax.nn.log_softmax(x, axis=-1)


@pytest.mark.parametrize("response_weight", [1.0, 5.0])
def test_prompt_weight_zero_trains_only_the_response(response_weight):
  doc = {"text": "abcabc", "prompt": "abca", "response": "bc", "prompt_weight": 0.0,
         "eos_weight": 0.0}
  (row,) = _rows([doc, DOCS[0]], 32, response_weight=response_weight)
  seg, mask = row["segment_ids"], row["loss_mask"]
  first = mask[seg == 1]  # targets of the copy document: "bca" then "bc" + eos
  np.testing.assert_array_equal(first[:4], 0.0)  # the prompt tokens as targets
  np.testing.assert_array_equal(first[4:6], response_weight)  # b, c
  assert first[6] == 0.0 and first[7] == 0.0  # the EOS as target; the last token predicts nothing
  assert mask[seg == 2][0] == 1.0  # a document without prompt_weight keeps weight 1


def test_pieces_weigh_their_target_spans():
  """A document with pieces: its tokens are the pieces' tokens; target pieces weigh the
  response weight, the others its prompt_weight, the EOS its eos_weight."""
  from ag_jax.data.packing import tokenize_weighted
  from ag_jax.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  doc = {"text": "k=4;k=4", "pieces": [("k=4;k=", False), ("4", True)], "prompt_weight": 0.5,
         "eos_weight": 0.0}
  ids, num_prompt, weights = tokenize_weighted(doc, tok, response_weight=3.0)
  assert list(ids) == tok.encode("k=4;k=4", add_bos=True, add_eos=True) and num_prompt == 0
  np.testing.assert_array_equal(weights[1:7], 0.5)   # "k=4;k=" as targets
  assert weights[7] == 3.0 and weights[8] == 0.0     # "4" (a lookup), then the EOS
