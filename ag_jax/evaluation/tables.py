"""The result tables of DESIGN §4b: the RULER-style suite (accuracy per subtask and context
length) and stdlib bits per byte, each swept over policies x budgets under one protocol.

Rows are flat, one per (task, length, policy, budget): {task, length, policy, budget,
protocol, accuracy (ruler) or bpb and bpb_long_range (stdlib_bpb), kept, ...the cache
statistics}. A policy that evicts nothing (`full`) runs once per task and length and is
reported at budget 1: it keeps the whole context.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from ag_jax import atomic_io
from ag_jax.config import ConfigError
from ag_jax.evaluation import ruler_eval
from ag_jax.evaluation.scoring import _round_up
from ag_jax.evaluation.sweep import run_sweep

TABLE_TASKS = ("ruler", "stdlib_bpb")
DEFAULT_LENGTHS = (512, 1024, 2048, 4096)
MIN_LENGTH = 16      # the suite's shortest context (ag_jax.data.ruler.RulerConfig)
QUESTION_ROOM = 256  # positions left for question + answer when --lengths is not given
BUCKET = 16          # score_protocol pads contexts and continuations to this many tokens


def default_lengths(kind: str, max_position: int) -> list[int]:
  """DEFAULT_LENGTHS that fit the model: ruler leaves QUESTION_ROOM positions for the
  question and answer, stdlib_bpb windows are the whole length."""
  room = QUESTION_ROOM if kind == "ruler" else 0
  return [n for n in DEFAULT_LENGTHS if n + room <= max_position]


def build_tasks(kind: str, tokenizer, *, lengths: Sequence[int], num_examples: int,
                protocol: str, subtasks: Sequence[str] = (), split: str = "test") -> list:
  """RulerTask per subtask x length (named `subtask@length`), or one StdlibBpbTask per
  length (named `stdlib_bpb@length`: windows of `length` tokens, half context, half scored)."""
  if kind == "ruler":
    tasks = []
    for subtask in subtasks:
      for n in lengths:
        try:
          tasks += ruler_eval.build_ruler_tasks(tokenizer, [subtask], [n], num_examples,
                                                split=split, protocol=protocol)
        except ValueError as e:  # e.g. the needles alone fill the context
          raise ConfigError(f"--lengths {n}: the {subtask} examples cannot be built ({e}): "
                            "use larger --lengths") from None
    return tasks
  if kind == "stdlib_bpb":
    return [ruler_eval.StdlibBpbTask(f"stdlib_bpb@{n}", ruler_eval.bpb_windows(
        tokenizer, num_examples, context=n, split=split), protocol=protocol) for n in lengths]
  raise ConfigError(f"unknown table task {kind!r}: use one of {', '.join(TABLE_TASKS)}")


def _pairs(task, tokenizer) -> list[tuple[list[int], list[int]]]:
  """(context ids, continuation ids) of every example, as the task scores them."""
  if isinstance(task, ruler_eval.RulerTask):
    return [ruler_eval.encode_example(tokenizer, ex)[:2] for ex in task.examples]
  return [(list(ids[:len(ids) // 2]), list(ids[len(ids) // 2:])) for ids, _, _ in task.windows]


def check_fits(model, tokenizer, tasks: Sequence) -> None:
  """Every example fits the model's positions and vocabulary, before anything compiles."""
  cfg = model.cfg
  for task in tasks:
    pairs = _pairs(task, tokenizer)
    if not pairs:
      raise ConfigError(f"{task.name}: no examples; raise --num-examples")
    need = _round_up(max(len(c) for c, _ in pairs), BUCKET) + \
        _round_up(max(len(q) for _, q in pairs), BUCKET)
    if need > cfg.max_position:
      base, _, length = task.name.partition("@")
      what = "window" if base == "stdlib_bpb" else "context + question + answer"
      raise ConfigError(f"--lengths {length}: {base} needs up to {need} positions ({what}, "
                        f"padded to {BUCKET}), above the model's max_position "
                        f"{cfg.max_position}: use smaller --lengths")
    top = max(max(c + q) for c, q in pairs)
    if top >= cfg.vocab_size:
      raise ConfigError(f"the tokenizer gives token id {top}, but the model's vocab_size is "
                        f"{cfg.vocab_size}: pass the model's own --tokenizer")


