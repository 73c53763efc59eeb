"""Issue 11's catalogue of bad command lines (docs/errors.md): each gets one `error: ...`
line naming the problem and the fix, exit status 2, no traceback, nothing half-written.

The entry points run in process (`main(argv)`, stderr captured), so no case compiles a
model; the runpy case and one decode case run as subprocesses, as a user would."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from ag_jax import batch_decode, default_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "train", "tiny.yaml")
SMALL = ["model.overrides={num_layers: 2, dim: 32, mlp_dim: 64, head_dim: 8, num_heads: 4, "
         "num_kv_heads: 2}", "gate.num_heads=2", "gate.head_dim=8", "data.source=recall:doc_len=60",
         "data.seq_len=64", "data.batch_size=8", "run.progress=false", "data.eval_split=null",
         "run.log_every=1"]


def _train_main():
  spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def _error(capsys, rc) -> str:
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, err
  return lines[0]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
  """Copies of the default world's model and gates with an empty, a truncated and a random
  safetensors file each, and a gate export with a broken gate_config.json."""
  tmp = tmp_path_factory.mktemp("damaged")
  out = {}
  for kind, file in (("model", "model.safetensors"), ("gates", "gates.safetensors")):
    good = os.path.join(default_world.ASSET_DIR, kind)
    data = open(os.path.join(good, file), "rb").read()
    for how, content in (("empty", b""), ("truncated", data[: len(data) // 2]),
                         ("random", os.urandom(4096))):
      path = tmp / f"{kind}_{how}"
      shutil.copytree(good, path)
      (path / file).write_bytes(content)
      out[kind, how] = str(path)
  broken = tmp / "gates_bad_json"
  shutil.copytree(os.path.join(default_world.ASSET_DIR, "gates"), broken)
  (broken / "gate_config.json").write_text('{"kind": "attention",\n  "num_heads": }\n')
  out["gates", "json"] = str(broken)
  return out


# ---------------------------------------------------------------------------------------------
# decode.py


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be a positive integer, got -3"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--policy", "snapkv", "--policy-arg", "window=abc"],
     "the snapkv knob window needs an integer, got 'abc'"),
    (["--policy", "h2o", "--policy-arg", "heavy=lots"], "h2o knob heavy needs"),
    (["--policy", "snapkv", "--policy-arg", "windw=3"], "has no knob windw"),
    (["--model", "/no/such/model_dir", "--prompt", "x"], "no such model directory"),
    (["--model", "no_such_preset", "--prompt", "x"], "unknown model preset"),
    (["--gates", "/no/such/gates"], "/no/such/gates/gates.safetensors' does not exist"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
])
def test_decode_bad_flags(capsys, args, message):
  assert message in _error(capsys, batch_decode.main(args))


def test_decode_bad_jsonl_line_names_file_and_line(capsys, tmp_path):
  path = tmp_path / "prompts.jsonl"
  path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": oops}\n')
  message = _error(capsys, batch_decode.main(["--prompts-file", str(path)]))
  assert f"{path}:4: not valid JSON" in message
  path.write_text('{"prompt": "a"}\n["b"]\n')
  assert f"{path}:2: each line must be a JSON object" in _error(
      capsys, batch_decode.main(["--prompts-file", str(path)]))


def test_decode_unwritable_json_is_refused_before_the_run(capsys, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  message = _error(capsys, batch_decode.main(["--json", str(blocker / "out.json")]))
  assert "cannot be written" in message and "is a file, not a folder" in message
  message = _error(capsys, batch_decode.main(["--json", str(tmp_path)]))
  assert "is a directory" in message


@pytest.mark.parametrize("kind", ["model", "gates"])
@pytest.mark.parametrize("how", ["empty", "truncated", "random"])
def test_decode_damaged_safetensors_names_the_file(capsys, damaged, kind, how):
  path = damaged[kind, how]
  args = ["--model", path, "--prompt", "x"] if kind == "model" else ["--gates", path]
  message = _error(capsys, batch_decode.main(args))
  assert os.path.join(path, f"{'model' if kind == 'model' else 'gates'}.safetensors") in message
  assert "copy or export it again" in message


def test_decode_broken_gate_config_json_names_the_file(capsys, damaged):
  message = _error(capsys, batch_decode.main(["--gates", damaged["gates", "json"]]))
  assert "gate_config.json' is not valid JSON" in message and "line 2" in message


def test_decode_gates_for_another_model_are_refused_on_the_default_world(capsys, tmp_path,
                                                                          tiny_cfg, tiny_gate):
  import jax

  import ag_jax
  model = ag_jax.Llama(tiny_cfg, gate=tiny_gate)
  gates = ag_jax.init_variables(model, jax.random.key(0))["params"]["layers"]["gate"]
  path = ag_jax.export_gates(str(tmp_path / "gates"), tiny_gate, tiny_cfg, gates)
  message = _error(capsys, batch_decode.main(["--gates", path]))
  assert "were trained for a different model" in message


def test_decode_gates_without_model_run_on_the_default_world(tmp_path):
  """--gates without --model applies those gates (a copy of the shipped ones) to the
  default world's base model, and says so; as a user runs it."""
  gates = tmp_path / "my_gates"
  shutil.copytree(os.path.join(default_world.ASSET_DIR, "gates"), gates)
  out = tmp_path / "report.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  run = subprocess.run([sys.executable, "decode.py", "--gates", str(gates), "--num-prompts", "4",
                        "--max-new-tokens", "1", "--quiet", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert f"gates: {gates}" in run.stdout
  assert json.loads(out.read_text())["summary"]["gates"] == str(gates)


