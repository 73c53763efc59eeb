"""The stdlib haystack (splits by path hash) and the BPE tokenizer trained on it."""

import json
import os

import pytest

from ag_jax import load_tokenizer
from ag_jax.data import open_source, stdlib
from ag_jax.tokenizer import HFTokenizer, stdlib_bpe_dir, train_bpe_tokenizer


def test_splits_are_disjoint_by_path_and_cover_all_files():
  parts = {s: set(stdlib.stdlib_files(s)) for s in stdlib.SPLITS}
  every = set(stdlib.stdlib_files())
  assert set.union(*parts.values()) == every
  assert sum(map(len, parts.values())) == len(every)
  assert all(parts.values())
  assert 0.7 < len(parts["train"]) / len(every) < 0.9
  assert not any("site-packages" in f or "/test/" in f or f.startswith("test/") for f in every)


def test_split_of_is_a_stable_hash_of_the_path():
  # Fixed values: the split of a path never depends on the machine or on other files.
  assert [stdlib.split_of(p) for p in ("os.py", "json/decoder.py", "asyncio/tasks.py")] == \
      [stdlib.split_of(p) for p in ("os.py", "json/decoder.py", "asyncio/tasks.py")]
  assert stdlib.split_of("json/decoder.py") == stdlib.split_of("json" + os.sep + "decoder.py")
  assert {stdlib.split_of(f"m{i}.py") for i in range(200)} == set(stdlib.SPLITS)


def test_read_texts_and_source():
  texts = stdlib.read_texts("validation", limit=3)
  assert len(texts) == 3 and all(isinstance(t, str) and t for _, t in texts)
  assert [p for p, _ in texts] == stdlib.stdlib_files("validation")[:3] or \
      all(stdlib.split_of(p) == "validation" for p, _ in texts)
  source = open_source("stdlib", "test")
  assert len(source) == len(stdlib.read_texts("test"))
  assert stdlib.split_of(source[0]["path"]) == "test" and source[0]["text"]
  with pytest.raises(ValueError):
    stdlib.stdlib_files("dev")


def _small_corpus():
  return [t for _, t in stdlib.read_texts("train", limit=6)]


def test_bpe_round_trip_and_required_tokens(tmp_path):
  required = [" amber", " 41", " zebra"]
  tok = train_bpe_tokenizer(_small_corpus(), 400, str(tmp_path / "a"), required=required,
                            required_count=200)
  assert isinstance(tok, HFTokenizer) and tok.vocab_size == 400
  loaded = load_tokenizer(str(tmp_path / "a"))
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 0)
  for piece in required:
    assert len(loaded.encode(piece, add_bos=False)) == 1
  text = stdlib.read_texts("test", limit=1)[0][1][:3000] + " ünïcode ✓\n"
  ids = loaded.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == loaded.bos_id and ids[-1] == loaded.eos_id
  assert loaded.decode(ids) == text
  assert len(ids) < len(text.encode())  # merges happened


def test_bpe_training_is_deterministic(tmp_path):
  for name in ("a", "b"):
    train_bpe_tokenizer(_small_corpus(), 320, str(tmp_path / name), required=[" amber"],
                        required_count=2000)
  a, b = (json.load(open(tmp_path / n / "tokenizer.json")) for n in ("a", "b"))
  assert a == b


def test_required_tokens_that_do_not_fit_are_an_error(tmp_path):
  with pytest.raises(ValueError, match="not single tokens"):
    train_bpe_tokenizer(["ab cd"], 260, str(tmp_path), required=[" amber"], required_count=1)


def test_stdlib_bpe_spec_holds_the_suite_pieces():
  from ag_jax.data import ruler
  tok = load_tokenizer("stdlib_bpe:2048")
  assert tok.vocab_size == 2048
  assert all(len(tok.encode(p, add_bos=False)) == 1 for p in ruler.required_tokens())
  assert load_tokenizer(stdlib_bpe_dir(2048)).vocab_size == 2048  # the cached directory
  with pytest.raises(ValueError, match="VOCAB_SIZE"):
    load_tokenizer("stdlib_bpe:big")