def flat_rows(sweep_rows: Sequence[dict]) -> list[dict]:
  """run_sweep rows -> table rows (task and length split from `name@length`; a
  non-evicting policy's budget is 1)."""
  out = []
  for r in sweep_rows:
    base, _, length = r["task"].partition("@")
    row = {"task": base, "length": int(length), "policy": r["policy"],
           "budget": 1.0 if r["budget"] is None else r["budget"], "protocol": r["protocol"],
           **{m: r[m] for m in r["metrics"]}, "kept": r["kept"]}
    row.update({k: v for k, v in r.items() if k not in row and k not in ("metrics", "length")})
    out.append(row)
  return out


def run_table(model, variables, tokenizer, tasks: Sequence, policy_specs: Sequence[str],
              budgets: Sequence[float], *, batch_size: int = 16, backend: str | None = None,
              log=None) -> list[dict]:
  """Every task x policy x budget (non-evicting policies once), as flat rows."""
  return flat_rows(run_sweep(model, variables, tokenizer, tasks, policy_specs, budgets,
                             batch_size=batch_size, backend=backend, log=log))


def _metrics(rows: Sequence[dict]) -> list[str]:
  first = rows[0]
  return ["accuracy", "answer_nll"] if "accuracy" in first else ["bpb", "bpb_long_range"]


def markdown(rows: Sequence[dict], meta: dict | None = None) -> str:
  """One table per task: length, policy, budget, metrics, kept %, capacity, KV MiB."""
  out = []
  if meta:
    out += [", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
  for task in dict.fromkeys(r["task"] for r in rows):
    task_rows = [r for r in rows if r["task"] == task]
    metrics = [m for m in _metrics(task_rows) if m in task_rows[0]]
    protocols = ", ".join(dict.fromkeys(r["protocol"] for r in task_rows))
    out.append(f"### {task} (protocol {protocols})\n")
    out.append("| length | policy | budget | " + " | ".join(metrics)
               + " | kept % | capacity | KV MiB (full) |")
    out.append("|---:|---|---:|" + "---:|" * len(metrics) + "---:|---:|---:|")
    for r in task_rows:
      out.append(f"| {r['length']} | {r['policy']} | {r['budget']:g} | "
                 + " | ".join(f"{r[m]:.4f}" for m in metrics)
                 + f" | {100 * r['kept']:.1f} | {r['capacity']} | "
                 f"{r['kv_mib']:.3f} ({r['full_kv_mib']:.3f}) |")
    out.append("")
  return "\n".join(out)


def write_plots(rows: Sequence[dict], out_dir: str) -> list[str]:
  """One PNG per task and length: its metric against the budget, one line per policy."""
  from ag_jax import plots  # pylint: disable=g-import-not-at-top
  paths = []
  for task, length in dict.fromkeys((r["task"], r["length"]) for r in rows):
    cell = [r for r in rows if (r["task"], r["length"]) == (task, length)]
    metric = _metrics(cell)[0]
    paths.append(os.path.join(out_dir, f"{task}_{length}_vs_budget.png"))
    plots.accuracy_vs_kept(cell, metric, x="budget", path=paths[-1],
                           title=f"{task}, {length} tokens ({cell[0]['protocol']}): "
                           f"{metric} vs budget")
  return paths


def write_table(rows: Sequence[dict], out_dir: str, meta: dict | None = None,
                plots: bool = False) -> list[str]:
  """results.json (the list of rows), results.md and, with `plots`, the PNGs; their paths."""
  paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
  atomic_io.write_text(paths[0], json.dumps(list(rows), indent=2))
  atomic_io.write_text(paths[1], markdown(rows, meta))
  return paths + (write_plots(rows, out_dir) if plots else [])
