"""Frozen configs (model, gate), HF config translation, and yaml loading with overrides.

Imports nothing of ours. Every config is a frozen dataclass: hashable, so it can be a
static attribute of a flax Module or a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
  """A config value or key is wrong; the message names it and says what is allowed."""


_DTYPES = ("float32", "bfloat16", "float16")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  # None, or a tuple of (key, value) pairs so the config stays hashable, e.g.
  # (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0), ...).
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_eps: float = 1e-5
  tie_embeddings: bool = False
  max_position: int = 4096
  dtype: str = "float32"        # activations / compute
  param_dtype: str = "float32"  # stored weights
  scan_layers: bool = True      # False unrolls the layer loop (debugging only)

  def __post_init__(self):
    if isinstance(self.rope_scaling, Mapping):  # accept dicts from yaml / HF, store hashable
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim", "max_position"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"ModelConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads "
          f"({self.num_kv_heads}): each KV head serves a whole group of query heads")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ConfigError(f"ModelConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
    if self.head_dim % 2:
      raise ConfigError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.rope_type not in _ROPE_TYPES:
      raise ConfigError(
          f"ModelConfig.rope_scaling rope_type {self.rope_type!r} is not supported; "
          f"supported: {_ROPE_TYPES}")

  @property
  def rope_type(self) -> str:
    scaling = dict(self.rope_scaling or ())
    return scaling.get("rope_type", scaling.get("type", "default"))

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """Translate an HF `config.json` dict (Llama 2/3/3.1/3.2, Mistral)."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "mistral"):
      raise ConfigError(
          f"config.json model_type {model_type!r} is not supported: ag-jax reads Llama-family "
          "checkpoints (model_type 'llama' or 'mistral')")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size"):
      if field not in hf:
        raise ConfigError(f"config.json is missing the field {field!r}")
    heads = hf["num_attention_heads"]
    scaling = hf.get("rope_scaling")
    # transformers 5 moved rope settings into `rope_parameters` (theta included).
    rope_params = hf.get("rope_parameters") or {}
    if scaling is None and rope_params.get("rope_type", "default") != "default":
      scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if scaling is not None:
      scaling = dict(scaling)
      kind = scaling.get("rope_type", scaling.get("type", "default"))
      if kind not in _ROPE_TYPES:
        raise ConfigError(
            f"config.json rope_scaling type {kind!r} is not supported; supported: {_ROPE_TYPES}")
      if kind == "default":
        scaling = None
    if hf.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"config.json hidden_act {hf['hidden_act']!r} is not supported (need 'silu')")
    kw = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position=int(hf.get("max_position_embeddings", 4096)),
    )
    kw.update(overrides)
    return cls(**kw)


