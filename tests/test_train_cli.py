"""`python train.py` on bad input: one clear message, no traceback, exit status 2, nothing
half-written. The cases run as concurrent subprocesses (one device each)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "configs/train/tiny.yaml"


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return env


def _cases(tmp):
  quick = ["run.progress=false", "data.eval_split=null"]
  return {
      "help": ["--help"],
      "unknown_key": ["--config", RECIPE, "run.stepz=3"],
      "unknown_nested_key": ["--config", RECIPE, "model.overrides.dimm=3"],
      "target_keep": ["--config", RECIPE, "gate.target_keep=1.5"],
      "seq_len": ["--config", RECIPE, "data.seq_len=2048"],
      "distill_all": ["--config", RECIPE, "run.trainable=all", "gate.distill_weight=1"],
      "missing_data": ["--config", RECIPE, "data.source=no_such_corpus",
                       f"data.data_dir={tmp}/tfds", f"run.out_dir={tmp}/missing_data"],
      "base_mismatch": ["--config", RECIPE, f"model.hf_path={tmp}/small_base",
                        f"run.out_dir={tmp}/base_mismatch"],
      "mesh": ["--config", RECIPE, "mesh.data=3", f"run.out_dir={tmp}/mesh"],
      "partial_distributed": ["--config", RECIPE, "--coordinator", "localhost:1"],
      "nan": ["--config", RECIPE, f"run.out_dir={tmp}/nan", "optim.lr=1e30", "optim.clip=null", "optim.warmup=0",
              "checkpoint.every=1", "run.steps=6", "run.log_every=100", *quick],
  }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  # A base checkpoint of another size than the recipe's model.
  import ag_jax
  import jax
  small = ag_jax.ModelConfig(vocab_size=259, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=8, mlp_dim=64, max_position=256)
  params = ag_jax.init_variables(ag_jax.Llama(small), jax.random.key(0))["params"]
  ag_jax.save_hf_llama(str(tmp / "small_base"), small, params)
  procs = {name: subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, args in _cases(tmp).items()}
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=240)
    out[name] = (proc.returncode, stdout, stderr)
  return tmp, out


def _error(results, name) -> str:
  code, _, stderr = results[1][name]
  assert "Traceback" not in stderr, stderr
  assert code == 2, (code, stderr)
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, stderr  # one message
  return stderr[stderr.index("error: "):]


def test_help_explains_recipes_overrides_and_outputs(results):
  code, stdout, _ = results[1]["help"]
  assert code == 0
  for text in ("tiny.yaml", "cpt_llama2_7b.yaml", "run.steps=50 gate.target_keep=0.3",
               "gates.safetensors", "checkpoints/", "metrics.jsonl", "tensorboard", "--coordinator"):
    assert text in stdout, text


def test_unknown_key_lists_the_valid_ones(results):
  message = _error(results, "unknown_key")
  assert "unknown config key run.stepz" in message
  assert "valid keys under run:" in message and "steps" in message and "trainable" in message
  message = _error(results, "unknown_nested_key")
  assert "model.overrides.dimm" in message and "num_kv_heads" in message


def test_target_keep_out_of_range(results):
  assert "target_keep must be in (0, 1], got 1.5" in _error(results, "target_keep")


def test_distillation_needs_a_frozen_base(results):
  message = _error(results, "distill_all")
  assert "gate.distill_weight" in message and "run.trainable=gates" in message


def test_seq_len_beyond_max_position(results):
  message = _error(results, "seq_len")
  assert "data.seq_len 2048 is beyond the model's max_position 1024" in message


def test_missing_data_set_says_how_to_prepare_it(results):
  tmp = results[0]
  message = _error(results, "missing_data")
  assert "'no_such_corpus' is not prepared" in message
  assert "python -m ag_jax.data.local_corpus" in message and "tfds build" in message
  assert not os.path.exists(tmp / "missing_data" / "gates")


def test_base_checkpoint_that_does_not_match_the_preset(results):
  message = _error(results, "base_mismatch")
  assert "does not match model.preset 'tiny' with model.overrides" in message
  assert "dim: checkpoint 32, preset 64" in message


def test_mesh_that_does_not_fit_the_devices(results):
  assert "uses 3 devices but 1 are available" in _error(results, "mesh")


def test_distributed_flags_go_together(results):
  assert "go together" in _error(results, "partial_distributed")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(results):
  tmp = results[0]
  message = _error(results, "nan")
  assert "the loss became nan at step 2" in message
  assert f"the last good checkpoint is step 1 in {tmp}/nan/checkpoints" in message
  assert sorted(os.listdir(tmp / "nan" / "checkpoints")) == ["1"]  # nothing after the NaN
  assert not os.path.exists(tmp / "nan" / "gates")  # no export of poisoned gates
