"""Evaluate KV eviction policies: `python -m ag_jax.evaluate --help` explains.

The library is `ag_jax.evaluation` (any model, variables and tokenizer); this module is
the command line: load a model, build the tasks, sweep policies x budgets, write
results.json and results.md (and PNG plots with --plots).
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Evaluate KV-cache eviction policies under memory budgets, all through the same evicting
cache and kernels.

Tasks (--task, repeatable):
  recall        greedy answers to recall questions (the embedded world's test prompts, or
                the generated recall corpus given by --recall), exact-match accuracy; the
                context is prefilled and evicted first, then the question (from the last
                '?') is read through the cache, as in kvpress
  perplexity    teacher-forced perplexity: each text's first --prefix-fraction is
                prefilled, the rest is decoded one token at a time through the cache
  piqa, ai2_arc[/ARC-Easy|/ARC-Challenge], arc_easy, arc_challenge, boolq, hellaswag
                multiple choice by log-likelihood (acc and acc_norm), read by TFDS name
                from --data-dir (prepared as array_record; see ag_jax.data)

Policies (--policy, repeatable; default: all that apply): ag (needs gates), full,
streaming_llm, h2o, snapkv, random, local, each optionally with knobs, e.g.
  --policy snapkv:window=16,kernel=5 --policy streaming_llm:sink=4 --policy h2o:recent=0.25
A budget is the fraction of each batch's context the cache may hold; `full` runs once.

Examples:
  python -m ag_jax.evaluate                                   # the embedded world
  python -m ag_jax.evaluate --task recall --task perplexity --budgets 0.1,0.25,0.5 --plots
  python -m ag_jax.evaluate --model /models/Llama-2-7b-hf --gates runs/cpt/gates \\
      --task piqa --task hellaswag --data-dir ~/tensorflow_datasets --num-examples 500
"""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m ag_jax.evaluate", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  from ag_jax.batch_decode import add_model_arguments  # pylint: disable=g-import-not-at-top
  src = add_model_arguments(p, "model (as decode.py)")
  src.add_argument("--seed", type=int, default=0, help="init seed of preset models")
  data = p.add_argument_group("tasks and data")
  data.add_argument("--task", action="append", default=[], help="recall (default), "
                    "perplexity, or a multiple-choice data set (repeatable)")
  data.add_argument("--num-examples", type=int, default=64, help="examples per task (default 64)")
  data.add_argument("--split", help="data split (default: test for recall, the labelled "
                    "evaluation split for multiple choice)")
  data.add_argument("--data-dir", help="TFDS data_dir (default: TFDS's)")
  data.add_argument("--recall", default="recall", help="recall corpus spec for models other "
                    "than the embedded world, e.g. recall:doc_len=512,num_facts=8")
  data.add_argument("--text-source", help="perplexity texts: a TFDS name or recall spec "
                    "(default: the recall corpus)")
  data.add_argument("--text-field", default="text")
  data.add_argument("--prefix-fraction", type=float, default=0.5)
  data.add_argument("--max-tokens", type=int, default=512, help="truncate perplexity texts")
  ev = p.add_argument_group("eviction")
  ev.add_argument("--policy", action="append", default=[], metavar="SPEC")
  ev.add_argument("--budgets", default="0.25,0.5", help="comma-separated fractions (default 0.25,0.5)")
  ev.add_argument("--capacities", help="comma-separated cache sizes in tokens, instead of budgets")
  ev.add_argument("--batch-size", type=int, default=16)
  ev.add_argument("--kernels", default=None, help="auto (default), reference, interpret, tpu, gpu")
  out = p.add_argument_group("output")
  out.add_argument("--out", default="outputs/eval", help="directory for results.json, "
                   "results.md and plots (default outputs/eval)")
  out.add_argument("--plots", action="store_true", help="also write PNG plots")
  out.add_argument("--quiet", action="store_true")
  return p


def _numbers(text: str | None, kind, what: str) -> list:
  if not text:
    return []
  try:
    return [kind(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _has_default_world() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("ag_jax.default_world") is not None


def load(args):
  """-> (model, variables, tokenizer, default_world module or None)."""
  if args.model is None and not _has_default_world():
    raise ValueError("no --model given and this install has no embedded default world "
                     "(ag_jax.default_world): pass --model (an HF directory or a preset)")
  from ag_jax.batch_decode import load_model  # pylint: disable=g-import-not-at-top
  model, variables, tokenizer = load_model(args)
  world = None
  if args.model is None:
    from ag_jax import default_world as world  # pylint: disable=g-import-not-at-top
  return model, variables, tokenizer, world


def build_tasks(args, world) -> list:
  from ag_jax.data import open_source  # pylint: disable=g-import-not-at-top
  from ag_jax import evaluation as ev  # pylint: disable=g-import-not-at-top
  from ag_jax.data import RecallSource  # pylint: disable=g-import-not-at-top
  n, tasks = args.num_examples, []
  split = args.split or "test"
  # The embedded world is evaluated on its own corpus; other models on --recall.
  recall = RecallSource(world.recall_config(), split, max(n, 1)) if world else \
      open_source(args.recall, split)
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

  budgets = _numbers(args.budgets, float, "--budgets")
  capacities = _numbers(args.capacities, int, "--capacities")
  for spec in args.policy:  # input errors first, before minutes of loading
    ev.parse_policy(spec)
  for name in args.task:
    if name not in ("recall", "perplexity"):
      ev.mc_format(name)
  model, variables, tokenizer, world = load(args)
  specs = args.policy or [p for p in ev.DEFAULT_POLICIES if p != "ag" or model.gate is not None]
  tasks = build_tasks(args, world)
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
  try:
    run(args)
  except (ValueError, FileNotFoundError) as e:  # our input errors all derive from these
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
