"""The natural haystack: the Python standard library source of the running interpreter.

Nothing of it is committed: the files are read at run time from
`sysconfig.get_paths()["stdlib"]`. Every `*.py` file under it counts, except third-party
packages (`site-packages`, `dist-packages`), test suites (directories named `test`,
`tests`, `idle_test`), `__pycache__` and `pydoc_data` (one generated 750 kB string table).
Files that are not valid UTF-8 are skipped.

A file's split is fixed by a stable hash of its relative POSIX path (sha256, first 8 bytes,
mod 100): < 80 train, < 90 validation, else test. So the splits are disjoint by path, the
same on every machine with the same interpreter, and a file never moves between splits when
other files come or go.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from typing import Sequence

SPLITS = ("train", "validation", "test")
SPLIT_PERCENT = (80, 10, 10)
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                       "__pycache__", "pydoc_data"})


def stdlib_root() -> str:
  """The standard library directory of the running interpreter."""
  return sysconfig.get_paths()["stdlib"]


def split_of(relpath: str) -> str:
  """The split of a file, from a stable hash of its relative POSIX path."""
  digest = hashlib.sha256(relpath.replace(os.sep, "/").encode("utf-8")).digest()
  bucket = int.from_bytes(digest[:8], "big") % 100
  edge = 0
  for split, percent in zip(SPLITS, SPLIT_PERCENT):
    edge += percent
    if bucket < edge:
      return split
  raise AssertionError("unreachable")


@functools.lru_cache(maxsize=8)
def _all_files(root: str) -> tuple[str, ...]:
  found = []
  for directory, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
    rel = os.path.relpath(directory, root)
    for name in sorted(files):
      if name.endswith(".py"):
        found.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
  return tuple(sorted(found))


def stdlib_files(split: str | None = None, root: str | None = None) -> list[str]:
  """Sorted relative paths of the stdlib's .py files (of one split, or all)."""
  if split is not None and split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  files = _all_files(os.fspath(root or stdlib_root()))
  return [f for f in files if split is None or split_of(f) == split]


def read_file(relpath: str, root: str | None = None) -> str | None:
  """A file's text, or None if it is not UTF-8 (or unreadable)."""
  try:
    with open(os.path.join(root or stdlib_root(), relpath), "rb") as f:
      return f.read().decode("utf-8")
  except (OSError, UnicodeDecodeError):
    return None


@functools.lru_cache(maxsize=8)
def _texts(split: str, root: str, limit: int | None) -> tuple[tuple[str, str], ...]:
  out = []
  for path in stdlib_files(split, root):
    text = read_file(path, root)
    if text and text.strip():
      out.append((path, text))
      if limit is not None and len(out) >= limit:
        break
  if not out:
    raise ValueError(f"no readable .py files of split {split!r} under {root!r}")
  return tuple(out)


def read_texts(split: str, root: str | None = None,
               limit: int | None = None) -> Sequence[tuple[str, str]]:
  """[(relative path, text)] of a split in path order (cached per process); `limit`
  takes the first files only (small corpora for tests)."""
  return _texts(split, os.fspath(root or stdlib_root()), limit)


class StdlibSource:
  """Random-access source of whole stdlib files of one split: {"text", "path"} (a TFDS-like
  source for language modelling; `ag_jax.data.open_source("stdlib", split)`)."""

  def __init__(self, split: str = "train", root: str | None = None, limit: int | None = None):
    self.split = split
    self.files = read_texts(split, root, limit)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index) -> dict:
    path, text = self.files[index.__index__()]
    return {"text": text, "path": path}

  def __getitems__(self, indices) -> list[dict]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"StdlibSource(split={self.split!r}, files={len(self)})"