# ---------------------------------------------------------------------------------------------
# python -m ag_jax.default_world


def test_default_world_module_runs_without_runpy_warning():
  run = subprocess.run([sys.executable, "-m", "ag_jax.default_world", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0 and "--install" in run.stdout
  assert "RuntimeWarning" not in run.stderr, run.stderr


@pytest.mark.parametrize("kind,how", [("model", "truncated"), ("gates", "random"),
                                      ("model", "empty")])
def test_install_refuses_damaged_files_and_keeps_the_assets(capsys, damaged, kind, how):
  good = os.path.join(default_world.ASSET_DIR, "model" if kind == "gates" else "gates")
  args = [damaged[kind, how], good] if kind == "model" else [good, damaged[kind, how]]
  before = os.path.getmtime(default_world.ASSET_DIR)
  message = _error(capsys, default_world.main(["--install", *args]))
  assert damaged[kind, how] in message
  assert os.path.getmtime(default_world.ASSET_DIR) == before


@pytest.mark.parametrize("extra,message", [
    (["--tokenizer", "stdlib_bpe:abc"], "the BPE size must be a number of tokens"),
    (["--tokenizer", "bytes"], "no tokenizer.json there"),
    (["--tasks", "niah_multikey,haystack"], "--tasks / --length"),
    (["--budget", "1.5"], "--budget must be a fraction in (0, 1]"),
])
def test_install_refuses_bad_settings_and_keeps_the_assets(capsys, extra, message):
  model, gates = (os.path.join(default_world.ASSET_DIR, k) for k in ("model", "gates"))
  before = os.path.getmtime(default_world.ASSET_DIR)
  assert message in _error(capsys, default_world.main(["--install", model, gates, *extra]))
  assert os.path.getmtime(default_world.ASSET_DIR) == before


def test_install_refuses_a_tokenizer_larger_than_the_model(capsys, monkeypatch):
  from ag_jax import tokenizer as tokenizer_module
  class Larger(tokenizer_module.HFTokenizer):
    def __init__(self, path):
      super().__init__(path)
      self.vocab_size = 4096
  monkeypatch.setattr(tokenizer_module, "HFTokenizer", Larger)
  model, gates = (os.path.join(default_world.ASSET_DIR, k) for k in ("model", "gates"))
  message = _error(capsys, default_world.main(["--install", model, gates, "--tokenizer", model]))
  assert "more than the model's vocab_size 2048" in message


# ---------------------------------------------------------------------------------------------
# train.py (nothing here compiles: every error comes before the first jit)


@pytest.mark.parametrize("override,message", [
    ("data.source=recall:doc_len=-3", "doc_len must be a positive integer, got -3"),
    ("data.source=recall:size=0", "size must be a positive integer"),
    ("run.steps=[", "override 'run.steps=[': the value is not valid YAML"),
])
def test_train_bad_overrides(capsys, tmp_path, override, message):
  rc = _train_main()(["--config", RECIPE, f"run.out_dir={tmp_path}", override])
  assert message in _error(capsys, rc)
  assert not os.path.exists(tmp_path / "gates")


def test_train_malformed_yaml_names_file_and_position(capsys, tmp_path):
  recipe = tmp_path / "bad.yaml"
  recipe.write_text("model:\n  preset: tiny\nrun: {steps: 3\ndata:\n  seq_len: 64\n")
  message = _error(capsys, _train_main()(["--config", str(recipe)]))
  assert f"config file {str(recipe)!r} is not valid YAML" in message and "line " in message


@pytest.mark.parametrize("how", ["truncated", "random"])
def test_train_damaged_base_model(capsys, tmp_path, damaged, how):
  rc = _train_main()(["--config", RECIPE, f"model.hf_path={damaged['model', how]}",
                      "model.preset=null", f"run.out_dir={tmp_path}"])
  assert os.path.join(damaged["model", how], "model.safetensors") in _error(capsys, rc)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 3-step run whose last checkpoint (step 3) is then removed: the folder holds metrics
  for steps 1-3 and checkpoints 1-2, as after a crash between saves."""
  out = tmp_path_factory.mktemp("resume")
  main = _train_main()
  assert main(["--config", RECIPE, *SMALL, f"run.out_dir={out}", "run.steps=3",
               "checkpoint.every=1", "checkpoint.keep=5", "checkpoint.async_save=false"]) == 0
  shutil.rmtree(out / "checkpoints" / "3")
  return out


@pytest.mark.parametrize("override,message", [
    ("optim.lr=0.5", "optim.lr: 0.003 -> 0.5"),
    ("gate.target_keep=0.3", "gate.target_keep: 0.5 -> 0.3"),
    ("run.steps=1", "run.steps=1 is below the step of the checkpoint"),
])
def test_resume_refuses_other_settings_naming_the_keys(capsys, trained, override, message):
  capsys.readouterr()
  rc = _train_main()(["--config", RECIPE, *SMALL, f"run.out_dir={trained}", "run.steps=3",
                      "checkpoint.every=1", "checkpoint.keep=5", override])
  error = _error(capsys, rc)
  assert message in error
  assert "gate.num_heads" not in error  # only the keys that differ
  assert "run.log_every" not in error


def test_resume_says_so_and_logs_each_step_once(capsys, trained):
  capsys.readouterr()
  rc = _train_main()(["--config", RECIPE, *SMALL, f"run.out_dir={trained}", "run.steps=3",
                      "checkpoint.every=1", "checkpoint.keep=5", "run.log_every=2"])
  out = capsys.readouterr()
  assert rc == 0, out.err
  assert f"resuming from step 2 (checkpoint {trained}/checkpoints)" in out.out
  assert "trained steps 3-3 (resumed from step 2)" in out.out
  assert "warning: resuming with settings that differ" in out.err and "run.log_every: 1 -> 2" in out.err
  steps = [json.loads(l)["step"] for l in open(trained / "metrics.jsonl")]
  assert steps == [1, 2, 3]


def test_train_value_of_the_wrong_type_names_the_key(capsys):
  rc = _train_main()(["--config", RECIPE, "gate.num_heads=x"])
  assert "gate.num_heads must be an integer, got 'x'" in _error(capsys, rc)
