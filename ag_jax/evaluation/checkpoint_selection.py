"""Choose a gate run's checkpoint on the validation split, and export its gates.

  python -m ag_jax.evaluation.checkpoint_selection RUN_DIR [--steps 500,600,...] \\
      [--tasks niah_multikey,niah_multiquery] [--lengths 512] [--budgets 1,0.25,0.125] \\
      [--num-examples 32] [--out RUN_DIR/gates_selected]

A gate run's retrieval accuracy moves from checkpoint to checkpoint by as much as a change of
recipe (benchmarks/RESULTS.md: a run at 100% on multikey half-way through ended at 90.6%).
So every kept checkpoint (`checkpoint.keep` in the
recipe) is scored here on the suite's *validation* split under the kvpress protocol, AG at
each budget, and the one with the highest mean accuracy over the cells (ties to the later
step) is exported like `train.py` exports its last one. Report its quality on the test split
(`python -m ag_jax.evaluate --gates ...`), never on the split that chose it. The run config
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
  """The row with the highest mean accuracy; ties go to the later step (more training)."""
  return max(scored, key=lambda r: (r["mean_accuracy"], r["step"]))


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
                num_examples: int, log=None) -> tuple[list[dict], dict]:
  """One row per step: {"step", "cells": {cell: accuracy}, "mean_accuracy", "kept"}; and
  what the export needs (the config, the model config and each step's gate params)."""
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
  scored, gates = [], {}
  for step in steps:
    if step != steps[0]:
      gate_params, _ = checkpointer.restore_trainable(step)
    gates[step] = gate_params
    variables = {"params": {**params, "layers": {**params["layers"], "gate": gate_params}}}
    rows = tables.run_table(model, variables, tokenizer, suite, ["ag"], budgets)
    cells = {cell_name(r): float(r["accuracy"]) for r in rows}
    scored.append({"step": int(step), "cells": cells,
                   "mean_accuracy": float(np.mean(list(cells.values()))),
                   "kept": float(np.mean([r["kept"] for r in rows]))})
    if log:
      log(f"step {step}: mean accuracy {scored[-1]['mean_accuracy']:.4f}")
  return scored, {"train_config": cfg, "model_config": model_cfg, "gates": gates}


def table(scored: Sequence[dict], chosen: int) -> str:
  cells = list(scored[0]["cells"])
  lines = ["| step | " + " | ".join(cells) + " | mean | kept % |",
           "|---:|" + "---:|" * (len(cells) + 2)]
  for r in scored:
    mark = " (chosen)" if r["step"] == chosen else ""
    lines.append(f"| {r['step']}{mark} | " + " | ".join(f"{100 * r['cells'][c]:.1f}" for c in cells)
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
    missing = sorted(set(steps) - set(saved))
    if not saved or missing:
      raise ConfigError(f"steps {missing or 'any'} not saved in {checkpoints!r}; saved: "
                        f"{saved or 'none'}")
    log = lambda line: print(line, file=sys.stderr, flush=True)
    scored, run = score_steps(checkpointer, sorted(set(steps)), args.model, tasks=tasks,
                              lengths=lengths, budgets=budgets,
                              num_examples=args.num_examples, log=log)
    checkpointer.close()
    best = choose(scored)
    out = args.out or os.path.join(args.run_dir, "gates_selected")
    export_gates(out, run["train_config"].gate, run["model_config"], run["gates"][best["step"]])
    record = {"run_dir": os.path.abspath(args.run_dir), "split": "validation",
              "protocol": "kvpress", "tasks": tasks, "lengths": lengths, "budgets": budgets,
              "num_examples": args.num_examples, "chosen_step": best["step"], "steps": scored}
    atomic_io.write_text(os.path.join(out, "selection.json"), json.dumps(record, indent=2))
    print(f"validation split, kvpress protocol, AG accuracy % ({args.num_examples} examples "
          "per cell):")
    print(table(scored, best["step"]))
    print(f"chose step {best['step']}; wrote {out}", file=sys.stderr)
    return 0

  return run_cli(go)


if __name__ == "__main__":
  sys.exit(main())
