"""The Pallas kernels compiled on this machine's accelerator against their jnp references.

No pytest needed (accelerator images may lack it). Each case runs in its own try block: a
kernel that fails to lower, compile or run is recorded with its error and the next case
runs. On CPU it runs the interpreter (slow, small shapes only) unless --backend is given.

  python benchmarks/kernel_check.py --backend gpu --out kernels.json
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from pallas_kernels import (compact, compact_reference, decode_attention,  # noqa: E402
                            decode_attention_reference)

TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def decode_cases(small: bool):
  # B, H, G, S, D, dtype, return_mass, stacked layers (0: plain [B,H,S,D])
  if small:
    return [(2, 2, 4, 40, 64, "float32", True, 3)]
  return [(2, 2, 4, 1025, 128, "bfloat16", False, 0), (2, 2, 4, 1025, 128, "bfloat16", True, 0),
          (1, 8, 4, 4097, 128, "bfloat16", False, 0), (2, 4, 1, 300, 64, "float32", True, 0),
          (2, 2, 4, 1025, 128, "bfloat16", False, 4), (8, 8, 4, 16385, 128, "bfloat16", False, 2)]


def compact_cases(small: bool):
  # B, H, T, D, dtype, capacity, with out buffers
  if small:
    return [(1, 2, 64, 64, "float32", 20, False)]
  return [(2, 4, 1024, 128, "bfloat16", 1024, False), (2, 4, 1024, 128, "bfloat16", 300, False),
          (2, 4, 1000, 64, "float32", 500, True), (8, 8, 8192, 128, "bfloat16", 4096, False)]


def check_decode(backend, B, H, G, S, D, dtype, mass, layers, seed=0):
  rng = np.random.default_rng(seed)
  dt = jnp.dtype(dtype)
  q = jnp.asarray(rng.standard_normal((B, H, G, D)), dt)
  stack = (layers or 1, B, H, S, D)
  k = jnp.asarray(rng.standard_normal(stack), dt)
  v = jnp.asarray(rng.standard_normal(stack), dt)
  length = rng.integers(0, S + 1, (B, H)).astype(np.int32)
  length.flat[0], length.flat[-1] = 0, S  # the edge rows
  length = jnp.asarray(length)
  layer = layers - 1 if layers else None
  kw = dict(return_mass=mass)
  got = jax.jit(functools.partial(decode_attention, backend=backend, **kw))(
      q, k if layers else k[0], v if layers else v[0], length,
      **({"layer": jnp.int32(layer)} if layers else {}))
  want = decode_attention_reference(q, k[layer or 0], v[layer or 0], length, **kw)
  got, want = (got, want) if mass else ((got,), (want,))
  return max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
             for a, b in zip(got, want)), TOL[dtype]


def check_compact(backend, B, H, T, D, dtype, capacity, with_out, seed=0):
  rng = np.random.default_rng(seed)
  dt = jnp.dtype(dtype)
  k = jnp.asarray(rng.standard_normal((B, H, T, D)), dt)
  v = jnp.asarray(rng.standard_normal((B, H, T, D)), dt)
  score = jnp.asarray(rng.random((B, H, T)), jnp.float32)
  keep = jnp.asarray(rng.random((B, H, T)) < 0.5)
  out = None
  if with_out:
    out = tuple(jnp.zeros(s, t) for s, t in (((B, H, capacity + 1, D), dt),
                                              ((B, H, capacity + 1, D), dt),
                                              ((B, H, capacity + 1), jnp.float32)))
  got = jax.jit(functools.partial(compact, capacity=capacity, backend=backend))(
      k, v, score, keep, out=out)
  want = compact_reference(k, v, score, keep, capacity, out=out)
  length = np.asarray(want[4])
  valid = np.arange(capacity + 1) < length[..., None]  # slots >= length are garbage
  err = 0.0
  for a, b in zip(got[:2], want[:2]):
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    err = max(err, float(diff[valid].max(initial=0)))
  err = max(err, float(np.abs(np.asarray(got[4]) - length).max()))
  return err, 0.0  # a compaction moves bytes: exact


def main(argv=None):
  p = common.parser(__doc__.split("\n\n")[0])
  p.add_argument("--backend", default=None,
                 help="gpu, tpu or interpret (default: this platform's; interpret on CPU)")
  args = p.parse_args(argv)
  backend = args.backend or {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "interpret")
  small = backend == "interpret" or common.resolve_size(args.size) == "tiny"
  res = common.Results(args.out, "kernel_check", dict(backend=backend, small=small))
  cases = [("decode_attention", check_decode, c) for c in decode_cases(small)]
  cases += [("compact", check_compact, c) for c in compact_cases(small)]
  for kernel, check, case in cases:
    if args.budget_s and res.elapsed() > args.budget_s:
      res.add("skipped", {"kernel": kernel, "case": case, "reason": "time budget"})
      continue
    start = time.perf_counter()
    try:
      err, tol = check(backend, *case)
      row = dict(kernel=kernel, case=list(case), max_abs_err=err, tol=tol, passed=err <= tol)
    except Exception as e:  # noqa: BLE001 - record any failure and continue
      row = dict(kernel=kernel, case=list(case), passed=False, error=repr(e)[:3000],
                 traceback=traceback.format_exc()[-4000:])
    row["seconds"] = time.perf_counter() - start
    res.add("rows", row)
    print(f"{kernel} {case}: {'ok' if row['passed'] else 'FAILED'} ({row['seconds']:.1f}s)",
          flush=True)
  rows = res.data["rows"]
  res.set("summary", {k: all(r["passed"] for r in rows if r["kernel"] == k) and any(
      r["kernel"] == k for r in rows) for k in ("decode_attention", "compact")})
  print(f"\nKernels ({backend}) vs references on {res.data['environment']['device_kind']}\n")
  print(common.markdown_table(["kernel", "case", "passed", "max abs err", "error"],
                              [[r["kernel"], str(r["case"]), r["passed"], r.get("max_abs_err"),
                                (r.get("error") or "-")[:120]] for r in rows]))
  return res.data


if __name__ == "__main__":
  main()
