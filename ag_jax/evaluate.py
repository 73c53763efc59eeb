"""Evaluate KV eviction policies: `python -m ag_jax.evaluate --help` explains.

The library is `ag_jax.evaluation` (any model, variables and tokenizer); this module is
the command line: load a model, build the tasks, sweep policies x budgets, write
results.json and results.md (and PNG plots with --plots). Its flags and their checks are
`ag_jax.evaluate_args`; the ruler and stdlib_bpb tables are `ag_jax.evaluation.tables`.
"""

from __future__ import annotations

import os
import sys

from ag_jax.evaluate_args import DESCRIPTION, build_parser, check_args, numbers, subtask_list

__all__ = ["DESCRIPTION", "build_parser", "load", "main", "run", "run_table"]


def _has_default_world() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("ag_jax.default_world") is not None


def load(args):
  """-> (model, variables, tokenizer); no --model: the embedded default world."""
  if args.model is None and not _has_default_world():
    raise ValueError("no --model given and this install has no embedded default world "
                     "(ag_jax.default_world): pass --model (an HF directory or a preset)")
  from ag_jax.batch_decode import load_model  # pylint: disable=g-import-not-at-top
  return load_model(args)


def build_tasks(args) -> list:
  from ag_jax.data import open_source  # pylint: disable=g-import-not-at-top
  from ag_jax import evaluation as ev  # pylint: disable=g-import-not-at-top
  n, tasks = args.num_examples, []
  split = args.split or "test"
  recall = open_source(args.recall, split)
  for name in args.task or ["recall"]:
    if name == "recall":
      examples = [(recall[i]["prompt"], recall[i]["answer"]) for i in range(min(n, len(recall)))]
      tasks.append(ev.RecallTask("recall", examples, question_marker="?"))
    elif name == "perplexity":
      source = open_source(args.text_source, split, args.data_dir) if args.text_source else recall
      texts = [source[i][args.text_field] for i in range(min(n, len(source)))]
      tasks.append(ev.PerplexityTask("perplexity", texts, args.prefix_fraction, args.max_tokens))
    else:
      examples = ev.load_multiple_choice(name, args.split, args.data_dir, limit=n)
      tasks.append(ev.MultipleChoiceTask(name, examples))
  return tasks


def run(args) -> list[dict]:
  from ag_jax import evaluation as ev  # pylint: disable=g-import-not-at-top

  if not args.task and args.model is None:
    args.task = ["ruler"]  # the embedded world's own table (before the checks of its flags)
  check_args(args)
  if set(args.task) & {"ruler", "stdlib_bpb"}:
    return run_table(args)
  budgets = numbers(args.budgets, float, "--budgets")
  capacities = numbers(args.capacities, int, "--capacities")
  for spec in args.policy:  # input errors first, before minutes of loading
    ev.parse_policy(spec)
  for name in args.task:
    if name not in ("recall", "perplexity"):
      ev.mc_format(name)
  model, variables, tokenizer = load(args)
  specs = args.policy or [p for p in ev.DEFAULT_POLICIES if p != "ag" or model.gate is not None]
  tasks = build_tasks(args)
  log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
  rows = ev.run_sweep(model, variables, tokenizer, tasks, specs, budgets or [None],
                      capacities=capacities, batch_size=args.batch_size, backend=args.kernels,
                      log=log)
  meta = {"model": args.model or "default_world", "gates": args.gates, "tasks": args.task,
          "budgets": budgets, "capacities": capacities, "num_examples": args.num_examples}
  json_path, md_path = ev.write_results(rows, args.out, meta)
  if args.plots:
    write_plots(rows, args.out)
  print(ev.markdown_table(rows))
  print(f"wrote {json_path} and {md_path}", file=sys.stderr)
  return rows


def run_table(args) -> list[dict]:
  """--task ruler or stdlib_bpb: one table, every length x policy x budget."""
  from ag_jax import evaluation as ev  # pylint: disable=g-import-not-at-top
  from ag_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from ag_jax.evaluation import tables  # pylint: disable=g-import-not-at-top
  kind = args.task[0]
  for spec in args.policy:  # input errors first, before minutes of loading
    ev.parse_policy(spec)
  model, variables, tokenizer = load(args)
  max_position = model.cfg.max_position
  lengths = numbers(args.lengths, int, "--lengths") or tables.default_lengths(kind, max_position)
  if not lengths:
    raise ConfigError(f"the model's max_position {max_position} holds none of the default "
                      f"lengths {','.join(map(str, tables.DEFAULT_LENGTHS))}: pass --lengths")
  protocol, split = args.protocol or "kvpress", args.split or "test"
  tasks = tables.build_tasks(kind, tokenizer, lengths=lengths, num_examples=args.num_examples,
                             protocol=protocol, subtasks=subtask_list(args), split=split)
  tables.check_fits(model, tokenizer, tasks)
  specs = args.policy or [p for p in ev.DEFAULT_POLICIES if p != "ag" or model.gate is not None]
  log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
  rows = tables.run_table(model, variables, tokenizer, tasks, specs,
                          numbers(args.budgets, float, "--budgets"),
                          batch_size=args.batch_size, backend=args.kernels, log=log)
  meta = {"model": args.model or "default world", "gates": args.gates or (
      "default world" if args.model is None and model.gate is not None else None),
          "protocol": protocol, "split": split, "examples per length": args.num_examples}
  paths = tables.write_table(rows, args.out, meta, plots=args.plots)
  print(tables.markdown(rows))
  print(f"wrote {', '.join(paths)}", file=sys.stderr)
  return rows


def write_plots(rows, out_dir: str) -> list[str]:
  from ag_jax import plots  # pylint: disable=g-import-not-at-top
  paths = []
  for task in dict.fromkeys(r["task"] for r in rows):
    task_rows = [r for r in rows if r["task"] == task]
    metric = task_rows[0]["metrics"][0]
    paths.append(os.path.join(out_dir, f"{task.replace('/', '_')}_vs_kept.png"))
    plots.accuracy_vs_kept(task_rows, metric, title=f"{task}: {metric} vs KV kept", path=paths[-1])
    for r in task_rows:
      if r["policy"] == "ag":
        size = "full" if r["budget"] is None else f"{r['budget']:g}"
        paths.append(os.path.join(out_dir, f"{task.replace('/', '_')}_ag_kept_{size}.png"))
        plots.kept_heatmap(r["kept_per_layer_head"], title=f"AG kept, budget {size}",
                           path=paths[-1])
  return paths


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from ag_jax.cli_errors import run_cli  # pylint: disable=g-import-not-at-top

  def go() -> int:
    try:
      run(args)
    except (ValueError, FileNotFoundError) as e:  # the data and TFDS layers' input errors too
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  return run_cli(go)


if __name__ == "__main__":
  sys.exit(main())
