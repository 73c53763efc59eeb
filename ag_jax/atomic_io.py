"""Writes that readers never see half done: a file or a whole directory appears complete or
not at all (written beside its destination, then renamed into place)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def write_text(path: str, text: str) -> None:
  """Write `text` to `path` through a temp file in the same directory and one rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
    f.write(text)
  os.replace(f.name, path)


@contextlib.contextmanager
def replace_dir(path: str) -> Iterator[str]:
  """Yields an empty temp directory beside `path`; on success it becomes `path` (an old one
  is moved aside first, then deleted), on any error it is removed and `path` is untouched."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
  try:
    yield tmp
    if os.path.exists(path):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.old-")
      os.rename(path, os.path.join(old, "x"))
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
