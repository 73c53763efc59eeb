"""Cache memory, measured: bytes the device really allocates for the cache that `prefill`
returns at AG budgets 1, 0.5, 0.25 vs Full, and the largest batch x context that fits a
memory limit with and without eviction.

Allocation = the device allocator's bytes in use after prefill minus before (with the
logits freed): `device.memory_stats()` on GPU/TPU; on CPU, which keeps no statistics, the
sum of `jax.live_arrays()` buffers. Never a formula: the per-buffer sum (`cache.nbytes`) is
printed beside the measurement as a cross-check only.

Target: cache bytes at budget b within 2% of b x Full + the gate cache, where the gate
cache is measured too (AG at budget 1 minus Full: same capacity, plus the gate's ring).

The fit table extrapolates the measured bytes linearly (every cache buffer is dense in
batch and in capacity or context; the gate ring in its slot count, the context or the gate
window): max batch = (limit - weights) / measured bytes per sequence at that context.
Activations and compiler scratch are not budgeted.

  python benchmarks/memory.py --size tiny --out memory.json
  python benchmarks/memory.py --prefill-peak --size accelerator   # benchmarks/prefill_peak.py
"""

from __future__ import annotations

import gc
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from ag_jax import engine  # noqa: E402
from ag_jax.config import preset  # noqa: E402
from ag_jax.model import Llama, init_variables  # noqa: E402
from ag_jax.policies import AttentionGate, Full  # noqa: E402

GRIDS = {
    "tiny": dict(model="tiny", batch=2, prompt=1024, new_tokens=1024, limit_gib=1.0,
                 fit_contexts="4k,16k,64k"),
    "accelerator": dict(model="llama3_8b", batch=1, prompt=2048, new_tokens=2048,
                        limit_gib=None, fit_contexts="8k,32k,128k"),
}
BUDGETS = "1,0.5,0.25"


def measure(compiled, variables, tokens, lengths):
  """(bytes the cache holds on the device, how measured, the cache's own buffer sum)."""
  before, how = common.allocated_bytes()
  logits, cache = compiled(variables, tokens, lengths)
  common.block(cache)
  del logits
  gc.collect()
  after, _ = common.allocated_bytes()
  parts = dict(total=common.tree_bytes(cache), kv=cache.kv_nbytes, gate=cache.gate_nbytes,
               capacity=cache.capacity)  # total: every buffer, per-sequence counters included
  del cache
  gc.collect()
  return after - before, how, parts


