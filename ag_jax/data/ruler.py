"""A RULER-style needle suite (Hsieh et al. 2024, "RULER: What's the real context size of
your long-context language models?"), sized in tokens of a given tokenizer.

Every example is a context (prefilled, and compressed under the kvpress protocol), a
question that always comes after it, and answer items checkable by exact match. Tasks:

  niah_multikey    `num_needles` needles "One of the magic numbers for KEY is V." with
                   distinct keys and values; one key, uniformly at random, is asked. The
                   context is drawn before the asked key, so the context alone never decides
                   the answer (no elimination).
  niah_multivalue  one key, `num_needles` needles "For KEY, magic number j is V." with distinct
                   values, numbered 1.. in order of appearance; all values are asked.
  niah_multiquery  `num_needles` distinct keys; `num_queries` of them are asked, each value
                   in the order asked.
  vt               variable tracking: `num_chains` chains "VAR A = 41." ... "VAR B = A." ...
                   of `num_hops` hops; asked: every name holding one chain's value, in chain
                   order.
  cwe              common-words extraction (the aggregation control, no haystack): a list of
                   words where `num_common` words each occur more often than any other;
                   asked: those words, in order of first appearance.

Keys and variable names are `key_len` words of KEY_WORDS, values `value_len` numbers of
VALUE_NUMBERS, each piece with its leading space, so with the stdlib BPE (which has them as
required single tokens) a key is exactly key_len tokens and a value value_len tokens.

Haystacks: `stdlib` (consecutive lines of Python standard-library files of a split, see
ag_jax.data.stdlib; needles go between lines) or `noise` (RULER's repeated sentences).
The context (BOS included) has at most `length` tokens and at least `length` minus one
haystack line. Example i of a split is drawn from a seed of (seed, split, task, i): random
access, deterministic, disjoint streams per split; the same index at another length keeps
its keys and values.

The answer restates what each item answers ("the magic number for K2 is", "magic number 2
is", "the variables assigned A are"): the `joins` between items. Scoring teacher-forces the
question and the joins and checks the items (the values, the names), so every item is one
lookup of the context, and each asked needle must survive eviction for its item to be right.
RULER's own templates list the items bare; a model that restates them scores the same under
its string_match_all. Why we restate: the tiny embedded model learns a lookup as an induction
copy ("KEY is" -> what followed it before); "for K1, K2 are" -> V2 or "V1," -> the next value of
one key are not lookups it learns within the recipe's budget (docs/ruler_base_probes.md).

Context, question and answer are tokenized apart: the context ends with a newline, the
question starts with '#', and answer items start with a space, so tokenizing the whole
text gives the same tokens (for byte-level BPEs with the GPT-2 split, and for bytes).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import random
import zlib
from typing import Sequence

import numpy as np

TASKS = ("niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
RETRIEVAL_TASKS = TASKS[:4]
HAYSTACKS = ("stdlib", "noise")
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
MAX_LINE_CHARS = 200  # longer stdlib lines (tables, long strings) are skipped

KEY_WORDS = tuple("""apple amber anchor angle arrow autumn badge bamboo banner barrel basket
beacon beard berry blade blossom bottle breeze bridge bronze bubble bucket butter cabin camel
candle canyon carbon carpet castle cedar cellar chalk cherry circle cliff clock cloud clover
cobalt comet copper coral cotton crane crater crystal daisy dancer desert diamond dolphin dragon
eagle ember engine falcon feather fern fiber forest fossil fountain galaxy garden garlic ginger
glacier globe granite grape guitar hammer harbor harvest hazel helmet honey horizon island ivory
jacket jasmine jungle kettle kingdom ladder lagoon lantern lemon lily lizard lotus magnet mango
maple marble meadow melon mirror monkey mountain muffin needle nectar noodle oasis ocean olive
onion orbit orchid otter oyster paddle palace panda parrot pebble pepper piano pillow planet
plum pocket pony puzzle quartz rabbit radar raven ribbon river rocket saddle salmon sand satin
shadow shell silver sky snow spider spring squirrel star stone storm sugar summit sunset swan
tiger timber tomato tower tulip tunnel turtle umbrella valley velvet violet walnut willow
window winter wolf yarn zebra""".split())
VALUE_NUMBERS = tuple(str(n) for n in range(10, 100))


def required_tokens() -> list[str]:
  """The pieces the suite's tokenizer must hold as single tokens (leading space included)."""
  return [" " + w for w in KEY_WORDS] + [" " + v for v in VALUE_NUMBERS]


