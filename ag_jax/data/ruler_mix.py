"""The RULER suite as a training source: a curriculum over example indices, for `train.py`
through `data.source: "ruler:..."` (configs/train/ruler_base.yaml).

Why a curriculum. A tiny model trained on the suite alone learns which values occur in the
context (an in-context unigram) and stays there: the key lookup needs an induction copy
(a previous-token head composed with a content match), and that circuit forms only after a
plateau. Probes (the recipe's header) found it forms reliably on short *copy rows*, random
key/value-pool tokens "filler x filler x" at random offsets, with the lr held high through
the plateau (~750-825 steps of 64 rows of 49 tokens), and then carries over to longer rows
when their length grows gradually. So the mix runs, over example indices:

  [0, copy_warmup)       copy rows of up to `copy_length` tokens;
  next alphabet_warmup   copy rows of up to `alphabet_length` tokens over `copy_alphabets`
                         alone (the two-token match forms here, before the suite dilutes
                         it: in the mix alone it did not, run 3 of the recipe);
  then                   the suite (with `copy_share` copy rows, some over small
                         alphabets (`copy_alphabets`, which teach the two-token match a
                         needle lookup needs), and `drill_share` lookup drills mixed in),
                         lengths ramping up over `length_ramp` examples, tasks from
                         `warmup_tasks` for the first `task_warmup` of them.

Stages run over indices, so the data iterator must not shuffle (data.shuffle: false).
"""

from __future__ import annotations

import dataclasses
import random

from ag_jax.data import ruler
from ag_jax.data.indexed import IndexedSource
from ag_jax.data.ruler import (HAYSTACKS, KEY_WORDS, RETRIEVAL_TASKS, TASKS, VALUE_NUMBERS,
                               RulerConfig)

_POOL = tuple(" " + w for w in KEY_WORDS + VALUE_NUMBERS)  # single tokens of the stdlib BPE
# The numbers of niah_multivalue's needles ("magic number 3 is"): single tokens too, but not
# in the pool, so no copy row trains a match on them (digit_copy).
DIGITS = tuple(f" {d}" for d in range(1, 10))
MIN_COPY_LENGTH = 20
QUESTION_ROOM = 127  # tokens a row holds past a context of max_length: seq_len - max_length - EOS


