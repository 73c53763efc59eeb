"""The random-access interface of a generated data set, written once.

`tfds.data_source` returns an object with `__len__`, `__getitem__(i) -> dict` (negative
indices counted from the end, out-of-range ones an IndexError) and `__getitems__`; the
data iterator reads every source through that interface. The generated corpora (the recall
world, the RULER mix) subclass `IndexedSource` and say only how example i is made.
"""

from __future__ import annotations


class IndexedSource:
  """`size` examples, example i made by `self.example_at(i)` (0 <= i < size)."""

  def __init__(self, size: int):
    if size < 1:
      raise ValueError(f"size must be >= 1, got {size}")
    self.size = int(size)

  def example_at(self, i: int) -> dict:
    raise NotImplementedError

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index) -> dict:
    i = index.__index__()
    if i < 0:
      i += self.size
    if not 0 <= i < self.size:
      raise IndexError(f"index {index} out of range for {type(self).__name__} of size "
                       f"{self.size}")
    return self.example_at(i)

  def __getitems__(self, indices) -> list[dict]:
    return [self[i] for i in indices]

  def __iter__(self):
    return (self.example_at(i) for i in range(self.size))
