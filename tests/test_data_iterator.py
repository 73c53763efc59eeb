"""The iterator: deterministic, resumable mid-epoch, and independent of process count."""

import collections
import json

import numpy as np
import pytest

from ag_jax.data import iterator as iterator_lib
from ag_jax.data.iterator import DataIterator, FeistelPermutation, merge_states
from ag_jax.data.recall import RecallConfig, RecallSource
from ag_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
# Documents of very different lengths, some longer than a row, so rows carry pending chunks.
DOCS = [{"text": f"doc{i}:" + "abcdefghij"[: i % 10] * (1 + (i * 7) % 13)} for i in range(57)]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _segment_texts(batch):
  out = []
  for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
    out += [TOK.decode(tokens[seg == s], skip_special=False) for s in np.unique(seg) if s]
  return out


def test_deterministic_and_seeded():
  make = lambda seed: DataIterator(DOCS, TOK, seq_len=48, batch_size=4, seed=seed)
  _assert_same(_take(make(0), 6), _take(make(0), 6))
  a, b = _take(make(0), 3), _take(make(1), 3)
  assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(a, b))
  batch = a[0]
  assert batch["tokens"].shape == (4, 48) and batch["loss_mask"].dtype == np.float32


@pytest.mark.parametrize("shuffle", [True, False])
def test_one_epoch_reads_every_document_once(shuffle):
  it = DataIterator(DOCS, TOK, seq_len=256, batch_size=4, seed=3, shuffle=shuffle,
                    num_epochs=1)
  texts = [t for batch in it for t in _segment_texts(batch)]
  assert collections.Counter(texts) == collections.Counter(
      f"<s>{d['text']}</s>" for d in DOCS)
  if not shuffle:  # row r reads documents r, r + 4, r + 8, ...
    assert _segment_texts(next(iter(DataIterator(DOCS, TOK, 256, 4, shuffle=False))))[0] \
        == f"<s>{DOCS[0]['text']}</s>"


@pytest.mark.parametrize("stop", [1, 4, 11])
def test_restore_mid_epoch_continues_exactly(stop):
  make = lambda: DataIterator(DOCS, TOK, seq_len=24, batch_size=4, seed=5)
  uninterrupted = _take(make(), stop + 8)
  it = make()
  _take(it, stop)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
  assert state["step"] == stop and state["epoch"] == it.epoch
  assert any(row["pending"] for row in state["rows"].values())  # mid-document somewhere
  restored = make()
  restored.set_state(state)
  _assert_same(_take(restored, 8), uninterrupted[stop:])


def test_process_slices_concatenate_to_the_global_batch():
  kwargs = dict(seq_len=40, batch_size=4, seed=7)
  single = _take(DataIterator(DOCS, TOK, **kwargs), 20)  # crosses several epochs
  for count in (2, 4):
    procs = [DataIterator(DOCS, TOK, process_index=p, process_count=count, **kwargs)
             for p in range(count)]
    local = [_take(it, 20) for it in procs]
    assert local[0][0]["tokens"].shape == (4 // count, 40)
    joined = [{k: np.concatenate([local[p][s][k] for p in range(count)]) for k in single[0]}
              for s in range(20)]
    _assert_same(joined, single)


def test_merged_state_restores_under_another_process_count():
  kwargs = dict(seq_len=24, batch_size=4, seed=9)
  single = _take(DataIterator(DOCS, TOK, **kwargs), 12)
  procs = [DataIterator(DOCS, TOK, process_index=p, process_count=2, **kwargs) for p in (0, 1)]
  for it in procs:
    _take(it, 5)
  merged = merge_states([it.get_state() for it in procs])
  resumed = DataIterator(DOCS, TOK, **kwargs)
  resumed.set_state(merged)
  _assert_same(_take(resumed, 7), single[5:])
  with pytest.raises(ValueError, match="lacks rows"):
    DataIterator(DOCS, TOK, **kwargs).set_state(procs[0].get_state())


def test_state_from_a_different_iterator_is_refused():
  state = DataIterator(DOCS, TOK, seq_len=24, batch_size=4, seed=1).get_state()
  for other in (dict(seed=2), dict(batch_size=8), dict(seq_len=32)):
    kwargs = dict(seq_len=24, batch_size=4, seed=1) | other
    with pytest.raises(ValueError, match="batches would differ"):
      DataIterator(DOCS, TOK, **kwargs).set_state(state)


def test_finite_epochs_pad_exhausted_rows_then_stop():
  docs = [{"text": f"document {i}"} for i in range(5)]  # one per row: 2 x 5 = 3 + 3 + 2 + 2
  batches = list(DataIterator(docs, TOK, seq_len=16, batch_size=4, num_epochs=2, seed=0))
  assert len(batches) == 3
  texts = [t for b in batches for t in _segment_texts(b)]
  assert collections.Counter(texts) == collections.Counter(
      [f"<s>{d['text']}</s>" for d in docs] * 2)
  assert not batches[-1]["segment_ids"][2:].any()  # rows 2 and 3 ran out: all padding
  assert not batches[-1]["loss_mask"][2:].any()


def test_feistel_permutation_is_a_permutation(monkeypatch):
  for n in (1, 2, 3, 17, 1000, 4097):
    perm = FeistelPermutation(n, np.random.default_rng(n))
    assert sorted(perm[i] for i in range(n)) == list(range(n))
  assert [perm[i] for i in range(10)] != list(range(10))
  # Huge sources take this path; the iterator works the same way on it.
  monkeypatch.setattr(iterator_lib, "DENSE_PERMUTATION_MAX", 8)
  it = DataIterator(DOCS, TOK, seq_len=256, batch_size=4, seed=3, num_epochs=1)
  texts = [t for batch in it for t in _segment_texts(batch)]
  assert sorted(texts) == sorted(f"<s>{d['text']}</s>" for d in DOCS)


def test_sft_on_recall_trains_only_the_answer():
  source = RecallSource(RecallConfig(), "train", size=32)
  it = DataIterator(source, TOK, seq_len=512, batch_size=4, seed=0, sft=True, num_epochs=1)
  answers = []
  for batch in it:
    for targets, mask in zip(batch["targets"], batch["loss_mask"]):
      answers.append(TOK.decode(targets[mask > 0]))  # one document per row at this length
  assert sorted(a for a in answers if a) == sorted(source[i]["answer"] for i in range(32))


def test_bad_arguments():
  with pytest.raises(ValueError):
    DataIterator(DOCS, TOK, seq_len=24, batch_size=3, process_count=2)
  with pytest.raises(ValueError):
    DataIterator([], TOK, seq_len=24, batch_size=2)
  with pytest.raises(ValueError, match="< 2 tokens"):
    next(DataIterator([{"text": ""}], _NoSpecials(), seq_len=8, batch_size=1))


class _NoSpecials(ByteTokenizer):
  def encode(self, text, add_bos=True, add_eos=False):
    return list(text.encode())
