"""Where the gates keep a needle: per layer, the share of KV heads whose own keep flags keep
every token of the asked needle's value, by the needle's position in the context.

  python -m ag_jax.evaluation.needle_probe [--gates DIR] --length 1536 \\
      [--depths 0.05,0.2,0.35,0.5,0.65,0.8,0.95] [--num-examples 12] [--out probe.json]

The flags are the training view's (the gates' decisions with an ample cache: what AG keeps at
budget 1 under either protocol); the needle is `niah_multikey`'s asked one, placed at each
depth in turn (RulerConfig.depth) in the same test-split contexts. A gate whose decisions
depend on how far into the context a token lies shows it here as a share that falls with the
position, whatever the budget. No --model: the embedded default world.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np


def value_span(tokenizer, example: dict) -> tuple[int, int]:
  """Token positions [start, end) of the asked needle's value in the context's ids (BOS
  first, as `tokenizer.encode(context)` gives them)."""
  from ag_jax.data import ruler  # pylint: disable=g-import-not-at-top
  asked = example["asked"][0]
  value = example["needle_values"][asked]
  line = ruler.niah_line(example["needle_keys"][asked], value)
  context = example["context"]
  start = context.index(line) + line.index(value)
  # A needle line starts after a newline and its value ends before '.': no token spans the
  # cuts, so the prefix lengths locate the value's tokens.
  count = lambda end: len(tokenizer.encode(context[:end]))
  return count(start), count(start + len(value))


def probe(model, variables, tokenizer, length: int, depths: Sequence[float],
          num_examples: int, split: str = "test") -> list[dict]:
  """One row per depth: the mean token position of the value, and per layer the share of
  (example, KV head) whose flags keep all of it and the mean of its lowest keep probability."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ag_jax.data import ruler  # pylint: disable=g-import-not-at-top

  gates = jax.jit(lambda tokens: model.apply(variables, tokens, return_gates=True)[1])
  rows = []
  for depth in depths:
    config = ruler.RulerConfig(task="niah_multikey", length=length, depth=float(depth))
    positions, kept, lowest = [], [], []
    for i in range(num_examples):
      example = ruler.generate_example(config, tokenizer, split, i)
      start, end = value_span(tokenizer, example)
      ids = tokenizer.encode(example["context"])
      # One width for every context, so the probe compiles once: the gates and the flags
      # are causal, so the padding after the context changes nothing before it.
      padded = np.full((1, max(length, len(ids))), tokenizer.pad_id, np.int32)
      padded[0, :len(ids)] = ids
      probs, flags = gates(jnp.asarray(padded))                    # [L, 1, K, T] each
      positions.append(start)
      kept.append(np.asarray(flags[:, 0, :, start:end]).all(-1).mean(-1))   # [L]
      lowest.append(np.asarray(probs[:, 0, :, start:end]).min(-1).mean(-1))  # [L]
    rows.append({"depth": float(depth), "position": float(np.mean(positions)),
                 "kept_per_layer": np.mean(kept, 0).tolist(),
                 "min_prob_per_layer": np.mean(lowest, 0).tolist()})
  return rows


def table(rows: list[dict]) -> str:
  layers = len(rows[0]["kept_per_layer"])
  head = "| depth | position | " + " | ".join(f"layer {l} kept (min p)" for l in range(layers))
  lines = [head + " |", "|---" * (layers + 2) + "|"]
  for r in rows:
    cells = [f"{k:.2f} ({p:.2f})" for k, p in zip(r["kept_per_layer"], r["min_prob_per_layer"])]
    lines.append(f"| {r['depth']:.2f} | {r['position']:.0f} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", help="an HF model directory (default: the embedded world's base)")
  p.add_argument("--gates", help="a gate export (default: the embedded world's gates)")
  p.add_argument("--tokenizer", help="default: the model's own, or stdlib_bpe:2048")
  p.add_argument("--length", type=int, default=1024, help="context tokens")
  p.add_argument("--depths", default="0.05,0.2,0.35,0.5,0.65,0.8,0.95")
  p.add_argument("--num-examples", type=int, default=12, help="contexts per depth")
  p.add_argument("--split", default="test", choices=("train", "validation", "test"))
  p.add_argument("--out", help="write the rows as JSON here")
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from ag_jax.cli_errors import run_cli  # pylint: disable=g-import-not-at-top
  from ag_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from ag_jax.evaluate_args import numbers  # pylint: disable=g-import-not-at-top

  def go() -> int:
    depths = numbers(args.depths, float, "--depths")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
      raise ConfigError(f"--depths {args.depths!r}: give fractions of the context in [0, 1], "
                        "e.g. 0.1,0.5,0.9")
    if args.length < 64 or args.num_examples < 1:
      raise ConfigError(f"--length {args.length} / --num-examples {args.num_examples}: the "
                        "context needs >= 64 tokens and at least one example per depth")
    from ag_jax.evaluate import load  # pylint: disable=g-import-not-at-top
    model, variables, tokenizer = load(args)
    if model.gate is None:
      raise ConfigError("the model has no gates: pass --gates (a gate export directory)")
    if args.length + 1 > model.cfg.max_position:
      raise ConfigError(f"--length {args.length} is past the model's {model.cfg.max_position} "
                        "positions: choose a shorter context")
    rows = probe(model, variables, tokenizer, args.length, depths, args.num_examples, args.split)
    print(f"niah_multikey, {args.length}-token contexts ({args.split} split, "
          f"{args.num_examples} per depth): share of KV heads whose flags keep the asked value")
    print(table(rows))
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump({"length": args.length, "split": args.split, "gates": args.gates,
                   "model": args.model, "rows": rows}, f, indent=2)
    return 0

  return run_cli(go)


if __name__ == "__main__":
  sys.exit(main())