def copy_example(rng: random.Random, length: int, alphabet: int = 0,
                 pool: tuple[str, ...] = _POOL) -> dict:
  """A content-matched copy row of at most `length` tokens (BOS included, EOS not): BOS,
  filler, a span x of 8..min(length // 3, 64) pool tokens, filler, x again; both filler
  lengths random, so only a content match (not a fixed offset) predicts the second x.
  `alphabet` k > 0 draws the row from k pool tokens only: a token then recurs within x, so
  matching the previous token alone is ambiguous and the copy must match the last two or
  three (the match a needle lookup "for KEY is" -> VALUE needs). `pool` replaces the key and
  value pool (DIGITS: rows over the nine digit tokens). prompt ends with x's first token
  again; response is the rest of x (the targets a copy predicts; the filler is noise)."""
  if length < MIN_COPY_LENGTH:
    raise ValueError(f"copy rows need length >= {MIN_COPY_LENGTH}, got {length}")
  span = rng.randint(8, max(8, min(length // 3, 64)))
  gaps = length - 1 - 2 * span
  first = rng.randint(0, gaps)
  second = rng.randint(0, gaps - first)
  pool = rng.sample(pool, alphabet) if alphabet else pool
  draw = lambda n: [rng.choice(pool) for _ in range(n)]
  x = draw(span)
  prompt = "".join(draw(first) + x + draw(second) + x[:1])
  response = "".join(x[1:])
  return {"task": "copy", "text": prompt + response, "prompt": prompt, "response": response,
          "answers": [], "length": 1 + first + second + 2 * span,
          # the filler and the end are noise: only the copied span is a target
          "prompt_weight": 0.0, "eos_weight": 0.0}


DRILL_FORMS = ("multikey", "multivalue", "vt")


def drill_example(rng: random.Random, length: int, needles: int, hay=None,
                  gap: int = 3, form: str = "multikey") -> dict:
  """A lookup drill of <= `length` tokens (BOS included): `needles` needle lines, then
  probes of them in random order until the length is reached. Every probe ends in a target
  only the lookup predicts (the suite's formats, many targets per row where a question
  gives one); `pieces` mark those targets (they weigh as answers do). Forms:

    multikey    lines "One of the magic numbers for KEY is V."; a probe repeats a line.
    multivalue  one key, lines "For KEY, magic number j is V." (j = 1..); a probe repeats one.
    vt          a chain "VAR A = 41.", "VAR B = A.", ...; a probe "the variables assigned A
                are B." asks the name (the suite's vt join: a lookup backwards).

  With a haystack `hay` (ruler.Haystack), 0..`gap` of its consecutive lines go before
  each line and probe: the lookup then has to work inside code, as the suite's questions
  need."""
  if form not in DRILL_FORMS:
    raise ValueError(f"drill form {form!r}: expected one of {DRILL_FORMS}")
  if form == "multikey":
    keys = rng.sample(KEY_WORDS, needles)
    values = [rng.choice(VALUE_NUMBERS) for _ in keys]
    lines = [ruler.niah_line(" " + k, " " + v) for k, v in zip(keys, values)]
    probes = lines
  elif form == "multivalue":
    key = rng.choice(KEY_WORDS)
    values = rng.sample(VALUE_NUMBERS, needles)
    lines = [ruler.multivalue_line(" " + key, j + 1, " " + v) for j, v in enumerate(values)]
    probes = lines
  else:  # vt: the targets are the names, each probed by its source
    names = rng.sample(KEY_WORDS, needles)
    sources = [rng.choice(VALUE_NUMBERS)] + names[:-1]
    lines = [f"# VAR {n} = {src}.\n" for n, src in zip(names, sources)]
    probes = [f"# the variables assigned {src} are {n}.\n" for n, src in zip(names, sources)]
    values = names
  # ~12 tokens per line with the stdlib BPE; the caller's tokenizer trims below
  order = list(range(needles)) + [rng.randrange(needles) for _ in range(max(1, length // 12))]
  fillers = [""] * len(order)
  if hay is not None:
    start = hay.start(rng)
    for j in range(len(order)):
      n = rng.randint(0, gap)
      fillers[j] = "".join(hay.lines(start, n))
      start += n
  return _drill(lines, values, order, fillers, probes)


def _drill(lines, values, order, fillers, probes=None) -> dict:
  # cut only around the targets (" 47", a space before): the pieces give the text's tokens
  probes = lines if probes is None else probes
  pieces, pending = [], "".join(f + lines[i] for f, i in zip(fillers, order[:len(lines)]))
  for f, i in zip(fillers[len(lines):], order[len(lines):]):
    head, _, tail = probes[i].rpartition(" " + values[i])
    pieces += [(pending + f + head, False), (" " + values[i], True)]
    pending = tail
  pieces.append((pending, False))
  text = "".join(t for t, _ in pieces)
  return {"task": "drill", "text": text, "prompt": text, "response": "", "answers": [],
          "lines": lines, "probes": probes, "values": values, "order": order,
          "fillers": fillers, "pieces": pieces,
          "eos_weight": 0.0}  # a drill ends anywhere: its EOS is noise


@dataclasses.dataclass(frozen=True)
class RulerMix:
  """A random-access curriculum (see the module docstring).

  Past the copy warm-up, example i draws (from its own seed): a copy row with probability
  `copy_share`, a drill with `drill_share`, LM with `lm_fraction` (a stdlib window of the
  length, text only), else a task uniformly from `tasks`; a length uniformly from
  [min_length, max_length] whose upper end ramps up over the first `length_ramp` examples;
  a needle count uniformly from [min_needles, max_needles] (None: the task's default).
  The first `task_warmup` examples draw their task from `warmup_tasks` instead, with
  `warmup_repeats` extra copies of each needle line and `warmup_haystack`. Ramp and task
  warm-up count from the end of the copy warm-ups.
  """

  tasks: tuple[str, ...] = RETRIEVAL_TASKS
  min_length: int = 128
  max_length: int = 1024
  length_ramp: int = 0
  copy_warmup: int = 0            # examples of copy rows first
  copy_length: int = 49           # tokens per warm-up copy row (BOS included), at most
  alphabet_warmup: int = 0        # examples of copy rows over `copy_alphabets` next
  alphabet_length: int = 97       # tokens per such row (BOS included), at most
  copy_share: float = 0.0         # share of copy rows after the copy warm-ups
  copy_alphabets: tuple[int, ...] = (0,)  # after the warm-up a copy row draws its alphabet
                                          # size from these (0: the whole pool)
  digit_copy: float = 0.0         # share of those copy rows drawn over DIGITS instead: the
  digit_copy_from: int = 0        # ... from this suite example on (multivalue's "number 3
                                  # is" -> value is a match on a digit, which the pool lacks)
  drill_share: float = 0.0        # share of lookup drills after the copy warm-up
  drill_haystack: str | None = None  # haystack lines between a drill's lines; None: none
  drill_haystack_from: int = 0    # ... from this suite example on (counted as task_warmup)
  drill_forms: tuple[str, ...] = ("multikey",)  # a drill draws its form from these
                                                # (DRILL_FORMS: the suite's lookups) ...
  drill_forms_from: int = 0       # ... from this suite example on; before it, the first form
  forms_copy_share: float | None = None   # copy_share and drill_share from drill_forms_from
  forms_drill_share: float | None = None  # on (None: unchanged): more drills keep each form's
                                          # rate up when the forms share them
  questions: int = 1              # questions per niah_multikey / multiquery context: the
  questions_from: int = 0         # extra ones (about other needles) from this suite example on
  context_weight: float = 1.0     # loss weight of a task example's context and question (its
                                  # answer weighs data.response_weight): below 1 the answers
                                  # are a larger share of the loss
  warmup_tasks: tuple[str, ...] = ()
  task_warmup: int = 0
  warmup_repeats: int = 0         # needle_repeats of the task warm-up's examples
  warmup_haystack: str | None = None  # haystack of the task warm-up; None: base's
  lm_fraction: float = 0.0
  question_in_context: float = 0.0  # share of task examples whose context (what the
                                    # budget-aware view compresses) is context + question,
                                    # as the decode protocol caches the question under the
                                    # policy too; the rest stop before the question (kvpress)
  min_needles: int | None = None
  max_needles: int | None = None
  base: RulerConfig = RulerConfig()

  def __post_init__(self):
    for t in self.tasks + self.warmup_tasks:
      if t not in TASKS:
        raise ValueError(f"unknown task {t!r}: expected some of {TASKS}")
    if self.task_warmup and not self.warmup_tasks:
      raise ValueError("task_warmup needs warmup_tasks")
    if self.warmup_haystack is not None and self.warmup_haystack not in HAYSTACKS:
      raise ValueError(f"warmup_haystack={self.warmup_haystack!r}: expected one of {HAYSTACKS}")
    if not 16 <= self.min_length <= self.max_length:
      raise ValueError(f"need 16 <= min_length ({self.min_length}) <= max_length "
                       f"({self.max_length})")
    if (min(self.copy_warmup, self.alphabet_warmup) < 0
        or min(self.copy_length, self.alphabet_length) < MIN_COPY_LENGTH):
      raise ValueError(f"need copy_warmup, alphabet_warmup >= 0 and copy_length, "
                       f"alphabet_length >= {MIN_COPY_LENGTH}")
    if not self.copy_alphabets or any(k != 0 and not 2 <= k <= len(_POOL)
                                      for k in self.copy_alphabets):
      raise ValueError(f"copy_alphabets: sizes 0 (the whole pool) or 2..{len(_POOL)}, got "
                       f"{self.copy_alphabets}")
    shares = (self.copy_share, self.drill_share, self.lm_fraction)
    late = self._shares(self.drill_forms_from) + (self.lm_fraction,)
    for names, values in (("copy_share, drill_share", shares),
                          ("forms_copy_share, forms_drill_share", late)):
      if min(values) < 0.0 or sum(values) > 1.0:
        raise ValueError(f"{names} and lm_fraction must be >= 0 with a sum <= 1, got {values}")
    if not self.drill_forms or any(f not in DRILL_FORMS for f in self.drill_forms):
      raise ValueError(f"drill_forms: some of {DRILL_FORMS}, got {self.drill_forms}")
    if self.drill_haystack is not None and self.drill_haystack not in HAYSTACKS:
      raise ValueError(f"drill_haystack={self.drill_haystack!r}: expected one of {HAYSTACKS}")
    if not 0.0 <= self.digit_copy <= 1.0:
      raise ValueError(f"digit_copy is a share in [0, 1], got {self.digit_copy}")
    if self.questions < 1:
      raise ValueError(f"questions must be >= 1, got {self.questions}")
    if self.context_weight < 0.0:
      raise ValueError(f"context_weight must be >= 0, got {self.context_weight}")
    if not 0.0 <= self.question_in_context <= 1.0:
      raise ValueError(f"question_in_context is a share in [0, 1], got {self.question_in_context}")
    if not self.tasks and min(sum(shares), sum(late)) < 1.0:
      raise ValueError("with no tasks, copy_share + drill_share + lm_fraction (and the forms_ "
                       "shares in their place) must be 1")

  def _shares(self, index: int) -> tuple[float, float]:
    """(copy share, drill share) of suite example `index`."""
    if index < self.drill_forms_from:
      return self.copy_share, self.drill_share
    return (self.copy_share if self.forms_copy_share is None else self.forms_copy_share,
            self.drill_share if self.forms_drill_share is None else self.forms_drill_share)

  def example(self, tokenizer, split: str, index: int, root=None, limit=None) -> dict:
    rng = random.Random(ruler.split_seed(self.base.seed, split, "mix", index))
    if index < self.copy_warmup:
      return copy_example(rng, self.copy_length)
    index -= self.copy_warmup
    if index < self.alphabet_warmup:
      return copy_example(rng, self.alphabet_length, rng.choice(self.copy_alphabets))
    index -= self.alphabet_warmup
    top = self.max_length
    if self.length_ramp:
      top = round(self.min_length + min(1.0, index / self.length_ramp) *
                  (self.max_length - self.min_length))
    length = rng.randint(self.min_length, top)
    draw = rng.random()
    copy_share, drill_share = self._shares(index)
    if draw < copy_share:
      # drawn only when asked for, so recipes without it read the same examples as before
      if self.digit_copy and index >= self.digit_copy_from and rng.random() < self.digit_copy:
        return copy_example(rng, max(MIN_COPY_LENGTH, length), pool=DIGITS)
      return copy_example(rng, max(MIN_COPY_LENGTH, length), rng.choice(self.copy_alphabets))
    draw -= copy_share
    if draw < drill_share:
      hay = None if self.drill_haystack is None or index < self.drill_haystack_from else \
          ruler.open_haystack(
          self.drill_haystack, self.base.haystack_split or split, root, limit)
      # one form draws nothing, so recipes of one form read the same examples as before
      form = self.drill_forms[0]
      if len(self.drill_forms) > 1 and index >= self.drill_forms_from:
        form = rng.choice(self.drill_forms)
      return _fit_drill(tokenizer, rng, length, self.min_needles or 4, self.max_needles or 8,
                        hay, form)
    draw -= drill_share
    if draw < self.lm_fraction or not self.tasks:
      hay = ruler.open_haystack("stdlib", self.base.haystack_split or split, root, limit)
      start = hay.start(rng)
      text, _ = ruler.fit_lines(tokenizer, lambda h: "".join(hay.lines(start, h)), length,
                           length // 8)
      return {"task": "lm", "text": text, "prompt": text, "response": "", "answers": []}
    warm = index < self.task_warmup
    task = rng.choice(self.warmup_tasks if warm else self.tasks)
    needles = None
    if self.min_needles is not None and task.startswith("niah"):
      needles = rng.randint(self.min_needles, self.max_needles or self.min_needles)
      if task == "niah_multiquery":
        needles = max(needles, self.base.num_queries)
    config = dataclasses.replace(self.base, task=task, length=length, num_needles=needles)
    if warm and self.warmup_haystack is not None:
      # a memorisable filler (noise) costs almost no loss once learned, so the LM loss of a
      # warm-up context sits on its needles
      config = dataclasses.replace(config, haystack=self.warmup_haystack)
    if warm and self.warmup_repeats and needles:
      # as many copies as fit with room for the question (64 tokens) and some haystack
      per_line = ruler.count_tokens(tokenizer, ruler.niah_line(" " + KEY_WORDS[0],
                                                          " " + VALUE_NUMBERS[0]))
      fit = (length - 64) // (per_line * needles) - 1
      config = dataclasses.replace(config, needle_repeats=max(0, min(self.warmup_repeats, fit)))
    ex = ruler.generate_example(config, tokenizer, split, rng.randrange(1 << 62), root=root,
                                limit=limit)
    if self.questions > 1 and index >= self.questions_from and task in _MANY_QUESTIONS:
      ex = _more_questions(ex, config, tokenizer, rng, self.questions - 1,
                           max_tokens=self.max_length + QUESTION_ROOM)
    # Drawn only when asked for, so recipes without it read the same examples as before.
    if self.question_in_context and rng.random() < self.question_in_context:
      # pieces are cut at the question's newline, so BOS + prompt is the text's first tokens
      ex = {**ex, "context_tokens": ruler.count_tokens(tokenizer, ex["prompt"])}
    return ex if self.context_weight == 1.0 else {**ex, "prompt_weight": self.context_weight}


_MANY_QUESTIONS = ("niah_multikey", "niah_multiquery")


def _more_questions(ex, config, tokenizer, rng, extra, max_tokens) -> dict:
  """`ex` with up to `extra` more question/answer pairs about other needles of its context,
  as pieces whose answers are targets, as many as fit in `max_tokens`. A context then
  teaches several lookups where one question teaches one."""
  keys, values, n = ex["needle_keys"], ex["needle_values"], len(ex["needle_keys"])
  if config.task == "niah_multikey":
    asks = [[a] for a in rng.sample([i for i in range(n) if i != ex["asked"][0]],
                                    min(extra, n - 1))]
  else:
    asks = [rng.sample(range(n), config.num_queries) for _ in range(extra)]
  pieces = [(ex["prompt"], False), (ex["response"], True)]
  size = ruler.count_tokens(tokenizer, ex["prompt"] + ex["response"])
  for ask in asks:
    question, answers, joins = ruler.key_question(config.task, keys, values, ask)
    more = [("\n" + question, False), (ruler.join_answer(answers, joins), True)]
    # pieces are cut at spaces and newlines, so their token counts add up
    size += sum(len(tokenizer.encode(t, add_bos=False)) for t, _ in more)
    if size > max_tokens:
      break
    pieces += more
  text = "".join(t for t, _ in pieces)
  return {**ex, "text": text, "pieces": pieces}


def _fit_drill(tokenizer, rng, length, lo, hi, hay=None, form="multikey") -> dict:
  """A drill trimmed to whole lines within `length` tokens (BOS included)."""
  needles = rng.randint(lo, hi)
  ex = drill_example(rng, length, needles, hay, form=form)
  lines, order, fillers, probes = ex["lines"], ex["order"], ex["fillers"], ex["probes"]
  text = lambda j, i: lines[i] if j < len(lines) else probes[i]
  size = lambda k: ruler.count_tokens(tokenizer, "".join(
      f + text(j, i) for j, (f, i) in enumerate(zip(fillers[:k], order[:k]))))
  # the most lines that fit, at most a guess from the first line's size (no haystack: the
  # lines are alike) or all of them (bisection; the size grows with the lines kept)
  per_line = max(1, ruler.count_tokens(tokenizer, lines[0]) - 1)
  guess = len(order) if hay is not None else min(len(order), (length - 1) // per_line)
  lo_keep, hi_keep = needles + 1, max(needles + 1, guess)
  while lo_keep < hi_keep:
    mid = (lo_keep + hi_keep + 1) // 2
    lo_keep, hi_keep = (mid, hi_keep) if size(mid) <= length else (lo_keep, mid - 1)
  ex = _drill(lines, ex["values"], order[:lo_keep], fillers[:lo_keep], probes)
  return {**ex, "length": ruler.count_tokens(tokenizer, ex["text"])}


class RulerSource(IndexedSource):
  """Random-access source of `size` examples of one split (like tfds.data_source)."""

  def __init__(self, mix: RulerMix, tokenizer, split: str = "train", size: int = 1_000_000,
               root: str | None = None, limit: int | None = None):
    super().__init__(size)
    self.mix, self.tokenizer, self.split = mix, tokenizer, split
    self.root, self.limit = root, limit

  def example_at(self, i: int) -> dict:
    ex = self.mix.example(self.tokenizer, self.split, i, self.root, self.limit)
    return {k: ex[k] for k in ("task", "text", "prompt", "response", "prompt_weight",
                                 "eos_weight", "pieces", "context_tokens") if k in ex}

  def __repr__(self) -> str:
    return f"RulerSource({self.mix}, split={self.split!r}, size={self.size})"


SIZES = {"train": 1_000_000, "validation": 2_000, "test": 2_000}
_MIX_FIELDS = {f.name: f for f in dataclasses.fields(RulerMix)}
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(RulerConfig)}


def _typed(key: str, value: str, kind):
  kind = str(kind)
  try:
    if "float" in kind:
      return None if value.lower() == "none" else float(value)
    if "int" in kind:
      return None if value.lower() == "none" else int(value)
  except ValueError:
    raise ValueError(f"ruler option {key} needs a number, got {value!r}") from None
  return value


def parse_spec(spec: str) -> tuple[RulerMix, str, int | None]:
  """`ruler:tasks=niah_multikey+vt,min_length=128,max_length=1024,copy_warmup=57600,...`
  -> (RulerMix, tokenizer spec, size or None). Keys: RulerMix fields (tasks joined by '+'),
  RulerConfig fields (but task/length), `tokenizer` (default stdlib_bpe:2048) and `size`."""
  options = spec.split(":", 1)[1] if ":" in spec else ""
  mix, base = {}, {}
  tokenizer, size = "stdlib_bpe:2048", None
  for item in filter(None, (s.strip() for s in options.split(","))):
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep:
      raise ValueError(f"bad ruler option {item!r}: use key=value")
    if key == "tokenizer":
      tokenizer = value
    elif key == "size":
      size = int(value)
    elif key in ("tasks", "warmup_tasks", "drill_forms"):
      mix[key] = tuple(t for t in value.split("+") if t)
    elif key == "copy_alphabets":
      mix[key] = tuple(_typed(key, t, int) for t in value.split("+") if t)
    elif key in _MIX_FIELDS and key != "base":
      mix[key] = _typed(key, value, _MIX_FIELDS[key].type)
    elif key in _CONFIG_FIELDS and key not in ("task", "length"):
      base[key] = _typed(key, value, _CONFIG_FIELDS[key].type)
    else:
      raise ValueError(f"unknown ruler option {key!r}: use {sorted(set(_MIX_FIELDS) - {'base'})}"
                       f", {sorted(set(_CONFIG_FIELDS) - {'task', 'length'})}, tokenizer, size")
  return RulerMix(base=RulerConfig(**base), **mix), tokenizer, size


def open_spec(spec: str, split: str):
  """`open_source("ruler:...")`, and `open_source("stdlib")` (whole files of a split)."""
  name = spec.split(":", 1)[0].strip()
  if name == "stdlib":
    from ag_jax.data.stdlib import StdlibSource  # pylint: disable=g-import-not-at-top
    return StdlibSource(split)
  from ag_jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  mix, tok_spec, size = parse_spec(spec)
  return RulerSource(mix, load_tokenizer(tok_spec), split,
                     size or SIZES.get(split, SIZES["validation"]))
