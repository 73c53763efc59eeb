"""Everything a training run needs before its first step, built from a TrainConfig: the
model config (checked against the data), the data iterators, the mesh, the params placed
on it, the optimizer state and the jitted steps.

Checks that only need files run before any weights are read, so a bad recipe fails in
seconds, not after loading 7B parameters.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ag_jax import config as config_lib
from ag_jax import sharding as sharding_lib
from ag_jax import train_step as step_lib
from ag_jax.checkpoint import ARCHITECTURE_FIELDS
from ag_jax.config import ConfigError, ModelConfig
from ag_jax.model import Llama
from ag_jax.train_config import ModelSection, TrainConfig


@dataclasses.dataclass
class Run:
  cfg: TrainConfig
  model_cfg: ModelConfig
  model: Llama
  mesh: Mesh
  tokenizer: Any
  iterator: Any                  # DataIterator over this process's rows of the train split
  eval_source: Any | None
  data_slice: tuple[int, int]    # (index, count) of this process among the data feeders
  frozen: dict                   # frozen params on devices ({} when everything trains)
  state: step_lib.TrainState     # initial state on devices
  train_step: Callable           # jitted (state, frozen, batch) -> (state, metrics)
  eval_step: Callable            # jitted (trainable, frozen, batch) -> metrics

  @property
  def has_eval(self) -> bool:
    return self.eval_source is not None


# ---------------------------------------------------------------------------------------------
# Model config


def resolve_model_config(section: ModelSection) -> ModelConfig:
  """The ModelConfig of the run, from the preset (+ overrides) and/or the HF config.json."""
  preset_cfg = None
  if section.preset is not None:
    preset_cfg = config_lib.preset(section.preset)
    if section.overrides:
      preset_cfg = config_lib.from_dict(
          ModelConfig, {**dataclasses.asdict(preset_cfg), **section.overrides},
          where="model.overrides.")
    if section.dtype is not None:
      preset_cfg = dataclasses.replace(preset_cfg, dtype=section.dtype, param_dtype=section.dtype)
  if section.hf_path is None:
    return preset_cfg
  from ag_jax.hf_checkpoint import CheckpointError, read_config
  dtype = section.dtype or "float32"
  try:
    hf_config = read_config(section.hf_path)
  except CheckpointError as e:
    raise ConfigError(f"model.hf_path: {e}. Put the HF model (config.json, tokenizer.json, "
                      "*.safetensors) there, or point model.hf_path at it") from None
  hf_cfg = ModelConfig.from_hf(hf_config, dtype=dtype, param_dtype=dtype)
  from ag_jax.hf_checkpoint import check_hf_checkpoint
  check_hf_checkpoint(section.hf_path, hf_cfg)  # damaged files fail here, before any compile
  if preset_cfg is not None:
    diff = [f"{f}: checkpoint {getattr(hf_cfg, f)!r}, preset {getattr(preset_cfg, f)!r}"
            for f in ARCHITECTURE_FIELDS if getattr(hf_cfg, f) != getattr(preset_cfg, f)]
    if diff:
      with_overrides = " with model.overrides" if section.overrides else ""
      raise ConfigError(
          f"the base checkpoint {section.hf_path!r} does not match model.preset "
          f"{section.preset!r}{with_overrides} ({'; '.join(diff)}). Point model.hf_path at a "
          "checkpoint of that model, or set model.preset=null to take the checkpoint's own "
          "config")
  return hf_cfg


# ---------------------------------------------------------------------------------------------
# Data


class _FirstN:
  """The first n examples of a source (`data.num_samples`)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(n, len(source))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index):
    if not 0 <= index < self.n:
      raise IndexError(index)
    return self.source[index]


def _tokenizer(cfg: TrainConfig, model_cfg: ModelConfig):
  from ag_jax.tokenizer import load_tokenizer
  spec = cfg.data.tokenizer or cfg.model.hf_path or "bytes"
  try:
    tokenizer = load_tokenizer(spec)
  except (FileNotFoundError, OSError, ValueError) as e:
    raise ConfigError(f"data.tokenizer {spec!r}: {e}") from None
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(
        f"the tokenizer ({spec!r}) has {tokenizer.vocab_size} ids but the model's vocab_size "
        f"is {model_cfg.vocab_size}; use the model's own tokenizer (data.tokenizer)")
  return tokenizer


def _open(cfg: TrainConfig, split: str):
  from ag_jax.data import open_source
  source = open_source(cfg.data.source, split, cfg.data.data_dir)
  return source if cfg.data.num_samples is None else _FirstN(source, cfg.data.num_samples)


def _iterator(cfg: TrainConfig, source, tokenizer, data_slice, shuffle: bool):
  from ag_jax.data import DataIterator
  index, count = data_slice
  return DataIterator(source, tokenizer, cfg.data.seq_len, cfg.data.batch_size, seed=cfg.data.seed,
                      shuffle=shuffle, process_index=index, process_count=count,
                      sft=cfg.data.sft, text_field=cfg.data.text_field,
                      response_weight=cfg.data.response_weight,
                      budgets=cfg.gate.train_budgets if cfg.gate is not None else None)


