"""ag-jax: Attention-Gate learned KV-cache eviction for Llama-family models in JAX/Flax."""

from ag_jax import policies
from ag_jax.cache import KVCache
from ag_jax.checkpoint import export_gates, load_gates
from ag_jax.config import ConfigError, GateConfig, ModelConfig
from ag_jax.engine import GenerateResult, InferenceError, decode_step, generate, prefill
from ag_jax.hf_checkpoint import CheckpointError, load_hf_llama, save_hf_llama
from ag_jax.model import Llama, init_variables, logical_axes
from ag_jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

def load_default(with_gates: bool = True):
  """The embedded default world (ag_jax.default_world.load_default); imported on first use so
  that `python -m ag_jax.default_world` runs that module once (no runpy warning)."""
  from ag_jax.default_world import load_default as load  # pylint: disable=g-import-not-at-top
  return load(with_gates)


__all__ = [
    "GenerateResult", "InferenceError", "KVCache", "decode_step", "generate", "policies", "prefill",
    "ByteTokenizer", "CheckpointError", "ConfigError", "GateConfig", "HFTokenizer", "Llama",
    "ModelConfig", "export_gates", "init_variables", "load_gates", "load_default", "load_hf_llama", "save_hf_llama", "load_tokenizer", "logical_axes",
]
