"""Training checkpoints (orbax) and the gate export (safetensors + JSON).

A training checkpoint is one orbax step directory holding three items:
  state   the TrainState: step, trainable params (the gates), optimizer state
  data    the data iterator's JSON state (all processes' rows merged), so a restored run
          reads exactly the batches the uninterrupted run would have read
  config  the run's TrainConfig as JSON
Saves are asynchronous (training continues while the arrays are written) and orbax keeps
the last `keep` steps; a step directory appears under its final name only once complete.

A gate export is a directory with `gates.safetensors` (keys `layers.gate.<name>`, arrays
stacked over layers) and `gate_config.json` (the GateConfig fields plus, under "model",
the ModelConfig they were trained for). Loading reads only those two files: no pickle,
nothing executed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from ag_jax import atomic_io
from ag_jax.config import ConfigError, GateConfig, ModelConfig, from_dict
from ag_jax.hf_checkpoint import FLOAT_DTYPES, CheckpointError, read_json, safetensors_header

GATES_FILE = "gates.safetensors"
GATE_CONFIG_FILE = "gate_config.json"
GATE_PREFIX = "layers.gate."
# ModelConfig fields that decide whether gates fit a model: its shapes and what its hidden
# states mean. dtype, max_position and scan_layers do not change what a gate computes.
ARCHITECTURE_FIELDS = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                       "mlp_dim", "rope_theta", "rope_scaling", "rms_eps", "tie_embeddings")


# ---------------------------------------------------------------------------------------------
# Training checkpoints


class TrainCheckpointer:
  """Save and restore (TrainState, data iterator state, run config) with orbax."""

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
    import orbax.checkpoint as ocp  # deferred: only training needs orbax

    self._ocp = ocp
    # Local paths are made absolute (orbax needs that); gs:// and other URLs pass as they are.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        # Saves are decided by the loop (`should_save`), which also forces the last step.
        save_interval_steps=1)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """abstract_state: ShapeDtypeStructs with shardings (e.g. `abstract_like(state)`)."""
    ocp = self._ocp
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], restored["config"]

  def restore_trainable(self, step: int) -> tuple[dict, dict]:
    """(the trainable params as host numpy arrays, the run config) of one saved step, without
    the optimizer state's shapes: no TrainState needs building (checkpoint selection)."""
    ocp = self._ocp
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
    return jax.device_get(restored["state"]["trainable"]), restored["config"]

  def wait(self) -> None:
    """Block until the background save (if any) is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with each array's sharding) to restore a checkpoint into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---------------------------------------------------------------------------------------------
# Gate export


def _flatten(tree: dict, prefix: str) -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _unflatten(flat: dict[str, Any], prefix: str) -> dict:
  out: dict = {}
  for name, value in flat.items():
    *parents, leaf = name[len(prefix):].split(".")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _model_config_json(model_cfg: ModelConfig) -> dict:
  data = dataclasses.asdict(model_cfg)
  data["rope_scaling"] = dict(model_cfg.rope_scaling) if model_cfg.rope_scaling else None
  return data


def expected_gate_shapes(gate_cfg: GateConfig, model_cfg: ModelConfig) -> dict[str, tuple]:
  """Flattened key -> shape of the gates of `model_cfg` (no compute: eval_shape)."""
  import jax.numpy as jnp

  from ag_jax.model import Llama

  model = Llama(model_cfg, gate=gate_cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  gates = abstract["params"]["layers"]["gate"]
  gates = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, gates,
                       is_leaf=lambda x: hasattr(x, "value"))
  return {k: tuple(v.shape) for k, v in _flatten(gates, GATE_PREFIX).items()}


def check_gate_params(gate_cfg: GateConfig, model_cfg: ModelConfig, gate_params: dict) -> None:
  """Raise CheckpointError unless `gate_params` has the shapes `gate_cfg` needs on `model_cfg`."""
  expected = expected_gate_shapes(gate_cfg, model_cfg)
  got = {k: tuple(np.shape(v)) for k, v in _flatten(gate_params, GATE_PREFIX).items()}
  if got != expected:
    raise CheckpointError(f"gate params {got} do not match the gate config, which needs {expected}")


def export_gates(path: str, gate_cfg: GateConfig, model_cfg: ModelConfig, gate_params: dict) -> str:
  """Write `gates.safetensors` + `gate_config.json` into directory `path` (replaced whole:
  written to a temp dir beside it, then renamed, so no reader sees half a gate)."""
  from safetensors.numpy import save_file

  check_gate_params(gate_cfg, model_cfg, gate_params)
  tensors = {k: np.ascontiguousarray(np.asarray(jax.device_get(v), np.float32))
             for k, v in _flatten(gate_params, GATE_PREFIX).items()}
  meta = {**dataclasses.asdict(gate_cfg), "model": _model_config_json(model_cfg)}
  path = os.path.abspath(path)
  with atomic_io.replace_dir(path) as tmp:
    save_file(tensors, os.path.join(tmp, GATES_FILE), metadata={"format": "ag_jax.gates"})
    with open(os.path.join(tmp, GATE_CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
  return path


def _architecture_diff(trained_for: ModelConfig, model_cfg: ModelConfig) -> list[str]:
  return [f"{f}: gates trained for {getattr(trained_for, f)!r}, model has {getattr(model_cfg, f)!r}"
          for f in ARCHITECTURE_FIELDS if getattr(trained_for, f) != getattr(model_cfg, f)]


def load_gates(path: str, model_cfg: ModelConfig | None = None) -> tuple[GateConfig, dict]:
  """Read a gate export -> (GateConfig, gate params for `params["layers"]["gate"]`).

  `path` is the export directory (or its gates.safetensors). With `model_cfg`, the gates
  must have been trained for that architecture. Any mismatch raises one CheckpointError.
  """
  from safetensors import safe_open

  folder = os.path.dirname(path) if path.endswith(".safetensors") else path
  tensors_file = os.path.join(folder, GATES_FILE)
  config_file = os.path.join(folder, GATE_CONFIG_FILE)
  for file in (tensors_file, config_file):
    if not os.path.exists(file):
      raise CheckpointError(f"{file!r} does not exist: a gate export directory holds "
                            f"{GATES_FILE} and {GATE_CONFIG_FILE} (written by training to out_dir/gates)")
  meta = read_json(config_file, GATE_CONFIG_FILE)
  if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
    raise CheckpointError(f"{config_file!r} is not a valid gate config: it must be a JSON object "
                          "with the GateConfig fields and a 'model' object; export the gates again")
  try:
    trained_for = from_dict(ModelConfig, meta.pop("model"), where="model.")
    # Exports from before gate k/v heads could be shared had one k/v head per query head.
    meta.setdefault("num_kv_heads", None)
    gate_cfg = from_dict(GateConfig, meta)
  except (ConfigError, KeyError) as e:
    raise CheckpointError(f"{config_file!r} is not a valid gate config: {e}") from None
  if model_cfg is not None:
    diff = _architecture_diff(trained_for, model_cfg)
    if diff:
      raise CheckpointError(f"the gates in {folder!r} were trained for a different model: "
                            + "; ".join(diff))
  header = safetensors_header(tensors_file)  # a damaged file fails here, named
  for name, (dtype, _) in header.items():
    if dtype not in FLOAT_DTYPES:
      raise CheckpointError(f"{tensors_file!r}: {name} has dtype {dtype}; gates are float tensors")
  expected = expected_gate_shapes(gate_cfg, trained_for)
  got = {k: shape for k, (_, shape) in header.items()}
  if got != expected:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    raise CheckpointError(
        f"{tensors_file!r} does not match its {GATE_CONFIG_FILE}: "
        + "; ".join(filter(None, [
            f"missing {missing}" if missing else "",
            f"unexpected {extra}" if extra else "",
            ", ".join(f"{k} has shape {got[k]}, expected {expected[k]}" for k in wrong)])))
  with safe_open(tensors_file, "numpy") as f:
    flat = {k: f.get_tensor(k) for k in f.keys()}
  return gate_cfg, _unflatten(flat, GATE_PREFIX)
