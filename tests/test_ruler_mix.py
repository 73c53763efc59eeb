"""The RULER training mix as configs/train/ruler_base.yaml uses it: the length ramp really
orders documents short-first through the data iterator, and every document of the longest
trained length fits in one packed row (a document cut into chunks would lose its needles)."""

import os

import numpy as np
import pytest

from ag_jax.data import ruler, ruler_mix

RECIPE = os.path.join(os.path.dirname(__file__), "..", "configs", "train", "ruler_base.yaml")


@pytest.fixture(scope="module")
def recipe():
  from ag_jax.train_config import load_train_config
  return load_train_config(RECIPE)


@pytest.fixture(scope="module")
def tok():
  from ag_jax.tokenizer import load_tokenizer
  return load_tokenizer("stdlib_bpe:2048")


def test_recipe_mix_parses_to_retrieval_tasks_over_a_ramp(recipe):
  mix, tok_spec, size = ruler_mix.parse_spec(recipe.data.source)
  assert set(ruler.RETRIEVAL_TASKS) <= set(mix.tasks)
  assert mix.max_length >= 512 and mix.min_length < 256 and mix.length_ramp > 0
  assert tok_spec == recipe.data.tokenizer == "stdlib_bpe:2048"
  assert recipe.model.overrides["vocab_size"] >= 2048
  # evaluation at 2x the longest trained length (plus question and answer) needs positions
  assert recipe.model.overrides["max_position"] >= 2 * mix.max_length + 64


def test_gate_recipe_reads_the_suite_its_base_was_trained_on(recipe):
  from ag_jax.train_config import load_train_config
  gates = load_train_config(RECIPE.replace("ruler_base", "ruler_gates"))
  mix, tok_spec, _ = ruler_mix.parse_spec(gates.data.source)
  base_mix, _, _ = ruler_mix.parse_spec(recipe.data.source)
  assert gates.run.trainable == "gates" and gates.gate is not None
  assert gates.model.hf_path == recipe.run.out_dir + "/model"
  assert tok_spec == gates.data.tokenizer == recipe.data.tokenizer
  assert set(mix.tasks) == set(base_mix.tasks) and mix.copy_warmup == mix.copy_share == 0
  assert gates.data.seq_len >= mix.max_length + ruler_mix.QUESTION_ROOM + 1 and not gates.data.shuffle


def test_ramp_bounds_each_example_length(tok):
  mix = ruler_mix.RulerMix(min_length=128, max_length=512, length_ramp=40)
  for i in (0, 1, 10, 20, 39, 40, 80):
    ex = mix.example(tok, "train", i)
    top = 128 + min(1.0, i / 40) * (512 - 128)
    assert ex["length"] <= round(top), (i, ex["length"], top)
    assert ex["length"] == len(tok.encode(ex["context"], add_bos=True))
  lengths = [mix.example(tok, "train", i)["length"] for i in range(40, 70)]
  assert max(lengths) > 300  # past the ramp, long contexts appear


def test_the_iterator_reads_short_documents_first_without_shuffle(recipe, tok):
  """The ramp runs over source indices: only an unshuffled iterator visits them in order
  (a shuffled one draws from all `size` indices, past the ramp, from the first step)."""
  from ag_jax.data import DataIterator, open_source
  assert recipe.data.shuffle is False
  mix, _, _ = ruler_mix.parse_spec(recipe.data.source)
  source = open_source(recipe.data.source, "train")
  it = DataIterator(source, tok, recipe.data.seq_len, 2, seed=recipe.data.seed,
                    shuffle=recipe.data.shuffle)
  batch = next(it)
  seg = batch["segment_ids"]
  doc_lengths = [int((row == s).sum()) for row in seg for s in np.unique(row) if s]
  assert len(doc_lengths) >= 4  # several short documents packed per row
  assert max(doc_lengths) <= mix.min_length + 80  # context + question + answer + eos
  shuffled = DataIterator(source, tok, recipe.data.seq_len, 2, seed=0, shuffle=True)
  seg = next(shuffled)["segment_ids"]
  assert max(int((row == s).sum()) for row in seg for s in np.unique(row) if s) > \
      mix.min_length + 80


