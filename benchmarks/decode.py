"""Decode step latency: Full vs AG-shaped caches, against the bytes-moved floor.

A decode step must at least read every weight once (the embedding table excepted: only
B rows of it are read), every kept K/V slot and the gate's ring cache. At the device's
measured copy bandwidth that is the step's floor:

    floor = (weight bytes + kept KV bytes + gate-cache bytes) / copy bandwidth

Each measured step is reported as a multiple of its floor, and the AG speedup over Full next
to the ratio of the two floors (what a perfect implementation would gain).

"AG-shaped" cache at kept ratio r: capacity = ceil(r * context), every row full (length =
capacity), the gate ring covering the whole context, exactly the pytree `prefill` returns
(tests/test_benchmarks.py checks that); Full is the gate-free model with capacity = context.
The step timed is the engine's own jitted, cache-donating `decode_step` program.

  python benchmarks/decode.py --size tiny --out decode.json
"""

from __future__ import annotations

import math
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
from ag_jax import engine  # noqa: E402
from ag_jax.cache import KVCache  # noqa: E402
from ag_jax.config import preset  # noqa: E402
from ag_jax.model import Llama, init_variables  # noqa: E402
from ag_jax.policies import AttentionGate, Full  # noqa: E402

GRIDS = {  # contexts in priority order: a time-boxed run measures the first ones
    "tiny": dict(models="tiny", contexts="1k,4k,16k", batches="1,8", steps=4, rounds=7),
    "accelerator": dict(models="llama3_8b,llama2_7b", contexts="16k,4k,32k,1k", batches="1,8",
                        steps=8, rounds=5),
}
RATIOS = "1,0.5,0.25,0.125"


def make_cache(model: Llama, batch: int, context: int, capacity: int, backend, seed=0,
               planned_context: int | None = None) -> KVCache:
  """A full cache of `capacity` kept tokens out of `context` seen (random contents), planned
  for `planned_context` positions (default: context + 4096, room for every timed step)."""
  cfg = model.cfg
  L, K, H, S = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity + 1
  keys = jax.random.split(jax.random.key(seed), 5)
  kv_shape = (L, batch, K, S, H)
  gate_k = gate_v = None
  if model.gate is not None:  # the gate's own k/v ring, as prefill stores it (model dtype)
    slots = engine._gate_slots(model, planned_context or context + 4096)
    ring = (L, batch, model.gate.kv_heads, slots, model.gate.head_dim)
    gate_k = jax.random.normal(keys[2], ring, jnp.dtype(cfg.dtype))
    gate_v = jax.random.normal(keys[3], ring, jnp.dtype(cfg.dtype))
  # Kept tokens: an increasing subset of the context's positions; scores in (0.5, 1].
  position = (jnp.arange(S, dtype=jnp.int32) * context) // S
  return KVCache(
      k=jax.random.normal(keys[0], kv_shape, jnp.dtype(cfg.dtype)),
      v=jax.random.normal(keys[1], kv_shape, jnp.dtype(cfg.dtype)),
      score=jax.random.uniform(keys[4], (L, batch, K, S), jnp.float32, 0.5, 1.0),
      position=jnp.broadcast_to(position, (L, batch, K, S)),
      length=jnp.full((L, batch, K), capacity, jnp.int32),
      gate_k=gate_k, gate_v=gate_v,
      next_position=jnp.full((batch,), context, jnp.int32),
      seen=jnp.full((batch,), context, jnp.int32),
      policy=common.engine_policy(AttentionGate() if model.gate is not None else Full(),
                                  capacity)[0], backend=backend,
      planned_context=planned_context or context + 4096)


def weight_bytes(params: dict, tied: bool) -> int:
  """Bytes a step reads from the weights: all of them but the embedding table (B rows of
  it are gathered), unless it doubles as the output head."""
  skip = () if tied else ("embed",)
  return common.tree_bytes({k: v for k, v in params.items() if k not in skip})


def without_gate(variables: dict) -> dict:
  layers = {k: v for k, v in variables["params"]["layers"].items() if k != "gate"}
  return {"params": {**variables["params"], "layers": layers}}  # the same arrays, no copy


def group_configs(ratios, context):
  """(name, uses gate, capacity): Full first, then AG at each kept ratio."""
  out = [("full", False, context)]
  out += [(f"ag@{r:g}", True, max(1, math.ceil(r * context))) for r in ratios]
  return out