def eval_batches(run: Run) -> Iterator[dict[str, np.ndarray]]:
  """The same `run.eval_batches` local batches at every evaluation (a fresh, unshuffled
  iterator), so evaluations are comparable step to step."""
  iterator = _iterator(run.cfg, run.eval_source, run.tokenizer, run.data_slice, shuffle=False)
  for _ in range(run.cfg.run.eval_batches):
    yield next(iterator)


# ---------------------------------------------------------------------------------------------
# Params, state and steps


def _init_fn(model: Llama, select: Callable[[dict], Any]):
  tokens = jnp.zeros((1, 2), jnp.int32)
  # Only the selected params leave the jit: XLA drops the other initializers.
  return lambda key: select(nn.meta.unbox(model.init(key, tokens))["params"])


def _params(cfg: TrainConfig, model_cfg: ModelConfig, mesh: Mesh) -> dict:
  """Base params (HF weights, or random from model.init_seed) and fresh gates (from
  run.seed), each created directly on its devices."""
  base_model = Llama(model_cfg)
  base_shardings = sharding_lib.param_shardings(base_model, mesh)
  inits, keys, shardings = [], [], []
  if cfg.model.hf_path is None:  # random base: initialised in the same program as the gates
    inits.append(_init_fn(base_model, lambda p: p))
    keys.append(jax.random.key(cfg.model.init_seed))
    shardings.append(base_shardings)
  if cfg.gate is not None:
    gated = Llama(model_cfg, gate=cfg.gate)
    inits.append(_init_fn(gated, lambda p: p["layers"]["gate"]))
    keys.append(jax.random.key(cfg.run.seed))
    shardings.append(sharding_lib.param_shardings(gated, mesh)["layers"]["gate"])
  created = jax.jit(lambda ks: [init(k) for init, k in zip(inits, ks)],
                    out_shardings=shardings)(keys) if inits else []
  if cfg.model.hf_path is not None:
    from ag_jax.hf_checkpoint import load_hf_llama
    _, params = load_hf_llama(cfg.model.hf_path, jnp.dtype(model_cfg.param_dtype),
                              shardings=base_shardings)
  else:
    params = created.pop(0)
  if cfg.gate is None:
    return params
  return {**params, "layers": {**params["layers"], "gate": created[0]}}


def build_run(cfg: TrainConfig) -> Run:
  model_cfg = resolve_model_config(cfg.model)
  if cfg.data.seq_len > model_cfg.max_position:
    raise ConfigError(f"data.seq_len {cfg.data.seq_len} is beyond the model's max_position "
                      f"{model_cfg.max_position}; lower data.seq_len")
  tokenizer = _tokenizer(cfg, model_cfg)
  train_source = _open(cfg, cfg.data.split)  # fails fast on a data set that is not prepared
  eval_source = _open(cfg, cfg.data.eval_split) if cfg.data.eval_split else None

  mesh = sharding_lib.make_mesh(cfg.mesh)
  sharding_lib.process_batch_slice(mesh, cfg.data.batch_size)  # batch divides the mesh
  data_slice = sharding_lib.data_parallel_processes(mesh)
  iterator = _iterator(cfg, train_source, tokenizer, data_slice, shuffle=cfg.data.shuffle)

  model = Llama(model_cfg, gate=cfg.gate, remat=cfg.run.remat)
  trainable_kind = cfg.run.trainable
  trainable, frozen = step_lib.split_params(_params(cfg, model_cfg, mesh), trainable_kind)
  trainable_shardings, frozen_shardings = step_lib.split_params(
      sharding_lib.param_shardings(model, mesh), trainable_kind)

  o = cfg.optim
  tx, schedule = step_lib.make_optimizer(
      o.lr, cfg.run.steps, warmup=o.warmup, decay_steps=o.decay_steps,
      end_lr_fraction=o.end_lr_fraction, weight_decay=o.weight_decay, clip=o.clip, b1=o.b1, b2=o.b2)
  replicated = sharding_lib.replicated(mesh)
  state_shardings = step_lib.TrainState(
      step=replicated, trainable=trainable_shardings,
      opt_state=sharding_lib.optimizer_shardings(
          tx, jax.eval_shape(lambda x: x, trainable), trainable_shardings, mesh))
  state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_shardings,
                  donate_argnums=(0,))(trainable)

  batch_sharding = sharding_lib.batch_sharding(mesh)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, schedule, trainable_kind), state_shardings,
      frozen_shardings, batch_sharding, replicated)
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(model, trainable_kind),
                                     trainable_shardings, frozen_shardings, batch_sharding,
                                     replicated)
  if jax.process_index() == 0:
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    import json
    with open(os.path.join(cfg.run.out_dir, "train_config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2)
  return Run(cfg, model_cfg, model, mesh, tokenizer, iterator, eval_source, data_slice, frozen,
             state, train_step, eval_step)