@dataclasses.dataclass(frozen=True)
class RulerConfig:
  """One suite setting. `num_needles` None: the task's default (RULER's, scaled down)."""

  task: str = "niah_multikey"
  length: int = 1024              # context tokens, BOS included (an upper bound)
  haystack: str = "stdlib"        # one of HAYSTACKS
  haystack_split: str | None = None  # stdlib split of the haystack; None: the example's
  num_needles: int | None = None  # multikey/multiquery: keys; multivalue: values
  num_queries: int = 2            # niah_multiquery: keys asked
  num_hops: int = 4               # vt: a chain names num_hops + 1 variables
  num_chains: int = 1             # vt: chains (one is asked)
  num_common: int = 5             # cwe: words to find
  common_share: float = 0.3       # cwe: share of the list taken by the common words
  depth: float | None = None      # depth in [0, 1] of the asked needle; None: uniform
  key_len: int = 1                # words per key / variable name
  value_len: int = 1              # numbers per value
  needle_repeats: int = 0         # multikey/multiquery: extra copies of each needle line
  seed: int = 0

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task={self.task!r}: expected one of {TASKS}")
    if self.haystack not in HAYSTACKS:
      raise ValueError(f"haystack={self.haystack!r}: expected one of {HAYSTACKS}")
    if self.depth is not None and not 0.0 <= self.depth <= 1.0:
      raise ValueError(f"depth must be in [0, 1] or None, got {self.depth}")
    if self.key_len < 1 or self.value_len < 1:
      raise ValueError("key_len and value_len must be >= 1")
    if self.needles < 1 or self.num_hops < 1 or self.num_chains < 1 or self.num_common < 1:
      raise ValueError("needle, hop, chain and common-word counts must be >= 1")
    if self.task == "niah_multiquery" and not 1 <= self.num_queries <= self.needles:
      raise ValueError(f"need 1 <= num_queries ({self.num_queries}) <= num_needles "
                       f"({self.needles})")
    if self.length < 16:
      raise ValueError(f"length must be >= 16 tokens, got {self.length}")
    if self.needle_repeats < 0:
      raise ValueError(f"needle_repeats must be >= 0, got {self.needle_repeats}")

  @property
  def needles(self) -> int:
    if self.num_needles is not None:
      return self.num_needles
    return {"niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4}.get(self.task, 1)


def split_seed(seed: int, split: str, task: str, index: int) -> int:
  code = _SPLIT_CODES.get(split, zlib.crc32(split.encode("utf-8")) + 3)
  state = np.random.SeedSequence([int(seed), code, zlib.crc32(task.encode("utf-8")), int(index)])
  return int(state.generate_state(2, np.uint64)[0])


# ---------------------------------------------------------------------------------------------
# Haystacks


@functools.lru_cache(maxsize=8)
def _stdlib_lines(split: str, root: str | None, limit: int | None) -> tuple[str, ...]:
  """Every stdlib line (newline included) of a split, files in path order, long lines and
  blank-only files dropped."""
  from ag_jax.data import stdlib  # pylint: disable=g-import-not-at-top
  lines: list[str] = []
  for _, text in stdlib.read_texts(split, root, limit):
    for line in text.splitlines(keepends=True):
      if len(line) <= MAX_LINE_CHARS:
        lines.append(line if line.endswith("\n") else line + "\n")
  return tuple(lines)


class Haystack:
  """Line streams to fill contexts with: `lines(rng, n)` -> n consecutive lines."""

  def __init__(self, kind: str = "stdlib", split: str = "train", root: str | None = None,
               limit: int | None = None):
    self.kind = kind
    self.all = _stdlib_lines(split, root, limit) if kind == "stdlib" else (NOISE,)

  def start(self, rng: random.Random) -> int:
    return rng.randrange(len(self.all))

  def lines(self, start: int, n: int) -> list[str]:
    m = len(self.all)
    return [self.all[(start + i) % m] for i in range(n)]


@functools.lru_cache(maxsize=16)
def open_haystack(kind: str, split: str, root: str | None, limit: int | None) -> Haystack:
  return Haystack(kind, split, root, limit)


def count_tokens(tokenizer, text: str) -> int:
  return len(tokenizer.encode(text, add_bos=True))


def fit_lines(tokenizer, build, budget: int, guess: int) -> tuple[str, int]:
  """The most haystack lines h with count_tokens(build(h)) <= budget: (text, h). build(h) must
  grow with h."""
  lo, hi = 0, max(1, guess)
  while count_tokens(tokenizer, build(hi)) <= budget:  # find an upper bound
    lo, hi = hi, hi * 2
    if hi > 1 << 20:
      raise ValueError("the haystack cannot fill the context")
  if count_tokens(tokenizer, build(lo)) > budget:
    raise ValueError(f"the needles alone exceed {budget} tokens; raise length")
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if count_tokens(tokenizer, build(mid)) <= budget:
      lo = mid
    else:
      hi = mid
  return build(lo), lo


def _with_needles(hay: list[str], needles: Sequence[str], depths: Sequence[float]) -> str:
  """Haystack lines with needle lines inserted at their depths (order of depth, ties in
  needle order)."""
  n = len(hay)
  slots = sorted(range(len(needles)), key=lambda i: (depths[i], i))
  out, taken = [], 0
  for i in slots:
    at = min(n, int(round(depths[i] * n)))
    out += hay[taken:at]
    out.append(needles[i])
    taken = max(taken, at)
  return "".join(out + hay[taken:])


# ---------------------------------------------------------------------------------------------
# Examples


def _pieces(rng: random.Random, pool: Sequence[str], n: int, k: int) -> list[str]:
  """n distinct strings of k pool words each (leading space, words joined by spaces)."""
  if n * k > len(pool) and k == 1:
    raise ValueError(f"{n} distinct single words asked from a pool of {len(pool)}")
  out: list[str] = []
  while len(out) < n:
    words = rng.sample(pool, k)
    piece = " " + " ".join(words)
    if piece not in out:
      out.append(piece)
  return out


def niah_line(key: str, value: str) -> str:
  return f"# One of the magic numbers for{key} is{value}.\n"


def multivalue_line(key: str, number: int, value: str) -> str:
  return f"# For{key}, magic number {number} is{value}.\n"


def key_question(task: str, keys: Sequence[str], values: Sequence[str],
                 asked: Sequence[int]) -> tuple[str, list[str], list[str]]:
  """(question, answer items, joins) asking the values of needles `asked` (indices into keys
  and values): niah_multikey asks one key, niah_multiquery several. The question ends with
  the first item's lead; joins[j - 1] leads item j."""
  answers = [values[a] for a in asked]
  if task == "niah_multikey":
    return (f"# Question: what is the magic number for{keys[asked[0]]}?\n"
            f"# Answer: the magic number for{keys[asked[0]]} is"), answers, []
  if task == "niah_multiquery":
    listed = ",".join(keys[a] for a in asked)
    return (f"# Question: what are the magic numbers for{listed}?\n"
            f"# Answer: the magic number for{keys[asked[0]]} is"), answers, \
        [f", the magic number for{keys[a]} is" for a in asked[1:]]
  raise ValueError(f"key_question asks niah_multikey or niah_multiquery, not {task!r}")


def generate_example(config: RulerConfig, tokenizer, split: str, index: int, *,
                     ask: int | Sequence[int] | None = None, root: str | None = None,
                     limit: int | None = None) -> dict:
  """Example `index` of `split`: {task, context, question, answers (items, each with its
  leading space), answer (the items joined by ','), text (context + question + answer),
  prompt (context + question), response (= answer), length (context tokens with BOS),
  depths (of the needles, in order of `needle_keys`)}.

  `ask` overrides which needle(s) are asked (niah_multikey: an index, niah_multiquery: a
  list of indices into the needles, vt: the chain); the context does not change when
  `config.depth` is None.
  """
  rng = random.Random(split_seed(config.seed, split, config.task, index))
  hay_split = config.haystack_split or split
  if config.task == "cwe":
    return _cwe(config, tokenizer, rng)
  hay = open_haystack(config.haystack, hay_split, root, limit)
  start = hay.start(rng)
  n = config.needles
  if config.task == "vt":
    return _vt(config, tokenizer, rng, hay, start, ask)
  keys = _pieces(rng, KEY_WORDS, 1 if config.task == "niah_multivalue" else n, config.key_len)
  values = _pieces(rng, VALUE_NUMBERS, n, config.value_len)
  depths = [rng.random() for _ in range(n)]
  if config.task == "niah_multikey":
    asked = [rng.randrange(n)] if ask is None else [int(ask)]
    lines = [niah_line(k, v) for k, v in zip(keys, values)]
    question, answers, joins = key_question(config.task, keys, values, asked)
  elif config.task == "niah_multiquery":
    asked = rng.sample(range(n), config.num_queries) if ask is None else [int(a) for a in ask]
    lines = [niah_line(k, v) for k, v in zip(keys, values)]
    question, answers, joins = key_question(config.task, keys, values, asked)
  else:  # niah_multivalue: all values of one key, numbered in order of appearance
    asked = list(range(n))
    order = sorted(range(n), key=lambda i: (depths[i], i))
    rank = {i: r for r, i in enumerate(order)}
    lines = [multivalue_line(keys[0], rank[i] + 1, v) for i, v in enumerate(values)]
    answers = [values[i] for i in order]
    question = (f"# Question: what are all the magic numbers for{keys[0]}?\n"
                f"# Answer: for{keys[0]}, magic number 1 is")
    joins = [f", magic number {r + 1} is" for r in range(1, n)]
  if config.depth is not None:
    depths[asked[0]] = config.depth
  placed, at = lines, depths
  if config.needle_repeats and config.task != "niah_multivalue":
    # A training aid: a needle seen again later is an LM target that only an induction copy
    # predicts ("for KEY is" -> the value seen before), many such targets per context where
    # the question gives one. Drawn last, so the rest of the example does not change.
    extra = [rng.random() for _ in range(config.needle_repeats * n)]
    placed, at = lines * (1 + config.needle_repeats), depths + extra
  context, _ = fit_lines(tokenizer, lambda h: _with_needles(hay.lines(start, h), placed, at),
                    config.length, guess=config.length // 8)
  return _finish(config, tokenizer, context, question, answers, joins,
                 needle_keys=keys if config.task != "niah_multivalue" else keys * n,
                 needle_values=values, depths=depths, asked=asked)


def _vt(config, tokenizer, rng, hay, start, ask) -> dict:
  per_chain = config.num_hops + 1
  names = _pieces(rng, KEY_WORDS, config.num_chains * per_chain, config.key_len)
  values = _pieces(rng, VALUE_NUMBERS, config.num_chains, config.value_len)
  lines, depths, chains = [], [], []
  for c in range(config.num_chains):
    chain = names[c * per_chain:(c + 1) * per_chain]
    chains.append(chain)
    ds = sorted(rng.random() for _ in range(per_chain))  # a chain reads forwards
    for j, name in enumerate(chain):
      source = values[c] if j == 0 else chain[j - 1]
      lines.append(f"# VAR{name} ={source}.\n")
      depths.append(ds[j])
  asked = rng.randrange(config.num_chains) if ask is None else int(ask)
  if config.depth is not None:  # the asked chain's first statement at `depth`
    shift = config.depth - depths[asked * per_chain]
    for j in range(per_chain):
      i = asked * per_chain + j
      depths[i] = min(1.0, max(0.0, depths[i] + shift))
  question = (f"# Question: which variables are assigned the value{values[asked]}?\n"
              f"# Answer: the variables assigned the value{values[asked]} are")
  context, _ = fit_lines(tokenizer, lambda h: _with_needles(hay.lines(start, h), lines, depths),
                    config.length, guess=config.length // 8)
  chain = list(chains[asked])
  joins = [f", the variables assigned{name} are" for name in chain[:-1]]
  return _finish(config, tokenizer, context, question, chain, joins,
                 needle_keys=names, needle_values=values, depths=depths, asked=[asked])


def _cwe(config, tokenizer, rng) -> dict:
  pool = list(KEY_WORDS)
  rng.shuffle(pool)
  common, rare = pool[:config.num_common], pool[config.num_common:]
  header = "# Below is a list of words.\n"
  question = (f"# Question: what are the {config.num_common} most common words in the list "
              f"above?\n# Answer: the {config.num_common} most common words are")

  def build(total: int) -> tuple[str, list[str], list[str]]:
    words = _cwe_words(rng_state, common, rare, total, config)
    rows = [words[i:i + 12] for i in range(0, len(words), 12)]
    body = "".join("#" + "".join(" " + w for w in row) + "\n" for row in rows)
    seen = [w for w in dict.fromkeys(words) if w in common]
    return header + body, seen, words

  rng_state = rng.getstate()
  text, h = fit_lines(tokenizer, lambda t: build(t)[0] if t else header,
                 config.length, guess=config.length // 2)
  if h < 2 * config.num_common:
    raise ValueError(f"cwe at length {config.length} holds too few words; raise length")
  _, seen, words = build(h)
  counts = {w: words.count(w) for w in set(words)}
  assert min(counts[w] for w in common) > max((counts[w] for w in rare if w in counts),
                                             default=0), "cwe common words are not the most common"
  return _finish(config, tokenizer, text, question, [" " + w for w in seen], None,
                 needle_keys=[" " + w for w in common], needle_values=[], depths=[], asked=[])


def _cwe_words(state, common, rare, total, config) -> list[str]:
  """`total` words: each common word c times, rare words fewer times each, shuffled."""
  rng = random.Random()
  rng.setstate(state)
  c = max(2, round(config.common_share * total / len(common)))
  c = min(c, max(1, total // len(common)))
  rest = max(0, total - c * len(common))
  m = min(len(rare), rest)
  counts = [rest // m + (i < rest % m) for i in range(m)] if m else []
  if counts and max(counts) >= c:
    raise ValueError(f"cwe: {total} words cannot have {len(common)} clearly most common "
                     f"words with a pool of {len(rare)} others; lower length or common_share")
  words = [w for w in common for _ in range(c)] + \
      [w for w, k in zip(rare, counts) for _ in range(k)]
  rng.shuffle(words)
  return words


def answer_joins(answers: Sequence[str], joins: Sequence[str] | None = None) -> list[str]:
  """The text before each answer item but the first: `joins`, or ',' (cwe's bare list)."""
  joins = [","] * max(0, len(answers) - 1) if joins is None else list(joins)
  if len(joins) != max(0, len(answers) - 1):
    raise ValueError(f"{len(answers)} answer items need {max(0, len(answers) - 1)} joins, "
                     f"got {len(joins)}")
  return joins


def join_answer(answers: Sequence[str], joins: Sequence[str] | None = None) -> str:
  """The answer text: items with joins[j - 1] before item j."""
  return "".join(j + a for j, a in zip([""] + answer_joins(answers, joins), answers))


def _finish(config, tokenizer, context, question, answers, joins, **meta) -> dict:
  # One newline, no blank run, at the end: whitespace runs tokenize apart from the '#'
  # that follows only when they are a single newline.
  context = context.rstrip() + "\n"
  context_tokens = count_tokens(tokenizer, context)
  joins = answer_joins(answers, joins)
  answer = join_answer(answers, joins)
  return {"task": config.task, "context": context, "question": question,
          "answers": list(answers), "joins": joins, "answer": answer, "prompt": context + question,
          "response": answer, "text": context + question + answer,
          # BOS + context: the prompt's leading tokens a kvpress cache compresses
          "length": context_tokens, "context_tokens": context_tokens, **meta}


def score_items(generated: str, answers: Sequence[str]) -> float:
  """RULER's string_match_all: the share of answer items found in the generation."""
  return float(np.mean([a.strip() in generated for a in answers])) if answers else 0.0