_GATE_KINDS = ("attention", "linear")
_EVICTION_LOSSES = ("hinge", "l2", "linear")


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """The Attention-Gate before each attention layer (DESIGN §1)."""

  kind: str = "attention"
  num_heads: int = 4
  # The gate's own k/v cache covers every token (a ring of `window` slots), so its size is
  # what the defaults bound: one k/v head shared by the query heads, 24 dims, the last 1024
  # tokens. That is 2.3% of a full cache's bytes per token on Llama-3-8B shapes (8 KV heads
  # x 128) and 4.7% on Llama-3.2-1B (8 x 64), and it stops growing at 1024 tokens
  # (`cache.gate_cache_nbytes`). The paper's MHA' (4 heads x 32, own k/v, whole context)
  # is num_kv_heads=null, head_dim=32, window=null: 12.5% / 25%, growing with the context.
  num_kv_heads: int | None = 1    # gate k/v heads (num_heads a multiple); None = num_heads
  head_dim: int = 24
  threshold: float = 0.5
  init_keep_prob: float = 0.95
  window: int | None = 1024       # the gate attends to the last `window` tokens; None = all
  target_keep: float = 0.5        # rho
  eviction_weight: float = 1.0    # lambda
  eviction_loss: str = "hinge"
  # Distillation to the full cache: the weight of KL(the frozen base's next-token
  # distribution without eviction || the gated view's) on the LM loss's positions, weighted
  # as the LM loss weighs them (answers by data.response_weight). The answers' cross entropy
  # alone scores only the one right token; the KL asks every position to predict what the
  # full cache predicts, so a token the full cache leans on is worth keeping even where the
  # answer survives without it. 0: off (the paper). Training only; needs run.trainable=gates.
  distill_weight: float = 0.0
  # With gate.train_budgets: whether the KL also covers the rows drawn under a budget.
  # false: only the positions with no capacity (budget 1 drawn, plain text) distil, where
  # the flags alone decide what stays; the capped rows keep the answers' cross entropy
  # alone, which trains the ranking a capacity uses (with the KL there too, multikey lost
  # under a budget at 1024 tokens: benchmarks/RESULTS.md, "Distillation at the shipped
  # keep rate").
  distill_under_budget: bool = True
  # Budget-aware training (ag_jax.capacity_view): each training row draws one of these
  # budgets, and the queries after a context see only its top max(1, int(n x budget))
  # flagged tokens by keep probability, as the kvpress protocol's cache keeps them.
  # None: the gates' flags alone. Training only; inference takes its budget from the user.
  train_budgets: tuple[float, ...] | None = None
  # Attention sinks: the first `sink_tokens` positions of a sequence keep probability 1, so
  # every view keeps them in every (layer, KV head) row and ranks them first under a budget.
  # Softmax attention parks its spare mass on the first token (StreamingLLM's attention
  # sinks); a gate that evicts it under a tight budget sends that mass elsewhere. 0: the
  # gates decide every token (the paper, and every export written before this field).
  sink_tokens: int = 0

  def __post_init__(self):
    if self.kind not in _GATE_KINDS:
      raise ConfigError(f"GateConfig.kind must be one of {_GATE_KINDS}, got {self.kind!r}")
    if self.eviction_loss not in _EVICTION_LOSSES:
      raise ConfigError(
          f"GateConfig.eviction_loss must be one of {_EVICTION_LOSSES}, got {self.eviction_loss!r}")
    if not 0.0 < self.target_keep <= 1.0:
      raise ConfigError(f"GateConfig.target_keep must be in (0, 1], got {self.target_keep}")
    if not 0.0 < self.threshold < 1.0:
      raise ConfigError(f"GateConfig.threshold must be in (0, 1), got {self.threshold}")
    if not 0.0 < self.init_keep_prob < 1.0:
      raise ConfigError(f"GateConfig.init_keep_prob must be in (0, 1), got {self.init_keep_prob}")
    if self.num_heads <= 0 or self.head_dim <= 0 or self.head_dim % 2:
      raise ConfigError(
          f"GateConfig.num_heads must be positive and head_dim positive and even, got "
          f"{self.num_heads} x {self.head_dim}")
    if self.num_kv_heads is not None and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
      raise ConfigError(f"GateConfig.num_kv_heads must be a positive divisor of num_heads "
                        f"({self.num_heads}) or null, got {self.num_kv_heads}")
    if self.window is not None and self.window <= 0:
      raise ConfigError(f"GateConfig.window must be a positive integer or null, got {self.window}")
    if isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
      raise ConfigError(f"GateConfig.sink_tokens must be an integer >= 0, got {self.sink_tokens!r}")
    if self.eviction_weight < 0:
      raise ConfigError(f"GateConfig.eviction_weight must be >= 0, got {self.eviction_weight}")
    if isinstance(self.distill_weight, bool) or not isinstance(self.distill_weight, (int, float)) \
        or not self.distill_weight >= 0:
      raise ConfigError(f"GateConfig.distill_weight must be a number >= 0, got {self.distill_weight!r}")
    if not isinstance(self.distill_under_budget, bool):
      raise ConfigError(f"GateConfig.distill_under_budget must be true or false, got "
                        f"{self.distill_under_budget!r}")
    if self.train_budgets is not None and (
        not self.train_budgets or isinstance(self.train_budgets, (str, bytes))
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 < b <= 1.0
                   for b in self.train_budgets)):
      raise ConfigError(f"GateConfig.train_budgets must be a non-empty list of budgets in "
                        f"(0, 1] (e.g. [0.125, 0.25, 0.5]) or null, got {self.train_budgets!r}")
    if not self.distill_under_budget and (not self.distill_weight or self.train_budgets is None):
      raise ConfigError("GateConfig.distill_under_budget=false restricts the distillation KL to "
                        "the rows with no budget: it needs gate.distill_weight > 0 and "
                        "gate.train_budgets (or leave it true)")

  @property
  def kv_heads(self) -> int:
    """Gate k/v heads: each is shared by num_heads // kv_heads gate query heads."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


# ---------------------------------------------------------------------------------------------
# yaml + key=value overrides into (nested) dataclasses


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
  """`["a.b=3", "c=null"]` -> `{"a": {"b": 3}, "c": None}` (values parsed as yaml scalars)."""
  out: dict[str, Any] = {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    node = out
    *parents, leaf = key.strip().split(".")
    for p in parents:
      node = node.setdefault(p, {})
    try:
      node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                        "quote it, e.g. key='text'") from None
  return out


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for k, v in update.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = merge(out[k], v)
    else:
      out[k] = v
  return out


def _unwrap_optional(tp):
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1:
      return args[0]
  return tp


_SCALAR_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_scalar(key: str, value, hint, tp) -> None:
  """An int/float/str/bool field holds that type (None only where the field is Optional)."""
  if tp not in _SCALAR_WORDS:
    return
  optional = tp is not hint and type(None) in typing.get_args(hint)
  if value is None and optional:
    return
  ok = (isinstance(value, bool) if tp is bool else
        isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
        isinstance(value, int) and not isinstance(value, bool) if tp is int else
        isinstance(value, str))
  if not ok:
    raise ConfigError(f"{key} must be {_SCALAR_WORDS[tp]}{' or null' if optional else ''}, "
                      f"got {value!r}")


def from_dict(cls, data: Mapping[str, Any] | None, where: str = ""):
  """Build dataclass `cls` from a dict, recursing into dataclass-typed fields.

  Unknown keys are rejected with the list of valid ones, so a typo never passes silently.
  """
  data = dict(data or {})
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ConfigError(
        f"unknown config key{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(where + k for k in unknown)}; valid keys{' under ' + where[:-1] if where else ''}: "
        f"{', '.join(sorted(fields))}")
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in data.items():
    tp = _unwrap_optional(hints[name])
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
      value = from_dict(tp, value, where=f"{where}{name}.")
    elif tp is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif tp is float and isinstance(value, str):
      try:  # yaml 1.1 reads "3e-3" (no dot) as a string
        value = float(value)
      except ValueError:
        raise ConfigError(f"{where}{name} must be a number, got {value!r}") from None
    elif tp is tuple or typing.get_origin(tp) is tuple:
      value = tuple(value) if isinstance(value, list) else value
    _check_scalar(f"{where}{name}", value, hints[name], tp)
    kwargs[name] = value
  try:
    return cls(**kwargs)
  except TypeError as e:  # a required field is missing
    raise ConfigError(f"{where or cls.__name__ + ': '}{e}") from None


def _yaml_problem(e: Exception) -> str:
  """One line from a yaml error: what is wrong and where (1-based line and column)."""
  mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
  problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
  where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
  return f"{problem}{where}"


def read_yaml(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  try:
    with open(path) as f:
      data = yaml.safe_load(f) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_problem(e)}; fix that "
                      "line") from None
  if not isinstance(data, Mapping):
    raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
  return dict(data)


def load(path: str, overrides: Sequence[str] = (), cls=ModelConfig):
  """Load a yaml file into `cls` (ModelConfig by default) with `key=value` overrides."""
  return from_dict(cls, merge(read_yaml(path), parse_overrides(overrides)))


PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "models")


def preset(name: str, overrides: Sequence[str] = ()) -> ModelConfig:
  """A model preset by name (`configs/models/<name>.yaml`) or yaml path."""
  path = name if name.endswith((".yaml", ".yml")) else os.path.join(PRESET_DIR, f"{name}.yaml")
  if not os.path.exists(path):
    known = sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml")) \
        if os.path.isdir(PRESET_DIR) else []
    raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(known)}")
  return load(path, overrides)
