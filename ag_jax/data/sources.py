"""Random-access data sources: TFDS data sets read from ArrayRecord, or the recall corpus.

A source is anything with `__len__` and `__getitem__(i) -> dict`, which is exactly what
`tfds.data_source` returns. TFDS is read without TensorFlow: `tfds.data_source` decodes
records with numpy, and text features come back as `bytes`; `open_source` turns them into
`str` so every source yields the same kinds of values.

Specs understood by `open_source`:
  "recall"                                the generated recall corpus (default config)
  "recall:num_facts=8,distractor=near_miss,size=5000"
                                          ... with RecallConfig fields and `size` set
  "ruler:tasks=niah_multikey+vt,max_length=1024,lm_fraction=0.3"
                                          the RULER-style suite mixed with stdlib LM
                                          (ag_jax.data.ruler_mix.parse_spec); "stdlib": files
  "c4/en:3.1.0", "piqa", "my_corpus"      a TFDS data set prepared under data_dir, in
                                          array_record format (or parquet)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from ag_jax.data import recall

RECALL_SIZES = {"train": 1_000_000, "validation": 2_000, "test": 2_000}


class DataError(ValueError):
  """A data set cannot be opened or prepared as asked; the message says what to do."""


def open_source(spec: str, split: str = "train", data_dir: str | None = None):
  """A random-access source of dict examples (text features as str)."""
  name = spec.split(":", 1)[0].strip()
  if name == "recall":
    return _open_recall(spec, split)
  if name in ("ruler", "stdlib"):  # the RULER-style suite / stdlib files (ag_jax.data.ruler)
    return _open_ruler(spec, split)
  return _open_tfds(spec, split, data_dir)


def _open_recall(spec: str, split: str) -> recall.RecallSource:
  options = spec.split(":", 1)[1] if ":" in spec else ""
  kwargs: dict[str, Any] = {}
  size = RECALL_SIZES.get(split, RECALL_SIZES["validation"])
  types = {f.name: f.type for f in dataclasses.fields(recall.RecallConfig)}
  for item in filter(None, (s.strip() for s in options.split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or (key not in types and key != "size"):
      raise DataError(f"bad recall option {item!r} in {spec!r}: use key=value with keys "
                      f"from {sorted(types) + ['size']}")
    if key == "size" or str(types[key]).startswith(("int", "<class 'int")):
      try:
        value = int(value)
      except ValueError:
        raise DataError(f"recall option {key} needs an integer, got {value!r}") from None
    if key == "size":
      if value < 1:
        raise DataError(f"bad recall spec {spec!r}: size must be a positive integer, got {value}")
      size = value
    else:
      kwargs[key] = value.strip() if isinstance(value, str) else value
  try:
    return recall.RecallSource(recall.RecallConfig(**kwargs), split=split, size=size)
  except ValueError as e:
    raise DataError(f"bad recall spec {spec!r}: {e}") from None


def _open_ruler(spec: str, split: str):
  from ag_jax.data import ruler_mix  # pylint: disable=g-import-not-at-top
  try:
    return ruler_mix.open_spec(spec, split)
  except ValueError as e:
    raise DataError(f"bad {spec.split(':')[0]} spec {spec!r}: {e}") from None


def _resolved_data_dir(data_dir: str | None) -> str:
  if data_dir:
    return os.fspath(data_dir)
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
  return constants.get_default_data_dir()


def _not_prepared(spec: str, data_dir: str | None, detail: str) -> DataError:
  where = _resolved_data_dir(data_dir)
  name = spec.split(":")[0]
  return DataError(
      f"data set {spec!r} is not prepared under data_dir={where!r} ({detail}). Prepare it "
      f"on a machine with network access with\n"
      f"  tfds build {name} --data_dir {where} --file_format array_record\n"
      f"and copy its folder {os.path.join(where, name.split('/')[0])} to this machine, or, "
      f"for your own .txt or .jsonl files,\n"
      f"  python -m ag_jax.data.local_corpus --name NAME --data-dir {where} FILES...")


def _open_tfds(spec: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    source = tfds.data_source(spec, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    # Unregistered names (and TFDS builders whose code needs TensorFlow, like c4) are
    # read from files alone; this error means there are none.
    raise _not_prepared(spec, data_dir, "no prepared files found") from None
  except Exception as e:  # pylint: disable=broad-except
    explained = _explain(spec, data_dir, e)
    if explained is e:
      raise
    raise explained from None  # TFDS's own message would mislead (e.g. "TFRECORD")
  return TextDecodedSource(source)


def _explain(spec: str, data_dir: str | None, error: Exception) -> Exception:
  """Turn TFDS's error for an unprepared or tfrecord-only data set into a DataError."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(spec, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception:  # pylint: disable=broad-except
    return error
  if not prepared:
    return _not_prepared(spec, data_dir, "no dataset_info.json")
  formats = {str(f.value) for f in builder.info.available_file_formats()} or {
      str(builder.info.file_format.value) if builder.info.file_format else "tfrecord"}
  if not formats & {"array_record", "parquet"}:
    name = spec.split(":")[0]
    return DataError(
        f"data set {spec!r} under {builder.data_dir!r} is stored as {sorted(formats)}, which "
        f"has no random access. Rebuild it with\n  tfds build {name} --data_dir "
        f"{_resolved_data_dir(data_dir)} --file_format array_record")
  if isinstance(error, ValueError):  # e.g. an unknown split: TFDS's message says which
    return DataError(f"cannot open {spec!r} under {builder.data_dir!r}: {error}")
  return error


def _decode_text(value):
  if isinstance(value, (bytes, np.bytes_)):
    try:
      return bytes(value).decode("utf-8")
    except UnicodeDecodeError:  # a binary feature, not text: leave it alone
      return bytes(value)
  if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
    return [_decode_text(v) for v in value.tolist()] if value.ndim else _decode_text(
        value.item())
  if isinstance(value, dict):
    return {k: _decode_text(v) for k, v in value.items()}
  return value


class TextDecodedSource:
  """Wraps a `tfds.data_source` so that string features come back as `str`."""

  def __init__(self, source):
    self.source = source
    self.info = getattr(source, "dataset_info", None)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index) -> dict:
    return _decode_text(self.source[index])

  def __getitems__(self, indices) -> list[dict]:
    return [_decode_text(x) for x in self.source.__getitems__(list(indices))]

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"TextDecodedSource({self.source!r})"
