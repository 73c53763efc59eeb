"""Evaluation under eviction: teacher-forced scores against the training view and the numpy
cache model, perplexity by hand, recall and multiple-choice scoring, TFDS field mappings
(mock_data and a locally prepared ArrayRecord data set), sweeps and the command line."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import ag_jax
from ag_jax import evaluate, evaluation, policies
from ag_jax.evaluation import scoring, tasks
from conftest import spread_variables
from test_policies import NumpyCacheModel, StreamingRule

PREFIXES = [[3, 9, 4, 1, 7], [5, 2], [8, 8, 1, 6, 2, 9, 4, 4, 3], [1, 2, 3]]
CONTINUATIONS = [[2, 6, 1], [7, 7, 3, 5, 9, 2], [4], [6, 1, 8, 2]]


@pytest.fixture(scope="module")
def byte_world(tiny_cfg):
  """The tiny test model with a byte-level vocabulary, shared by every test here."""
  model = ag_jax.Llama(dataclasses.replace(tiny_cfg, vocab_size=259))
  return model, spread_variables(model, seed=3), ag_jax.ByteTokenizer()


@pytest.fixture(scope="module")
def tiny(byte_world):
  return byte_world[:2]


def training_view_logp(model, variables, sequences, width=24):
  """[N, width, V] float64 log-probs of right-padded sequences, one jitted call (causal:
  padding after a sequence never changes its positions)."""
  tokens = np.zeros((len(sequences), width), np.int32)
  for i, seq in enumerate(sequences):
    tokens[i, :len(seq)] = seq
  return log_softmax(jax.jit(model.apply)(variables, jnp.asarray(tokens)))


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_full_cache_scores_equal_the_training_view(tiny):
  model, variables = tiny
  scores, stats = scoring.score_continuations(model, variables, PREFIXES, CONTINUATIONS,
                                              policy=policies.Full(), batch_size=3)
  logps = training_view_logp(model, variables, [p + c for p, c in zip(PREFIXES, CONTINUATIONS)])
  for prefix, cont, got, logp in zip(PREFIXES, CONTINUATIONS, scores, logps):
    want = [logp[len(prefix) - 1 + j, cont[j]] for j in range(len(cont))]
    np.testing.assert_allclose(got, want, atol=1e-4)
  assert stats.as_dict()["kept"] == 1.0 and stats.rows == 4


def test_evicting_scores_equal_the_numpy_cache_model(tiny):
  model, variables = tiny
  capacity = 4
  scores, greedy, stats = scoring.score_and_greedy(
      model, variables, PREFIXES, CONTINUATIONS, policy=policies.StreamingLLM(sink=1),
      capacity=capacity, batch_size=4)
  prefix_logps = training_view_logp(model, variables, PREFIXES)
  for prefix, cont, got, hits, logp in zip(PREFIXES, CONTINUATIONS, scores, greedy, prefix_logps):
    sim = NumpyCacheModel(variables["params"], model.cfg, StreamingRule(1, None), capacity)
    _, step_logits = sim.run(prefix, cont[:-1])  # feeding token j predicts token j + 1
    first = logp[len(prefix) - 1, cont[0]]
    want = [first] + [log_softmax(step_logits[j])[cont[j + 1]] for j in range(len(cont) - 1)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    argmax = [logp[len(prefix) - 1].argmax()] + [step_logits[j].argmax()
                                                 for j in range(len(cont) - 1)]
    np.testing.assert_array_equal(hits, np.asarray(argmax) == np.asarray(cont))
  assert stats.capacity == capacity and stats.as_dict()["kept"] < 1.0


def test_perplexity_by_hand_on_a_uniform_model(tiny):
  """A zero output head predicts the uniform distribution: perplexity = vocab exactly,
  whatever the cache evicted; the token count is every continuation token."""
  model, variables = tiny
  zero = jax.tree_util.tree_map(lambda x: x, variables)
  zero["params"]["lm_head"] = jnp.zeros_like(variables["params"]["lm_head"])
  rows = [p + c for p, c in zip(PREFIXES, CONTINUATIONS)]
  result = scoring.perplexity(model, zero, rows, prefix_tokens=2,
                              policy=policies.H2O(), budget=0.5)
  assert result["tokens"] == sum(len(r) - 2 for r in rows)
  assert math.isclose(result["perplexity"], model.cfg.vocab_size, rel_tol=1e-5)
  # With real weights: exp(mean NLL) of the scores the same call computes.
  real = scoring.perplexity(model, variables, rows, prefix_fraction=0.5, policy=policies.Full())
  cuts = [int(len(r) * 0.5) for r in rows]
  scores, _ = scoring.score_continuations(model, variables, [r[:c] for r, c in zip(rows, cuts)],
                                          [r[c:] for r, c in zip(rows, cuts)],
                                          policy=policies.Full())
  nll = -np.concatenate(scores).sum() / sum(len(s) for s in scores)
  assert math.isclose(real["perplexity"], math.exp(nll), rel_tol=1e-6)


def test_recall_accuracy_scores_each_example_against_its_own_answer(byte_world):
  model, variables, tok = byte_world
  prompts = ["#abc=123; ?abc=", "hello there ?", "#q=1;#r=2;#s=3;?r=", "zz top"]
  full = policies.Full()
  answers = ag_jax.generate(model, variables, [tok.encode(p) for p in prompts], policy=full,
                            max_new_tokens=3, eos_id=tok.eos_id, pad_id=tok.pad_id).texts(tok)
  assert all(answers)
  examples = list(zip(prompts, answers))
  result = tasks.recall_accuracy(model, variables, tok, examples, policy=full, batch_size=2,
                                 max_new_tokens=3)
  assert result["accuracy"] == 1.0 and result["kept"] == 1.0
  shuffled = list(zip(prompts, answers[1:] + answers[:1]))  # every answer belongs elsewhere
  wrong = sum(a.startswith(b) for a, b in zip(answers, answers[1:] + answers[:1]))
  result = tasks.recall_accuracy(model, variables, tok, shuffled, policy=full, batch_size=2,
                                 max_new_tokens=3)
  assert result["accuracy"] == wrong / len(prompts)
  evicting = tasks.recall_accuracy(model, variables, tok, examples, policy=policies.Local(),
                                   budget=0.5, max_new_tokens=3)
  longest = max(len(tok.encode(p)) for p in prompts) + 3
  assert evicting["capacity"] == math.ceil(0.5 * longest) and evicting["kept"] < 0.8
  # Each prompt's budget is of its own tokens: one at a time, the same caches.
  alone = tasks.recall_accuracy(model, variables, tok, examples, policy=policies.Local(),
                                budget=0.5, max_new_tokens=3, batch_size=1)
  assert abs(alone["kept"] - evicting["kept"]) < 1e-6
  assert alone["accuracy"] == evicting["accuracy"]


def test_multiple_choice_acc_and_acc_norm_against_the_training_view(byte_world):
  model, variables, tok = byte_world
  contexts = ["Question: which is red?\nAnswer:", "A cat", "1 2 3", "boolq passage\nAnswer:"]
  choices = [("apple", "sky", "leaf"), ("sat", "flew away"), ("4", "five"), ("no", "yes")]

  pairs = [(tok.encode(c), tok.encode(" " + x, add_bos=False)) for c, ch in zip(contexts, choices)
           for x in ch]
  logps = training_view_logp(model, variables, [ids + cont for ids, cont in pairs], width=48)
  flat = [sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(cont))
          for (ids, cont), logp in zip(pairs, logps)]
  ll = [flat[:3], flat[3:5], flat[5:7], flat[7:9]]
  best = [int(np.argmax(row)) for row in ll]
  labels = [best[0], (best[1] + 1) % 2, best[2], (best[3] + 1) % 2]  # acc = 0.5 exactly
  norm = [int(np.argmax([v / len((" " + x).encode()) for v, x in zip(row, ch)]))
          for row, ch in zip(ll, choices)]
  examples = [tasks.MCExample(c, ch, y) for c, ch, y in zip(contexts, choices, labels)]
  result = tasks.MultipleChoiceTask("toy", examples).run(model, variables, tok, policies.Full())
  assert result["acc"] == 0.5
  assert result["acc_norm"] == np.mean([n == y for n, y in zip(norm, labels)])
  assert result["examples"] == 4


def _raw(name, split):
  """Records as TFDS itself returns them, text as str."""
  def text(x):
    if isinstance(x, dict):
      return {k: text(v) for k, v in x.items()}
    if isinstance(x, (list, np.ndarray)) and np.asarray(x).dtype.kind in "OSU":
      return [text(v) for v in x]
    return x.decode() if isinstance(x, bytes) else x
  source = tfds.data_source(name, split=split)
  return [text(source[i]) for i in range(len(source))]


def test_tfds_field_mappings_on_mock_data():
  with tfds.testing.mock_data(num_examples=5):
    piqa = evaluation.load_multiple_choice("piqa")
    raw = _raw("piqa", "validation")
    assert piqa[0] == tasks.MCExample(f"Question: {raw[0]['goal']}\nAnswer:",
                                      (raw[0]["sol1"], raw[0]["sol2"]),
                                      int(raw[0]["label"]))
    boolq = evaluation.load_multiple_choice("boolq", limit=3)
    raw = _raw("bool_q", "validation")
    assert len(boolq) == 3 and boolq[1].choices == ("no", "yes")
    assert boolq[1].label == int(raw[1]["answer"])
    assert boolq[1].context == (f"{raw[1]['passage']}\nQuestion: "
                                f"{raw[1]['question']}?\nAnswer:")
    arc = evaluation.load_multiple_choice("arc_easy", split="test")
    raw = _raw("ai2_arc/ARC-Easy", "test")
    for ex, r in zip(arc, raw):  # mock answers are always among the labels here
      labels = list(r["choices"]["label"])
      assert ex.context == f"Question: {r['question']}\nAnswer:"
      assert ex.choices[ex.label] == r["choices"]["text"][labels.index(r["answerKey"])]
  with pytest.raises(ag_jax.data.DataError, match="no multiple-choice format for 'squad'"):
    evaluation.load_multiple_choice("squad")


def prepare_hellaswag(data_dir, records):
  """A hellaswag folder in TFDS's own format: its features, ArrayRecord, dataset_info."""
  from array_record.python.array_record_module import ArrayRecordWriter
  features = tfds.features.FeaturesDict({
      "context": tfds.features.Text(), "endings": tfds.features.Sequence(tfds.features.Text()),
      "activity_label": tfds.features.Text(), "label": np.int32,
      "split_type": tfds.features.Text(), "source_id": tfds.features.Text()})
  folder = os.path.join(data_dir, "hellaswag", "1.1.0")
  os.makedirs(folder)
  name = "hellaswag-validation.array_record-00000-of-00001"
  writer = ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
  for r in records:
    writer.write(features.serialize_example(r))
  writer.close()
  split = tfds.core.SplitInfo(name="validation", shard_lengths=[len(records)], num_bytes=0,
                              filename_template=None)
  tfds.folder_dataset.write_metadata(data_dir=folder, features=features, split_infos=[split],
                                     version="1.1.0", check_data=False)


