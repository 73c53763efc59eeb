"""The RULER-style suite: deterministic, answers right by construction, no elimination."""

import dataclasses
import re

import pytest

from ag_jax import load_tokenizer
from ag_jax.data import DataError, open_source, ruler


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("stdlib_bpe:2048")


def _ex(tok, task, length=512, index=0, split="test", ask=None, **kw):
  return ruler.generate_example(ruler.RulerConfig(task=task, length=length, **kw), tok, split,
                                index, ask=ask)


@pytest.mark.parametrize("task", ruler.TASKS)
@pytest.mark.parametrize("length", [256, 1024])
def test_lengths_tokens_and_determinism(tok, task, length):
  for i in range(3):
    ex = ruler.generate_example(ruler.RulerConfig(task=task, length=length), tok, "test", i)
    again = ruler.generate_example(ruler.RulerConfig(task=task, length=length), tok, "test", i)
    assert ex == again
    context = tok.encode(ex["context"], add_bos=True)
    assert len(context) == ex["length"] and length - 80 < ex["length"] <= length
    parts = (context + tok.encode(ex["question"], add_bos=False)
             + tok.encode(ex["answer"], add_bos=False))
    assert parts == tok.encode(ex["text"], add_bos=True)  # pieces tokenize as the whole
    assert ex["question"].startswith("# Question:") and ex["text"].endswith(ex["answer"])
    assert ex["answers"] and all(a.startswith(" ") for a in ex["answers"])
    assert all(len(tok.encode(a, add_bos=False)) == 1 for a in ex["answers"])


def _facts(context):
  return re.findall(r"# One of the magic numbers for ([a-z ]+) is ([0-9 ]+)\.\n", context)


def test_niah_answers_are_right_by_construction(tok):
  for i in range(10):
    ex = _ex(tok, "niah_multikey", index=i)
    facts = dict(_facts(ex["context"]))
    key = re.search(r"number for ([a-z ]+)\?", ex["question"]).group(1)
    assert len(facts) == 4 and ex["answers"] == [" " + facts[key]]
    ex = _ex(tok, "niah_multivalue", index=i)
    numbered = re.findall(r"# For ([a-z ]+), magic number ([0-9]) is ([0-9 ]+)\.\n",
                          ex["context"])
    assert len({k for k, _, _ in numbered}) == 1 and len(numbered) == 4
    assert [n for _, n, _ in numbered] == ["1", "2", "3", "4"]  # in order of appearance
    assert [" " + v for _, _, v in numbered] == ex["answers"]
    ex = _ex(tok, "niah_multiquery", index=i)
    facts = dict(_facts(ex["context"]))
    keys = re.search(r"numbers for (.*)\?", ex["question"]).group(1).split(", ")
    assert [" " + facts[k.strip()] for k in keys] == ex["answers"]


@pytest.mark.parametrize("task", ruler.RETRIEVAL_TASKS)
def test_each_item_is_led_by_the_lookup_it_answers(tok, task):
  """The question and joins restate each item's lookup: the text before an item ends with
  the same tokens as the context's line before that item's value (the lookup a copy makes);
  items are never given away by the text the scorer teacher-forces."""
  from ag_jax.evaluation.ruler_eval import encode_example
  for i in range(5):
    ex = _ex(tok, task, index=i)
    leads = [ex["question"]] + ex["joins"]
    assert len(leads) == len(ex["answers"]) and ex["answer"] == ruler.join_answer(
        ex["answers"], ex["joins"])
    # the scorer's continuation is the question and answer text, items where it says
    context, cont, spans = encode_example(tok, ex)
    assert context + cont == tok.encode(ex["text"], add_bos=True)
    assert [tok.decode(cont[a:b]) for a, b in spans] == ex["answers"]
    for lead, item in zip(leads, ex["answers"]):
      assert item not in lead
      if task == "vt":  # "the variables assigned X are" -> the name in "VAR name = X."
        source = lead.rsplit("assigned", 1)[1].removesuffix(" are").removeprefix(" the value")
        assert f"# VAR{item} ={source}.\n" in ex["context"]
      else:  # "...for KEY is" / "magic number j is" -> the value after it in the context
        tail = " ".join(lead.split()[-3:])
        assert f"{tail}{item}." in ex["context"]


def test_multikey_is_not_decidable_from_the_context(tok):
  config = ruler.RulerConfig(task="niah_multikey", length=512)
  a = ruler.generate_example(config, tok, "test", 5, ask=0)
  b = ruler.generate_example(config, tok, "test", 5, ask=1)
  assert a["context"] == b["context"] and a["question"] != b["question"]
  assert a["answers"] != b["answers"]
  # the asked key is uniform over the needles
  asked = [ruler.generate_example(config, tok, "test", i)["asked"][0] for i in range(200)]
  assert set(asked) == {0, 1, 2, 3} and max(asked.count(j) for j in range(4)) < 80


def test_vt_chain_and_cwe_counts(tok):
  ex = _ex(tok, "vt", num_chains=2)
  assigned = dict(re.findall(r"# VAR ([a-z ]+) = ([a-z0-9 ]+)\.\n", ex["context"]))
  value = re.search(r"value ([0-9 ]+)\?", ex["question"]).group(1)
  holds = [n for n, v in assigned.items() if v == value]
  for _ in range(10):
    holds += [n for n, v in assigned.items() if v in holds and n not in holds]
  assert [" " + n for n in holds] == ex["answers"] and len(assigned) == 10
  ex = _ex(tok, "cwe", length=1024)
  words = " ".join(line[1:] for line in ex["context"].splitlines()[1:]).split()
  counts = {w: words.count(w) for w in set(words)}
  top = sorted(counts, key=counts.get, reverse=True)[:5]
  assert sorted(a.strip() for a in ex["answers"]) == sorted(top)
  assert min(counts[w] for w in top) > max(c for w, c in counts.items() if w not in top)


def test_depth_knob_splits_and_noise(tok):
  early = _ex(tok, "niah_multikey", depth=0.0, ask=None)
  key = early["question"].split("number for")[1].split("?")[0]
  assert early["context"].index(f"for{key} is") < 200
  train = _ex(tok, "niah_multikey", split="train")
  assert train["context"] != _ex(tok, "niah_multikey", split="test")["context"]
  noise = _ex(tok, "niah_multikey", haystack="noise")
  assert "The grass is green." in noise["context"]
  assert len(_ex(tok, "niah_multikey", num_needles=8)["needle_values"]) == 8
  two = _ex(tok, "niah_multikey", key_len=2, value_len=2)
  assert len(tok.encode(two["answer"], add_bos=False)) == 2


def test_source_spec(tok):
  source = open_source("ruler:tasks=niah_multikey+vt,min_length=128,max_length=256,"
                       "lm_fraction=0.5,length_ramp=100,size=50", "train")
  assert len(source) == 50
  rows = [source[i] for i in range(20)]
  assert {r["task"] for r in rows} <= {"lm", "niah_multikey", "vt"} and len(
      {r["task"] for r in rows}) == 3
  assert all(len(tok.encode(r["text"])) <= 256 + 40 for r in rows)
  assert rows == [source[i] for i in range(20)]
  with pytest.raises(DataError, match="unknown ruler option"):
    open_source("ruler:colour=red", "train")
  with pytest.raises(DataError):
    open_source("ruler:tasks=nope", "train")


def test_score_items():
  assert ruler.score_items(" 41, 17", [" 41", " 17"]) == 1.0
  assert ruler.score_items(" 41", [" 41", " 17"]) == 0.5
