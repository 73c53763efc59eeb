"""The recall corpus: deterministic, correct by construction, disjoint splits, and each
distractor kind producing what it says."""

import re

import pytest

from ag_jax.data import recall
from ag_jax.data.recall import RecallConfig, RecallSource, generate_example, parse_document
from ag_jax.data.sources import DataError, open_source

CONFIGS = [RecallConfig(distractor=d, query_position=q, num_facts=f, num_queries=n)
           for d in recall.DISTRACTORS for q in recall.QUERY_POSITIONS
           for f, n in ((4, 2), (6, 6))]


def _structural_spans(text):
  return [m.span() for m in re.finditer(r"[#?][a-z]+=[0-9]+;", text)]


def _distractor_units(text):
  """Everything but facts and queries, split into space-separated units, per gap."""
  gaps, start = [], 0
  for a, b in _structural_spans(text) + [(len(text), len(text))]:
    gaps.append(text[start:a].split())
    start = b
  return gaps


def test_deterministic_and_random_access():
  source = RecallSource(RecallConfig(), "train", size=50)
  again = RecallSource(RecallConfig(), "train", size=50)
  assert [source[i] for i in (3, 7, 3)] == [again[3], again[7], again[3]]
  assert source[-1] == source[49] == generate_example(RecallConfig(), "train", 49)
  assert source[0] != source[1]
  assert RecallSource(RecallConfig(seed=1), "train", 50)[0] != source[0]
  with pytest.raises(IndexError):
    source[50]
  with pytest.raises(IndexError):
    source[-51]
  assert source.__getitems__([7, -1]) == [source[7], source[49]]
  assert len(list(source)) == 50 == len(source)
  with pytest.raises(ValueError, match="size must be >= 1"):
    RecallSource(RecallConfig(), "train", size=0)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_answers_correct_by_construction(config):
  for i in range(40):
    ex = generate_example(config, "train", i)
    text = ex["text"]
    assert text.isascii() and text == ex["prompt"] + ex["answer"] + ";"
    assert ex["response"] == ex["answer"]
    facts, queries = parse_document(text)  # raises on a key stated twice
    assert list(facts) == ex["facts"]["keys"] and list(facts.values()) == ex["facts"]["values"]
    assert len(queries) == config.num_queries
    assert len({k for k, _ in queries}) == len(queries)
    for key, inline_answer in queries:
      assert inline_answer == facts[key]
      assert text.index(f"?{key}=") > text.index(f"#{key}=")  # asked after it is stated
    last_key = queries[-1][0]
    assert ex["prompt"].endswith(f"?{last_key}=") and facts[last_key] == ex["answer"]
    for key, value, off in zip(*ex["facts"].values()):
      assert text.startswith(f"#{key}={value};", off)
    for key, off in zip(*ex["queries"].values()):
      assert text.startswith(f"?{key}={facts[key]};", off)
    for off in ex["near_misses"]["offsets"]:
      assert recall.NEAR_MISS_RE.match(text, off)
    assert config.doc_len - 30 <= len(text) <= config.doc_len


def test_query_positions():
  for i in range(30):
    ex = generate_example(RecallConfig(query_position="end", num_queries=3), "train", i)
    assert min(ex["queries"]["offsets"]) > max(ex["facts"]["offsets"])
  mid = 0
  for i in range(30):
    ex = generate_example(RecallConfig(query_position="interleaved", num_queries=3), "train", i)
    last_fact = max(ex["facts"]["offsets"])
    mid += sum(off < last_fact for off in ex["queries"]["offsets"])
    # The prompt's query is always last, after every fact.
    assert ex["queries"]["offsets"][-1] > last_fact
  assert mid > 10


def test_splits_never_share_documents():
  texts = {split: [generate_example(RecallConfig(), split, i)["text"] for i in range(300)]
           for split in ("train", "validation", "test")}
  seen = set()
  for split_texts in texts.values():
    assert len(set(split_texts)) == len(split_texts)
    assert not seen & set(split_texts)
    seen |= set(split_texts)


