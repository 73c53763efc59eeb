"""Sweeps: every task under every policy and budget, as JSON rows and a markdown table.

A policy spec is a registry name with optional knobs: `h2o`, `snapkv:window=16,kernel=5`,
`streaming_llm:sink=4`. Policies that evict nothing (`full`) run once per task, without a
budget: they are the reference row.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import yaml

from ag_jax import atomic_io, engine, policies
from ag_jax.engine import InferenceError
from ag_jax.policies import Policy, PolicyError

DEFAULT_POLICIES = ("ag", "full", "streaming_llm", "h2o", "snapkv", "random", "local")


def parse_policy(spec: str) -> Policy:
  """`name` or `name:key=value,key=value` (values read as yaml scalars) -> Policy."""
  name, _, knobs = spec.partition(":")
  kwargs = {}
  for item in filter(None, (s.strip() for s in knobs.split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise PolicyError(f"bad policy knob {item!r} in {spec!r}: use name:key=value,key=value")
    kwargs[key.strip()] = yaml.safe_load(value) if value.strip() else None
  return policies.make_policy(name.strip(), **kwargs)


def run_sweep(model, variables, tokenizer, tasks: Sequence, policy_specs: Sequence[str],
              budgets: Sequence[float | None] = (None,), *, capacities: Sequence[int] = (),
              batch_size: int = 16, backend: str | None = None, log=None) -> list[dict]:
  """Rows {task, policy (the spec), describe (as run), budget, capacity, kept, kv_mib, ...,
  metrics} for every task x
  policy x budget (or x capacity when `capacities` is given instead of budgets). Each
  policy's compiled programs, and jax's caches with them, are dropped once its budgets ran
  (`engine.clear_compiled`): a long sweep otherwise runs out of memory mappings."""
  parsed = [(spec, parse_policy(spec)) for spec in policy_specs]
  for spec, policy in parsed:
    if policy.uses_gate and model.gate is None:
      raise InferenceError(f"policy {spec!r} needs gates, but the model has none: load "
                           "trained gates (--gates) or drop it from the policies")
  sizes = [("capacity", c) for c in capacities] or [("budget", b) for b in budgets]
  rows = []
  for task in tasks:
    for spec, policy in parsed:
      for kind, size in (sizes if policy.evicts else [("budget", None)]):
        start = time.perf_counter()
        result = task.run(model, variables, tokenizer, policy, batch_size=batch_size,
                          backend=backend, **{kind: size})
        row = {"task": task.name, "policy": spec, "budget": size if kind == "budget" else None, "metrics": list(task.metrics),
               **result, "seconds": time.perf_counter() - start}
        rows.append(row)
        if log is not None:
          log(f"{task.name:>12} {spec:>24} {_size(row):>10}: "
              + ", ".join(f"{m}={row[m]:.4g}" for m in task.metrics)
              + f", kept {100 * row['kept']:.1f}%")
      engine.clear_compiled()  # this policy's programs are not needed again: free them
  return rows


def _size(row) -> str:
  return f"budget {row['budget']:g}" if row["budget"] is not None else f"capacity {row['capacity']}"


def markdown_table(rows: Sequence[dict]) -> str:
  """One table per task: policy, budget, capacity, kept %, KV MiB (of full), metrics."""
  out = []
  for task in dict.fromkeys(r["task"] for r in rows):
    task_rows = [r for r in rows if r["task"] == task]
    metrics = task_rows[0]["metrics"]
    out.append(f"### {task}\n")
    out.append("| policy | budget | capacity | kept % | KV MiB (full) | "
               + " | ".join(metrics) + " |")
    out.append("|---|---:|---:|---:|---:|" + "---:|" * len(metrics))
    for r in task_rows:
      budget = "-" if r["budget"] is None else f"{r['budget']:g}"
      out.append(f"| {r['policy']} | {budget} | {r['capacity']} | {100 * r['kept']:.1f} | "
                 f"{r['kv_mib']:.3f} ({r['full_kv_mib']:.3f}) | "
                 + " | ".join(f"{r[m]:.4f}" for m in metrics) + " |")
    out.append("")
  return "\n".join(out)


def write_results(rows: Sequence[dict], out_dir: str, meta: dict | None = None) -> tuple[str, str]:
  """results.json ({"meta", "rows"}) and results.md under out_dir; returns both paths."""
  json_path, md_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
  atomic_io.write_text(json_path, json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=2))
  atomic_io.write_text(md_path, markdown_table(rows))
  return json_path, md_path
