"""The paper's gate ablations as one command (issue 14):

  python -m ag_jax.evaluation.ablations --config configs/train/ruler_gates.yaml \\
      --set model.hf_path=ag_jax/assets/ruler_tiny/model --steps 300 --seeds 0,1,2 \\
      --out out/ablations

Each variant is the recipe with one change (gate kind, gate heads, gate head size, loss form,
target keep ratio, budget-aware training off, the paper's unbounded gate layout), trained
with the base frozen for the same steps and seeds, then scored on the RULER-style suite
(test split) under the kvpress protocol with the AG policy at every budget (1 = the gates'
own flags, an ample cache): accuracy and the kept share. Writes results.json (one row per
variant, seed, task, length and budget) and results.md (mean and worst over seeds; one
seed: its accuracy) after every variant and seed, so a stopped run leaves the table of what
it finished. A variant whose gates are already in `--work-dir` is not trained again (its
training time and keep ratio are read back), so an interrupted run continues with the same
command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from ag_jax import atomic_io

DEFAULT_RECIPE = "configs/train/ruler_gates.yaml"
TRAINED_FILE = "ablation_trained.json"  # in a variant's run dir: its training time, keep ratio
# name -> overrides of the recipe. The recipe's own gate is the reference row.
VARIANTS: dict[str, tuple[str, ...]] = {
    "recipe": (),
    "gate kind: linear": ("gate.kind=linear",),
    "gate heads: 2": ("gate.num_heads=2",),
    "gate head size: 16": ("gate.head_dim=16",),
    "loss: l2": ("gate.eviction_loss=l2",),
    "loss: linear": ("gate.eviction_loss=linear",),
    "target keep: 0.1": ("gate.target_keep=0.1",),
    "target keep: 0.5": ("gate.target_keep=0.5",),
    "flags alone (no budget-aware training)": ("gate.train_budgets=null",),
    # The paper's MHA' layout (issue 10's "before"): 4 heads x 32 with their own k/v over the
    # whole context, a gate cache that grows with it.
    "gate layout: paper (4 x 32, own k/v, whole context)": (
        "gate.num_heads=4", "gate.num_kv_heads=null", "gate.head_dim=32", "gate.window=null"),
}


@dataclasses.dataclass
class Trained:
  gates_dir: str
  steps: int
  seconds: float | None   # wall time of the training run that finished it (a resumed run:
                          # its own steps only); None: not recorded
  keep_ratio: float | None  # the hard keep ratio of the last logged training interval


def variant_config(recipe, overrides: Sequence[str], steps: int | None, seed: int,
                   out_dir: str):
  """The TrainConfig of one variant and seed. recipe: a yaml path or a dict of the same
  sections (a notebook's recipe); overrides: `key=value` strings."""
  from ag_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ag_jax import train_config  # pylint: disable=g-import-not-at-top
  extra = [f"run.out_dir={out_dir}", f"run.seed={seed}", f"data.seed={seed}",
           "run.eval_every=0", "run.progress=false"]
  if steps is not None:
    extra.append(f"run.steps={steps}")
  data = dict(recipe) if isinstance(recipe, dict) else config_lib.read_yaml(recipe)
  cfg = train_config.from_dict(config_lib.merge(data, config_lib.parse_overrides(
      list(overrides) + extra)))
  train_config.validate(cfg)
  if cfg.run.trainable != "gates" or cfg.gate is None:
    raise config_lib.ConfigError(
        f"the recipe {recipe if isinstance(recipe, str) else '(a dict)'!r} does not train "
        f"gates (run.trainable: gates and a gate section): give a gate recipe such as "
        f"{DEFAULT_RECIPE}")
  return cfg


def train_variant(cfg, log=None) -> Trained:
  """Train one variant's gates into cfg.run.out_dir/gates (or find them there)."""
  from ag_jax.checkpoint import GATE_CONFIG_FILE  # pylint: disable=g-import-not-at-top
  from ag_jax.train import train  # pylint: disable=g-import-not-at-top
  gates_dir = os.path.join(cfg.run.out_dir, "gates")
  record = os.path.join(cfg.run.out_dir, TRAINED_FILE)
  if os.path.exists(os.path.join(gates_dir, GATE_CONFIG_FILE)):
    found = json.load(open(record)) if os.path.exists(record) else {}
    return Trained(gates_dir, cfg.run.steps, found.get("seconds"), found.get("keep_ratio"))
  start = time.perf_counter()
  result = train(cfg)
  seconds = time.perf_counter() - start
  keep = result.history[-1].get("keep_ratio") if result.history else None
  atomic_io.write_text(record, json.dumps({"seconds": seconds, "keep_ratio": keep}))
  if log:
    log(f"trained {cfg.run.out_dir}: {cfg.run.steps} steps in {seconds:.0f} s, keep ratio "
        f"{keep if keep is None else round(keep, 3)}")
  return Trained(result.gates_dir, cfg.run.steps, seconds, keep)


def recipe_tokenizer(cfg):
  from ag_jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  return load_tokenizer(cfg.data.tokenizer or cfg.model.hf_path)


def load_gated(cfg, gates_dir: str):
  """(model, variables, tokenizer): the recipe's base with the variant's gates."""
  import ag_jax  # pylint: disable=g-import-not-at-top
  model_cfg, params = ag_jax.load_hf_llama(cfg.model.hf_path)
  gate, gate_params = ag_jax.load_gates(gates_dir, model_cfg=model_cfg)
  params = {**params, "layers": {**params["layers"], "gate": gate_params}}
  return ag_jax.Llama(model_cfg, gate=gate), {"params": params}, recipe_tokenizer(cfg)


def run_ablations(recipe, variants: dict[str, Sequence[str]], *, seeds: Sequence[int],
                  steps: int | None, tasks: Sequence[str], lengths: Sequence[int],
                  budgets: Sequence[float], num_examples: int, work_dir: str,
                  overrides: Sequence[str] = (), batch_size: int = 16, log=None,
                  on_rows=None) -> list[dict]:
  """Rows {variant, seed, task, length, budget, accuracy, kept, ..., train_seconds,
  train_keep_ratio} for every variant x seed x task x length x budget (AG, kvpress).
  on_rows(rows so far), if given, after each variant and seed."""
  from ag_jax.evaluation import tables  # pylint: disable=g-import-not-at-top
  configs = {(name, seed): variant_config(
      recipe, list(overrides) + list(changes), steps, seed,
      os.path.join(work_dir, f"{_slug(name)}_seed{seed}"))
      for name, changes in variants.items() for seed in seeds}  # every config checked first
  # The questions too, before any training (the variants share the recipe's tokenizer).
  first = next(iter(configs.values()))
  suite = tables.build_tasks("ruler", recipe_tokenizer(first), lengths=lengths,
                             num_examples=num_examples, protocol="kvpress", subtasks=tasks,
                             split="test")
  sizes = [None if b >= 1.0 else b for b in budgets]  # None: the gates' own flags
  rows, checked = [], False
  for (name, seed), cfg in configs.items():
    trained = train_variant(cfg, log)
    model, variables, tokenizer = load_gated(cfg, trained.gates_dir)
    if not checked:
      tables.check_fits(model, tokenizer, suite)
      checked = True
    for r in tables.run_table(model, variables, tokenizer, suite, ["ag"], sizes,
                              batch_size=batch_size):  # budget None comes back as 1
      rows.append({"variant": name, "seed": seed, **r,
                   "train_steps": trained.steps, "train_seconds": trained.seconds,
                   "train_keep_ratio": trained.keep_ratio, "gate": dataclasses.asdict(model.gate)})
      if log:
        log(f"{name} seed {seed} {r['task']}@{r['length']} budget {rows[-1]['budget']:g}: "
            f"accuracy {r['accuracy']:.3f}, kept {100 * r['kept']:.1f}%")
    if on_rows:
      on_rows(rows)
  return rows


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def markdown(rows: Sequence[dict]) -> str:
  """One table per task and length: a row per variant, a column per budget, cells
  'accuracy % (kept %)': the mean over seeds and the worst seed's accuracy, or with one
  seed its accuracy."""
  out = []
  budgets = sorted({r["budget"] for r in rows}, reverse=True)
  for task, length in dict.fromkeys((r["task"], r["length"]) for r in rows):
    cell = [r for r in rows if (r["task"], r["length"]) == (task, length)]
    seeds = sorted({r["seed"] for r in cell})
    one = len(seeds) == 1  # one seed: its accuracy, not a mean and worst of one
    out.append(f"### {task} @ {length} tokens (kvpress protocol, AG; "
               + (f"seed {seeds[0]})\n" if one else
                  f"seeds {','.join(map(str, seeds))}: mean, worst)\n"))
    out.append("| variant | " + " | ".join(
        "ample (budget 1)" if b >= 1 else f"budget {b:g}" for b in budgets) + " |")
    out.append("|---|" + "---:|" * len(budgets))
    for variant in dict.fromkeys(r["variant"] for r in cell):
      cells = []
      for b in budgets:
        got = [r for r in cell if r["variant"] == variant and r["budget"] == b]
        acc = np.array([r["accuracy"] for r in got]) * 100
        kept = np.mean([r["kept"] for r in got]) * 100
        score = f"{acc[0]:.1f}" if one else f"{acc.mean():.1f}, {acc.min():.1f}"
        cells.append(f"{score} (kept {kept:.0f}%)")
      out.append(f"| {variant} | " + " | ".join(cells) + " |")
    out.append("")
  return "\n".join(out)


def write(rows: Sequence[dict], out_dir: str) -> tuple[str, str]:
  """results.json (the list of rows) and results.md under out_dir; returns both paths."""
  paths = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
  atomic_io.write_text(paths[0], json.dumps(list(rows), indent=2))
  atomic_io.write_text(paths[1], markdown(rows))
  return paths


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m ag_jax.evaluation.ablations", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=DEFAULT_RECIPE, help="the gate recipe every variant changes")
  p.add_argument("--variants", default=None,
                 help=f"comma-separated names (default all): {', '.join(VARIANTS)}")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
  p.add_argument("--seeds", default="0", help="comma-separated seeds (gate init and data draws)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a recipe override for every variant (e.g. data.seq_len=512)")
  p.add_argument("--tasks", default="niah_multikey", help="suite subtasks, comma-separated")
  p.add_argument("--lengths", default="512", help="context lengths, comma-separated")
  p.add_argument("--budgets", default="1,0.25,0.125", help="1 = the gates' own flags")
  p.add_argument("--num-examples", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--out", required=True, help="results.json and results.md go here")
  p.add_argument("--work-dir", default=None, help="the variants' training runs (default OUT/runs)")
  return p


def _numbers(text: str, kind, flag: str) -> list:
  from ag_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from ag_jax.evaluate_args import numbers  # pylint: disable=g-import-not-at-top
  values = numbers(text, kind, flag)
  if not values:
    raise ConfigError(f"{flag} is empty: give comma-separated numbers")
  return values


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from ag_jax.cli_errors import run_cli  # pylint: disable=g-import-not-at-top
  from ag_jax.config import ConfigError  # pylint: disable=g-import-not-at-top

  def go() -> int:
    names = list(VARIANTS) if args.variants is None else \
        [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
      raise ConfigError(f"--variants: unknown {unknown or 'none given'}; choose from "
                        f"{', '.join(VARIANTS)}")
    budgets = _numbers(args.budgets, float, "--budgets")
    if not all(0 < b <= 1 for b in budgets):
      raise ConfigError(f"--budgets {args.budgets!r}: each budget must be in (0, 1]")
    from ag_jax.data.ruler import TASKS  # pylint: disable=g-import-not-at-top
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
      raise ConfigError(f"--tasks: unknown {unknown or 'none given'}; choose from "
                        f"{', '.join(TASKS)}")
    log = lambda line: print(line, file=sys.stderr, flush=True)
    rows = run_ablations(
        args.config, {n: VARIANTS[n] for n in names}, seeds=_numbers(args.seeds, int, "--seeds"),
        steps=args.steps, tasks=tasks,
        lengths=_numbers(args.lengths, int, "--lengths"), budgets=budgets,
        num_examples=args.num_examples, overrides=args.set, batch_size=args.batch_size,
        work_dir=args.work_dir or os.path.join(args.out, "runs"), log=log,
        on_rows=lambda so_far: write(so_far, args.out))
    print(markdown(rows))
    return 0
  return run_cli(go)


if __name__ == "__main__":
  sys.exit(main())
