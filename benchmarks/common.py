"""Shared plumbing of the benchmarks: arguments, environment record, timing, the measured
copy bandwidth every result is compared with, markdown tables and JSON output.

Timing rule: whatever is compared is measured side by side in one process, interleaved in
rounds (round r runs every variant once), and reported as the median over rounds, so a
noisy neighbour slows all variants of a round alike instead of biasing one of them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

SIZES = ("tiny", "accelerator")


def parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", choices=SIZES + ("auto",), default="auto",
                 help="problem sizes: tiny (CPU, seconds), accelerator (real model shapes, random "
                      "weights); auto picks accelerator when jax sees a GPU or TPU")
  p.add_argument("--out", default=None, help="write the results as JSON to this path")
  p.add_argument("--rounds", type=int, default=None, help="timing rounds (median is reported)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="stop starting new measurements after this many seconds (partial results "
                      "are still written); for the time-boxed accelerator script")
  return p


def resolve_size(size: str) -> str:
  if size != "auto":
    return size
  return "accelerator" if jax.default_backend() in ("gpu", "tpu") else "tiny"


def ints(text: str) -> list[int]:
  """'1024,4k,16k' -> [1024, 4096, 16384]."""
  out = []
  for item in text.split(","):
    item = item.strip().lower()
    out.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
  return out


def floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",")]


def environment() -> dict[str, Any]:
  """Where and how a result was produced: date, machine, versions and the exact command."""
  dev = jax.devices()[0]
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": socket.gethostname(),
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "platform": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
  }


class Results:
  """JSON results written after every addition, so a time-boxed run that is killed still
  leaves what it measured."""

  def __init__(self, path: str | None, benchmark: str, settings: dict[str, Any]):
    self.path = path
    self.data = {"benchmark": benchmark, "environment": environment(), "settings": settings,
                 "rows": [], "skipped": [], "errors": []}
    self.start = time.perf_counter()
    self.save()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def add(self, key: str, item: Any):
    self.data[key].append(item)
    self.save()

  def set(self, key: str, value: Any):
    self.data[key] = value
    self.save()

  def save(self):
    if not self.path:
      return
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1, default=_json_default)
    os.replace(tmp, self.path)


def _json_default(x):
  if isinstance(x, (np.integer, np.floating, np.bool_)):
    return x.item()
  return str(x)


def block(x):
  return jax.block_until_ready(x)


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, dict]:
  """Runs every variant once per round (each returns its own seconds per unit of work);
  returns per variant the median, min and max over rounds."""
  samples: dict[str, list[float]] = {name: [] for name in variants}
  for _ in range(rounds):
    for name, run in variants.items():
      samples[name].append(run())
  return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s),
                 "rounds": len(s)} for name, s in samples.items()}


def timed(fn: Callable[[], Any], inner: int = 1) -> Callable[[], float]:
  """A sampler for `interleaved`: runs fn `inner` times, blocks, returns seconds per call."""

  def run() -> float:
    start = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn()
    block(out)
    return (time.perf_counter() - start) / inner

  return run


def copy_bandwidth(nbytes: int, rounds: int = 7, inner: int = 3) -> dict[str, float]:
  """Device copy bandwidth: an elementwise `x + 1` over a large buffer reads and writes every
  byte once (a plain copy could be elided by XLA), so bandwidth = 2 * nbytes / time.

  The input is donated, so the result is written in place: a fresh output buffer would
  charge the copy with allocating (on CPU: page-faulting) hundreds of MiB, which a decode
  step, whose cache is donated too, never pays.
  """
  n = max(1024, nbytes // 4)
  state = [block(jnp.arange(n, dtype=jnp.float32))]
  fn = jax.jit(lambda a: a + 1.0, donate_argnums=0)

  def step():
    state[0] = fn(state[0])
    return state[0]

  block(step())
  t = interleaved({"copy": timed(step, inner)}, rounds)["copy"]
  del state[0]
  return {"bytes": 4 * n, "seconds": t["median_s"], "bytes_per_s": 2 * 4 * n / t["median_s"],
          "method": "jit(x + 1, donated), median of rounds"}


def default_copy_bytes() -> int:
  """Large enough to leave every cache behind: 2 GiB on an accelerator, 256 MiB on CPU."""
  return (2 << 30) if jax.default_backend() in ("gpu", "tpu") else (256 << 20)


def device_memory() -> dict[str, int] | None:
  """The allocator's statistics (bytes_in_use, bytes_limit, ...) where the backend has them."""
  stats = jax.devices()[0].memory_stats()
  return dict(stats) if stats else None


def allocated_bytes() -> tuple[int, str]:
  """Bytes allocated on the device now: allocator statistics where available, else the sum
  of the live jax arrays (CPU has no allocator statistics)."""
  gc.collect()
  stats = device_memory()
  if stats and "bytes_in_use" in stats:
    return int(stats["bytes_in_use"]), "device.memory_stats()[bytes_in_use]"
  live = {id(a): a for a in jax.live_arrays() if not a.is_deleted()}
  return int(sum(a.nbytes for a in live.values())), "sum of jax.live_arrays() nbytes"


def available_memory() -> int:
  """Bytes the benchmark may use on the device (allocator limit, or the host's available RAM)."""
  stats = device_memory()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  try:
    with open("/proc/meminfo") as f:
      info = dict(l.split(":", 1) for l in f)
    return int(info["MemAvailable"].split()[0]) * 1024
  except (OSError, KeyError):
    return 4 << 30


def tree_bytes(tree) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def compile_all(jobs: list[tuple[Any, Callable[[], Any]]], workers: int | None = None) -> dict:
  """Compiles `lower()` callables in threads (XLA compiles release the GIL), so a grid of
  cache shapes compiles in parallel on a many-core host. jobs: [(key, lower_fn)]."""
  lowered = [(key, lower()) for key, lower in jobs]  # tracing is Python: sequential
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    futures = {key: pool.submit(low.compile) for key, low in lowered}
    out = {}
    for key, future in futures.items():
      try:
        out[key] = future.result()
      except Exception as e:  # a shape that does not compile (e.g. memory) is reported
        out[key] = e
    return out


def add_gate_window(p: argparse.ArgumentParser) -> None:
  p.add_argument("--gate-window", type=int, default=None,
                 help="the gate's window / ring slots (default: GateConfig's; 0: the whole context)")


def gate_config(window: int | None):
  """The default GateConfig, with --gate-window applied (0: a gate over the whole context)."""
  from ag_jax.config import GateConfig
  return GateConfig() if window is None else GateConfig(window=window or None)


def engine_policy(policy, capacity: int):
  """(policy, capacity) as the engine builds a cache with them: engines with
  `policies.fit` bind the policy to the capacity (and cap window policies)."""
  from ag_jax import engine
  fit = getattr(engine, "fit", None)
  return fit(policy, capacity) if fit else (policy, capacity)


def fmt(x, digits: int = 3) -> str:
  if x is None:
    return "-"
  if isinstance(x, str):
    return x
  if isinstance(x, (bool, np.bool_)):
    return "yes" if x else "NO"
  if isinstance(x, (int, np.integer)):
    return str(x)
  return f"{x:.{digits}g}"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def gib(n: float) -> str:
  return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"
