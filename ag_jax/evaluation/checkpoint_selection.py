"""Choose a gate run's checkpoint on the validation split, and export its gates.

  python -m ag_jax.evaluation.checkpoint_selection RUN_DIR [--steps 500,600,...] \\
      [--tasks niah_multikey,niah_multiquery] [--lengths 512] [--budgets 1,0.25,0.125] \\
      [--num-examples 32] [--average 700,800,900,1000] [--out RUN_DIR/gates_selected]

A gate run's retrieval accuracy moves from checkpoint to checkpoint by as much as a change of
recipe (benchmarks/RESULTS.md: a run at 100% on multikey half-way through ended at 90.6%).
So every kept checkpoint (`checkpoint.keep` in the
recipe) is scored here on the suite's *validation* split under the kvpress protocol, AG at
each budget, and the one with the highest mean accuracy over the cells (ties to the later
step) is exported like `train.py` exports its last one. `--average` adds one more candidate: the
element-wise mean of those checkpoints' gate parameters (a uniform average along the run's
tail, as stochastic weight averaging takes it), which smooths the checkpoint-to-checkpoint
swing instead of betting on one step; it is scored and chosen by the same rule. Report the
choice's quality on the test split (`python -m ag_jax.evaluate --gates ...`), never on the
split that chose it. The run config
saved in each checkpoint names the base model, the tokenizer and the gate; `--model` points
elsewhere when the base has moved (its shapes must fit the gates).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

DEFAULT_TASKS = "niah_multikey,niah_multiquery"


def cell_name(row: dict) -> str:
  return f"{row['task']}@{row['length']} b{row['budget']:g}"


def choose(scored: Sequence[dict]) -> dict:
  """The row with the highest mean accuracy; ties go to the later step (more training). An
  average's row (`"average_of"`, `"step"` None) ranks on a tie just after the single step it
  ends with: a tie goes to the simpler candidate."""
  def tie_break(r):
    return r["step"] if r["step"] is not None else max(r["average_of"]) - 0.5
  return max(scored, key=lambda r: (r["mean_accuracy"], tie_break(r)))


def average_params(trees: Sequence[dict]) -> dict:
  """The element-wise mean of same-shaped gate parameter trees, in float32, cast back to
  each leaf's dtype."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda *leaves: np.mean(np.stack([np.asarray(x, np.float32)
                                                        for x in leaves]), axis=0)
                      .astype(np.asarray(leaves[0]).dtype), *trees)


def load_base(config: dict, model_dir: str | None):
  """(TrainConfig, ModelConfig, base params, tokenizer) of the run that saved `config`."""
  import ag_jax  # pylint: disable=g-import-not-at-top
  from ag_jax import train_config  # pylint: disable=g-import-not-at-top
  from ag_jax.config import ConfigError  # pylint: disable=g-import-not-at-top

  cfg = train_config.from_dict(config)
  if cfg.run.trainable != "gates" or cfg.gate is None:
    raise ConfigError(f"the run trained {cfg.run.trainable!r}, not gates on a frozen base: "
                      "checkpoint selection chooses among gate checkpoints only")
  path = model_dir or cfg.model.hf_path
  if path is None or not os.path.isdir(path):
    raise ConfigError(f"the run's base model {path!r} is not a model directory: pass --model "
                      "(the HF directory the gates were trained on)")
  model_cfg, params = ag_jax.load_hf_llama(path)
  spec = cfg.data.tokenizer or path
  try:
    tokenizer = ag_jax.load_tokenizer(spec)
  except (FileNotFoundError, OSError, ValueError) as e:
    raise ConfigError(f"the run's tokenizer {spec!r}: {e}") from None
  return cfg, model_cfg, params, tokenizer


def score_steps(checkpointer, steps: Sequence[int], model_dir: str | None, *,
                tasks: Sequence[str], lengths: Sequence[int], budgets: Sequence[float],
                num_examples: int, average: Sequence[int] = (),
                log=None) -> tuple[list[dict], dict]:
  """One row per step: {"step", "cells": {cell: accuracy}, "mean_accuracy", "kept"}, then,
  if `average` names steps, one row for the mean of their gates ("step" None, "average_of");
  and what the export needs (the config, the model config, each step's gate params and,
  under "average", the averaged ones)."""
  import ag_jax  # pylint: disable=g-import-not-at-top
  from ag_jax.checkpoint import check_gate_params  # pylint: disable=g-import-not-at-top
  from ag_jax.evaluation import tables  # pylint: disable=g-import-not-at-top

  gate_params, config = checkpointer.restore_trainable(steps[0])
  cfg, model_cfg, params, tokenizer = load_base(config, model_dir)
  check_gate_params(cfg.gate, model_cfg, gate_params)  # a --model the gates do not fit
  model = ag_jax.Llama(model_cfg, gate=cfg.gate)
  suite = tables.build_tasks("ruler", tokenizer, lengths=lengths, num_examples=num_examples,
                             protocol="kvpress", subtasks=tasks, split="validation")
  tables.check_fits(model, tokenizer, suite)

  def score(gate_params) -> dict:
    variables = {"params": {**params, "layers": {**params["layers"], "gate": gate_params}}}
    rows = tables.run_table(model, variables, tokenizer, suite, ["ag"], budgets)
    cells = {cell_name(r): float(r["accuracy"]) for r in rows}
    return {"cells": cells, "mean_accuracy": float(np.mean(list(cells.values()))),
            "kept": float(np.mean([r["kept"] for r in rows]))}

  gates = {steps[0]: gate_params}

  def restore(step: int) -> dict:  # each checkpoint is read once, whichever list names it
    if step not in gates:
      gates[step] = checkpointer.restore_trainable(step)[0]
    return gates[step]

  scored = []
  for step in steps:
    restore(step)
    scored.append({"step": int(step), **score(gates[step])})
    if log:
      log(f"step {step}: mean accuracy {scored[-1]['mean_accuracy']:.4f}")
  run = {"train_config": cfg, "model_config": model_cfg, "gates": gates}
  if average:
    run["average"] = average_params([restore(s) for s in average])
    scored.append({"step": None, "average_of": [int(s) for s in average],
                   **score(run["average"])})
    if log:
      log(f"mean of steps {list(average)}: mean accuracy {scored[-1]['mean_accuracy']:.4f}")
  return scored, run


