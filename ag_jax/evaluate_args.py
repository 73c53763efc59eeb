"""The command line of `python -m ag_jax.evaluate`: its flags and their checks, before
anything is loaded or compiled (ag_jax/evaluate.py runs them)."""

from __future__ import annotations

import argparse

from ag_jax.config import ConfigError

DESCRIPTION = """\
Evaluate KV-cache eviction policies under memory budgets, all through the same evicting
cache and kernels.

Tasks (--task, repeatable):
  recall        greedy answers to recall questions of the generated corpus given by
                --recall (the default task of a --model), exact-match accuracy; the
                context is prefilled and evicted first, then the question (from the last
                '?') is read through the cache, as in kvpress
  perplexity    teacher-forced perplexity: each text's first --prefix-fraction is
                prefilled, the rest is decoded one token at a time through the cache
  piqa, ai2_arc[/ARC-Easy|/ARC-Challenge], arc_easy, arc_challenge, boolq, hellaswag
                multiple choice by log-likelihood (acc and acc_norm), read by TFDS name
                from --data-dir (prepared as array_record; see ag_jax.data)

Tables (--task ruler or --task stdlib_bpb, one per command; results.json is a list of rows
{task, length, policy, budget, protocol, accuracy | bpb, kept, ...}):
  ruler         the RULER-style needle suite over the stdlib haystack (the default task of
                the embedded world; --subtasks, default all: niah_multikey,
                niah_multivalue, niah_multiquery, vt, cwe) at --lengths
                context tokens; accuracy = share of answer items greedy decoding gets right
  stdlib_bpb    bits per byte of held-out stdlib files: windows of --lengths tokens, the
                first half is the context the policy compresses, the second half is scored
  --protocol kvpress (default): each context of T tokens is compressed to max(1, int(T * budget)),
  question and answer are read with room reserved; --protocol decode: they go through the
  evicting policy too. Models trained on the RULER world use --tokenizer stdlib_bpe:2048.

Policies (--policy, repeatable; default: all that apply): ag (needs gates), full,
streaming_llm, h2o, snapkv, random, local, each optionally with knobs, e.g.
  --policy snapkv:window=16,kernel=5 --policy streaming_llm:sink=4 --policy h2o:recent=0.25
A budget is the fraction of each example's context the cache may hold; `full` runs once.

Examples:
  python -m ag_jax.evaluate                    # the embedded world: its ruler table
  python -m ag_jax.evaluate --task recall --task perplexity --budgets 0.1,0.25,0.5 --plots
  python -m ag_jax.evaluate --model runs/ruler/model --gates runs/ruler/gates \
      --tokenizer stdlib_bpe:2048 --task ruler --subtasks niah_multikey,vt --lengths 512,1024 \
      --budgets 0.1,0.25,0.5 --policy ag --policy snapkv --policy full --plots --out out/ruler
  python -m ag_jax.evaluate --task stdlib_bpb --protocol decode --lengths 512 --out out/bpb
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
  data.add_argument("--task", action="append", default=[], help="recall (default with --model), "
                    "perplexity, or a multiple-choice data set (repeatable); or one table: "
                    "ruler (default for the embedded world) or stdlib_bpb")
  data.add_argument("--subtasks", help="ruler: comma-separated subtasks (default: all)")
  data.add_argument("--lengths", help="ruler and stdlib_bpb: comma-separated context lengths "
                    "in tokens (default: those of 512,1024,2048,4096 that fit the model)")
  data.add_argument("--num-examples", type=int, default=64,
                    help="examples per task (and per length; default 64)")
  data.add_argument("--split", help="data split (default: test for recall, the labelled "
                    "evaluation split for multiple choice)")
  data.add_argument("--data-dir", help="TFDS data_dir (default: TFDS's)")
  data.add_argument("--recall", default="recall", help="recall corpus spec (default: "
                    "recall), e.g. recall:doc_len=512,num_facts=8")
  data.add_argument("--text-source", help="perplexity texts: a TFDS name or recall spec "
                    "(default: the recall corpus)")
  data.add_argument("--text-field", default="text")
  data.add_argument("--prefix-fraction", type=float, default=0.5)
  data.add_argument("--max-tokens", type=int, default=512, help="truncate perplexity texts")
  ev = p.add_argument_group("eviction")
  ev.add_argument("--policy", action="append", default=[], metavar="SPEC")
  ev.add_argument("--protocol", help="ruler and stdlib_bpb: kvpress (default) or decode")
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


def numbers(text: str | None, kind, what: str) -> list:
  if not text:
    return []
  try:
    return [kind(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def check_args(args) -> None:
  """Flag checks that need no model: ConfigError names the flag and the fix."""
  from ag_jax.data.ruler import TASKS  # pylint: disable=g-import-not-at-top
  from ag_jax.evaluation.ruler_eval import PROTOCOLS  # pylint: disable=g-import-not-at-top
  from ag_jax.evaluation.tables import MIN_LENGTH, TABLE_TASKS  # pylint: disable=g-import-not-at-top
  budgets = numbers(args.budgets, float, "--budgets")
  for b in budgets:
    if not 0.0 < b <= 1.0:
      raise ConfigError(f"--budgets: each budget is the fraction of the context kept, in "
                        f"(0, 1]; got {b:g} (e.g. --budgets 0.25,0.5)")
  for flag, value in (("--num-examples", args.num_examples), ("--batch-size", args.batch_size)):
    if value < 1:
      raise ConfigError(f"{flag} must be a positive integer, got {value}")
  table = [t for t in dict.fromkeys(args.task) if t in TABLE_TASKS]
  if not table:
    for flag in ("--subtasks", "--lengths", "--protocol"):
      if getattr(args, flag[2:]) is not None:
        raise ConfigError(f"{flag} applies to --task ruler and --task stdlib_bpb only")
    return
  if len(set(args.task)) > 1:
    raise ConfigError(f"--task {table[0]} makes one table per command: run "
                      f"{' and '.join(dict.fromkeys(args.task))} as separate commands "
                      "(each with its own --out)")
  if args.capacities:
    raise ConfigError("--capacities: the tables size caches by --budgets (fractions of each "
                      "context); drop --capacities")
  if not budgets:
    raise ConfigError("--budgets is empty: give fractions in (0, 1], e.g. --budgets 0.25,0.5")
  if args.protocol is not None and args.protocol not in PROTOCOLS:
    raise ConfigError(f"--protocol {args.protocol!r} is not a protocol: use kvpress (the "
                      "default: the context is compressed, question and answer are kept) or "
                      "decode (question and answer go through the policy too)")
  if args.subtasks is not None:
    if table[0] != "ruler":
      raise ConfigError("--subtasks applies to --task ruler only")
    subtasks = subtask_list(args)
    if not subtasks:
      raise ConfigError(f"--subtasks is empty: name some of {', '.join(TASKS)}")
    for name in subtasks:
      if name not in TASKS:
        raise ConfigError(f"--subtasks: unknown RULER subtask {name!r}; known subtasks: "
                          f"{', '.join(TASKS)}")
  for n in numbers(args.lengths, int, "--lengths"):
    if n < MIN_LENGTH:
      raise ConfigError(f"--lengths {n}: a context needs at least {MIN_LENGTH} tokens; use "
                        "e.g. --lengths 512,1024")


def subtask_list(args) -> list[str]:
  from ag_jax.data.ruler import TASKS  # pylint: disable=g-import-not-at-top
  if args.subtasks is None:
    return list(TASKS)
  return [t.strip() for t in args.subtasks.split(",") if t.strip()]