@pytest.mark.parametrize("task", ruler.RETRIEVAL_TASKS)
def test_longest_documents_fit_one_row(recipe, tok, task):
  mix, _, _ = ruler_mix.parse_spec(recipe.data.source)
  needles = mix.max_needles if task.startswith("niah") else None
  config = ruler.RulerConfig(task=task, length=mix.max_length, num_needles=needles)
  for i in range(2):
    ex = ruler.generate_example(config, tok, "train", i)
    ids = tok.encode(ex["text"], add_bos=True, add_eos=True)
    assert ex["length"] <= mix.max_length < len(ids) <= recipe.data.seq_len


def test_task_warmup_draws_only_warmup_tasks_first(tok):
  spec = ("ruler:tasks=niah_multikey+vt,warmup_tasks=niah_multikey,task_warmup=20,"
          "min_length=96,max_length=128")
  mix, _, _ = ruler_mix.parse_spec(spec)
  assert mix.warmup_tasks == ("niah_multikey",) and mix.task_warmup == 20
  assert {mix.example(tok, "train", i)["task"] for i in range(20)} == {"niah_multikey"}
  # past the warm-up the examples are exactly those of the mix without one
  plain = ruler_mix.RulerMix(tasks=mix.tasks, min_length=96, max_length=128)
  for i in range(20, 30):
    assert mix.example(tok, "train", i)["text"] == plain.example(tok, "train", i)["text"]
  assert "vt" in {mix.example(tok, "train", i)["task"] for i in range(20, 40)}
  with pytest.raises(ValueError, match="warmup_tasks"):
    ruler_mix.RulerMix(task_warmup=5)


def test_needle_repeats_copy_each_needle_line(tok):
  base = ruler.RulerConfig(task="niah_multikey", length=256, num_needles=3)
  plain = ruler.generate_example(base, tok, "train", 5)
  ex = ruler.generate_example(ruler.dataclasses.replace(base, needle_repeats=2), tok, "train", 5)
  assert ex["answers"] == plain["answers"] and ex["question"] == plain["question"]
  for key, value in zip(ex["needle_keys"], ex["needle_values"]):
    assert ex["context"].count(ruler.niah_line(key, value)) == 3
  assert ex["length"] <= 256


def test_warmup_repeats_only_in_the_warmup_and_always_fit(tok):
  mix = ruler_mix.RulerMix(tasks=("niah_multikey", "niah_multiquery", "vt"), min_length=112,
                       max_length=256, min_needles=2, max_needles=5,
                       warmup_tasks=("niah_multikey", "niah_multiquery"), task_warmup=30,
                       warmup_repeats=3)
  repeated = 0
  for i in range(40):
    ex = mix.example(tok, "train", i)  # never "the needles alone exceed": copies shrink
    lines = [ruler.niah_line(k, v) for k, v in zip(ex.get("needle_keys", []),
                                                   ex.get("needle_values", []))]
    copies = max((ex["context"].count(line) for line in lines), default=0)  # vt: 0
    assert copies <= 1 or i < 30
    repeated += copies > 1
  assert repeated > 5


def test_warmup_haystack_only_in_the_warmup(tok):
  mix, _, _ = ruler_mix.parse_spec("ruler:tasks=niah_multikey+vt,warmup_tasks=niah_multikey,"
                               "task_warmup=5,warmup_haystack=noise,min_length=128,max_length=160")
  assert all(ruler.NOISE in mix.example(tok, "train", i)["context"] for i in range(5))
  assert not any(ruler.NOISE in mix.example(tok, "train", i)["context"] for i in range(5, 10))
  with pytest.raises(ValueError, match="warmup_haystack"):
    ruler_mix.RulerMix(warmup_haystack="nope")


def test_copy_rows_repeat_a_span_at_random_offsets(tok):
  rng = ruler_mix.random.Random(3)
  starts = set()
  for _ in range(20):
    ex = ruler_mix.copy_example(rng, 49)
    ids = tok.encode(ex["text"], add_bos=True)
    assert len(ids) == ex["length"] <= 49  # every pool piece is one token
    prompt = tok.encode(ex["prompt"], add_bos=True)
    response = tok.encode(ex["response"], add_bos=False)
    assert prompt + response == ids  # the SFT split tokenizes like the whole text
    span = len(response) + 1
    x = ids[-span:]
    hits = [i for i in range(1, len(ids) - 2 * span + 1) if ids[i:i + span] == x]
    assert hits, "the copied span occurs earlier in the row"
    starts.add(hits[0])
  assert len(starts) > 5  # offsets vary: no positional rule predicts the copy
  small = ruler_mix.copy_example(rng, 97, alphabet=4)
  assert len(set(small["text"].split())) <= 4
  with pytest.raises(ValueError, match="copy rows need length"):
    ruler_mix.copy_example(rng, 10)


