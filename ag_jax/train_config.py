"""The training run's config: nested frozen dataclasses read from a yaml recipe plus
`key=value` overrides (`ag_jax.config.from_dict`: unknown keys are errors that list the
valid ones), and the checks that need no devices.

A recipe looks like (every key optional except the model source):

  model: {preset: tiny, overrides: {num_layers: 2}, init_seed: 0}   # random init, or
  model: {hf_path: /ckpt/Llama-2-7b-hf, preset: llama2_7b}        # HF weights (preset checked)
  gate:  {target_keep: 0.5, eviction_loss: hinge, ...}             # GateConfig; null: no gate
  data:  {source: recall, split: train, seq_len: 256, batch_size: 8, ...}
  optim: {lr: 1.0e-3, warmup: 20, weight_decay: 0.01, clip: 1.0}
  mesh:  {data: -1, fsdp: 1, tensor: 1}
  checkpoint: {every: 100, keep: 3}
  run:   {out_dir: runs/x, steps: 200, trainable: gates, remat: none}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ag_jax import config as config_lib
from ag_jax.config import ConfigError, GateConfig
from ag_jax.sharding import MeshConfig

TRAINABLE = ("gates", "all")
REMAT = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """Where the base model comes from.

  `preset` (configs/models/<name>.yaml or a yaml path) with `overrides` (ModelConfig
  fields) names an architecture. hf_path null: that model, randomly initialised from
  `init_seed`. hf_path set: weights and config.json from that local HF directory (a
  downloaded Llama, or the `out_dir/model` of a `trainable: all` run); if a preset is set
  too, the checkpoint must be of that architecture.
  """

  preset: str | None = None
  hf_path: str | None = None
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  init_seed: int = 0
  dtype: str | None = None  # weights/compute dtype of an hf_path model; null: the preset's or float32


@dataclasses.dataclass(frozen=True)
class DataSection:
  source: str = "recall"          # "recall[:key=value,...]" or a prepared TFDS name
  split: str = "train"
  eval_split: str | None = "validation"
  data_dir: str | None = None     # TFDS data_dir; null: TFDS's default (~/tensorflow_datasets)
  tokenizer: str | None = None    # "bytes", or an HF dir / tokenizer.json; null: hf_path or bytes
  seq_len: int = 256
  batch_size: int = 8             # global rows per step, over all processes
  sft: bool = False               # prompt/response examples: only the response is trained
  response_weight: float = 1.0    # LM loss weight of response tokens (the RULER answers); 1: plain LM
  seed: int = 0                   # document order
  shuffle: bool = True
  num_samples: int | None = None  # use only the first N documents of the split
  text_field: str = "text"


@dataclasses.dataclass(frozen=True)
class OptimSection:
  lr: float = 1e-3                # peak learning rate
  warmup: int = 0                 # linear warmup steps from 0
  decay_steps: int | None = None  # cosine decay length after warmup; null: run.steps
  end_lr_fraction: float = 0.1    # the cosine ends at lr * end_lr_fraction
  weight_decay: float = 0.0       # AdamW; never applied to biases and norm scales
  clip: float | None = 1.0        # global gradient norm clip; null: none
  b1: float = 0.9
  b2: float = 0.95


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  dir: str | None = None          # null: <run.out_dir>/checkpoints
  every: int = 100                # save every N steps (and at the end); 0: only at the end
  keep: int = 3                   # keep the last N checkpoints
  async_save: bool = True         # write in the background while training continues
  resume: bool = True             # continue from the latest checkpoint in dir, if any


@dataclasses.dataclass(frozen=True)
class RunSection:
  out_dir: str = "runs/train"
  steps: int = 100
  eval_every: int = 0             # 0: evaluate only at the end (if data.eval_split is set)
  eval_batches: int = 4
  log_every: int = 10
  trainable: str = "gates"        # "gates": base frozen; "all": every parameter trains
  remat: str = "none"             # activation checkpointing of each layer (REMAT)
  seed: int = 0                   # gate initialisation
  progress: bool = True           # tqdm bar on process 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: ModelSection = ModelSection()
  gate: GateConfig | None = GateConfig()
  data: DataSection = DataSection()
  optim: OptimSection = OptimSection()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointSection = CheckpointSection()
  run: RunSection = RunSection()

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _checked_ints(cfg: TrainConfig) -> None:
  positive = {"data.seq_len": cfg.data.seq_len, "data.batch_size": cfg.data.batch_size,
              "run.steps": cfg.run.steps, "run.log_every": cfg.run.log_every,
              "run.eval_batches": cfg.run.eval_batches, "checkpoint.keep": cfg.checkpoint.keep}
  non_negative = {"run.eval_every": cfg.run.eval_every, "checkpoint.every": cfg.checkpoint.every,
                  "optim.warmup": cfg.optim.warmup}
  for name, value in positive.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"{name} must be a positive integer, got {value!r}")
  for name, value in non_negative.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
  if cfg.data.seq_len < 2:
    raise ConfigError(f"data.seq_len must be >= 2 (one input and one target), got {cfg.data.seq_len}")
  if not (isinstance(cfg.data.response_weight, (int, float)) and cfg.data.response_weight > 0):
    raise ConfigError(f"data.response_weight must be positive, got {cfg.data.response_weight!r}")
  if cfg.data.num_samples is not None and cfg.data.num_samples < 1:
    raise ConfigError(f"data.num_samples must be positive or null, got {cfg.data.num_samples}")


def validate(cfg: TrainConfig) -> None:
  """Checks that need neither devices nor files."""
  _checked_ints(cfg)
  if cfg.run.trainable not in TRAINABLE:
    raise ConfigError(f"run.trainable must be one of {TRAINABLE}, got {cfg.run.trainable!r}")
  if cfg.run.trainable == "all" and cfg.gate is not None and cfg.gate.distill_weight:
    raise ConfigError("gate.distill_weight distils the frozen base without eviction into the "
                      "gated view: it needs run.trainable=gates (or set gate.distill_weight=0)")
  if cfg.run.trainable == "gates" and cfg.gate is None:
    raise ConfigError("run.trainable=gates needs a gate: set gate (e.g. gate.target_keep=0.5) "
                      "or train the base model with run.trainable=all")
  if cfg.run.remat not in REMAT:
    raise ConfigError(f"run.remat must be one of {REMAT}, got {cfg.run.remat!r}")
  if cfg.model.hf_path is None and cfg.model.preset is None:
    raise ConfigError("set model.hf_path (a local HF Llama directory) or model.preset "
                      "(e.g. model.preset=tiny) for a randomly initialised model")
  if cfg.optim.lr <= 0:
    raise ConfigError(f"optim.lr must be positive, got {cfg.optim.lr}")
  if cfg.optim.clip is not None and cfg.optim.clip <= 0:
    raise ConfigError(f"optim.clip must be positive or null, got {cfg.optim.clip}")
  if not 0.0 <= cfg.optim.end_lr_fraction <= 1.0:
    raise ConfigError(f"optim.end_lr_fraction must be in [0, 1], got {cfg.optim.end_lr_fraction}")


def from_dict(data: dict) -> TrainConfig:
  return config_lib.from_dict(TrainConfig, data)


def load_train_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
  """A recipe (yaml; None: all defaults) merged with `key=value` overrides, validated."""
  data = config_lib.read_yaml(path) if path else {}
  data = config_lib.merge(data, config_lib.parse_overrides(overrides))
  cfg = from_dict(data)
  validate(cfg)
  return cfg
