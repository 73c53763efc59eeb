"""Two processes joined by jax.distributed on localhost (2 CPU devices each, gloo
collectives) train exactly like one process with 4 devices on the same global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "configs/train/tiny.yaml", "run.steps=4", "run.log_every=1",
        "run.progress=false", "data.eval_split=null", "data.batch_size=8", "data.seq_len=64",
        "data.source=recall:doc_len=60", "checkpoint.every=2", "checkpoint.async_save=true",
        "model.overrides={num_layers: 2, dim: 32, mlp_dim: 64, head_dim: 8}", "gate.head_dim=8",
        "optim.lr=1e-2", "optim.warmup=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(out_dir, devices: int, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "train.py", *ARGS, f"run.out_dir={out_dir}", *extra],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _wait(proc):
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  return stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("dist")
  port = _free_port()
  procs = [_launch(tmp / "two", 2, ["--coordinator", f"localhost:{port}", "--num-processes", "2",
                                    "--process-id", str(i)]) for i in range(2)]
  procs.append(_launch(tmp / "one", 4))
  outputs = [_wait(proc) for proc in procs]
  assert all("on 2 process(es), 4 devices" in out for out in outputs[:2]), outputs
  assert "on 1 process(es), 4 devices" in outputs[2], outputs[2]
  return tmp


def _losses(out_dir):
  return [json.loads(line) for line in open(out_dir / "metrics.jsonl")]


def _checkpoint_json(ckpt_dir, step, item):
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(str(ckpt_dir), item_names=("state", "data", "config"))
  return manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]


def test_two_processes_match_one(runs):
  one, two = _losses(runs / "one"), _losses(runs / "two")
  assert [m["step"] for m in two] == [1, 2, 3, 4]
  for a, b in zip(one, two):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["keep_ratio_per_layer"], a["keep_ratio_per_layer"], atol=1e-6)
    assert b["tokens"] == a["tokens"]  # the same global batch, row for row
  assert one[0]["loss"] != one[-1]["loss"]  # and it trained


def test_two_processes_export_the_same_gates_and_data_order(runs):
  from ag_jax import load_gates
  _, gates_one = load_gates(str(runs / "one" / "gates"))
  _, gates_two = load_gates(str(runs / "two" / "gates"))
  for name in gates_one:
    np.testing.assert_allclose(gates_two[name], gates_one[name], atol=1e-5, err_msg=name)
  # The checkpoint holds both processes' rows, merged into the single process's state.
  state_one = _checkpoint_json(runs / "one" / "checkpoints", 4, "data")
  state_two = _checkpoint_json(runs / "two" / "checkpoints", 4, "data")
  assert sorted(state_two["rows"], key=int) == [str(r) for r in range(8)]
  assert state_two == state_one
