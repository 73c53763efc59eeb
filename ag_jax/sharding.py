"""Device mesh, the one logical-to-mesh rule table, and shardings for params, gates,
optimizer state and batches; multi-host start-up and global batches.

Mesh axes: `data` (pure data parallel: everything but the batch replicated), `fsdp` (data
parallel with parameters sharded over their `embed` dimension, gathered per layer by XLA),
`tensor` (heads, KV heads, MLP and vocab split across devices). The model only names its
parameter dimensions (`ag_jax.model.logical_axes`); `LOGICAL_RULES` below is the single
place that decides where each name goes. A dimension that does not divide by its mesh
axes is replicated instead, so tiny test models run on any mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ag_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = "batch"  # the logical name of a batch dimension

# logical name -> mesh axis (or axes, or None = replicated). Every logical name the model
# uses must be listed: an unlisted one is an error, never silently replicated.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),         # scanned over: every device needs every layer's slice
    ("gate_heads", None),     # gates are tiny; splitting their heads saves nothing
    ("gate_head_dim", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; -1 takes all devices the other axes leave (at most one -1)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    for name, size in zip(MESH_AXES, sizes):
      if not isinstance(size, int) or (size < 1 and size != -1):
        raise ConfigError(f"mesh.{name} must be a positive integer or -1 (all remaining "
                          f"devices), got {size!r}")
    if sizes.count(-1) > 1:
      raise ConfigError(f"only one mesh axis may be -1, got data={self.data}, "
                        f"fsdp={self.fsdp}, tensor={self.tensor}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % fixed:
        raise ConfigError(
            f"mesh {self._describe()} cannot fill {num_devices} devices: the fixed axes "
            f"({fixed} devices) must divide the device count")
      sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
      raise ConfigError(
          f"mesh {self._describe()} uses {math.prod(sizes)} devices but {num_devices} are "
          f"available; make data x fsdp x tensor equal {num_devices}, or set one axis to -1")
    return tuple(sizes)

  def _describe(self) -> str:
    return f"data={self.data} x fsdp={self.fsdp} x tensor={self.tensor}"


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all, of every process).

  Axis types are Auto: shardings are given at the jit boundary and XLA propagates them.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(cfg.shape(len(devices)), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _rule_table(rules) -> dict[str, tuple[str, ...]]:
  table = {}
  for name, axes in rules:
    table[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return table


def logical_to_mesh(logical: P, shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES) -> P:
  """A PartitionSpec of logical names -> one of mesh axes for an array of `shape`.

  A dimension falls back to replicated when its size does not divide by its mesh axes, or
  when an axis is already used by an earlier dimension of the same array.
  """
  table = _rule_table(rules)
  if len(logical) != len(shape):
    raise ValueError(f"logical spec {logical} has {len(logical)} names for shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for name, size in zip(logical, shape):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no rule in ag_jax.sharding.LOGICAL_RULES "
                       f"(known: {sorted(table)})")
    axes = tuple(a for a in table[name] if mesh.shape[a] > 1)  # size-1 axes change nothing
    if not axes or size % math.prod(mesh.shape[a] for a in axes) or used & set(axes):
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def _is_spec(x) -> bool:
  return isinstance(x, P)


def named_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given its logical specs."""
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_mesh(spec, x.shape, mesh, rules)),
      logical_tree, abstract_tree, is_leaf=_is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(model, mesh: Mesh, rules=LOGICAL_RULES) -> dict:
  """Shardings of the model's whole params tree (base and gates), from its logical axes."""
  from ag_jax.model import logical_axes  # deferred: config-only users need no model

  logical = logical_axes(model)["params"]
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  abstract = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, abstract["params"],
                          is_leaf=lambda x: hasattr(x, "value"))
  return named_shardings(logical, abstract, mesh, rules)


def optimizer_shardings(tx, params_abstract: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of `tx`'s state: each copy of the params tree inside it (Adam's mu, nu, ...)
  is sharded like the params; counters and other non-param leaves are replicated."""
  import optax

  state_abstract = jax.eval_shape(tx.init, params_abstract)
  return optax.tree_map_params(tx, lambda _, sharding: sharding, state_abstract,
                               params_shardings, transform_non_params=lambda _: replicated(mesh))


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
  """[batch, seq] arrays: rows split over the data-parallel axes, sequence whole."""
  return NamedSharding(mesh, P(_rule_table(rules)[BATCH] or None, None))


def process_batch_slice(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
  """(index, count): this process feeds rows [index * B/count, (index + 1) * B/count).

  Read from the batch sharding itself, so it is right for any mesh layout: processes whose
  devices hold the same rows (e.g. a tensor axis spanning hosts) get the same index.
  """
  sharding = batch_sharding(mesh)
  if global_batch_size % math.prod(mesh.shape[a] for a in ("data", "fsdp")):
    raise ConfigError(
        f"data.batch_size {global_batch_size} must be a multiple of mesh data x fsdp "
        f"({mesh.shape['data']} x {mesh.shape['fsdp']}): each data-parallel device gets "
        "whole rows")
  index_map = sharding.addressable_devices_indices_map((global_batch_size, 1))
  rows = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
                 for s in index_map.values()})
  start, stop = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  if covered != stop - start or global_batch_size % (stop - start) or start % (stop - start):
    raise ConfigError(
        f"process {jax.process_index()} holds rows {rows} of the batch, not one contiguous "
        "equal share; order the mesh so that each host's devices are adjacent on data/fsdp")
  return start // (stop - start), global_batch_size // (stop - start)


@functools.lru_cache(maxsize=16)
def data_parallel_processes(mesh: Mesh) -> tuple[int, int]:
  """(index, count) of this process among the processes that feed distinct rows; the
  layout alone decides it (probed with one row per data-parallel device)."""
  return process_batch_slice(mesh, math.prod(mesh.shape[a] for a in ("data", "fsdp")))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows ([B / count, ...] each, as `process_batch_slice` assigns them)
  -> global [B, ...] arrays sharded by `batch_sharding`."""
  sharding = batch_sharding(mesh)
  _, count = data_parallel_processes(mesh)
  return {key: jax.make_array_from_process_local_data(
              sharding, value, (value.shape[0] * count,) + value.shape[1:])
          for key, value in local.items()}


# ---------------------------------------------------------------------------------------------
# Multi-host start-up


def distributed_environment() -> bool:
  """Whether the environment describes a multi-process job jax can join by itself."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True  # a multi-host Cloud TPU slice
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or \
      int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Join a multi-process job before any device is touched; True if this is one.

  Explicit arguments (the CLI's --coordinator/--num-processes/--process-id) win; else the
  usual environment (JAX_COORDINATOR_ADDRESS, a multi-host Cloud TPU slice, SLURM, Open
  MPI) is detected and jax finds the rest itself. A single host does nothing.
  """
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ConfigError("--coordinator, --num-processes and --process-id go together: give all "
                      "three (e.g. --coordinator localhost:12345 --num-processes 2 --process-id 0)")
  if coordinator is None and not distributed_environment():
    return False
  # CPU devices need a collectives backend for cross-process all-reduces (gloo is the
  # default in recent jax; set it for older ones). Accelerators ignore this flag.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is not None:
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process-id {process_id} must be in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