def test_copy_warmup_comes_first_then_the_mix_without_it(tok):
  mix, _, _ = ruler_mix.parse_spec("ruler:tasks=niah_multikey,copy_warmup=6,copy_length=40,"
                                   "min_length=96,max_length=128")
  assert {mix.example(tok, "train", i)["task"] for i in range(6)} == {"copy"}
  assert all(len(tok.encode(mix.example(tok, "train", i)["text"], add_bos=True)) <= 40
             for i in range(6))
  plain = ruler_mix.RulerMix(tasks=mix.tasks, min_length=96, max_length=128)
  for i in range(6, 10):  # each index keeps its own seed
    assert mix.example(tok, "train", i)["text"] == plain.example(tok, "train", i)["text"]
  # the length ramp counts from the copy warm-up's end
  ramped = ruler_mix.RulerMix(tasks=mix.tasks, min_length=96, max_length=512, length_ramp=100,
                              copy_warmup=50)
  assert all(ramped.example(tok, "train", i)["length"] <= 100 for i in range(50, 52))


def test_alphabet_warmup_follows_the_copy_warmup(tok):
  mix, _, _ = ruler_mix.parse_spec("ruler:tasks=niah_multikey,copy_warmup=3,alphabet_warmup=4,"
                                   "alphabet_length=60,copy_alphabets=4,min_length=96,"
                                   "max_length=128")
  rows = [mix.example(tok, "train", i) for i in range(7)]
  assert [r["task"] for r in rows] == ["copy"] * 7
  assert all(len(set(r["text"].split())) > 4 for r in rows[:3])  # the whole pool
  for r in rows[3:]:  # small alphabets, the stage's length
    assert len(set(r["text"].split())) <= 4
    assert len(tok.encode(r["text"], add_bos=True)) <= 60
  plain = ruler_mix.RulerMix(tasks=mix.tasks, min_length=96, max_length=128)
  assert mix.example(tok, "train", 7)["text"] == plain.example(tok, "train", 7)["text"]
  with pytest.raises(ValueError, match="alphabet_length"):
    ruler_mix.RulerMix(alphabet_length=10)


def test_shares_mix_copies_and_drills_into_the_suite(tok):
  mix = ruler_mix.RulerMix(tasks=("niah_multikey",), min_length=96, max_length=160,
                           copy_share=0.3, drill_share=0.3, min_needles=2, max_needles=4)
  tasks = [mix.example(tok, "train", i)["task"] for i in range(60)]
  assert {"copy", "drill", "niah_multikey"} == set(tasks)
  for i in range(60):
    ex = mix.example(tok, "train", i)
    if ex["task"] == "drill":
      lines = ex["text"].splitlines(keepends=True)
      assert len(tok.encode(ex["text"], add_bos=True)) <= 160
      taught = set(ex["lines"])
      assert len(taught) >= 2 and set(lines) <= taught and len(lines) > len(taught)
      # the repeated lines' values, and nothing else, are targets
      targets = [t for t, is_target in ex["pieces"] if is_target]
      assert "".join(t for t, _ in ex["pieces"]) == ex["text"]
      assert len(targets) == len(lines) - len(taught)
      assert all(t.strip() in ex["values"] for t in targets)
  mix, _, _ = ruler_mix.parse_spec("ruler:copy_share=1,copy_alphabets=0+4")
  assert mix.copy_alphabets == (0, 4)
  with pytest.raises(ValueError, match="copy_alphabets"):
    ruler_mix.RulerMix(copy_alphabets=(1,))
  with pytest.raises(ValueError, match="sum <= 1"):
    ruler_mix.RulerMix(copy_share=0.7, drill_share=0.5)
  light = ruler_mix.RulerMix(tasks=("niah_multikey",), min_length=96, max_length=160,
                             context_weight=0.25)
  ex = light.example(tok, "train", 0)
  plain = ruler_mix.RulerMix(tasks=("niah_multikey",), min_length=96, max_length=160)
  assert ex["prompt_weight"] == 0.25 and "prompt_weight" not in plain.example(tok, "train", 0)