def test_hellaswag_from_a_prepared_array_record_data_set(tmp_path, byte_world):
  records = [
      {"context": "A man is [header] standing on a roof. He", "label": 1,
       "endings": ["eats [title] soup.", "climbs  down.", "sings.", "flies."],
       "activity_label": "Roof shingle removal", "split_type": "indomain", "source_id": "a"},
      {"context": "A woman pours water. She", "label": 0, "endings": ["drinks.", "sleeps."],
       "activity_label": "Drinking", "split_type": "zeroshot", "source_id": "b"},
  ]
  prepare_hellaswag(str(tmp_path), records)
  examples = evaluation.load_multiple_choice("hellaswag", data_dir=str(tmp_path))
  assert examples == [
      tasks.MCExample("Roof shingle removal: A man is standing on a roof. He",
                      ("eats. soup.", "climbs down.", "sings.", "flies."), 1),
      tasks.MCExample("Drinking: A woman pours water. She", ("drinks.", "sleeps."), 0)]
  model, variables, tok = byte_world
  result = tasks.MultipleChoiceTask("hellaswag", examples).run(
      model, variables, tok, policies.SnapKV(window=4, kernel=3), budget=0.5)
  assert result["examples"] == 2 and 0.0 <= result["acc"] <= 1.0 and result["kept"] < 1.0


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
  path = tmp_path_factory.mktemp("preset") / "tiny_eval.yaml"
  path.write_text("vocab_size: 259\ndim: 32\nnum_layers: 2\nnum_heads: 4\nnum_kv_heads: 2\n"
                  "head_dim: 8\nmlp_dim: 64\nmax_position: 512\n")
  return str(path)


