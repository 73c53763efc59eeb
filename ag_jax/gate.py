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
  # The dtype the gate's k/v cache is stored in (the model's). Both views round the gate's
  # k and v to it, so training, prefill and decode compute one function in bf16 too.
  cache_dtype: str = "float32"

  def setup(self):
    g, f32 = self.gate, jnp.float32
    bias_init = nn.initializers.constant(math.log(g.init_keep_prob / (1 - g.init_keep_prob)))
    self.bias = param(self, "bias", bias_init, (self.num_kv_heads,), ("kv_heads",), f32)
    if g.kind == "linear":
      self.w_out = param(self, "out", normal(), (self.dim, self.num_kv_heads),
                         ("embed", "kv_heads"), f32)
      return
    axes = ("embed", "gate_heads", "gate_head_dim")
    self.wq = param(self, "q", normal(), (self.dim, g.num_heads, g.head_dim), axes, f32)
    self.wk = param(self, "k", normal(), (self.dim, g.kv_heads, g.head_dim), axes, f32)
    self.wv = param(self, "v", normal(), (self.dim, g.kv_heads, g.head_dim), axes, f32)
    self.w_out = param(self, "out", normal(), (g.num_heads, g.head_dim, self.num_kv_heads),
                       ("gate_heads", "gate_head_dim", "kv_heads"), f32)

  def project(self, x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray):
    """x [B, T, E] -> gate q [B, T, N, D], k, v [B, T, M, D] (N query heads sharing M k/v
    heads; RoPE on q and k), fp32 with k and v rounded to the cache dtype."""
    x = x.astype(jnp.float32)
    rounded = lambda a: a.astype(self.cache_dtype).astype(jnp.float32)
    q = apply_rope(jnp.einsum("BTE,END->BTND", x, self.wq), positions, inv_freq)
    k = rounded(apply_rope(jnp.einsum("BTE,END->BTND", x, self.wk), positions, inv_freq))
    v = rounded(jnp.einsum("BTE,END->BTND", x, self.wv))
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

    Returns logits [B, T, K] (and the gate's own k, v [B, T, M, D] for the decode cache).
    """
    if self.gate.kind == "linear":
      logits = self.linear_logits(x)
      return (logits, None) if return_kv else logits
    q, k, v = self.project(x, positions, inv_freq)
    logits = self._attend(q, k, v, positions, positions, segments, segments, backend)
    return (logits, (k, v)) if return_kv else logits

  def chunk(self, x, positions, segments, inv_freq, ring_k, ring_v, ring_positions,
            ring_segments, backend=None):
    """The training view for a chunk of a prompt after its prefix, whose gate k/v are in
    the ring. x [B, C, E]; positions, segments [B, C]; ring_k, ring_v [B, M, W, D];
    ring_positions, ring_segments [B, W] (segment -1: an empty slot, seen by no query).
    -> logits [B, C, K], and the chunk's gate k, v [B, C, M, D]."""
    if self.gate.kind == "linear":
      return self.linear_logits(x), None
    q, k, v = self.project(x, positions, inv_freq)
    keys = jnp.concatenate([ring_k.transpose(0, 2, 1, 3).astype(jnp.float32), k], axis=1)
    values = jnp.concatenate([ring_v.transpose(0, 2, 1, 3).astype(jnp.float32), v], axis=1)
    logits = self._attend(q, keys, values, positions,
                          jnp.concatenate([ring_positions, positions], axis=1), segments,
                          jnp.concatenate([ring_segments, segments], axis=1), backend)
    return logits, (k, v)

  def _attend(self, q, k, v, q_pos, k_pos, q_seg, k_seg, backend):
    """q [B, T, N, D]; k, v [B, S, M, D] -> logits [B, T, K]: causal, windowed, blocked."""
    b, t, n, d = q.shape
    m = k.shape[2]  # query head i reads k/v head i // (n // m), as the decode step does
    attended = pallas_kernels.gated_attention(
        q.reshape(b, t, m, n // m, d), k, v, q_pos, k_pos, q_seg, k_seg, None,
        window=self.gate.window, backend=backend).reshape(b, t, n, d)
    return self.read_out(attended)

  def decode_logits(self, q: jnp.ndarray, ring_k: jnp.ndarray, ring_v: jnp.ndarray,
                    position: jnp.ndarray) -> jnp.ndarray:
    """One new token per row: q [B, N, D] (its gate query); ring_k, ring_v [B, M, W, D], the
    ring cache already holding the token's own k/v at slot position % W; position [B].
    -> logits [B, K]. The ring holds exactly the positions the training view's causal
    window lets the token see (slots past `position` are unwritten until it gets there)."""
    b, n, d = q.shape
    m, w = ring_k.shape[1:3]
    qg = q.reshape(b, m, n // m, d)
    scores = jnp.einsum("BMGD,BMWD->BMGW", qg, ring_k.astype(jnp.float32)) / np.sqrt(d)
    seen = jnp.arange(w)[None, :] <= position[:, None]  # [B, W]
    scores = jnp.where(seen[:, None, None, :], scores, -jnp.inf)
    attended = jnp.einsum("BMGW,BMWD->BMGD", jax.nn.softmax(scores, axis=-1),
                          ring_v.astype(jnp.float32))
    return self.read_out(attended.reshape(b, 1, n, d))[:, 0]