def run_group(res, cfg_name, models, variables, batch, context, ratios, args, bandwidth):
  """Compile, build and time Full and every AG ratio for one (model, batch, context)."""
  configs = group_configs(ratios, context)
  tokens = jnp.zeros((batch,), jnp.int32)
  abstract = {name: jax.eval_shape(lambda m=models[g], c=cap: make_cache(
      m, batch, context, c, args.backend)) for name, g, cap in configs}
  need = sum(common.tree_bytes(a) for a in abstract.values())
  limit = 0.8 * common.available_memory() - common.tree_bytes(variables[True])
  fits_together = need <= limit
  compiled = common.compile_all([
      (name, lambda g=g, name=name: engine._decode_step.lower(
          variables[g], abstract[name], tokens, model=models[g])) for name, g, _ in configs])

  floors, variants = {}, {}
  for name, g, cap in configs:
    if isinstance(compiled[name], Exception):
      res.add("errors", {"model": cfg_name, "batch": batch, "context": context, "config": name,
                         "error": repr(compiled[name])[:2000]})
      continue
    nbytes = common.tree_bytes(abstract[name])
    if nbytes > limit:
      res.add("skipped", {"model": cfg_name, "batch": batch, "context": context, "config": name,
                          "reason": f"cache {common.gib(nbytes)} exceeds the memory left"})
      continue
    cache = abstract[name]
    kv = common.tree_bytes((cache.k, cache.v))
    gate = common.tree_bytes((cache.gate_k, cache.gate_v))
    weights = weight_bytes(variables[g]["params"], models[g].cfg.tie_embeddings)
    floors[name] = dict(capacity=cap, weight_bytes=weights, kv_bytes=kv, gate_bytes=gate,
                        bookkeeping_bytes=common.tree_bytes((cache.score, cache.position)),
                        floor_s=(weights + kv + gate) / bandwidth)
    variants[name] = Variant(compiled[name], variables[g], tokens,
                             lambda m=models[g], c=cap: make_cache(m, batch, context, c,
                                                                   args.backend), args.steps)
  if fits_together:  # all caches alive at once: interleaved rounds
    for v in variants.values():
      v.setup()
    times = common.interleaved({n: v.run for n, v in variants.items()}, args.rounds)
  else:  # one cache at a time: rounds of one variant (less robust to drift; flagged)
    times = {}
    for name, v in variants.items():
      v.setup()
      times.update(common.interleaved({name: v.run}, args.rounds))
      v.release()
  for v in variants.values():
    v.release()

  full = times.get("full")
  for name, t in times.items():
    f = floors[name]
    step = t["median_s"]
    row = dict(model=cfg_name, batch=batch, context=context, config=name,
               ratio=f["capacity"] / context, step_s=step, step_min_s=t["min_s"],
               step_max_s=t["max_s"], tokens_per_s=batch / step, **f,
               x_floor=step / f["floor_s"], interleaved=fits_together, backend=args.backend_name)
    if full is not None:
      row["speedup"] = full["median_s"] / step
      row["floor_ratio"] = floors["full"]["floor_s"] / f["floor_s"]
      row["speedup_vs_floor_ratio"] = row["speedup"] / row["floor_ratio"]
    res.add("rows", row)


class Variant:
  """One cache variant: its compiled step and its cache, which every step donates and
  replaces."""

  def __init__(self, compiled, variables, tokens, build, steps: int):
    self.compiled, self.variables, self.tokens = compiled, variables, tokens
    self.build, self.steps, self.cache = build, steps, None

  def setup(self):
    self.cache = common.block(jax.jit(self.build)())
    self.run_steps(2)  # warm-up: the first executions allocate and page in

  def run_steps(self, n):
    logits = None
    for _ in range(n):
      logits, self.cache = self.compiled(self.variables, self.cache, self.tokens)
    return logits

  def run(self) -> float:
    """Seconds per step over one round of `steps` steps."""
    return common.timed(lambda: self.run_steps(self.steps))() / self.steps

  def release(self):
    self.cache = None


