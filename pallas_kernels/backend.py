"""Backend choice and the per-backend plumbing shared by the kernels.

Four backends:
  "tpu"        Mosaic TPU, compiled.
  "gpu"        Mosaic GPU (``plgpu``), compiled. Opt-in only: it lowers for CUDA (tested
               on CPU) but has not been run on a real GPU yet, so "auto" never picks it.
  "interpret"  The TPU kernels run by the Pallas TPU interpreter on any platform. This is
               how the kernels are tested on CPU; it is far too slow for real use.
  "reference"  The pure-jnp version beside each kernel. Always works.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BACKENDS = ("tpu", "gpu", "interpret", "reference")
ENV_VAR = "AG_JAX_KERNEL_BACKEND"


def resolve_backend(backend: str | None = None) -> str:
  """Returns one of BACKENDS.

  None or "auto": the environment variable AG_JAX_KERNEL_BACKEND if set, else by
  `jax.default_backend()`: tpu -> "tpu"; cpu and gpu -> "reference" (interpret mode is
  for tests only; the GPU kernels are opt-in until a benchmark validates them).
  """
  if backend is None or backend == "auto":
    backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend == "auto":
      return "tpu" if jax.default_backend() == "tpu" else "reference"
  if backend not in BACKENDS:
    raise ValueError(
        f"Unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)} or 'auto'"
        f" (None). The environment variable {ENV_VAR} takes the same names.")
  return backend


def tpu_call_kwargs(
    backend: str,
    *,
    grid: tuple[int, ...],
    in_specs: Sequence[pl.BlockSpec],
    out_specs: Any,
    num_scalar_prefetch: int,
    dimension_semantics: tuple[str, ...],
    cost_estimate: pl.CostEstimate,
    scratch_shapes: Sequence[Any] = (),
) -> dict[str, Any]:
  """`pl.pallas_call` keyword arguments for the TPU-style kernels ("tpu" or "interpret").

  Both use the same `PrefetchScalarGridSpec`, so the interpreted kernel on CPU is the
  very kernel that runs on TPU (the jax test-suite pattern). "interpret" uses the TPU
  interpreter (`pltpu.InterpretParams`) rather than plain `interpret=True`: it simulates
  DMAs and semaphores (a copy lands when it is waited for, so a missing wait shows up as
  missing data), fills uninitialised buffers with NaN and rejects out-of-bounds reads.
  """
  if backend not in ("tpu", "interpret"):
    raise ValueError(f"tpu_call_kwargs is for 'tpu' or 'interpret', got {backend!r}")
  return dict(
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=num_scalar_prefetch, grid=grid, in_specs=in_specs,
          out_specs=out_specs, scratch_shapes=scratch_shapes),
      compiler_params=pltpu.CompilerParams(dimension_semantics=dimension_semantics),
      cost_estimate=cost_estimate,
      interpret=pltpu.InterpretParams() if backend == "interpret" else False,
  )


def gpu_kernel(
    body: Callable[..., None],
    *,
    out_type: Any,
    grid: tuple[int, ...],
    grid_names: tuple[str, ...],
    cost_estimate: pl.CostEstimate,
) -> Callable[..., Any]:
  """A Mosaic GPU kernel over `grid` (one CTA of one warpgroup per grid point).

  Uses `pl.kernel` with a `plgpu.Mesh` and `plgpu.CompilerParams`, i.e. the Mosaic GPU
  backend chosen explicitly. Not the Triton lowering (being deprecated upstream), and not
  `pl.pallas_call` either: jax 0.10 deprecates `pallas_call` for Mosaic GPU in favour of
  the mesh-based `kernel` entry point. Grid indices come from `lax.axis_index(name)`; all
  refs live in GMEM. Outputs to be written in place are passed in as `jax.new_ref` refs
  (aliased in and out of the kernel, so a donated buffer is filled without a copy).
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu  # imports fine on CPU

  return pl.kernel(
      body,
      out_type=out_type,
      mesh=plgpu.Mesh(grid=grid, grid_names=grid_names),
      compiler_params=plgpu.CompilerParams(),
      cost_estimate=cost_estimate,
  )


def clamp_block(block, length, block_size: int):
  """Index of the block to fetch at grid step `block` of a row holding `length` items.

  Steps past the row's last valid block return that block again: Pallas skips the copy
  when a block index does not change between consecutive steps, so the skipped steps
  cost no memory traffic (their compute is skipped with `pl.when`).
  """
  last = jnp.maximum(pl.cdiv(length, block_size) - 1, 0)
  return jnp.minimum(block, last)