def test_drills_over_a_haystack_keep_their_targets(tok):
  from ag_jax.data.packing import tokenize_weighted
  mix = ruler_mix.RulerMix(tasks=("niah_multikey",), min_length=200, max_length=400,
                           drill_share=1.0, drill_haystack="stdlib", drill_haystack_from=5,
                           min_needles=2, max_needles=4)
  for i in range(5, 9):
    ex = mix.example(tok, "train", i)
    lines = ex["text"].splitlines(keepends=True)
    code = [line for line in lines if line not in ex["lines"]]
    assert code and len(lines) > len(code)  # code between the needle lines
    ids, _, weights = tokenize_weighted(ex, tok, response_weight=5.0)
    assert list(ids) == tok.encode(ex["text"], add_bos=True, add_eos=True)  # cut at spaces
    assert len(ids) <= 401
    values = [tok.decode([t]).strip() for t in ids[weights == 5.0]]
    assert values and set(values) <= set(ex["values"])  # only the looked-up values weigh 5
  before = mix.example(tok, "train", 4)["text"].splitlines(keepends=True)
  assert all(line.startswith("# One of the magic numbers") for line in before)


def test_more_questions_ask_other_needles_of_one_context(tok):
  from ag_jax.data.packing import tokenize_weighted
  mix = ruler_mix.RulerMix(tasks=("niah_multikey",), min_length=256, max_length=400,
                           questions=3, questions_from=2, min_needles=3, max_needles=5)
  plain = ruler_mix.RulerMix(tasks=("niah_multikey",), min_length=256, max_length=400,
                             min_needles=3, max_needles=5)
  assert mix.example(tok, "train", 1)["text"] == plain.example(tok, "train", 1)["text"]
  for i in range(2, 6):
    ex, one = mix.example(tok, "train", i), plain.example(tok, "train", i)
    assert ex["text"].startswith(one["prompt"] + one["response"])  # the same first question
    asked = [line.split("for ")[1].rstrip("?") for line in ex["text"].splitlines()
             if line.startswith("# Question")]
    assert len(asked) == len(set(asked)) == 3  # other needles of the same context
    answers = dict(zip(ex["needle_keys"], ex["needle_values"]))
    ids, _, weights = tokenize_weighted(ex, tok, response_weight=5.0)
    assert list(ids) == tok.encode(ex["text"], add_bos=True, add_eos=True)
    targets = [tok.decode([t]) for t in ids[weights == 5.0][:-1]]  # the EOS last
    assert targets == [answers[" " + k] for k in asked]
    assert len(ids) <= 400 + ruler_mix.QUESTION_ROOM + 1  # max_length + the room + EOS
  with pytest.raises(ValueError, match="questions"):
    ruler_mix.RulerMix(questions=0)


def test_copy_rows_train_only_the_copied_span(tok):
  """Through the source and the packer: the filler and the EOS of a copy row weigh 0, the
  copied span (after its first token) the response weight."""
  from ag_jax.data.packing import tokenize_weighted
  source = ruler_mix.RulerSource(ruler_mix.RulerMix(copy_warmup=4), tok, "train", size=8)
  ex = source[0]
  ids, _, weights = tokenize_weighted(ex, tok, response_weight=5.0)
  span = len(tok.encode(ex["response"], add_bos=False))
  np.testing.assert_array_equal(weights[-span - 1:-1], 5.0)
  assert weights[-1] == 0.0 and not weights[:-span - 1].any()


@pytest.mark.parametrize("form", ruler_mix.DRILL_FORMS)
def test_drill_forms_probe_the_suites_lookups(tok, form):
  """Each drill form's targets follow from its lines by the suite's lookup: the value after
  the same line start (multikey, multivalue), or the name whose line reads '= source' (vt,
  the join's backward lookup)."""
  import re
  from ag_jax.data.packing import tokenize_weighted
  mix = ruler_mix.RulerMix(tasks=("niah_multikey",), min_length=200, max_length=300,
                           drill_share=1.0, drill_forms=(form,), drill_haystack="stdlib",
                           min_needles=2, max_needles=5)
  for i in range(4):
    ex = mix.example(tok, "train", i)
    ids, _, weights = tokenize_weighted(ex, tok, response_weight=5.0)
    assert list(ids) == tok.encode(ex["text"], add_bos=True, add_eos=True)  # cut at spaces
    targets = [tok.decode([t]) for t in ids[weights == 5.0]]
    assert len(targets) >= 2 and len(ids) <= 301
    text = ex["text"]
    if form == "vt":
      assigned = dict(re.findall(r"# VAR ([a-z]+) = ([a-z0-9]+)\.\n", text))
      probed = re.findall(r"# the variables assigned ([a-z0-9]+) are ([a-z]+)\.\n", text)
      assert [" " + n for _, n in probed] == targets
      assert all(assigned[n] == src for src, n in probed)
    else:
      line = (r"# One of the magic numbers for ([a-z]+) is ([0-9]+)\.\n" if form == "multikey"
              else r"# For ([a-z]+), magic number ([0-9]) is ([0-9]+)\.\n")
      found = re.findall(line, text)
      first = {f[:-1]: f[-1] for f in reversed(found)}  # each line's first statement
      assert len(found) == len(first) + len(targets) and \
          [" " + first[f[:-1]] for f in found[len(first):]] == targets
      if form == "multivalue":
        assert len({f[0] for f in found}) == 1
  with pytest.raises(ValueError, match="drill_forms"):
    ruler_mix.RulerMix(drill_forms=("cwe",))
  mix, _, _ = ruler_mix.parse_spec("ruler:drill_share=0.5,drill_forms=multikey+vt")
  assert mix.drill_forms == ("multikey", "vt")


