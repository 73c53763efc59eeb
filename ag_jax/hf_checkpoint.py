"""Load HF Llama-family checkpoints (config.json + *.safetensors, sharded or not) into our tree.

Tensor by tensor: each HF tensor is read, transposed to our layout and copied into its
slot of a preallocated stacked [layers, ...] host array, so host memory holds the model
once (plus one tensor), never two copies. Only safetensors and JSON are read: no pickle,
no code from the checkpoint is executed.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from ag_jax import atomic_io
from ag_jax.config import ConfigError, ModelConfig


class CheckpointError(ValueError):
  """The checkpoint does not match what ag-jax expects; the message names the tensor."""


def read_json(path: str, what: str = "file"):
  """A JSON file -> its value; a parse error names the file, line and column."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path!r} is not valid JSON ({e.msg} at line {e.lineno}, column "
                          f"{e.colno}): this {what} is damaged; restore or rewrite it") from None
  except UnicodeDecodeError:
    raise CheckpointError(f"{path!r} is not a UTF-8 JSON text: this {what} is damaged; "
                          "restore or rewrite it") from None


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Validate a .safetensors file without reading its tensors -> name -> (dtype, shape).

  Empty, truncated or random files raise one CheckpointError that names the file."""
  import struct

  fix = "the file is damaged or incomplete (an interrupted copy?): copy or export it again"
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path!r} is not a safetensors file ({size} bytes, no header): {fix}")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 * 2**20:
      raise CheckpointError(f"{path!r} is not a safetensors file (its header claims {n} bytes, "
                            f"the file has {size}): {fix}")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
      raise ValueError("not an object")
  except ValueError:
    raise CheckpointError(f"{path!r} is not a safetensors file (its header is not JSON): {fix}") from None
  data_bytes = size - 8 - n
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path!r} has a malformed header entry for {name!r}: {fix}") from None
    if dtype not in _ST_DTYPES or end - start != int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[dtype]:
      raise CheckpointError(f"{path!r}: tensor {name!r} ({dtype}, shape {shape}) does not match "
                            f"its byte range: {fix}")
    if not 0 <= start <= end <= data_bytes:
      raise CheckpointError(f"{path!r} is truncated: tensor {name!r} needs bytes up to {end}, the "
                            f"file holds {data_bytes} after its header: {fix}")
    out[name] = (dtype, shape)
  return out


# HF layer tensor suffix -> (our path inside params["layers"], transform of the HF matrix).
def _layer_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]]:
  e, n, k, h = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  return {
      "self_attn.q_proj.weight": (("attn", "q"), lambda w: w.T.reshape(e, n, h)),
      "self_attn.k_proj.weight": (("attn", "k"), lambda w: w.T.reshape(e, k, h)),
      "self_attn.v_proj.weight": (("attn", "v"), lambda w: w.T.reshape(e, k, h)),
      "self_attn.o_proj.weight": (("attn", "o"), lambda w: w.T.reshape(n, h, e)),
      "mlp.gate_proj.weight": (("mlp", "wi_0"), lambda w: w.T),
      "mlp.up_proj.weight": (("mlp", "wi_1"), lambda w: w.T),
      "mlp.down_proj.weight": (("mlp", "wo"), lambda w: w.T),
      "input_layernorm.weight": (("attn_norm", "scale"), lambda w: w),
      "post_attention_layernorm.weight": (("mlp_norm", "scale"), lambda w: w),
  }


def param_shapes(cfg: ModelConfig) -> dict:
  """The base model's parameter shapes (no gate), as a nested dict of tuples."""
  e, n, k, h, f, v, L = (cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                         cfg.vocab_size, cfg.num_layers)
  shapes = {
      "embed": (v, e),
      "final_norm": {"scale": (e,)},
      "layers": {
          "attn": {"q": (L, e, n, h), "k": (L, e, k, h), "v": (L, e, k, h), "o": (L, n, h, e)},
          "attn_norm": {"scale": (L, e)},
          "mlp_norm": {"scale": (L, e)},
          "mlp": {"wi_0": (L, e, f), "wi_1": (L, e, f), "wo": (L, f, e)},
      },
  }
  if not cfg.tie_embeddings:
    shapes["lm_head"] = (e, v)
  return shapes


def read_config(path: str) -> dict:
  file = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {path!r} does not exist")
  if not os.path.exists(file):
    raise CheckpointError(f"{path!r} has no config.json: pass a local HF model directory")
  hf = read_json(file, "config.json")
  if not isinstance(hf, dict):
    raise CheckpointError(f"{file!r} must hold a JSON object (an HF model config)")
  return hf


