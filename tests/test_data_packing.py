"""Packing: segments, positions, targets within segments, chunking, and the SFT loss mask."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ag_jax.data.packing import ROW_KEYS, build_row, pack_documents, stack_rows
from ag_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _segments(row):
  """{segment id: slice} of a row."""
  seg = row["segment_ids"]
  return {int(s): np.flatnonzero(seg == s) for s in np.unique(seg) if s}


def _check_row_invariants(row, seq_len):
  assert {k: (v.shape, v.dtype.name) for k, v in row.items()} == {
      **{k: ((seq_len,), "int32") for k in ROW_KEYS[:-1]}, "loss_mask": ((seq_len,), "float32")}
  seg, pad = row["segment_ids"], row["segment_ids"] == 0
  ids = [s for s in seg if s]
  assert ids == sorted(ids) and (not ids or set(ids) == set(range(1, max(ids) + 1)))
  if pad.any():  # padding only at the end
    assert not seg[np.argmax(pad):].any()
  assert (row["tokens"][pad] == TOK.pad_id).all() and not row["loss_mask"][pad].any()
  assert not row["positions"][pad].any()
  for idx in _segments(row).values():
    assert (idx == np.arange(idx[0], idx[0] + len(idx))).all()  # contiguous
    assert (row["positions"][idx] == np.arange(len(idx))).all()  # restart at 0
    # Targets are the next token of the same segment; the last token has none.
    assert (row["targets"][idx[:-1]] == row["tokens"][idx[1:]]).all()
    assert row["targets"][idx[-1]] == TOK.pad_id and row["loss_mask"][idx[-1]] == 0
  same = np.append((seg[1:] == seg[:-1]) & (seg[:-1] > 0), False)
  assert not row["loss_mask"][~same].any()  # no target crosses a segment boundary


def test_rows_pack_whole_documents_in_order():
  docs = [{"text": t} for t in ("hello", "a much longer document here", "x", "", "abc")]
  rows = list(pack_documents(docs, TOK, seq_len=16))
  for row in rows:
    _check_row_invariants(row, 16)
  segments = [[TOK.decode(row["tokens"][idx], skip_special=False)
               for idx in _segments(row).values()] for row in rows]
  # A document that does not fit in the rest of a row starts the next row; one longer than
  # a row is cut into chunks of 16 tokens that share one token ("d").
  assert segments == [["<s>hello</s>"], ["<s>a much longer d"], ["document here</s>"],
                      ["<s>x</s>", "<s></s>", "<s>abc</s>"]]


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12),
       seq_len=st.integers(2, 24))
def test_every_prediction_trained_exactly_once(lengths, seq_len):
  texts = ["".join(chr(97 + (i + j) % 26) for j in range(n)) for i, n in enumerate(lengths)]
  rows = list(pack_documents([{"text": t} for t in texts], TOK, seq_len=seq_len))
  for row in rows:
    _check_row_invariants(row, seq_len)
  # The trained (input, target) pairs, in order, are exactly the documents' bigrams.
  trained = [(int(row["tokens"][t]), int(row["targets"][t])) for row in rows
             for t in np.flatnonzero(row["loss_mask"])]
  expected = []
  for text in texts:
    ids = TOK.encode(text, add_bos=True, add_eos=True)
    expected += list(zip(ids[:-1], ids[1:]))
  assert trained == expected
  # Segments fit: no chunk is longer than a row; a document that fits is never split.
  for text in texts:
    if len(text) + 2 <= seq_len:
      assert any(TOK.decode(row["tokens"][idx], skip_special=False) == f"<s>{text}</s>"
                 for row in rows for idx in _segments(row).values())


def test_sft_loss_mask_covers_exactly_the_response():
  examples = [{"prompt": "What is 2+2? ", "response": "four"},
              {"prompt": "#abc=123; ?abc=", "response": "123"},
              {"prompt": "p", "response": "a longer response that gets cut into chunks"}]
  for seq_len in (64, 20, 8):
    rows = list(pack_documents(examples, TOK, seq_len=seq_len, sft=True))
    trained_targets = []
    for row in rows:
      _check_row_invariants(row, seq_len)
      trained_targets += [int(x) for x in row["targets"][row["loss_mask"] > 0]]
    # Exactly the response tokens and each response's eos, in order.
    expected = [i for ex in examples
                for i in TOK.encode(ex["response"], add_bos=False, add_eos=True)]
    assert trained_targets == expected
    assert TOK.decode(trained_targets) == "".join(ex["response"] for ex in examples)
  # The last prompt token predicts the first response token; no prompt token is a target.
  row = next(pack_documents(examples[:1], TOK, seq_len=64, sft=True))
  n_prompt = len(examples[0]["prompt"]) + 1
  assert row["loss_mask"][n_prompt - 2] == 0 and row["loss_mask"][n_prompt - 1] == 1
  assert row["targets"][n_prompt - 1] == ord("f")


def test_sft_missing_fields_is_a_clear_error():
  with pytest.raises(KeyError, match="response"):
    list(pack_documents([{"prompt": "p"}], TOK, seq_len=8, sft=True))
  with pytest.raises(KeyError, match="text"):
    list(pack_documents([{"prompt": "p"}], TOK, seq_len=8))


def test_build_row_and_stack():
  row = build_row([(np.array([257, 5, 6], np.int32), 0), (np.array([257, 7], np.int32), 0)],
                  seq_len=6, pad_id=256)
  np.testing.assert_array_equal(row["tokens"], [257, 5, 6, 257, 7, 256])
  np.testing.assert_array_equal(row["targets"], [5, 6, 256, 7, 256, 256])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(row["loss_mask"], [1, 1, 0, 1, 0, 0])
  batch = stack_rows([row, row])
  assert batch["tokens"].shape == (2, 6) and batch["loss_mask"].dtype == np.float32
  with pytest.raises(ValueError):
    build_row([(np.zeros(7, np.int32), 0)], seq_len=6, pad_id=0)
