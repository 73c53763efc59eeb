"""`python -m ag_jax.evaluation.needle_probe`: where a gate set keeps the asked needle.

The value's token span is checked against the tokenizer's own decoding; the shares against
gates whose bias forces every flag on or off, and against the flags of the training view
recomputed here for one example."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ag_jax
from ag_jax.data import ruler
from ag_jax.evaluation import needle_probe
from test_cli_errors import _error

LENGTH = 128


@pytest.fixture(scope="module")
def probed(tmp_path_factory, tiny_cfg, tiny_gate):
  """(model dir, gates dir, model, variables, tokenizer): stdlib BPE vocabulary."""
  cfg = dataclasses.replace(tiny_cfg, vocab_size=2048, max_position=256)
  model = ag_jax.Llama(cfg, gate=tiny_gate)
  variables = ag_jax.init_variables(model, jax.random.key(3))
  root = tmp_path_factory.mktemp("probe")
  params = variables["params"]
  base = {**params, "layers": {k: v for k, v in params["layers"].items() if k != "gate"}}
  ag_jax.save_hf_llama(str(root / "model"), cfg, base)
  ag_jax.export_gates(str(root / "gates"), tiny_gate, cfg, params["layers"]["gate"])
  return (str(root / "model"), str(root / "gates"), model, variables,
          ag_jax.load_tokenizer("stdlib_bpe:2048"))


def _with_bias(variables, value):
  params = variables["params"]
  gate = {**params["layers"]["gate"], "bias": jnp.full_like(params["layers"]["gate"]["bias"], value)}
  return {"params": {**params, "layers": {**params["layers"], "gate": gate}}}


def test_value_span_is_the_asked_value(probed):
  tok = probed[-1]
  for depth in (0.1, 0.9):
    config = ruler.RulerConfig(task="niah_multikey", length=LENGTH, depth=depth)
    for i in range(3):
      ex = ruler.generate_example(config, tok, "test", i)
      start, end = needle_probe.value_span(tok, ex)
      ids = tok.encode(ex["context"])
      assert tok.decode(ids[start:end]).strip() == ex["needle_values"][ex["asked"][0]].strip()


def test_shares_follow_the_flags(probed):
  _, _, model, variables, tok = probed
  layers = model.cfg.num_layers
  on = needle_probe.probe(model, _with_bias(variables, 30.0), tok, LENGTH, [0.5], 2)
  off = needle_probe.probe(model, _with_bias(variables, -30.0), tok, LENGTH, [0.5], 2)
  assert on[0]["kept_per_layer"] == [1.0] * layers
  assert off[0]["kept_per_layer"] == [0.0] * layers
  # One example, one depth: the shares are the flags of the training view over the span.
  row = needle_probe.probe(model, variables, tok, LENGTH, [0.3], 1)[0]
  ex = ruler.generate_example(ruler.RulerConfig(task="niah_multikey", length=LENGTH, depth=0.3),
                              tok, "test", 0)
  start, end = needle_probe.value_span(tok, ex)
  _, (probs, flags) = model.apply(variables, jnp.asarray([tok.encode(ex["context"])]),
                                  return_gates=True)
  want = np.asarray(probs[:, 0, :, start:end] > model.gate.threshold).all(-1).mean(-1)
  np.testing.assert_allclose(row["kept_per_layer"], want)
  assert row["position"] == start


def test_cli_writes_the_table(probed, tmp_path, capsys):
  model_dir, gates_dir = probed[:2]
  out = tmp_path / "probe.json"
  assert needle_probe.main(["--model", model_dir, "--tokenizer", "stdlib_bpe:2048", "--gates",
                            gates_dir, "--length", str(LENGTH), "--depths", "0.2,0.8",
                            "--num-examples", "1", "--out", str(out)]) == 0
  text = capsys.readouterr().out
  assert text.strip().splitlines()[-1].startswith("| 0.80 |")
  rows = json.loads(out.read_text())["rows"]
  assert [r["depth"] for r in rows] == [0.2, 0.8] and rows[0]["position"] < rows[1]["position"]


@pytest.mark.parametrize("argv, words", [
    (["--gates", "GATES", "--depths", "0.5,1.5"], "--depths"),
    (["--gates", "GATES", "--length", "4000"], "past the model"),
    ([], "no gates"),
])
def test_cli_refuses_bad_input(probed, argv, words, capsys):
  model_dir, gates_dir = probed[:2]
  argv = ["--model", model_dir, "--tokenizer", "stdlib_bpe:2048"] + \
      [gates_dir if a == "GATES" else a for a in argv]
  assert words in _error(capsys, needle_probe.main(argv))