def _tensor_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file holding it."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      weight_map = read_json(index, "checkpoint index")["weight_map"]
    except (KeyError, TypeError):
      raise CheckpointError(f"{index!r} has no 'weight_map' object: the index is damaged") from None
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, "model.safetensors")
  if not os.path.exists(single):
    raise CheckpointError(
        f"{path!r} has neither model.safetensors nor model.safetensors.index.json "
        "(only safetensors checkpoints are read; convert .bin files with transformers first)")
  return {name: single for name in safetensors_header(single)}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> the shape config.json implies."""
  e, n, k, h, f, v = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  per_layer = {"self_attn.q_proj.weight": (n * h, e), "self_attn.k_proj.weight": (k * h, e),
               "self_attn.v_proj.weight": (k * h, e), "self_attn.o_proj.weight": (e, n * h),
               "mlp.gate_proj.weight": (f, e), "mlp.up_proj.weight": (f, e),
               "mlp.down_proj.weight": (e, f), "input_layernorm.weight": (e,),
               "post_attention_layernorm.weight": (e,)}
  out = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,), "lm_head.weight": (v, e)}
  for i in range(cfg.num_layers):
    out.update({f"model.layers.{i}.{s}": shape for s, shape in per_layer.items()})
  return out


def check_hf_checkpoint(path: str, cfg: ModelConfig) -> None:
  """Every safetensors file parses and every tensor has a float dtype and the shape
  config.json implies; reads headers only (seconds, before any weights are loaded)."""
  files = _tensor_files(path)
  expected = hf_shapes(cfg)
  for file in sorted(set(files.values())):
    if not os.path.exists(file):
      raise CheckpointError(f"the index names {os.path.basename(file)!r}, which is missing in {path!r}")
    for name, (dtype, shape) in safetensors_header(file).items():
      if name in expected and shape != expected[name]:
        raise CheckpointError(
            f"tensor {name!r} in {file!r} has shape {shape}, but {os.path.join(path, 'config.json')!r} "
            f"implies {expected[name]}: the weights and config.json are of different models")
      if name in expected and dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {name!r} in {file!r} has dtype {dtype}; model weights must "
                              f"be one of {FLOAT_DTYPES}")


_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def load_hf_llama(path: str, dtype=jnp.float32, shardings=None) -> tuple[ModelConfig, dict]:
  """Read a local HF Llama/Mistral directory -> (ModelConfig, params).

  `dtype` is the dtype of the weights (and of the computation). `shardings`, a pytree
  matching the params (e.g. from `ag_jax.sharding`), places each stacked array straight
  onto its devices.
  """
  hf = read_config(path)
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ConfigError(f"config.json sets {flag}=true: biases are not supported for Llama models")
  dtype_name = jnp.dtype(dtype).name
  cfg = ModelConfig.from_hf(hf, dtype=dtype_name, param_dtype=dtype_name)
  np_dtype = _NP_DTYPES[dtype_name]
  shapes = param_shapes(cfg)
  host = jax.tree_util.tree_map(lambda s: np.empty(s, np_dtype), shapes,
                                is_leaf=lambda s: isinstance(s, tuple))
  filled = {}  # our (path, layer) -> HF name, to catch duplicates and missing tensors

  def store(hf_name: str, where: tuple[str, ...], layer: int | None, value: np.ndarray):
    target = host
    for key in where[:-1]:
      target = target[key]
    expected = target[where[-1]].shape[1:] if layer is not None else target[where[-1]].shape
    if value.shape != expected:
      raise CheckpointError(
          f"tensor {hf_name!r} has shape {tuple(value.shape)} after conversion, expected "
          f"{tuple(expected)} from config.json (does the config match the weights?)")
    if layer is None:
      target[where[-1]][...] = value
    else:
      target[where[-1]][layer] = value
    filled[(where, layer)] = hf_name

  check_hf_checkpoint(path, cfg)
  layer_map = _layer_map(cfg)
  files = _tensor_files(path)
  by_file: dict[str, list[str]] = {}
  for name, file in files.items():
    by_file.setdefault(file, []).append(name)
  layer_re = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
  for file, names in sorted(by_file.items()):
    if not os.path.exists(file):
      raise CheckpointError(f"the index names {os.path.basename(file)!r}, which is missing in {path!r}")
    with safe_open(file, "numpy") as f:
      for name in sorted(names):
        if _IGNORED.match(name):
          continue
        m = layer_re.match(name)
        if m and m.group(2) in layer_map and int(m.group(1)) < cfg.num_layers:
          where, convert = layer_map[m.group(2)]
          store(name, ("layers",) + where, int(m.group(1)), convert(f.get_tensor(name)).astype(np_dtype))
        elif name == "model.embed_tokens.weight":
          store(name, ("embed",), None, f.get_tensor(name).astype(np_dtype))
        elif name == "model.norm.weight":
          store(name, ("final_norm", "scale"), None, f.get_tensor(name).astype(np_dtype))
        elif name == "lm_head.weight" and not cfg.tie_embeddings:
          store(name, ("lm_head",), None, f.get_tensor(name).T.astype(np_dtype))
        elif name == "lm_head.weight":
          continue  # tied checkpoints may still carry a copy of the embedding
        else:
          raise CheckpointError(
              f"unexpected tensor {name!r} in {os.path.basename(file)}: not part of a "
              f"{cfg.num_layers}-layer Llama (wrong model type or config.json?)")

  expected = [(("embed",), None), (("final_norm", "scale"), None)]
  expected += [] if cfg.tie_embeddings else [(("lm_head",), None)]
  expected += [(("layers",) + where, i) for where, _ in layer_map.values() for i in range(cfg.num_layers)]
  missing = [w for w in expected if w not in filled]
  if missing:
    where, layer = missing[0]
    hf_name = {("embed",): "model.embed_tokens.weight", ("final_norm", "scale"): "model.norm.weight",
               ("lm_head",): "lm_head.weight"}.get(where)
    if hf_name is None:
      suffix = next(s for s, (w, _) in layer_map.items() if ("layers",) + w == where)
      hf_name = f"model.layers.{layer}.{suffix}"
    raise CheckpointError(f"tensor {hf_name!r} is missing from {path!r} ({len(missing)} missing in all)")

  # Move leaf by leaf, dropping each host array as soon as it is on its devices.
  leaves, treedef = jax.tree_util.tree_flatten(host)
  host = None  # the leaves list now owns the arrays
  targets = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings)
  for i, target in enumerate(targets):
    leaves[i] = jnp.asarray(leaves[i]) if target is None else jax.device_put(leaves[i], target)
  return cfg, jax.tree_util.tree_unflatten(treedef, leaves)


def save_hf_llama(path: str, cfg: ModelConfig, params: dict) -> None:
  """Write params as an HF Llama directory (config.json + model.safetensors) that
  `load_hf_llama` and `transformers.LlamaForCausalLM.from_pretrained` both read.

  Gate parameters, if present, are not part of an HF checkpoint and are skipped
  (export them with `ag_jax.checkpoint.export_gates`). Written to a temp dir, then renamed.
  """

  from safetensors.numpy import save_file

  e, n, k, h = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  inverse = {  # our layout -> HF [out, in] matrices
      ("attn", "q"): lambda w: w.reshape(e, n * h).T,
      ("attn", "k"): lambda w: w.reshape(e, k * h).T,
      ("attn", "v"): lambda w: w.reshape(e, k * h).T,
      ("attn", "o"): lambda w: w.reshape(n * h, e).T,
      ("mlp", "wi_0"): lambda w: w.T, ("mlp", "wi_1"): lambda w: w.T, ("mlp", "wo"): lambda w: w.T,
      ("attn_norm", "scale"): lambda w: w, ("mlp_norm", "scale"): lambda w: w,
  }
  tensors = {}
  host = lambda x: np.ascontiguousarray(np.asarray(x))  # noqa: E731
  for suffix, (where, _) in _layer_map(cfg).items():
    stacked = params["layers"][where[0]][where[1]]
    for i in range(cfg.num_layers):
      tensors[f"model.layers.{i}.{suffix}"] = host(inverse[where](np.asarray(stacked[i])))
  tensors["model.embed_tokens.weight"] = host(params["embed"])
  tensors["model.norm.weight"] = host(params["final_norm"]["scale"])
  if not cfg.tie_embeddings:
    tensors["lm_head.weight"] = host(np.asarray(params["lm_head"]).T)
  scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  hf_config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "intermediate_size": cfg.mlp_dim, "hidden_act": "silu",
      "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rms_norm_eps": cfg.rms_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_position,
      "attention_bias": False, "mlp_bias": False, "torch_dtype": cfg.param_dtype,
  }
  with atomic_io.replace_dir(path) as tmp:
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