def test_random_distractors_are_words():
  for i in range(20):
    text = generate_example(RecallConfig(distractor="random"), "train", i)["text"]
    units = [u for gap in _distractor_units(text) for u in gap]
    assert units and all(re.fullmatch(r"[a-z]{2,6}", u) for u in units)


def test_repeated_distractors_repeat_one_phrase_per_gap():
  phrases = [p.split() for p in recall.PHRASES]
  for i in range(20):
    text = generate_example(RecallConfig(distractor="repeated"), "train", i)["text"]
    repeats = 0
    for gap in filter(None, _distractor_units(text)):
      assert any(gap == [p[j % len(p)] for j in range(len(gap))] for p in phrases), gap
      repeats += len(gap) > min(map(len, phrases))
    assert repeats > 0


def test_near_miss_distractors_look_like_facts_but_are_not():
  for i in range(20):
    ex = generate_example(RecallConfig(distractor="near_miss"), "train", i)
    facts = dict(zip(ex["facts"]["keys"], ex["facts"]["values"]))
    units = [u for gap in _distractor_units(ex["text"]) for u in gap]
    assert len(units) == len(ex["near_misses"]["offsets"]) > 5
    for unit in units:
      m = recall.NEAR_MISS_RE.fullmatch(unit)
      assert m and unit[0] in recall.NEAR_MISS_MARKERS and not recall.FACT_RE.search(unit)
      key, value = m.groups()
      if key in facts:  # a real key behind a wrong marker, with a wrong value
        assert value != facts[key]
      else:  # or a key one letter off a real key
        assert min(sum(a != b for a, b in zip(key, k)) for k in facts) == 1
    assert parse_document(ex["text"])[0] == facts  # near misses never parse as facts


def test_mixed_uses_every_kind():
  words = set(" ".join(recall.PHRASES).split())
  kinds = set()
  for i in range(30):
    for gap in _distractor_units(generate_example(RecallConfig(), "train", i)["text"]):
      if len(gap) < 4:
        continue  # too short to tell the kinds apart
      if all(recall.NEAR_MISS_RE.fullmatch(u) for u in gap):
        kinds.add("near_miss")
      elif all(u in words for u in gap):
        kinds.add("repeated")
      elif all(re.fullmatch(r"[a-z]{2,6}", u) for u in gap):
        kinds.add("random")
  assert kinds == {"random", "repeated", "near_miss"}


def test_score_answer():
  assert recall.score_answer("123;", "123") and recall.score_answer("123", "123")
  assert not recall.score_answer("12", "123") and not recall.score_answer(" 123", "123")
  assert not recall.score_answer("124", "123") and not recall.score_answer("", "")


def test_config_validation_and_open_source_spec():
  with pytest.raises(ValueError):
    RecallConfig(distractor="noise")
  with pytest.raises(ValueError):
    RecallConfig(num_facts=2, num_queries=3)
  source = open_source("recall:num_facts=6, distractor=near_miss,size=7", "validation")
  assert len(source) == 7 and source.config.num_facts == 6
  assert source.config.distractor == "near_miss" and source.split == "validation"
  assert len(open_source("recall", "train")) == 1_000_000
  for bad in ("recall:colour=red", "recall:num_facts", "recall:num_facts=x",
              "recall:distractor=noise"):
    with pytest.raises(DataError):
      open_source(bad, "train")


def test_min_doc_len_and_length_ramp_grow_documents_with_the_index():
  cfg = RecallConfig(doc_len=400, min_doc_len=60, length_ramp=1000, key_len=1, value_len=1,
                     num_facts=2, num_queries=1, distractor="random")
  early = [len(generate_example(cfg, "train", i)["text"]) for i in range(20)]
  late = [len(generate_example(cfg, "train", i)["text"]) for i in range(2000, 2040)]
  assert max(early) < 120          # the ramp has barely opened: lengths near min_doc_len
  assert max(late) > 300 and min(late) >= 50
  with pytest.raises(ValueError, match="length_ramp needs min_doc_len"):
    RecallConfig(length_ramp=10)