def targets(rows):
  """The issue's targets, evaluated on the AG rows at context >= 4k."""
  ag = [r for r in rows if r["config"].startswith("ag") and r["context"] >= 4096]
  vs = [r for r in ag if "speedup_vs_floor_ratio" in r]
  return {
      "ag_step_le_1.15x_floor": {"met": all(r["x_floor"] <= 1.15 for r in ag) if ag else None,
                                 "worst": max((r["x_floor"] for r in ag), default=None)},
      "speedup_ge_0.9x_floor_ratio": {  # rows whose Full ran
          "met": all(r["speedup_vs_floor_ratio"] >= 0.9 for r in vs) if vs else None,
          "worst": min((r["speedup_vs_floor_ratio"] for r in vs), default=None)},
  }


def main(argv=None):
  p = common.parser(__doc__.split("\n\n")[0])
  p.add_argument("--models", help="comma-separated presets (tiny, llama2_7b, llama3_8b, ...)")
  p.add_argument("--contexts", help="comma-separated, e.g. 1k,4k,16k")
  p.add_argument("--batches", help="comma-separated batch sizes")
  p.add_argument("--ratios", default=RATIOS, help=f"AG kept ratios (default {RATIOS})")
  p.add_argument("--steps", type=int, help="decode steps per timing round")
  p.add_argument("--backend", default=None,
                 help="kernel backend: reference, gpu, tpu, interpret (default: auto)")
  common.add_gate_window(p)
  p.add_argument("--copy-mib", type=int, default=None, help="bandwidth probe size")
  args = p.parse_args(argv)
  size = common.resolve_size(args.size)
  grid = GRIDS[size]
  models = (args.models or grid["models"]).split(",")
  contexts = common.ints(args.contexts or grid["contexts"])
  batches = common.ints(args.batches or grid["batches"])
  ratios = common.floats(args.ratios)
  args.rounds = args.rounds or grid["rounds"]
  args.steps = args.steps or grid["steps"]
  from pallas_kernels import resolve_backend
  args.backend_name = resolve_backend(args.backend)
  res = common.Results(args.out, "decode", dict(size=size, models=models, contexts=contexts,
                                                batches=batches, ratios=ratios,
                                                steps=args.steps,
                                                rounds=args.rounds, backend=args.backend_name,
                                                gate_window=args.gate_window))
  bw = common.copy_bandwidth(args.copy_mib << 20 if args.copy_mib else common.default_copy_bytes())
  res.set("copy_bandwidth", bw)
  print(f"copy bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s (read + write of "
        f"{common.gib(bw['bytes'])})", flush=True)

  for cfg_name in models:
    cfg = preset(cfg_name)
    gated = Llama(cfg, gate=common.gate_config(args.gate_window))
    models_ = {True: gated, False: Llama(cfg)}
    with_gate = init_variables(gated, jax.random.key(0))
    variables = {True: with_gate, False: without_gate(with_gate)}
    for context in contexts:
      for batch in batches:
        if args.budget_s and res.elapsed() > args.budget_s:
          res.add("skipped", {"model": cfg_name, "batch": batch, "context": context,
                              "reason": "time budget"})
          continue
        run_group(res, cfg_name, models_, variables, batch, context, ratios, args,
                  bw["bytes_per_s"])
        print(f"{cfg_name} B={batch} context={context}: done at {res.elapsed():.0f}s", flush=True)
    del with_gate, variables

  rows = res.data["rows"]
  res.set("targets", targets(rows))
  for name, t in res.data["targets"].items():
    print(f"target {name}: {common.fmt(t['met'])} (worst {common.fmt(t['worst'])})")
  for s in res.data["skipped"]:
    print(f"skipped: {s}")
  for e in res.data["errors"]:
    print(f"error: {e}")
  headers = ["model", "B", "context", "cache", "capacity", "step ms", "tok/s", "floor ms",
             "x floor", "speedup", "floor ratio", "speedup / floor ratio"]
  print(f"\nDecode step, {res.data['environment']['device_kind']}, kernel backend "
        f"{args.backend_name}, copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s\n")
  print(common.markdown_table(headers, [
      [r["model"], r["batch"], r["context"], r["config"], r["capacity"], 1e3 * r["step_s"],
       r["tokens_per_s"], 1e3 * r["floor_s"], r["x_floor"], r.get("speedup"),
       r.get("floor_ratio"), r.get("speedup_vs_floor_ratio")] for r in rows]))
  return res.data


if __name__ == "__main__":
  main()