def table(scored: Sequence[dict], chosen: dict) -> str:
  cells = list(scored[0]["cells"])
  lines = ["| step | " + " | ".join(cells) + " | mean | kept % |",
           "|---:|" + "---:|" * (len(cells) + 2)]
  for r in scored:
    mark = " (chosen)" if r is chosen else ""
    name = r["step"] if r["step"] is not None else "mean of " + ", ".join(map(str, r["average_of"]))
    lines.append(f"| {name}{mark} | " + " | ".join(f"{100 * r['cells'][c]:.1f}" for c in cells)
                 + f" | {100 * r['mean_accuracy']:.1f} | {100 * r['kept']:.1f} |")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run_dir", help="the gate run's out_dir (its checkpoints/ are read)")
  p.add_argument("--steps", help="comma-separated saved steps (default: every saved one)")
  p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"suite tasks (default {DEFAULT_TASKS})")
  p.add_argument("--lengths", default="512", help="context tokens (default 512)")
  p.add_argument("--budgets", default="1,0.25,0.125", help="AG budgets (default 1,0.25,0.125)")
  p.add_argument("--num-examples", type=int, default=32, help="validation examples per cell")
  p.add_argument("--model", help="the base model directory (default: the run's model.hf_path)")
  p.add_argument("--average", help="comma-separated saved steps whose gates' mean is one more "
                 "candidate (e.g. the last four)")
  p.add_argument("--out", help="export the chosen gates here (default RUN_DIR/gates_selected)")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from ag_jax.cli_errors import run_cli  # pylint: disable=g-import-not-at-top
  from ag_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from ag_jax.data import ruler  # pylint: disable=g-import-not-at-top
  from ag_jax.evaluate_args import numbers  # pylint: disable=g-import-not-at-top

  def go() -> int:
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in ruler.RETRIEVAL_TASKS]
    if not tasks or unknown:
      raise ConfigError(f"--tasks {args.tasks!r}: choose from {', '.join(ruler.RETRIEVAL_TASKS)}")
    lengths = numbers(args.lengths, int, "--lengths")
    budgets = numbers(args.budgets, float, "--budgets")
    if not lengths or not budgets or any(not 0 < b <= 1 for b in budgets) or args.num_examples < 1:
      raise ConfigError("--lengths, --budgets (each in (0, 1]) and --num-examples (>= 1) must "
                        "each name at least one value")
    checkpoints = os.path.join(args.run_dir, "checkpoints")
    if not os.path.isdir(checkpoints):
      raise ConfigError(f"{checkpoints!r} does not exist: pass a gate run's out_dir (train.py "
                        "saves its checkpoints there; keep several with checkpoint.keep)")
    from ag_jax import atomic_io  # pylint: disable=g-import-not-at-top
    from ag_jax.checkpoint import TrainCheckpointer, export_gates  # pylint: disable=g-import-not-at-top
    checkpointer = TrainCheckpointer(checkpoints, every=0, keep=1_000_000, async_save=False)
    saved = sorted(checkpointer.all_steps())
    steps = numbers(args.steps, int, "--steps") if args.steps else saved
    average = sorted(set(numbers(args.average, int, "--average"))) if args.average else []
    if len(average) == 1:
      raise ConfigError(f"--average {args.average!r}: name at least two steps to average")
    missing = sorted((set(steps) | set(average)) - set(saved))
    if not saved or missing:
      raise ConfigError(f"steps {missing or 'any'} not saved in {checkpoints!r}; saved: "
                        f"{saved or 'none'}")
    log = lambda line: print(line, file=sys.stderr, flush=True)
    scored, run = score_steps(checkpointer, sorted(set(steps)), args.model, tasks=tasks,
                              lengths=lengths, budgets=budgets,
                              num_examples=args.num_examples, average=average, log=log)
    checkpointer.close()
    best = choose(scored)
    out = args.out or os.path.join(args.run_dir, "gates_selected")
    chosen_gates = run["gates"][best["step"]] if best["step"] is not None else run["average"]
    export_gates(out, run["train_config"].gate, run["model_config"], chosen_gates)
    record = {"run_dir": os.path.abspath(args.run_dir), "split": "validation",
              "protocol": "kvpress", "tasks": tasks, "lengths": lengths, "budgets": budgets,
              "num_examples": args.num_examples, "chosen_step": best["step"],
              "chosen_average_of": best.get("average_of"), "steps": scored}
    atomic_io.write_text(os.path.join(out, "selection.json"), json.dumps(record, indent=2))
    print(f"validation split, kvpress protocol, AG accuracy % ({args.num_examples} examples "
          "per cell):")
    print(table(scored, best))
    what = (f"step {best['step']}" if best["step"] is not None
            else f"the mean of steps {best['average_of']}")
    print(f"chose {what}; wrote {out}", file=sys.stderr)
    return 0

  return run_cli(go)


if __name__ == "__main__":
  sys.exit(main())
