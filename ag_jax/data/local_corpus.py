"""Turn local .txt / .jsonl files into a TFDS data set in ArrayRecord form, without TF.

The result lives at `data_dir/NAME/1.0.0/` (ArrayRecord shards + dataset_info.json +
features.json) and opens like any prepared TFDS data set:
`tfds.data_source(NAME, split="train", data_dir=data_dir)` or `open_source(NAME, ...)`.

Inputs:
  .txt    one document per blank-line-separated block (txt_mode="blocks", the default:
          paragraphs of a single file are documents), or one per file (txt_mode="file")
  .jsonl  one JSON object per line: `text_field` (default "text") -> a text document,
          or `prompt` and `response` -> an SFT example
Features: {"text": Text} or, when every record is SFT, {"prompt": Text, "response": Text}.
Splits: "train", plus "validation" when val_fraction > 0 (a seeded random subset).

Records are serialized by TFDS's own feature connectors and split metadata is written by
`tfds.folder_dataset.write_metadata`, so TFDS reads the files as its own. Everything is
written under a temporary folder that is renamed into place at the end: a failure leaves
nothing half-written.

CLI: python -m ag_jax.data.local_corpus --name NAME --data-dir DIR FILES...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from typing import Iterator

import numpy as np

from ag_jax.data.sources import DataError

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
TEXT_FEATURES = ("text",)
SFT_FEATURES = ("prompt", "response")


def _read_txt(path: str, txt_mode: str) -> Iterator[dict]:
  try:
    with open(path, encoding="utf-8") as f:
      content = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e})") from None
  if txt_mode == "file":
    blocks = [content.strip("\n")]
  else:
    blocks = [b.strip("\n") for b in re.split(r"\n[ \t]*\n", content)]
  for block in blocks:
    if block.strip():
      yield {"text": block}


def _read_jsonl(path: str, text_field: str) -> Iterator[dict]:
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
      if isinstance(record, dict) and isinstance(record.get(text_field), str):
        yield {"text": record[text_field]}
      elif isinstance(record, dict) and all(
          isinstance(record.get(k), str) for k in SFT_FEATURES):
        yield {"prompt": record["prompt"], "response": record["response"]}
      else:
        raise DataError(f"{path}:{line_no}: expected an object with a string field "
                        f"{text_field!r}, or string fields 'prompt' and 'response'")


def read_documents(paths: list[str], text_field: str = "text",
                   txt_mode: str = "blocks") -> Iterator[dict]:
  """The documents of the files, in order, all of one kind (text or SFT)."""
  kind = None
  for path in paths:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
      docs = _read_txt(path, txt_mode)
    elif ext == ".jsonl":
      docs = _read_jsonl(path, text_field)
    else:
      raise DataError(f"{path}: unsupported file type {ext!r} (use .txt or .jsonl)")
    for doc in docs:
      doc_kind = tuple(doc)
      if kind is not None and doc_kind != kind:
        raise DataError(f"{path}: mixes {'/'.join(doc_kind)} records into a corpus of "
                        f"{'/'.join(kind)} records; prepare them as separate data sets")
      kind = doc_kind
      yield doc


def _check_inputs(paths, name, txt_mode, val_fraction) -> None:
  if not _NAME_RE.match(name):
    raise DataError(f"name {name!r}: use lowercase letters, digits and '_', starting "
                    "with a letter (a TFDS data set name)")
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top
  try:
    registered.imported_builder_cls(name)
  except registered.DatasetNotFoundError:
    pass
  else:
    raise DataError(f"name {name!r} is a TFDS data set; TFDS would read the files with "
                    "its own builder. Choose another name")
  if not paths:
    raise DataError("no input files given")
  for path in paths:
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such file")
  if txt_mode not in ("blocks", "file"):
    raise DataError(f"txt_mode={txt_mode!r}: use 'blocks' or 'file'")
  if not 0.0 <= val_fraction < 1.0:
    raise DataError(f"val_fraction={val_fraction}: must be in [0, 1)")


def prepare_local_corpus(paths: list[str], name: str, data_dir: str, text_field: str = "text",
                         val_fraction: float = 0.0, *, txt_mode: str = "blocks",
                         seed: int = 0, version: str = "1.0.0", overwrite: bool = False,
                         shard_bytes: int = 256 << 20) -> str:
  """Writes the files as TFDS data set `name` under data_dir; returns its builder dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  paths = [os.fspath(p) for p in paths]
  _check_inputs(paths, name, txt_mode, val_fraction)
  final_dir = os.path.join(os.fspath(data_dir), name, version)
  if os.path.exists(final_dir) and not overwrite:
    raise DataError(f"{final_dir} already exists; pass overwrite=True (--overwrite) to "
                    "replace it")

  # Pass 1: count and type-check, so that the validation subset is exact.
  num_docs, kind = 0, None
  for doc in read_documents(paths, text_field, txt_mode):
    num_docs, kind = num_docs + 1, tuple(doc)
  if num_docs == 0:
    raise DataError(f"no documents in {paths}")
  num_val = 0
  if val_fraction > 0:
    if num_docs < 2:
      raise DataError("a validation split needs at least 2 documents")
    num_val = min(num_docs - 1, max(1, round(num_docs * val_fraction)))
  rng = np.random.default_rng(seed)
  val_ids = set(rng.choice(num_docs, size=num_val, replace=False).tolist())
  features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in kind})

  parent = os.path.join(os.fspath(data_dir), name)
  parent_existed = os.path.isdir(parent)
  tmp_dir = os.path.join(parent, f".incomplete-{uuid.uuid4().hex}")
  os.makedirs(tmp_dir)
  try:
    splits = {"train": _ShardWriter(tmp_dir, name, "train", shard_bytes, ArrayRecordWriter)}
    if num_val:
      splits["validation"] = _ShardWriter(
          tmp_dir, name, "validation", shard_bytes, ArrayRecordWriter)
    for i, doc in enumerate(read_documents(paths, text_field, txt_mode)):
      split = "validation" if i in val_ids else "train"
      splits[split].write(features.serialize_example(doc))
    split_infos = [w.close() for w in splits.values()]
    tfds.folder_dataset.write_metadata(
        data_dir=tmp_dir, features=features, split_infos=split_infos, version=version,
        check_data=False,  # checking would read through tf.data
        description=f"Local corpus prepared by ag_jax from {len(paths)} file(s): "
                    + ", ".join(os.path.basename(p) for p in paths[:20]))
    if os.path.exists(final_dir):  # overwrite: swap, then delete the old copy
      old = os.path.join(parent, f".old-{uuid.uuid4().hex}")
      os.rename(final_dir, old)
      os.rename(tmp_dir, final_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp_dir, final_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if not parent_existed:
      shutil.rmtree(parent, ignore_errors=True)
    raise
  return final_dir


class _ShardWriter:
  """Writes one split as ArrayRecord shards of about shard_bytes each."""

  def __init__(self, folder, name, split, shard_bytes, writer_cls):
    self.folder, self.name, self.split = folder, name, split
    self.shard_bytes, self.writer_cls = shard_bytes, writer_cls
    self.files: list[str] = []
    self.lengths: list[int] = []
    self.num_bytes = 0
    self.writer, self.shard_size = None, 0

  def write(self, record: bytes) -> None:
    if self.writer is None or self.shard_size >= self.shard_bytes:
      self._close_shard()
      self.files.append(os.path.join(self.folder, f".shard-{self.split}-{len(self.files)}"))
      self.writer = self.writer_cls(self.files[-1], "group_size:1")
      self.lengths.append(0)
      self.shard_size = 0
    self.writer.write(record)
    self.lengths[-1] += 1
    self.shard_size += len(record)
    self.num_bytes += len(record)

  def _close_shard(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None

  def close(self):
    """Final shard names ({NAME}-{SPLIT}.array_record-0000i-of-0000n) and the SplitInfo."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._close_shard()
    n = len(self.files)
    for i, path in enumerate(self.files):
      os.rename(path, os.path.join(
          self.folder, f"{self.name}-{self.split}.array_record-{i:05d}-of-{n:05d}"))
    return tfds.core.SplitInfo(name=self.split, shard_lengths=self.lengths,
                               num_bytes=self.num_bytes, filename_template=None)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ag_jax.data.local_corpus",
      description="Prepare local .txt/.jsonl files as a TFDS data set (ArrayRecord) that "
                  "open_source(NAME, split, data_dir) and tfds.data_source read.")
  parser.add_argument("files", nargs="+", help=".txt (blank-line separated documents) or "
                      ".jsonl ('text', or 'prompt' + 'response') files")
  parser.add_argument("--name", required=True, help="data set name, e.g. my_corpus")
  parser.add_argument("--data-dir", required=True, help="TFDS data_dir to write into")
  parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
  parser.add_argument("--val-fraction", type=float, default=0.0,
                      help="fraction of documents held out as the 'validation' split")
  parser.add_argument("--txt-mode", choices=("blocks", "file"), default="blocks",
                      help="a .txt document is a blank-line separated block, or a file")
  parser.add_argument("--seed", type=int, default=0, help="seed of the validation subset")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing copy")
  args = parser.parse_args(argv)
  try:
    path = prepare_local_corpus(args.files, args.name, args.data_dir, args.text_field,
                                args.val_fraction, txt_mode=args.txt_mode, seed=args.seed,
                                overwrite=args.overwrite)
  except (DataError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"prepared {args.name!r} at {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
