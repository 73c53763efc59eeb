"""decode.py: the batch generation CLI (the README's first command) and its errors."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def decode(*args, timeout=600):
  return subprocess.run([sys.executable, os.path.join(ROOT, "decode.py"), *args], cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def micro_preset(tmp_path_factory):
  path = tmp_path_factory.mktemp("preset") / "micro.yaml"
  path.write_text("vocab_size: 259\ndim: 32\nnum_layers: 2\nnum_heads: 2\nnum_kv_heads: 1\n"
                  "head_dim: 16\nmlp_dim: 64\nmax_position: 128\n")
  return str(path)


def _accuracy(run) -> float:
  assert run.returncode == 0, run.stderr
  assert "accuracy:" in run.stdout and "KV cache:" in run.stdout
  return float(run.stdout.split("accuracy:")[1].split("%")[0])


def test_default_world_runs_and_reports_accuracy():
  run = decode("--num-prompts", "16", "--quiet")
  assert _accuracy(run) >= 50.0  # the shipped gates at the default budget; measured 62.5
  kept_percent = float(run.stdout.split("| all |")[1].split("|")[0])
  assert kept_percent < 30.0  # measured: 25
  allocated_percent = float(run.stdout.split("full (")[1].split("%")[0])
  assert allocated_percent < 30.0  # the default budget, 0.25
  # The same questions with a full cache: the base answers them (measured 93.8).
  assert _accuracy(decode("--num-prompts", "16", "--quiet", "--policy", "full")) >= 85.0


def test_preset_with_policy_and_json(micro_preset, tmp_path):
  out = tmp_path / "out.json"
  run = decode("--model", micro_preset, "--prompt", "hello", "--prompt", "a longer prompt here",
               "--policy", "streaming_llm", "--policy-arg", "sink=2", "--capacity", "8",
               "--max-new-tokens", "5", "--json", str(out))
  assert run.returncode == 0, run.stderr
  report = json.loads(out.read_text())
  assert len(report["generations"]) == 2
  summary = report["summary"]
  assert summary["policy"].startswith("StreamingLLM(sink=2")
  assert summary["capacity"] == 8 and summary["kv_mib"] < summary["full_kv_mib"]
  assert "| layer | kept % |" in run.stdout


@pytest.mark.parametrize("args,message", [
    (["--policy", "bogus", "--prompt", "x"], "unknown policy 'bogus'"),
    (["--gates", "/nonexistent/gates", "--prompt", "x"], "gates"),
    (["--prompts-file", "/nonexistent.txt"], "does not exist"),
    (["--policy", "full", "--capacity", "4", "--prompt", "a long prompt"], "needs capacity"),
])
def test_bad_input_exits_2_without_traceback(micro_preset, args, message):
  run = decode("--model", micro_preset, *args)
  assert run.returncode == 2
  assert "Traceback" not in run.stderr
  assert message in run.stderr
