"""The recall corpus: key -> value facts hidden in distractor text, queried later.

This is the small world in which KV eviction matters: a query can only be answered if
the cache still holds its fact, while the distractors around it are safe to drop. The
format is byte-level and regular so that a tiny byte-tokenized Llama learns it quickly.

A document is space-separated units (ASCII only, so byte offsets == str offsets):

  fact       `#abc=123;`   key = 3 lowercase letters (unique in a document), value = 3 digits
  query      `?abc=123;`   answered inline in `text`; the last query is the prompt's question
  distractor `random`    lowercase words of 2-6 letters
             `repeated`  one stock phrase repeated (cut at a word) to fill the gap
             `near_miss` `%abc=517;` a real key, or a key one letter off, behind a wrong
                         marker (one of `%&@$`, never `#`) with a wrong value
             `mixed`     each gap picks one of the three kinds

Facts appear in order with distractor gaps of random length around them; queries follow
(`query_position="end"`), or each query but the last one appears at a random place after
its own fact (`"interleaved"`). The text ends with the last answered query, e.g.

  ogu yfaw #kqa=381; mxe bbpq ... %kqa=907; ... #bcd=446; ... ?kqa=381; ?bcd=446;

Example i of a split is generated from a seed derived from (config.seed, split, i): random
access in O(1), deterministic, and splits draw from disjoint seed streams.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
import zlib

import numpy as np

from ag_jax.data.indexed import IndexedSource

DISTRACTORS = ("random", "repeated", "near_miss", "mixed")
QUERY_POSITIONS = ("end", "interleaved")
NEAR_MISS_MARKERS = "%&@$"
PHRASES = (
    "the cat sat on the mat.",
    "all work and no play makes a dull day.",
    "nothing to see here.",
    "it was a dark and stormy night.",
    "the quick brown fox jumps over the lazy dog.",
    "lorem ipsum dolor sit amet.",
)
FACT_RE = re.compile(r"#([a-z]+)=([0-9]+);")
QUERY_RE = re.compile(r"\?([a-z]+)=([0-9]+);")
NEAR_MISS_RE = re.compile(r"[%&@$]([a-z]+)=([0-9]+);")
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class RecallConfig:
  """How recall documents look. `doc_len` is a target in bytes, met to within a word."""

  doc_len: int = 384
  # If set, each document's length target is drawn uniformly from [min_doc_len, doc_len]:
  # short documents teach the lookup quickly, long ones make eviction matter.
  min_doc_len: int | None = None
  # A curriculum by example index (read in order, i.e. without shuffling): the upper end of
  # the length draw grows linearly from min_doc_len to doc_len over the first
  # `length_ramp` examples. A tiny model learns the lookup on short documents in a few
  # hundred steps but can stall for thousands on long ones.
  length_ramp: int = 0
  num_facts: int = 4
  num_queries: int = 2            # distinct facts queried per document, <= num_facts
  distractor: str = "mixed"       # one of DISTRACTORS
  query_position: str = "end"     # one of QUERY_POSITIONS
  key_len: int = 3
  value_len: int = 3
  seed: int = 0                   # base seed; each split derives its own stream from it

  def __post_init__(self):
    for name in ("doc_len", "num_facts", "num_queries", "key_len", "value_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
    if self.distractor not in DISTRACTORS:
      raise ValueError(f"distractor={self.distractor!r}: expected one of {DISTRACTORS}")
    if self.query_position not in QUERY_POSITIONS:
      raise ValueError(
          f"query_position={self.query_position!r}: expected one of {QUERY_POSITIONS}")
    if self.min_doc_len is not None and not 0 < self.min_doc_len <= self.doc_len:
      raise ValueError(f"need 0 < min_doc_len ({self.min_doc_len}) <= doc_len ({self.doc_len})")
    if self.length_ramp < 0 or (self.length_ramp and self.min_doc_len is None):
      raise ValueError("length_ramp needs min_doc_len and must be >= 0")
    if not 1 <= self.num_queries <= self.num_facts:
      raise ValueError(f"need 1 <= num_queries ({self.num_queries}) <= num_facts "
                       f"({self.num_facts})")
    if self.key_len < 1 or self.value_len < 1 or 26 ** self.key_len < 2 * self.num_facts:
      raise ValueError("key_len/value_len too small for num_facts unique keys")


def split_seed(seed: int, split: str) -> list[int]:
  """Seed entropy of a split: known splits get fixed codes, others a crc32 of the name."""
  code = _SPLIT_CODES.get(split, zlib.crc32(split.encode("utf-8")) + 3)
  return [int(seed), code]


def generate_example(config: RecallConfig, split: str, index: int) -> dict:
  """Example `index` of `split`: `text`, `prompt`, `answer`/`response`, and metadata."""
  state = np.random.SeedSequence(split_seed(config.seed, split) + [int(index)])
  rng = random.Random(int(state.generate_state(2, np.uint64)[0]))
  keys = _distinct_keys(rng, config.num_facts, config.key_len)
  values = ["".join(rng.choices(string.digits, k=config.value_len)) for _ in keys]
  queried = rng.sample(range(config.num_facts), config.num_queries)  # last = the prompt's

  # gaps[j] is the run of distractor units before fact j (j < F) or before the queries.
  gaps = _distractor_gaps(rng, config, keys, values, index)
  if config.query_position == "interleaved":
    for f in queried[:-1]:
      j = rng.randint(f + 1, config.num_facts)  # any gap after fact f
      gaps[j].insert(rng.randint(0, len(gaps[j])), ("query", f))
    tail = [("query", queried[-1])]
  else:
    tail = [("query", f) for f in queried]

  units: list[tuple[str, object]] = []
  for j in range(config.num_facts):
    units += gaps[j] + [("fact", j)]
  units += gaps[config.num_facts] + tail

  pieces, offsets = [], {"fact": [], "query": [], "near_miss": []}
  pos = 0
  for kind, payload in units:
    if kind == "fact":
      piece = f"#{keys[payload]}={values[payload]};"
    elif kind == "query":
      piece = f"?{keys[payload]}={values[payload]};"
    else:
      piece = payload
    if kind in offsets:
      offsets[kind].append(pos)
    pieces.append(piece)
    pos += len(piece) + 1
  text = " ".join(pieces)
  last = queried[-1]
  prompt = text[: len(text) - config.value_len - 1]  # drop the final "123;"
  assert prompt.endswith(f"?{keys[last]}=") and text.endswith(f"{values[last]};")
  return {
      "text": text,
      "prompt": prompt,
      "answer": values[last],
      "response": values[last],  # the SFT target, same as `answer`
      "facts": {"keys": keys, "values": values, "offsets": offsets["fact"]},
      "queries": {"keys": [keys[f] for f in _query_order(units)], "offsets": offsets["query"]},
      "near_misses": {"offsets": offsets["near_miss"]},
  }


def _query_order(units) -> list[int]:
  return [payload for kind, payload in units if kind == "query"]


def _distinct_keys(rng: random.Random, n: int, key_len: int) -> list[str]:
  keys: list[str] = []
  while len(keys) < n:
    key = "".join(rng.choices(string.ascii_lowercase, k=key_len))
    if key not in keys:
      keys.append(key)
  return keys


def _distractor_gaps(rng, config: RecallConfig, keys, values, index: int) -> list[list]:
  """F + 1 lists of ("distractor"|"near_miss", text) units, about doc_len bytes in all."""
  num_gaps = config.num_facts + 1
  fixed = (config.num_facts + config.num_queries) * (config.key_len + config.value_len + 4)
  doc_len = config.doc_len
  if config.min_doc_len is not None:
    longest = config.doc_len
    if config.length_ramp > 0:
      grown = min(1.0, index / config.length_ramp)
      longest = round(config.min_doc_len + grown * (config.doc_len - config.min_doc_len))
    doc_len = rng.randint(config.min_doc_len, longest)
  budget = max(0, doc_len - fixed)
  weights = [rng.random() + 1e-6 for _ in range(num_gaps)]
  total = sum(weights)
  gaps, carry = [], 0
  for w in weights:
    kind = config.distractor
    if kind == "mixed":
      kind = rng.choice(("random", "repeated", "near_miss"))
    nbytes = int(budget * w / total) + carry
    units = _fill(rng, kind, nbytes, keys, values)
    carry = nbytes - sum(len(text) + 1 for _, text in units)  # unused bytes move on
    gaps.append(units)
  return gaps


def _fill(rng, kind: str, nbytes: int, keys, values) -> list:
  """Distractor units whose joined length (each + 1 space) stays within nbytes."""
  units, used = [], 0
  phrase = rng.choice(PHRASES).split()  # repeated word by word, so gaps fill up evenly
  while True:
    if kind == "random":
      unit = ("distractor", "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6))))
    elif kind == "repeated":
      unit = ("distractor", phrase[len(units) % len(phrase)])
    else:
      unit = ("near_miss", _near_miss(rng, keys, values))
    if used + len(unit[1]) + 1 > nbytes:
      return units
    units.append(unit)
    used += len(unit[1]) + 1


def _near_miss(rng, keys, values) -> str:
  """A fact look-alike that is not a fact: wrong marker, a real or one-letter-off key."""
  f = rng.randrange(len(keys))
  key = keys[f]
  if rng.random() < 0.5:
    for _ in range(64):  # one letter off, and not another real key
      i = rng.randrange(len(key))
      off = key[:i] + rng.choice(string.ascii_lowercase.replace(key[i], "")) + key[i + 1:]
      if off not in keys:
        key = off
        break
  value = values[f]
  while value == values[f]:
    value = "".join(rng.choices(string.digits, k=len(values[f])))
  return f"{rng.choice(NEAR_MISS_MARKERS)}{key}={value};"


class RecallSource(IndexedSource):
  """Random-access source of `size` recall examples of one split (like tfds.data_source)."""

  def __init__(self, config: RecallConfig = RecallConfig(), split: str = "train",
               size: int = 100_000):
    super().__init__(size)
    self.config, self.split = config, split

  def example_at(self, i: int) -> dict:
    return generate_example(self.config, self.split, i)

  def __repr__(self) -> str:
    return f"RecallSource({self.config}, split={self.split!r}, size={self.size})"


def parse_document(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
  """(facts key -> value, [(query key, inline answer)...]) of a recall text."""
  facts: dict[str, str] = {}
  for key, value in FACT_RE.findall(text):
    if key in facts:
      raise ValueError(f"key {key!r} stated twice")
    facts[key] = value
  return facts, QUERY_RE.findall(text)


def score_answer(generated: str, answer: str) -> bool:
  """Exact match: the generation starts with exactly the answer's characters."""
  return bool(answer) and generated.startswith(answer)
