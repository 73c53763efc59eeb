"""The Attention-Gate: per token and KV head, the probability that the token's K/V stay cached.

`attention` kind (the paper's MHA'): a small causal multi-head attention over the same
normalised hidden states the layer's attention reads, RoPE at the token positions, then a
dense layer to one logit per KV head. `linear` kind: a dense layer on the token's own state.

Causal on purpose: a token's flag depends only on tokens up to itself, so it is computed
once, when the token arrives, in prefill and in decode alike. The output bias starts at
logit(init_keep_prob) so an untrained gate keeps almost everything.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from ag_jax.config import GateConfig
from ag_jax.layers import normal, param
from ag_jax.rope import apply_rope


def straight_through(prob: jnp.ndarray, threshold: float) -> jnp.ndarray:
  """Forward: exactly `prob > threshold` as 0/1. Backward: the gradient of `prob`."""
  hard = (prob > threshold).astype(prob.dtype)
  return hard + (prob - jax.lax.stop_gradient(prob))  # (p - p) is exactly 0: forward stays 0/1


class Gate(nn.Module):
  gate: GateConfig
  dim: int
  num_kv_heads: int

  def setup(self):
    g, f32 = self.gate, jnp.float32
    bias_init = nn.initializers.constant(math.log(g.init_keep_prob / (1 - g.init_keep_prob)))
    self.bias = param(self, "bias", bias_init, (self.num_kv_heads,), ("kv_heads",), f32)
    if g.kind == "linear":
      self.w_out = param(self, "out", normal(), (self.dim, self.num_kv_heads),
                         ("embed", "kv_heads"), f32)
      return
    qkv_shape, qkv_axes = (self.dim, g.num_heads, g.head_dim), ("embed", "gate_heads", "gate_head_dim")
    self.wq = param(self, "q", normal(), qkv_shape, qkv_axes, f32)
    self.wk = param(self, "k", normal(), qkv_shape, qkv_axes, f32)
    self.wv = param(self, "v", normal(), qkv_shape, qkv_axes, f32)
    self.w_out = param(self, "out", normal(), (g.num_heads, g.head_dim, self.num_kv_heads),
                       ("gate_heads", "gate_head_dim", "kv_heads"), f32)

  def project(self, x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray):
    """x [B, T, E] -> gate q, k, v [B, T, N, D] (N gate heads of D dims), RoPE on q and k."""
    x = x.astype(jnp.float32)
    q = apply_rope(jnp.einsum("BTE,END->BTND", x, self.wq), positions, inv_freq)
    k = apply_rope(jnp.einsum("BTE,END->BTND", x, self.wk), positions, inv_freq)
    v = jnp.einsum("BTE,END->BTND", x, self.wv)
    return q, k, v

  def read_out(self, attended: jnp.ndarray) -> jnp.ndarray:
    """attended [B, T, N, D] -> logits [B, T, K]."""
    return jnp.einsum("BTND,NDK->BTK", attended, self.w_out) + self.bias

  def linear_logits(self, x: jnp.ndarray) -> jnp.ndarray:
    """x [B, T, E] -> logits [B, T, K] from each token's own state."""
    return x.astype(jnp.float32) @ self.w_out + self.bias

  def __call__(self, x, positions, segments, inv_freq, return_kv: bool = False, backend=None):
    """Training view. x [B, T, E]; positions, segments [B, T]: causal within a segment (and
    the last `gate.window` tokens), blocked so no [T, T] score matrix exists.

    Returns logits [B, T, K] (and the gate's own k, v [B, T, N, D] for the decode cache).
    """
    if self.gate.kind == "linear":
      logits = self.linear_logits(x)
      return (logits, None) if return_kv else logits
    q, k, v = self.project(x, positions, inv_freq)
    # The blocked kernel groups queries per KV head: here every gate head has its own k/v.
    attended = pallas_kernels.gated_attention(
        q[:, :, :, None], k, v, positions, positions, segments, segments, None,
        window=self.gate.window, backend=backend)[:, :, :, 0]  # [B, T, N, D]
    logits = self.read_out(attended)
    return (logits, (k, v)) if return_kv else logits
