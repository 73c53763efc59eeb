"""Prefill's peak memory at real shapes, from the compiler: the temporary, argument and output
bytes of the engine's jitted prefill, one-shot and chunked, from
`jax.jit(...).lower(...).compile().memory_analysis()`. Nothing runs and nothing is
allocated: weights and prompts are abstract (`jax.ShapeDtypeStruct`), so an 8B model at 128k
tokens compiles on a laptop CPU. `argument_bytes` is mostly the weights, `output_bytes` the
cache; `temp_bytes` is what prefill needs on top.

Target (issue 10): chunked prefill of llama3_8b at 32k, B=1, budget 0.25: temp <= 2 GiB.

  python benchmarks/memory.py --prefill-peak --out prefill_peak.json
  python benchmarks/prefill_peak.py --models llama3_8b --contexts 32k --budgets 0.25
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
from ag_jax import engine  # noqa: E402
from ag_jax.config import preset  # noqa: E402
from ag_jax.model import Llama, init_variables  # noqa: E402
from ag_jax.policies import AttentionGate  # noqa: E402

GRIDS = {
    "tiny": dict(models="tiny", contexts="1k,4k", budgets="1,0.25", chunk=256),
    "accelerator": dict(models="llama3_8b,llama3_2_1b", contexts="8k,32k,128k",
                        budgets="1,0.5,0.25", chunk=1024),
}


def abstract_variables(model: Llama):
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))


def analyse(model: Llama, variables, batch: int, context: int, budget: float, chunk: int | None):
  """Compiled memory of engine.prefill's program for one prompt width (no new tokens)."""
  policy, capacity = common.engine_policy(
      AttentionGate(), engine.resolve_capacity(AttentionGate(), context, None, budget))
  tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
  statics = dict(model=model, policy=policy, capacity=capacity,
                 gate_slots=engine._gate_slots(model, context), backend=None, all_logits=False,
                 context=context, reserve=0)
  if chunk is None:
    lowered = engine._prefill.lower(variables, tokens, lengths, **statics)
  else:
    cache = jax.eval_shape(lambda: engine.empty_cache(model, batch, capacity + 1,
                                                      statics["gate_slots"], policy))
    lowered = engine._prefill_chunked.lower(variables, tokens, lengths, cache, chunk=chunk,
                                            **statics)
  start = time.perf_counter()
  stats = lowered.compile().memory_analysis()
  # A chunked prefill fills a donated empty cache in place: its output aliases that argument.
  return dict(temp_bytes=int(stats.temp_size_in_bytes),
              alias_bytes=int(stats.alias_size_in_bytes),
              argument_bytes=int(stats.argument_size_in_bytes),
              output_bytes=int(stats.output_size_in_bytes),
              compile_s=time.perf_counter() - start, capacity=capacity)


def main(argv=None):
  p = common.parser(__doc__.split("\n\n")[0])
  p.add_argument("--prefill-peak", action="store_true", help=argparse.SUPPRESS)  # memory.py's flag
  p.add_argument("--models", help="model presets, comma-separated")
  p.add_argument("--contexts", help="prompt lengths, e.g. 8k,32k,128k")
  p.add_argument("--budgets", help="AG budgets, e.g. 1,0.5,0.25")
  p.add_argument("--chunk", type=int, help="prefill chunk of the chunked rows")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--layers", type=int, help="override the presets' layer count")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="weights and activations (default float32: XLA's CPU backend converts bf16 "
                      "weights to f32 for its dots and hoists the copies, which would count every "
                      "weight again as temporary memory; fp32 activations bound the bf16 ones)")
  common.add_gate_window(p)
  args = p.parse_args(argv)
  size = common.resolve_size(args.size)
  g = GRIDS[size]
  chunk = args.chunk or g["chunk"]
  models = (args.models or g["models"]).split(",")
  contexts, budgets = common.ints(args.contexts or g["contexts"]), common.floats(args.budgets or g["budgets"])
  res = common.Results(args.out, "prefill_peak", dict(size=size, models=models, contexts=contexts,
                                                      budgets=budgets, chunk=chunk, batch=args.batch,
                                                      dtype=args.dtype))
  table = []
  for name in models:
    overrides = [f"dtype={args.dtype}", f"param_dtype={args.dtype}"]
    overrides += [f"num_layers={args.layers}"] if args.layers else []
    cfg = preset(name, overrides)
    model = Llama(cfg, gate=common.gate_config(args.gate_window))
    variables = abstract_variables(model)
    for context in contexts:
      for budget in budgets:
        for c in (None, chunk):
          if c is not None and c >= context:
            continue
          try:
            row = analyse(model, variables, args.batch, context, budget, c)
          except Exception as e:  # a failed compile is a row, not the end of the table
            res.add("errors", dict(preset=name, context=context, budget=budget, chunk=c,
                                   error=repr(e)[:2000]))
            continue
          row.update(preset=name, layers=cfg.num_layers, context=context, budget=budget,
                     chunk=c or "one-shot", batch=args.batch)
          res.add("rows", row)
          table.append([name, cfg.num_layers, context, budget, row["chunk"], common.gib(row["temp_bytes"]),
                        common.gib(row["argument_bytes"]), common.gib(row["output_bytes"]),
                        f"{row['compile_s']:.1f}"])
          print(" | ".join(map(str, table[-1])), flush=True)
  print(common.markdown_table(["preset", "layers", "context", "budget", "chunk", "temp",
                               "arguments", "output (cache)", "compile s"], table))
  res.save()
  return res.data


if __name__ == "__main__":
  main()
