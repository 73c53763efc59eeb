"""The ablation notebook runs end to end in its small setting and shows its results."""

import json
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks", "ablations.ipynb")


def test_ablation_notebook_runs_small(tmp_path, monkeypatch):
  out = tmp_path / "out"
  monkeypatch.setenv("AG_JAX_NOTEBOOK_SMALL", "1")  # the kernel inherits the environment
  monkeypatch.setenv("AG_JAX_NOTEBOOK_OUT", str(out))
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device is enough; no simulated mesh
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert "parameters" in nb.cells[2].metadata.get("tags", [])
  start = time.perf_counter()
  NotebookClient(nb, timeout=280, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  assert time.perf_counter() - start < 300

  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) == 4  # policies curve, kept heatmap, keep map, ablation curve
  with open(out / "results.json") as f:
    rows = json.load(f)["rows"]
  assert sorted({r["policy"] for r in rows}) == sorted(
      ["ag", "full", "streaming_llm", "h2o", "snapkv", "random", "local"])
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
  with open(out / "gate_ablations" / "results.json") as f:
    variants = {r["variant"] for r in json.load(f)}
  assert variants == {"recipe", "gate kind: linear"}  # the small setting; the full run: all
  for png in ("policies_vs_kept.png", "ag_kept_heatmap.png", "ag_keep_map.png",
              "ablations_vs_kept.png"):
    assert (out / png).stat().st_size > 1000


def _run_install_cell(monkeypatch, cwd, repo_url):
  """Run the notebook's install cell as a fresh kernel would (ag_jax not importable), with
  pip replaced by a recorder; -> the pip arguments."""
  import importlib.util
  import subprocess
  nb = nbformat.read(NOTEBOOK, as_version=4)
  calls = []
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "ag_jax" else real_find_spec(name, *a))
  monkeypatch.setattr(subprocess, "check_call", lambda args: calls.append(args))
  monkeypatch.chdir(cwd)
  if repo_url is None:
    monkeypatch.delenv("AG_JAX_REPO_URL", raising=False)
  else:
    monkeypatch.setenv("AG_JAX_REPO_URL", repo_url)
  exec(compile(nb.cells[1].source, "install-cell", "exec"), {})  # pylint: disable=exec-used
  return calls


def test_install_cell_installs_the_clone_it_runs_in(monkeypatch):
  root = os.path.dirname(os.path.dirname(os.path.abspath(NOTEBOOK)))
  calls = _run_install_cell(monkeypatch, os.path.join(root, "notebooks"), None)
  assert len(calls) == 1 and calls[0][-1] == f"{root}[notebook]"


def test_install_cell_outside_a_clone_uses_repo_url_or_says_to_set_it(monkeypatch, tmp_path):
  calls = _run_install_cell(monkeypatch, tmp_path, "https://example.org/me/ag-jax.git")
  assert calls[0][-1] == "ag-jax[notebook] @ git+https://example.org/me/ag-jax.git"
  with pytest.raises(RuntimeError, match=r"(?s)clone.*REPO_URL"):
    _run_install_cell(monkeypatch, tmp_path, None)