def test_cli_sweep_writes_json_markdown_and_plots(tmp_path, tiny_preset, capsys):
  out = str(tmp_path / "eval")
  with tfds.testing.mock_data(num_examples=3):
    code = evaluate.main(["--model", tiny_preset, "--task", "recall", "--task", "piqa",
                          "--recall", "recall:doc_len=48,num_facts=2,num_queries=1",
                          "--policy", "full", "--policy", "h2o:recent=0.5", "--budgets", "0.3",
                          "--num-examples", "3", "--out", out, "--plots", "--quiet"])
  assert code == 0, capsys.readouterr().err
  with open(os.path.join(out, "results.json")) as f:
    rows = json.load(f)["rows"]
  assert [(r["task"], r["policy"], r["budget"]) for r in rows] == [
      (t, p, b) for t in ("recall", "piqa") for p, b in (("full", None), ("h2o:recent=0.5", 0.3))]
  for r in rows:
    assert np.asarray(r["kept_per_layer_head"]).shape == (2, 2)
    assert r["kv_mib"] <= r["full_kv_mib"] * (0.4 if r["budget"] else 1.1)
  for r in (rows[1], rows[3]):  # recent=0.5 resolved against the capacity
    recent = round(0.5 * r["capacity"])
    assert r["describe"] == f"H2O(heavy={r['capacity'] - recent}, recent={recent})"
    assert r["kept"] < 0.45  # short rows of a batch may keep more than the batch budget
  assert rows[0]["describe"] == "Full()" and rows[0]["kept"] == 1.0
  assert "acc_norm" in rows[3] and "accuracy" in rows[0]
  table = open(os.path.join(out, "results.md")).read()
  assert "### piqa" in table and "| h2o:recent=0.5 | 0.3 |" in table
  for png in ("recall_vs_kept.png", "piqa_vs_kept.png"):
    with open(os.path.join(out, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["--model", "no_such_preset"], "unknown model preset 'no_such_preset'"),
    (["--budgets", "half"], "--budgets must be comma-separated numbers"),
    (["--policy", "ag"], "policy 'ag' needs gates"),
    (["--policy", "h2o:heavy"], "bad policy knob 'heavy'"),
    (["--task", "squad"], "no multiple-choice format for 'squad'"),
])
def test_cli_errors_are_one_line_and_exit_2(argv, message, tiny_preset, capsys):
  if argv[0] != "--model":
    argv = ["--model", tiny_preset] + argv
  assert evaluate.main(argv + ["--quiet", "--out", "/nonexistent/never"]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err and err.startswith("error: ")


def test_cli_without_model_or_default_world_says_what_to_pass(monkeypatch, capsys):
  monkeypatch.setattr(evaluate, "_has_default_world", lambda: False)
  assert evaluate.main([]) == 2
  assert "pass --model" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--help"])
  assert exit_info.value.code == 0 and "acc_norm" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The RULER-style suite and stdlib bits per byte (ag_jax.evaluation.ruler_eval)


@pytest.fixture(scope="module")
def bpe_world():
  import jax
  import ag_jax
  from ag_jax.config import ModelConfig
  tok = ag_jax.load_tokenizer("stdlib_bpe:2048")
  cfg = ModelConfig(vocab_size=2048, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, max_position=512)
  model = ag_jax.Llama(cfg)
  return model, ag_jax.init_variables(model, jax.random.key(0)), tok


def test_stdlib_bpb_matches_a_numpy_statement(bpe_world):
  import numpy as np
  import ag_jax
  from ag_jax.evaluation import ruler_eval
  model, variables, tok = bpe_world
  windows = ruler_eval.bpb_windows(tok, 2, context=96)
  got = ruler_eval.StdlibBpbTask("stdlib_bpb", windows, protocol="decode").run(
      model, variables, tok, ag_jax.policies.Full())
  nll, nbytes = 0.0, 0
  for ids, _, _ in windows:
    logits = np.asarray(model.apply(variables, np.asarray([ids])), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    cut = len(ids) // 2
    nll -= sum(logp[k - 1, ids[k]] for k in range(cut, len(ids)))
    nbytes += len(tok.decode(ids[cut:]).encode("utf-8"))
  assert abs(got["bpb"] - nll / np.log(2) / nbytes) < 1e-4


def test_long_range_mask():
  from ag_jax.evaluation import ruler_eval
  text = "alpha beta " + "x" * 600 + " alpha beta alpha"
  mask = ruler_eval.long_range_mask(text, 512)
  hits = text.encode()[:][mask.nonzero()[0][0]:mask.nonzero()[0][-1] + 1]
  assert hits.startswith(b"alpha") and mask.sum() == len("alpha") + len("beta")


def test_ruler_task_decode_protocol_and_kvpress_capacity(bpe_world):
  import ag_jax
  from ag_jax.evaluation import ruler_eval
  model, variables, tok = bpe_world
  assert ruler_eval.kvpress_capacity(1000, 0.125) == 125
  assert ruler_eval.kvpress_capacity(3, 0.1) == 1
  (task,) = ruler_eval.build_ruler_tasks(tok, ["niah_multikey"], [128], 2, protocol="decode")
  row = task.run(model, variables, tok, ag_jax.policies.Full())
  assert 0.0 <= row["accuracy"] <= 1.0 and row["length"] == 128
  ctx, cont, spans = ruler_eval.encode_example(tok, task.examples[0])
  assert [tok.decode(cont[a:b]) for a, b in spans] == task.examples[0]["answers"]