def main(argv=None):
  if "--prefill-peak" in (sys.argv[1:] if argv is None else argv):
    import prefill_peak  # compile-only memory analysis of prefill at real shapes
    return prefill_peak.main(argv)
  p = common.parser(__doc__.split("\n\n")[0])
  p.add_argument("--model", help="model preset")
  p.add_argument("--batch", type=int)
  p.add_argument("--prompt", type=int, help="prompt tokens")
  p.add_argument("--new-tokens", type=int, help="tokens the cache is sized to generate")
  p.add_argument("--budgets", default=BUDGETS, help=f"AG budgets (default {BUDGETS})")
  p.add_argument("--limit-gib", type=float,
                 help="memory limit for the fit table (default: the device's allocator limit; "
                      "tiny: 1 GiB)")
  p.add_argument("--fit-contexts", help="contexts of the fit table, e.g. 8k,32k,128k")
  common.add_gate_window(p)
  args = p.parse_args(argv)
  size = common.resolve_size(args.size)
  g = GRIDS[size]
  name = args.model or g["model"]
  batch, prompt = args.batch or g["batch"], args.prompt or g["prompt"]
  new_tokens = args.new_tokens if args.new_tokens is not None else g["new_tokens"]
  budgets = common.floats(args.budgets)
  fit_contexts = common.ints(args.fit_contexts or g["fit_contexts"])
  context = prompt + new_tokens
  res = common.Results(args.out, "memory", dict(size=size, model=name, batch=batch, prompt=prompt,
                                                new_tokens=new_tokens, budgets=budgets,
                                                gate_window=args.gate_window))
  cfg = preset(name)
  gated = Llama(cfg, gate=common.gate_config(args.gate_window))
  plain = Llama(cfg)
  variables = init_variables(gated, jax.random.key(0))
  layers = {k: v for k, v in variables["params"]["layers"].items() if k != "gate"}
  variables_plain = {"params": {**variables["params"], "layers": layers}}
  weights = common.tree_bytes(variables)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt)), jnp.int32)
  lengths = jnp.full((batch,), prompt, jnp.int32)

  # The engine's own jitted prefill program, compiled ahead of time (in parallel threads).
  configs = [("full", plain, Full(), None)] + [(f"ag@{b:g}", gated, AttentionGate(), b)
                                                for b in budgets]
  jobs = []
  for label, model, policy, budget in configs:
    # What engine.prefill passes to its jitted program, mirrored to compile ahead of time.
    policy, capacity = common.engine_policy(
        policy, engine.resolve_capacity(policy, context, None, budget))
    statics = dict(model=model, policy=policy, capacity=capacity,
                   gate_slots=engine._gate_slots(model, context), backend=None, all_logits=False,
                   context=context)
    v = variables if model is gated else variables_plain
    jobs.append((label, lambda v=v, s=statics: engine._prefill.lower(v, tokens, lengths, **s)))
  compiled = common.compile_all(jobs)

  measured = {}
  for label, model, _, budget in configs:
    if isinstance(compiled[label], Exception):
      res.add("errors", {"config": label, "error": repr(compiled[label])[:2000]})
      continue
    v = variables if model is gated else variables_plain
    measure(compiled[label], v, tokens, lengths)  # warm-up: first run may allocate for good
    nbytes, how, parts = measure(compiled[label], v, tokens, lengths)
    measured[label] = nbytes
    res.add("rows", dict(config=label, budget=budget or 1.0, measured_bytes=nbytes,
                         measured_with=how, buffer_sum_bytes=parts["total"],
                         kv_bytes=parts["kv"], gate_buffer_bytes=parts["gate"],
                         capacity=parts["capacity"], context=context, batch=batch))
  full = measured.get("full")
  gate = measured.get("ag@1", 0) - full if full is not None and "ag@1" in measured else None
  for row in res.data["rows"]:
    if full is None or gate is None:
      break
    b = row["budget"]
    row["vs_full"] = row["measured_bytes"] / full
    if row["config"] != "full":
      row["expected_bytes"] = b * full + gate
      row["deviation"] = row["measured_bytes"] / row["expected_bytes"] - 1
  res.save()

  # Fit table: the measured bytes, extrapolated per sequence: the KV part grows with the
  # context, the gate ring with its slot count (the context, or the gate window).
  limit = (args.limit_gib or g["limit_gib"] or 0) * 2**30 or common.available_memory()
  room = limit - weights
  ring_now = engine._gate_slots(gated, context)
  fit = []
  for c in fit_contexts:
    entry = {"context": c}
    for label, nbytes in measured.items():
      ring = gate if label != "full" and gate is not None else 0
      per_sequence = ((nbytes - ring) * c / context
                      + ring * engine._gate_slots(gated, c) / ring_now) / batch
      entry[label] = max(0, int(room // per_sequence))
    fit.append(entry)
  res.set("fit", dict(limit_bytes=limit, weight_bytes=weights, rows=fit))
  dev = [abs(r["deviation"]) for r in res.data["rows"] if "deviation" in r]
  res.set("targets", {"cache_within_2pct_of_budget_x_full_plus_gate": {
      "met": all(d <= 0.02 for d in dev) if dev else None, "worst": max(dev, default=None)}})

  for e in res.data["errors"]:
    print(f"error: {e}")
  t = res.data["targets"]["cache_within_2pct_of_budget_x_full_plus_gate"]
  print(f"target cache within 2% of b x Full + gate cache: {common.fmt(t['met'])} "
        f"(worst {common.fmt(t['worst'])})")
  print(f"\nLargest batch that fits {common.gib(limit)} with {common.gib(weights)} of weights "
        f"({name}; measured cache bytes, extrapolated linearly):\n")
  labels = list(measured)
  print(common.markdown_table(["context"] + [f"max batch {l}" for l in labels],
                              [[f["context"]] + [f[l] for l in labels] for f in fit]))
  print(f"\nCache bytes allocated by prefill ({name}, batch {batch}, context {context}; "
        f"measured with {res.data['rows'][0]['measured_with'] if res.data['rows'] else '-'}):\n")
  print(common.markdown_table(
      ["cache", "capacity", "measured", "buffer sum", "gate buffers", "x Full",
       "b x Full + gate", "deviation"],
      [[r["config"], r["capacity"], common.gib(r["measured_bytes"]),
        common.gib(r["buffer_sum_bytes"]), common.gib(r["gate_buffer_bytes"]), r.get("vs_full"),
        common.gib(r["expected_bytes"]) if "expected_bytes" in r else "-",
        f"{100 * r['deviation']:+.2f}%" if "deviation" in r else "-"]
       for r in res.data["rows"]]))
  return res.data


if __name__ == "__main__":
  main()
