"""Local corpus -> TFDS ArrayRecord -> tfds.data_source / open_source, and TFDS errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ag_jax.data import local_corpus
from ag_jax.data.iterator import DataIterator
from ag_jax.data.local_corpus import prepare_local_corpus
from ag_jax.data.sources import DataError, open_source
from ag_jax.tokenizer import ByteTokenizer

TEXT_DOCS = ["first doc\nline two", "second doc", "the third, with ünïcödé",
             "json doc one", "json doc two"]


@pytest.fixture
def text_files(tmp_path):
  txt = tmp_path / "a.txt"
  txt.write_text("first doc\nline two\n\n\nsecond doc\n  \nthe third, with ünïcödé\n",
                 encoding="utf-8")
  jsonl = tmp_path / "b.jsonl"
  jsonl.write_text("\n".join(json.dumps({"text": t, "id": i})
                             for i, t in enumerate(TEXT_DOCS[3:])) + "\n", encoding="utf-8")
  return [str(txt), str(jsonl)]


@pytest.fixture
def sft_file(tmp_path):
  path = tmp_path / "sft.jsonl"
  rows = [{"prompt": f"Q{i}: ", "response": f"answer {i}"} for i in range(6)]
  path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
  return str(path), rows


def test_text_corpus_round_trip(tmp_path, text_files):
  data_dir = str(tmp_path / "tfds")
  path = prepare_local_corpus(text_files, "my_text", data_dir)
  assert path == os.path.join(data_dir, "my_text", "1.0.0")
  assert sorted(os.listdir(path)) == ["dataset_info.json", "features.json",
                                      "my_text-train.array_record-00000-of-00001"]
  raw = tfds.data_source("my_text", split="train", data_dir=data_dir)  # TFDS's own reader
  assert [raw[i]["text"] for i in range(len(raw))] == [t.encode() for t in TEXT_DOCS]
  source = open_source("my_text", "train", data_dir)  # text as str
  assert len(source) == 5 and [source[i] for i in range(5)] == [{"text": t} for t in TEXT_DOCS]
  assert "tensorflow" not in sys.modules


def test_validation_split_and_shards(tmp_path, text_files):
  data_dir = str(tmp_path / "tfds")
  path = prepare_local_corpus(text_files * 20, "sharded", data_dir, val_fraction=0.2,
                              shard_bytes=200)
  shards = [f for f in os.listdir(path) if "array_record" in f]
  assert len(shards) > 2
  train, val = (open_source("sharded:1.0.0", s, data_dir) for s in ("train", "validation"))
  assert (len(train), len(val)) == (80, 20)
  texts = [x["text"] for x in list(train) + list(val)]
  assert sorted(texts) == sorted(TEXT_DOCS * 20)
  assert texts[:3] == [x["text"] for x in train.__getitems__([0, 1, 2])]
  # Same seed, same split.
  again = prepare_local_corpus(text_files * 20, "sharded2", data_dir, val_fraction=0.2,
                               shard_bytes=200)
  assert [x["text"] for x in open_source("sharded2", "validation", data_dir)] == \
      [x["text"] for x in val]
  assert again.endswith("1.0.0")


def test_sft_corpus_round_trip_and_iterator(tmp_path, sft_file):
  path, rows = sft_file
  data_dir = str(tmp_path / "tfds")
  prepare_local_corpus([path], "my_sft", data_dir)
  raw = tfds.data_source("my_sft", split="train", data_dir=data_dir)
  assert raw[0] == {"prompt": b"Q0: ", "response": b"answer 0"}
  source = open_source("my_sft", "train", data_dir)
  assert list(source) == rows
  tok = ByteTokenizer()
  batches = list(DataIterator(source, tok, seq_len=64, batch_size=2, sft=True, num_epochs=1))
  seen = []
  for b in batches:
    for tokens, targets, seg, mask in zip(b["tokens"], b["targets"], b["segment_ids"],
                                          b["loss_mask"]):
      for s in set(seg[seg > 0].tolist()):  # several examples per row
        i = int(tok.decode(tokens[seg == s])[1])  # "Q3: answer 3" -> 3
        assert tok.decode(targets[(seg == s) & (mask > 0)]) == rows[i]["response"]
        seen.append(i)
  assert sorted(seen) == list(range(6))


def test_missing_data_set_error_says_how_to_prepare(tmp_path):
  data_dir = str(tmp_path / "empty")
  for spec in ("c4/en:3.1.0", "piqa", "no_such_corpus"):
    with pytest.raises(DataError) as info:
      open_source(spec, "train", data_dir)
    message = str(info.value)
    assert spec in message and data_dir in message
    assert f"tfds build {spec.split(':')[0]} --data_dir {data_dir} --file_format " \
        "array_record" in message
    assert "python -m ag_jax.data.local_corpus" in message
  assert not os.path.exists(os.path.join(data_dir, "piqa"))  # opening wrote nothing


def test_unknown_split_and_tfrecord_only_data_sets(tmp_path, text_files):
  data_dir = str(tmp_path / "tfds")
  path = prepare_local_corpus(text_files, "corpus", data_dir)
  with pytest.raises(DataError, match="Unknown split 'test'"):
    open_source("corpus", "test", data_dir)
  info_file = os.path.join(path, "dataset_info.json")
  with open(info_file) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  with open(info_file, "w") as f:
    json.dump(info, f)
  with pytest.raises(DataError, match="no random access"):
    open_source("corpus", "train", data_dir)


def test_tfds_by_name_on_mock_data():
  # mock_data serves tfds.data_source for registered builders (without TensorFlow).
  with tfds.testing.mock_data(num_examples=7):
    source = open_source("piqa", "train")
    assert len(source) == 7
    example = source[3]
    assert isinstance(example["goal"], str) and isinstance(example["sol1"], str)
    assert int(np.asarray(example["label"])) in (0, 1)


def test_failures_leave_nothing_behind(tmp_path, text_files, monkeypatch):
  data_dir = str(tmp_path / "tfds")

  def broken(**kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(tfds.folder_dataset, "write_metadata", broken)
  with pytest.raises(OSError, match="disk full"):
    prepare_local_corpus(text_files, "broken", data_dir)
  assert os.listdir(data_dir) == []
  monkeypatch.undo()
  prepare_local_corpus(text_files, "kept", data_dir)
  monkeypatch.setattr(tfds.folder_dataset, "write_metadata", broken)
  with pytest.raises(OSError):
    prepare_local_corpus(text_files[:1], "kept", data_dir, overwrite=True)
  assert os.listdir(os.path.join(data_dir, "kept")) == ["1.0.0"]
  monkeypatch.undo()
  assert len(open_source("kept", "train", data_dir)) == 5  # the old copy is intact
  prepare_local_corpus(text_files[:1], "kept", data_dir, overwrite=True)
  assert len(open_source("kept", "train", data_dir)) == 3


@pytest.mark.parametrize("files, kwargs, match", [
    (["missing.txt"], {}, "no such file"),
    (["x.csv"], {}, "unsupported file type"),
    ([], {}, "no input files"),
    (["a.txt"], {"name": "Bad-Name"}, "lowercase"),
    (["a.txt"], {"name": "piqa"}, "is a TFDS data set"),
    (["a.txt", "sft.jsonl"], {}, "mixes"),
    (["bad.jsonl"], {}, r"bad.jsonl:2: invalid JSON"),
    (["nofield.jsonl"], {}, r"nofield.jsonl:1: expected an object"),
    (["latin1.txt"], {}, "not UTF-8"),
    (["empty.txt"], {}, "no documents"),
    (["a.txt"], {"val_fraction": 1.0}, "val_fraction"),
])
def test_input_errors(tmp_path, files, kwargs, match):
  (tmp_path / "a.txt").write_text("doc one\n\ndoc two\n")
  (tmp_path / "x.csv").write_text("a,b\n")
  (tmp_path / "sft.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
  (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  (tmp_path / "empty.txt").write_text("\n\n  \n")
  data_dir = tmp_path / "tfds"
  kwargs = {"name": "corpus"} | kwargs
  with pytest.raises(DataError, match=match):
    prepare_local_corpus([str(tmp_path / f) for f in files], data_dir=str(data_dir), **kwargs)
  assert not data_dir.exists() or not any(data_dir.iterdir())


def test_txt_file_mode_and_text_field(tmp_path):
  (tmp_path / "a.txt").write_text("para one\n\npara two\n")
  (tmp_path / "b.jsonl").write_text('{"body": "from body"}\n')
  prepare_local_corpus([str(tmp_path / "a.txt")], "whole", str(tmp_path), txt_mode="file")
  assert list(open_source("whole", "train", str(tmp_path))) == [{"text": "para one\n\npara two"}]
  prepare_local_corpus([str(tmp_path / "b.jsonl")], "body", str(tmp_path), text_field="body")
  assert list(open_source("body", "train", str(tmp_path))) == [{"text": "from body"}]


def test_cli(tmp_path, text_files, capsys):
  data_dir = str(tmp_path / "tfds")
  assert local_corpus.main(["--name", "cli_corpus", "--data-dir", data_dir, *text_files,
                            "--val-fraction", "0.4"]) == 0
  assert "prepared 'cli_corpus'" in capsys.readouterr().out
  assert len(open_source("cli_corpus", "validation", data_dir)) == 2
  assert local_corpus.main(["--name", "cli_corpus", "--data-dir", data_dir, *text_files]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "already exists" in err and "Traceback" not in err
  # As a real command: --help works, errors exit 2 without a traceback.
  cmd = [sys.executable, "-m", "ag_jax.data.local_corpus"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run(cmd + ["--help"], capture_output=True, text=True, cwd=root)
  assert run.returncode == 0 and "--data-dir" in run.stdout
  run = subprocess.run(cmd + ["--name", "x", "--data-dir", data_dir, "nope.txt"],
                       capture_output=True, text=True, cwd=root)
  assert run.returncode == 2 and "nope.txt: no such file" in run.stderr
  assert "Traceback" not in run.stderr and "RuntimeWarning" not in run.stderr


def test_tfds_name_with_config_and_version_reads_from_files(tmp_path, text_files):
  # A data set built elsewhere (`tfds build c4/en ...`, whose builder code needs TensorFlow)
  # and copied to data_dir/c4/en/3.1.0 opens from its files alone.
  data_dir = str(tmp_path / "tfds")
  path = prepare_local_corpus(text_files, "c4", str(tmp_path / "staging"), version="3.1.0")
  os.makedirs(os.path.join(data_dir, "c4", "en"))
  os.rename(path, os.path.join(data_dir, "c4", "en", "3.1.0"))
  info_file = os.path.join(data_dir, "c4", "en", "3.1.0", "dataset_info.json")
  with open(info_file) as f:
    info = json.load(f)
  with open(info_file, "w") as f:
    json.dump(info | {"configName": "en"}, f)
  for spec in ("c4/en:3.1.0", "c4/en"):
    assert [x["text"] for x in open_source(spec, "train", data_dir)] == TEXT_DOCS
