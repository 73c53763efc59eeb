"""atomic_io: a directory or file is replaced whole or not at all."""

import os

import pytest

from ag_jax import atomic_io


def test_replace_dir_swaps_on_success_and_leaves_everything_on_error(tmp_path):
  target = tmp_path / "out"
  with atomic_io.replace_dir(str(target)) as tmp:
    (open(os.path.join(tmp, "a.txt"), "w")).write("one")
  assert (target / "a.txt").read_text() == "one"
  with pytest.raises(RuntimeError):
    with atomic_io.replace_dir(str(target)) as tmp:
      open(os.path.join(tmp, "a.txt"), "w").write("half")
      raise RuntimeError("interrupted")
  assert (target / "a.txt").read_text() == "one"  # the old version survives
  with atomic_io.replace_dir(str(target)) as tmp:
    open(os.path.join(tmp, "b.txt"), "w").write("two")
  assert sorted(os.listdir(target)) == ["b.txt"]  # replaced whole, not merged
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp or old directories left


def test_write_text_replaces_the_file(tmp_path):
  path = tmp_path / "sub" / "r.json"
  atomic_io.write_text(str(path), "x")
  atomic_io.write_text(str(path), "y")
  assert path.read_text() == "y" and os.listdir(path.parent) == ["r.json"]
