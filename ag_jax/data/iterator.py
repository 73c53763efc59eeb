"""A deterministic, resumable, process-sliced iterator of packed batches.

Documents are visited in an epoch-wise permutation: epoch e is a permutation of the source
drawn from `np.random.default_rng([seed, e])` (identity when shuffle=False). The epochs,
back to back, form one global document stream g[0], g[1], ...

Row r of every global batch (batch_size rows) has its own packer fed by the documents
g[r], g[r + B], g[r + 2B], ...: it reads only those. So a process producing rows
[p*B/P, (p+1)*B/P) reads only its own documents, and the global batch does not depend
on the number of processes. Each row's state is one integer (`cursor`: how many of its
documents it took) plus the document it is in the middle of (`pending`: source index and
token offset; restoring re-reads and re-tokenizes it), so `get_state()` is a small JSON
dict. A state may hold more rows than this process owns (`merge_states` of all
processes), so a merged state restores under any process_count.

With num_epochs set the stream ends after that many epochs; rows that run out are all
padding (loss_mask 0) until every local row has run out, then StopIteration. Processes
may run out at different steps: multi-process evaluation should run a fixed number of
steps (or use one process).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ag_jax import capacity_view
from ag_jax.data import packing

STATE_FORMAT = 1
DENSE_PERMUTATION_MAX = 1 << 22  # larger sources get an O(1)-memory Feistel permutation
_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
  """splitmix64 finalizer: a cheap, well-mixed 64-bit hash."""
  z = (z + 0x9E3779B97F4A7C15) & _M64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
  return z ^ (z >> 31)


class FeistelPermutation:
  """A pseudo-random permutation of range(n) in O(1) memory (4-round Feistel network on
  the next even power of two, cycle-walking back into range)."""

  def __init__(self, n: int, rng: np.random.Generator):
    self.n = n
    self.half = max(1, math.ceil(math.ceil(math.log2(max(n, 2))) / 2))
    self.mask = (1 << self.half) - 1
    self.keys = [int(k) for k in rng.integers(0, 1 << 62, size=4)]

  def _encrypt(self, x: int) -> int:
    left, right = x >> self.half, x & self.mask
    for key in self.keys:
      left, right = right, left ^ (_mix64(right ^ key) & self.mask)
    return (left << self.half) | right

  def __getitem__(self, i: int) -> int:
    x = self._encrypt(i)
    while x >= self.n:
      x = self._encrypt(x)
    return x


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True):
  """Index -> document of `epoch`: a numpy permutation, or Feistel for huge n."""
  if not shuffle:
    return range(n)
  rng = np.random.default_rng([int(seed), int(epoch)])
  if n <= DENSE_PERMUTATION_MAX:
    return rng.permutation(n)
  return FeistelPermutation(n, rng)


class DataIterator:
  """Packed numpy batches {tokens, targets, positions, segment_ids, context_length: int32,
  loss_mask: float32} (and context_capacity int32 with `budgets`), each
  [batch_size // process_count, seq_len]: this process's rows."""

  def __init__(self, source, tokenizer, seq_len: int, batch_size: int, seed: int = 0,
               shuffle: bool = True, process_index: int = 0, process_count: int = 1,
               sft: bool = False, num_epochs: int | None = None, text_field: str = "text",
               prompt_field: str = "prompt", response_field: str = "response",
               response_weight: float = 1.0, budgets=None):
    if len(source) == 0:
      raise ValueError("the data source is empty")
    if batch_size % process_count or not 0 <= process_index < process_count:
      raise ValueError(f"batch_size {batch_size} must split evenly over {process_count} "
                       f"processes and process_index {process_index} be one of them")
    self.source, self.tokenizer = source, tokenizer
    self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
    # Budget-aware gate training (GateConfig.train_budgets): each row's context capacity,
    # batch key "context_capacity" [B, T] int32 (`capacity_view.draw_capacity`).
    self.budgets = None if budgets is None else tuple(float(b) for b in budgets)
    self.num_docs, self.num_epochs = len(source), num_epochs
    if not response_weight > 0:
      raise ValueError(f"response_weight must be positive, got {response_weight}")
    self.fields = dict(sft=sft, text_field=text_field, prompt_field=prompt_field,
                       response_field=response_field, response_weight=float(response_weight))
    local = batch_size // process_count
    self.rows = list(range(process_index * local, (process_index + 1) * local))
    self.packers = {r: packing.RowPacker(seq_len, tokenizer.pad_id) for r in self.rows}
    self.cursors = {r: 0 for r in self.rows}
    self.step = 0
    self._perms: dict[int, Any] = {}

  def _doc_index(self, position: int) -> int:
    epoch, i = divmod(position, self.num_docs)
    if epoch not in self._perms:
      if len(self._perms) >= 4:  # rows drift apart by at most a few epochs
        self._perms.pop(min(self._perms))
      self._perms[epoch] = epoch_permutation(self.num_docs, self.seed, epoch, self.shuffle)
    return int(self._perms[epoch][i])

  def _tokenize(self, index: int):
    """(tokens, num_prompt, weights, context_tokens) of document `index`."""
    example = self.source[index]
    return (*packing.tokenize_weighted(example, self.tokenizer, **self.fields),
            packing.example_context_tokens(example))

  def _supplier(self, row: int):
    def supply():
      for _ in range(self.num_docs):  # bounded: a source of only empty documents is an error
        position = self.cursors[row] * self.batch_size + row
        if self.num_epochs is not None and position >= self.num_epochs * self.num_docs:
          return None
        self.cursors[row] += 1
        index = self._doc_index(position)
        tokens, num_prompt, weights, context = self._tokenize(index)
        if len(tokens) >= 2:
          return index, tokens, num_prompt, weights, context
      raise ValueError(f"{self.num_docs} documents in a row tokenized to < 2 tokens")
    return supply

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [self.packers[r].next_row(self._supplier(r)) for r in self.rows]
    if all(row is None for row in rows):
      raise StopIteration
    empty = packing.build_row([], self.seq_len, self.tokenizer.pad_id)
    batch = packing.stack_rows([empty if row is None else row for row in rows])
    if self.budgets is not None:
      batch["context_capacity"] = capacity_view.draw_capacity(
          batch["context_length"], self.budgets, self.seed, self.step, self.rows)
    self.step += 1
    return batch

  @property
  def epoch(self) -> int:
    """The earliest epoch any local row is still reading."""
    return min(self.cursors[r] * self.batch_size + r for r in self.rows) // self.num_docs

  def get_state(self) -> dict:
    rows = {}
    for r in self.rows:
      p = self.packers[r].pending
      rows[str(r)] = {"cursor": self.cursors[r],
                      "pending": None if p is None else [p.ref, p.offset]}
    return {"format": STATE_FORMAT, "step": self.step, "epoch": self.epoch,
            "rows": rows, **self._identity()}

  def set_state(self, state: dict) -> None:
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"unknown data iterator state format {state.get('format')!r}")
    for key, value in self._identity().items():
      # states written before response_weight existed were all unweighted
      if state.get(key, 1.0 if key == "response_weight" else None) != value:
        raise ValueError(f"data iterator state has {key}={state.get(key)!r} but this "
                         f"iterator has {value!r}: the batches would differ")
    missing = [r for r in self.rows if str(r) not in state["rows"]]
    if missing:
      raise ValueError(f"data iterator state lacks rows {missing} of this process")
    for r in self.rows:
      row = state["rows"][str(r)]
      self.cursors[r] = int(row["cursor"])
      self.packers[r].pending = None
      if row["pending"] is not None:
        ref, offset = (int(x) for x in row["pending"])
        tokens, num_prompt, weights, context = self._tokenize(ref)
        self.packers[r].pending = packing.Pending(ref, tokens, num_prompt, offset, weights,
                                                  context)
    self.step = int(state["step"])

  def _identity(self) -> dict:
    return {"seed": self.seed, "shuffle": self.shuffle, "num_docs": self.num_docs,
            "batch_size": self.batch_size, "seq_len": self.seq_len,
            "num_epochs": self.num_epochs, "sft": self.fields["sft"],
            "response_weight": self.fields["response_weight"]}


def merge_states(states: list[dict]) -> dict:
  """One state holding the rows of all processes' states (same step and identity)."""
  merged = dict(states[0], rows={})
  for state in states:
    if {k: v for k, v in state.items() if k not in ("rows", "epoch")} != \
        {k: v for k, v in merged.items() if k not in ("rows", "epoch")}:
      raise ValueError("states come from different iterators or steps")
    merged["rows"].update(state["rows"])
    merged["epoch"] = min(merged["epoch"], state["epoch"])
  return merged
