"""`python -m ag_jax.evaluate --task ruler | stdlib_bpb`: the two tables of DESIGN §4b.

A tiny random Llama (large random weights, so that attention and eviction matter) is saved as an HF
directory and run through `evaluate.main` with the stdlib BPE; the rows are checked against
the training view (the plain forward pass, with no cache), RulerTask and StdlibBpbTask run
directly, and kvpress's capacity rule written out by hand."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ag_jax
from ag_jax import evaluate, policies
from ag_jax.evaluation import ruler_eval
from test_cli_errors import _error

# Every batch of both lengths is 112 tokens wide with 48 continuation steps: one shape.
SUBTASKS, LENGTHS, BUDGETS = ("niah_multikey", "vt"), (104, 112), (0.25, 0.5)
SNAP = "snapkv:window=8"
# The grid's evicting policy: its window bounds every cache to 16 slots, so that the grid
# compiles once per shape (each capacity compiles; kvpress's budget rule is checked apart).
STREAM = "streaming_llm:sink=4,window=12"


def random_variables(model, seed: int, scale: float = 0.3) -> dict:
  """conftest.spread_variables without the jitted init (a compile of the whole model): base
  matrices N(0, scale), norm scales 1 + N(0, 0.1), shapes from an abstract init."""
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0),
                                                           jnp.zeros((1, 2), jnp.int32))))

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return jnp.asarray(1.0 + 0.1 * noise if path[-1].key == "scale" else scale * noise, x.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_cfg):
  """(HF model dir, model, variables, tokenizer): vocab 2048 for the stdlib BPE."""
  cfg = dataclasses.replace(tiny_cfg, vocab_size=2048, max_position=256)
  model = ag_jax.Llama(cfg)
  variables = random_variables(model, seed=5)
  path = str(tmp_path_factory.mktemp("ruler_model") / "model")
  ag_jax.save_hf_llama(path, cfg, variables["params"])
  return path, model, variables, ag_jax.load_tokenizer("stdlib_bpe:2048")


def _cli(world, *argv) -> list[str]:
  return ["--model", world[0], "--tokenizer", "stdlib_bpe:2048", "--quiet", *argv]


def _rows(out) -> list[dict]:
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def grid(world, tmp_path_factory):
  """One decode-protocol run of the whole grid, with plots."""
  out = str(tmp_path_factory.mktemp("ruler_grid") / "out")
  argv = _cli(world, "--task", "ruler", "--subtasks", ",".join(SUBTASKS),
              "--lengths", ",".join(map(str, LENGTHS)), "--num-examples", "2", "--policy", "full",
              "--policy", STREAM, "--budgets", ",".join(map(str, BUDGETS)), "--protocol", "decode",
              "--out", out, "--plots")
  assert evaluate.main(argv) == 0
  return out, _rows(out)


_FORWARD = {}


def _forward(model):
  return _FORWARD.setdefault(model, jax.jit(model.apply))


def training_view(model, variables, tokenizer, examples):
  """(accuracy, answer NLL per token) of the Full cache, from one plain forward pass per
  example: answer token j of the continuation is predicted at position len(context) - 1 + j."""
  shares, nll, count = [], 0.0, 0
  for ex in examples:
    context, cont, spans = ruler_eval.encode_example(tokenizer, ex)
    ids = np.zeros((1, 256), np.int32)  # one width, one compile; causal: the padding is unseen
    ids[0, :len(context) + len(cont)] = context + cont
    logits = np.asarray(_forward(model)(variables, ids), np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    at = len(context) - 1 + np.arange(len(cont))
    hits = logp[at].argmax(-1) == np.asarray(cont)
    shares.append(np.mean([hits[a:b].all() for a, b in spans]))
    for a, b in spans:
      nll -= sum(logp[at[j], cont[j]] for j in range(a, b))
      count += b - a
  return float(np.mean(shares)), nll / count


def test_ruler_rows_cover_the_grid(grid):
  _, rows = grid
  want = [(t, n, p, b) for t in SUBTASKS for n in LENGTHS
          for p, b in [("full", 1.0)] + [(STREAM, b) for b in BUDGETS]]
  assert [(r["task"], r["length"], r["policy"], r["budget"]) for r in rows] == want
  for r in rows:
    assert {"task", "length", "policy", "budget", "protocol", "accuracy", "kept"} <= set(r)
    assert r["protocol"] == "decode" and r["examples"] == 2 and 0.0 <= r["accuracy"] <= 1.0
    if r["policy"] == "full":
      assert r["kept"] == 1.0 and r["describe"] == "Full()"
    else:  # the window (4 sinks + 12 recent tokens) is below every budget's capacity
      assert r["capacity"] == 16 and r["describe"] == "StreamingLLM(sink=4, window=12)"
      assert 0.0 < r["kept"] <= r["budget"] and r["kv_mib"] < r["full_kv_mib"]
  nll = {(r["task"], r["length"], r["policy"]): r["answer_nll"] for r in rows}
  assert len(set(nll.values())) == len(nll)  # each cell and policy scored on its own


def test_full_rows_equal_the_training_view_and_ruler_task(grid, world):
  _, model, variables, tok = world
  _, rows = grid
  for r in (r for r in rows if r["policy"] == "full"):
    (task,) = ruler_eval.build_ruler_tasks(tok, [r["task"]], [r["length"]], 2, protocol="decode")
    accuracy, nll = training_view(model, variables, tok, task.examples)
    assert r["accuracy"] == accuracy
    assert abs(r["answer_nll"] - nll) < 1e-4
    direct = task.run(model, variables, tok, policies.Full())
    assert (direct["accuracy"], direct["answer_nll"]) == (r["accuracy"], r["answer_nll"])


def test_evicting_row_equals_ruler_task_directly(grid, world):
  _, model, variables, tok = world
  (r,) = [r for r in grid[1] if (r["task"], r["length"], r["budget"]) == ("vt", 112, 0.25)]
  (task,) = ruler_eval.build_ruler_tasks(tok, ["vt"], [112], 2, protocol="decode")
  direct = task.run(model, variables, tok, policies.StreamingLLM(sink=4, window=12), budget=0.25)
  assert (direct["accuracy"], direct["answer_nll"], direct["capacity"]) == \
      (r["accuracy"], r["answer_nll"], r["capacity"])


def test_ruler_markdown_and_plots(grid):
  out, _ = grid
  with open(os.path.join(out, "results.md")) as f:
    table = f.read()
  assert "### niah_multikey (protocol decode)" in table and "### vt (protocol decode)" in table
  assert f"| 112 | {STREAM} | 0.25 |" in table and "| 104 | full | 1 |" in table
  assert table.count("\n| 104 |") == table.count("\n| 112 |") == 6
  for task in SUBTASKS:
    for n in LENGTHS:
      with open(os.path.join(out, f"{task}_{n}_vs_budget.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_kvpress_protocol_compresses_the_context_only(grid, world, tmp_path):
  """kvpress keeps max(1, int(T * budget)) context tokens (the row's capacity column reports
  the largest, the longest context's), and with nothing evicted it is the decode protocol's
  function."""
  _, model, variables, tok = world
  out = str(tmp_path / "kv")
  assert evaluate.main(_cli(world, "--task", "ruler", "--subtasks", "niah_multikey", "--lengths",
                            "104", "--num-examples", "2", "--policy", "full", "--policy", SNAP,
                            "--budgets", "0.5", "--out", out)) == 0
  full, snap = _rows(out)
  assert full["protocol"] == snap["protocol"] == "kvpress"
  (decode_full,) = [r for r in grid[1] if (r["task"], r["length"], r["policy"]) ==
                    ("niah_multikey", 104, "full")]
  assert abs(full["answer_nll"] - decode_full["answer_nll"]) < 1e-5
  assert full["accuracy"] == decode_full["accuracy"]
  (task,) = ruler_eval.build_ruler_tasks(tok, ["niah_multikey"], [104], 2)
  longest = max(len(ruler_eval.encode_example(tok, ex)[0]) for ex in task.examples)
  assert snap["capacity"] == max(1, int(longest * 0.5)) and snap["budget"] == 0.5
  assert snap["kept"] < 1.0 and snap["answer_nll"] != full["answer_nll"]


def test_kvpress_protocol_sizes_each_context_by_its_own_length(world):
  """Each context keeps max(1, int(T_i * budget)) of its own T_i tokens, as kvpress compresses
  one prompt at a time (the decode protocol: budget x its own context + continuation, in
  prefill and every decode step): a batch of contexts of different lengths scores every
  example as it scores alone (a capacity taken from the batch's longest context would not),
  for ranked policies and for H2O (whose split of each row follows that row's capacity)."""
  _, model, variables, tok = world
  (task,) = ruler_eval.build_ruler_tasks(tok, ["niah_multikey"], [104], 3)
  encoded = [ruler_eval.encode_example(tok, ex) for ex in task.examples]
  # Contexts cut to clearly different lengths (about 100, 80, 60: keeps 25, 20, 15).
  contexts = [e[0][:len(e[0]) - 20 * i] for i, e in enumerate(encoded)]
  conts = [e[1] for e in encoded]
  for protocol, policy in (("kvpress", policies.ObservedAttention()), ("kvpress", policies.H2O()),
                           ("decode", policies.StreamingLLM(sink=2)), ("decode", policies.H2O())):
    together = ruler_eval.score_protocol(model, variables, contexts, conts, policy=policy,
                                         budget=0.25, batch_size=3, protocol=protocol)
    for i in range(3):
      alone = ruler_eval.score_protocol(model, variables, contexts[i:i + 1], conts[i:i + 1],
                                        policy=policy, budget=0.25, batch_size=1,
                                        protocol=protocol)
      np.testing.assert_allclose(together[0][i], alone[0][0], atol=1e-5, err_msg=protocol)
      np.testing.assert_array_equal(together[1][i], alone[1][0])
    if protocol == "kvpress":
      assert together[2].capacity == max(1, int(len(contexts[0]) * 0.25))
  # The rule the fix replaced: the shortest context under the longest one's capacity.
  short, longest = contexts[2], len(contexts[0])
  tokens = np.zeros((1, 112), np.int32)
  tokens[0, :len(short)] = short
  own = ag_jax.prefill(model, variables, tokens, [len(short)], policy=policies.ObservedAttention(),
                       capacity=max(1, int(longest * 0.25)), reserve=16,
                       row_capacity=[max(1, int(len(short) * 0.25))])[1]
  batch_max = ag_jax.prefill(model, variables, tokens, [len(short)],
                             policy=policies.ObservedAttention(),
                             capacity=max(1, int(longest * 0.25)), reserve=16)[1]
  assert (np.asarray(own.length) == int(len(short) * 0.25)).all()
  assert (np.asarray(batch_max.length) > np.asarray(own.length)).all()


def test_row_capacity_is_checked(world):
  _, model, variables, _ = world
  tokens = np.ones((2, 32), np.int32)
  with pytest.raises(ag_jax.InferenceError, match=r"row_capacity must lie in \[1, capacity=8\]"):
    ag_jax.prefill(model, variables, tokens, policy=policies.Local(), capacity=8,
                   row_capacity=[8, 9])
  with pytest.raises(ag_jax.InferenceError, match="Full policy evicts nothing"):
    ag_jax.prefill(model, variables, tokens, policy=policies.Full(), capacity=32,
                   row_capacity=[32, 8])
  with pytest.raises(ag_jax.InferenceError, match="row_capacity must be 2 integers"):
    ag_jax.prefill(model, variables, tokens, policy=policies.Local(), capacity=8,
                   row_capacity=[8])


def test_stdlib_bpb_rows_equal_the_task_run_directly(world, tmp_path):
  _, model, variables, tok = world
  out = str(tmp_path / "bpb")
  assert evaluate.main(_cli(world, "--task", "stdlib_bpb", "--lengths", "64", "--num-examples",
                            "2", "--policy", "full", "--policy", "streaming_llm:sink=4",
                            "--budgets", "0.5", "--protocol", "decode", "--out", out)) == 0
  rows = _rows(out)
  assert [(r["task"], r["length"], r["policy"], r["budget"]) for r in rows] == [
      ("stdlib_bpb", 64, "full", 1.0), ("stdlib_bpb", 64, "streaming_llm:sink=4", 0.5)]
  task = ruler_eval.StdlibBpbTask("stdlib_bpb", ruler_eval.bpb_windows(tok, 2, context=64),
                                  protocol="decode")
  for r, policy, budget in zip(rows, [policies.Full(), policies.StreamingLLM(sink=4)], [None, .5]):
    direct = task.run(model, variables, tok, policy, budget=budget)
    assert r["protocol"] == "decode" and r["bpb"] > 0.0
    assert abs(r["bpb"] - direct["bpb"]) < 1e-6 and r["kept"] == direct["kept"]
  assert rows[0]["bpb"] != rows[1]["bpb"]
  with open(os.path.join(out, "results.md")) as f:
    assert "### stdlib_bpb (protocol decode)" in f.read()


@pytest.mark.parametrize("argv,message", [
    (["--task", "ruler", "--subtasks", "niah_multikey,needle"],
     "--subtasks: unknown RULER subtask 'needle'; known subtasks: niah_multikey"),
    (["--task", "ruler", "--lengths", "512,8"], "--lengths 8: a context needs at least 16 tokens"),
    (["--task", "ruler", "--lengths", "5x"], "--lengths must be comma-separated numbers"),
    (["--task", "ruler", "--budgets", "0.5,1.5"], "--budgets: each budget is the fraction"),
    (["--task", "stdlib_bpb", "--budgets", "0"], "in (0, 1]; got 0"),
    (["--task", "ruler", "--protocol", "prefill"], "--protocol 'prefill' is not a protocol: use "
     "kvpress"),
    (["--task", "ruler", "--task", "recall"], "makes one table per command"),
    (["--task", "recall", "--protocol", "decode"], "--protocol applies to --task ruler"),
    (["--task", "stdlib_bpb", "--subtasks", "vt"], "--subtasks applies to --task ruler only"),
    (["--task", "ruler", "--num-examples", "0"], "--num-examples must be a positive integer"),
])
def test_bad_table_flags_are_one_error_line(argv, message, capsys):
  # Checked before anything loads: the model directory need not exist.
  assert message in _error(capsys, evaluate.main(["--model", "/nonexistent/m", *argv]))


def test_lengths_beyond_the_model_are_refused_before_running(world, capsys, tmp_path):
  out = str(tmp_path / "never")
  message = _error(capsys, evaluate.main(_cli(world, "--task", "ruler", "--lengths", "240",
                                              "--subtasks", "niah_multikey",
                                              "--num-examples", "1", "--out", out)))
  assert "--lengths 240: niah_multikey needs up to" in message
  assert "above the model's max_position 256: use smaller --lengths" in message
  assert not os.path.exists(out)
  _, model, variables, _ = world  # the same model cut to a byte vocabulary, read with the BPE
  byte_model = str(tmp_path / "bytes")
  params = {**variables["params"], "embed": variables["params"]["embed"][:259],
            "lm_head": variables["params"]["lm_head"][:, :259]}
  ag_jax.save_hf_llama(byte_model, dataclasses.replace(model.cfg, vocab_size=259), params)
  message = _error(capsys, evaluate.main(["--model", byte_model, "--tokenizer",
                                          "stdlib_bpe:2048", "--task", "stdlib_bpb", "--lengths",
                                          "64", "--num-examples", "1", "--out", out]))
  assert "but the model's vocab_size is 259: pass the model's own --tokenizer" in message
  assert not os.path.exists(out)


def test_default_lengths_are_those_the_model_holds(world, capsys):
  from ag_jax.evaluation import tables
  assert tables.default_lengths("ruler", 1024) == [512]  # 256 positions left for the question
  assert tables.default_lengths("stdlib_bpb", 1024) == [512, 1024]
  assert tables.default_lengths("ruler", 8192) == [512, 1024, 2048, 4096]
  message = _error(capsys, evaluate.main(_cli(world, "--task", "ruler")))  # max_position 256
  assert "max_position 256 holds none of the default lengths 512,1024,2048,4096: pass " \
      "--lengths" in message
