"""Small Llama building blocks: parameters with logical axis names, RMSNorm, SwiGLU MLP.

Logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`) are
attached to every parameter so `ag_jax.sharding` can map them onto a mesh without touching
the model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def dtype_of(name: str):
  return jnp.dtype(name)


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
          axes: Sequence[str | None], dtype) -> jnp.ndarray:
  """A parameter carrying its logical axis names (one name per dimension)."""
  assert len(axes) == len(shape), (name, shape, axes)
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def normal(stddev: float = 0.02):
  return nn.initializers.normal(stddev)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                  dtype_of(self.param_dtype))
    # As HF: normalise in fp32, cast back to the input dtype, then scale.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class MLP(nn.Module):
  """SwiGLU: wo(silu(x @ wi_0) * (x @ wi_1)); names follow MaxText (wi_0 = HF gate_proj)."""

  dim: int
  mlp_dim: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # x [B, T, E]
    pd, cd = dtype_of(self.param_dtype), dtype_of(self.dtype)
    wi_0 = param(self, "wi_0", normal(), (self.dim, self.mlp_dim), ("embed", "mlp"), pd)
    wi_1 = param(self, "wi_1", normal(), (self.dim, self.mlp_dim), ("embed", "mlp"), pd)
    wo = param(self, "wo", normal(), (self.mlp_dim, self.dim), ("mlp", "embed"), pd)
    x = x.astype(cd)
    hidden = nn.silu(x @ wi_0.astype(cd)) * (x @ wi_1.astype(cd))  # [B, T, F]
    return hidden @ wo.astype(cd)  # [B, T, E]
