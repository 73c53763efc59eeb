"""Compaction throughput: the `compact` kernel vs the device's copy bandwidth and vs the jnp
reference, in GB/s of useful bytes (kept K and V rows, each read once and written once).

Per backend two numbers, timed side by side with the copy probe:
  end-to-end  `compact(...)`: the XLA destination plan (two sorts per row), the row moves and
              the score gather, i.e. what prefill pays per layer;
  moves only  the row-moving part alone, given the plan (the kernel for kernel backends,
              `take_along_axis` for the reference).
Target: compaction >= 80% of copy bandwidth.

On CPU only the reference runs by default: the kernels' CPU mode is the Pallas interpreter,
a correctness simulator, not a performance path (`--backends reference,interpret` at a
small shape shows it anyway).

  python benchmarks/compaction.py --size tiny --out compaction.json
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
compact_lib = importlib.import_module("pallas_kernels.compact")  # the module, not the function
from pallas_kernels.backend import resolve_backend  # noqa: E402

GRIDS = {  # B, H, T, D, dtype
    "tiny": dict(shape="2,4,4096,128", dtype="float32", keeps="0.5,0.25,0.125", rounds=9,
                 inner=5),
    "accelerator": dict(shape="8,8,16384,128", dtype="bfloat16", keeps="0.5,0.25,0.125",
                        rounds=7, inner=5),
}


def default_backends() -> str:
  platform = jax.default_backend()
  return {"gpu": "reference,gpu", "tpu": "reference,tpu"}.get(platform, "reference")


def moves_only(backend: str):
  """The row-moving part of `compact` given the plan (src, length)."""
  if backend == "reference":
    def move(k, v, src, length):
      idx = jnp.maximum(src, 0)[..., None]
      valid = (src >= 0)[..., None]
      return (jnp.where(valid, jnp.take_along_axis(k, idx, axis=2), 0),
              jnp.where(valid, jnp.take_along_axis(v, idx, axis=2), 0))
  elif backend == "gpu":
    def move(k, v, src, length):
      return compact_lib._gather_rows_gpu(k, v, src, length, (), None)
  else:
    def move(k, v, src, length):
      return compact_lib._gather_rows_tpu(backend, k, v, src, length, (), None)
  return jax.jit(move)


def main(argv=None):
  p = common.parser(__doc__.split("\n\n")[0])
  p.add_argument("--shape", help="B,H,T,D of one layer's K (and V)")
  p.add_argument("--dtype", help="float32 or bfloat16")
  p.add_argument("--keeps", help="kept fractions, e.g. 0.5,0.25")
  p.add_argument("--backends", help="kernel backends (default: reference + this accelerator's)")
  args = p.parse_args(argv)
  size = common.resolve_size(args.size)
  g = GRIDS[size]
  B, H, T, D = common.ints(args.shape or g["shape"])
  dtype = jnp.dtype(args.dtype or g["dtype"])
  keeps = common.floats(args.keeps or g["keeps"])
  backends = [resolve_backend(b) for b in (args.backends or default_backends()).split(",")]
  rounds = args.rounds or g["rounds"]
  res = common.Results(args.out, "compaction", dict(size=size, shape=[B, H, T, D],
                                                    dtype=str(dtype), keeps=keeps,
                                                    backends=backends, rounds=rounds))
  key = jax.random.split(jax.random.key(0), 4)
  k = jax.random.normal(key[0], (B, H, T, D), dtype)
  v = jax.random.normal(key[1], (B, H, T, D), dtype)
  score = jax.random.uniform(key[2], (B, H, T), jnp.float32)
  copy = common.copy_bandwidth(max(common.default_copy_bytes(), 4 * k.nbytes))
  res.set("copy_bandwidth", copy)
  row_bytes = 2 * D * dtype.itemsize  # one K row + one V row

  for keep_ratio in keeps:
    if args.budget_s and res.elapsed() > args.budget_s:
      res.add("skipped", {"keep": keep_ratio, "reason": "time budget"})
      continue
    keep = jax.random.uniform(key[3], (B, H, T)) < keep_ratio
    src, length = jax.jit(functools.partial(compact_lib.compaction_plan, capacity=T,
                                            slots=T + 1))(score, keep)
    kept_rows = int(length.sum())
    useful = 2 * kept_rows * row_bytes  # read + write of every kept row
    variants = {}
    for backend in backends:
      e2e = jax.jit(functools.partial(compact_lib.compact, capacity=T, backend=backend))
      move = moves_only(backend)
      for label, fn, call_args in ((f"{backend} end-to-end", e2e, (k, v, score, keep)),
                                   (f"{backend} moves only", move, (k, v, src, length))):
        try:
          common.block(fn(*call_args))  # compile + warm-up
          variants[label] = common.timed(lambda fn=fn, a=call_args: fn(*a), g["inner"])
        except Exception as e:  # the untested Mosaic GPU path may fail: record, go on
          res.add("errors", {"keep": keep_ratio, "variant": label, "error": repr(e)[:2000]})
    times = common.interleaved(variants, rounds)
    for label, t in times.items():
      gbps = useful / t["median_s"]
      res.add("rows", dict(keep=keep_ratio, variant=label, seconds=t["median_s"],
                           useful_bytes=useful, bytes_per_s=gbps,
                           vs_copy=gbps / copy["bytes_per_s"]))
    for label, t in times.items():  # vs the reference's same part
      ref = times.get("reference " + label.split(" ", 1)[1])
      if ref:
        row = next(r for r in res.data["rows"][::-1] if r["variant"] == label)
        row["speedup_vs_reference"] = ref["median_s"] / t["median_s"]
    res.save()

  kernel_rows = [r for r in res.data["rows"] if not r["variant"].startswith("reference")]
  target_rows = kernel_rows or [r for r in res.data["rows"]]
  res.set("targets", {"compaction_ge_80pct_copy_bandwidth": {
      "evaluated_on": "kernel" if kernel_rows else "reference (no kernel backend ran)",
      "met_moves_only": all(r["vs_copy"] >= 0.8 for r in target_rows
                            if "moves only" in r["variant"]) if target_rows else None,
      "met_end_to_end": all(r["vs_copy"] >= 0.8 for r in target_rows
                            if "end-to-end" in r["variant"]) if target_rows else None}})
  for e in res.data["errors"]:
    print(f"error: {e}")
  print(f"target compaction >= 80% of copy bandwidth: "
        f"{res.data['targets']['compaction_ge_80pct_copy_bandwidth']}")
  print(f"\nCompaction of K and V [{B},{H},{T},{D}] {dtype}, "
        f"{res.data['environment']['device_kind']}, copy bandwidth "
        f"{copy['bytes_per_s'] / 1e9:.1f} GB/s\n")
  print(common.markdown_table(
      ["kept", "variant", "ms", "GB/s (useful)", "x copy bandwidth", "x reference"],
      [[r["keep"], r["variant"], 1e3 * r["seconds"], r["bytes_per_s"] / 1e9, r["vs_copy"],
        r.get("speedup_vs_reference")] for r in res.data["rows"]]))
  return res.data


if __name__ == "__main__":
  main()