def test_drill_forms_start_at_their_index_and_change_nothing_before(tok):
  kw = dict(tasks=("niah_multikey",), min_length=150, max_length=200, drill_share=1.0,
            min_needles=2, max_needles=3)
  one = ruler_mix.RulerMix(**kw)
  forms = ruler_mix.RulerMix(**kw, drill_forms=("multikey", "multivalue", "vt"),
                             drill_forms_from=6)
  assert [one.example(tok, "train", i) for i in range(6)] == \
      [forms.example(tok, "train", i) for i in range(6)]
  later = [forms.example(tok, "train", i)["lines"][0] for i in range(6, 30)]
  assert any(line.startswith("# VAR") for line in later)
  assert any(line.startswith("# For") for line in later)


def test_digit_copy_rows_start_at_their_index_and_change_nothing_before(tok):
  kw = dict(tasks=("niah_multikey",), min_length=60, max_length=90, copy_share=1.0,
            copy_alphabets=(0, 4))
  plain = ruler_mix.RulerMix(**kw)
  digits = ruler_mix.RulerMix(**kw, digit_copy=0.5, digit_copy_from=5)
  assert [plain.example(tok, "train", i) for i in range(5)] == \
      [digits.example(tok, "train", i) for i in range(5)]
  later = [digits.example(tok, "train", i) for i in range(5, 45)]
  over_digits = [ex for ex in later if set(ex["text"].split()) <= set("123456789")]
  assert 8 <= len(over_digits) <= 32  # about half of them
  for ex in over_digits:  # a copy row still: one token per digit, the span repeated
    ids = tok.encode(ex["text"], add_bos=True)
    assert len(ids) == ex["length"] and ex["text"].endswith(ex["response"])
    assert ex["response"] and ex["prompt_weight"] == 0.0
    cut = ex["prompt"].rindex(" ")  # the prompt ends with x's first token again
    assert ex["prompt"][cut:] + ex["response"] in ex["prompt"][:cut]  # x occurred earlier
  with pytest.raises(ValueError, match="digit_copy is a share"):
    ruler_mix.RulerMix(**kw, digit_copy=1.5)


def test_forms_shares_apply_from_the_forms_index_and_change_nothing_before(tok):
  kw = dict(tasks=("niah_multikey",), min_length=60, max_length=90, copy_share=0.8,
            drill_share=0.1, drill_forms=("multikey", "vt"), drill_forms_from=5)
  plain = ruler_mix.RulerMix(**kw)
  late = ruler_mix.RulerMix(**kw, forms_copy_share=0.0, forms_drill_share=1.0)
  assert [plain.example(tok, "train", i) for i in range(5)] == \
      [late.example(tok, "train", i) for i in range(5)]
  # from index 5 on every example of `late` is a drill (no copy row, no task); `plain` is
  # still mostly copy rows
  kinds = lambda mix: [mix.example(tok, "train", i)["task"] for i in range(5, 25)]
  assert set(kinds(late)) == {"drill"}
  assert kinds(plain).count("copy") >= 10
  assert ruler_mix.parse_spec("ruler:forms_drill_share=0.5")[0].forms_drill_share == 0.5
  with pytest.raises(ValueError, match="forms_copy_share, forms_drill_share"):
    ruler_mix.RulerMix(**kw, forms_drill_share=0.5)  # 0.8 + 0.5 > 1
  with pytest.raises(ValueError, match="with no tasks"):  # the late shares leave a gap
    ruler_mix.RulerMix(**{**kw, "tasks": (), "copy_share": 0.9}, forms_copy_share=0.5)
