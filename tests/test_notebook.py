"""The ablation notebook runs end to end in its small setting and shows its results."""

import json
import os
import time

import nbformat
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
    variants = {r["policy"] for r in json.load(f)["rows"]}
  assert variants == {"baseline (attention, 2 heads, l2)", "gate: linear", "gate heads: 1",
                      "loss: hinge", "loss: linear"}
  for png in ("policies_vs_kept.png", "ag_kept_heatmap.png", "ag_keep_map.png",
              "ablations_vs_kept.png"):
    assert (out / png).stat().st_size > 1000
