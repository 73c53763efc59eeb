"""GQA self-attention: projections, and the training-view attention with key keep flags.

Letters in einsum strings: B batch, T query time, S key time, K kv heads, G query heads per
KV head, H head dim, E embed. K/V are never repeated per query head: queries are grouped
as [B, T, K, G, H] instead.

Training view (DESIGN §1): query i may use key j iff j is not later, in the same segment,
and (`keep[j]` or i == j). The flag multiplies the key's weight inside the softmax:
`a_ij = m_ij exp(l_ij) / sum_k m_ik exp(l_ik)`. With a straight-through `keep` (forward exactly
0/1, backward through the keep probability) the gradient reaches the gate.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from ag_jax.config import ModelConfig
from ag_jax.layers import dtype_of, normal, param
from ag_jax.rope import apply_rope

def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, positions: jnp.ndarray,
           segments: jnp.ndarray, keep: jnp.ndarray | None = None, backend: str | None = None):
  """Training-view attention with optional multiplicative key flags, blocked (flash-style).

  q [B, T, K, G, H]; k, v [B, T, K, H]; positions, segments [B, T]; keep None or [B, K, T]
  float (0/1 forward; may carry a straight-through gradient). Returns [B, T, K, G, H].
  Memory is O(T x block) per head, never [T, T] (`pallas_kernels.gated_attention`).
  """
  return pallas_kernels.gated_attention(q, k, v, positions, positions, segments, segments, keep,
                                        backend=backend)


def attention_probs(q: jnp.ndarray, k: jnp.ndarray, positions: jnp.ndarray,
                    segments: jnp.ndarray, keep: jnp.ndarray | None = None) -> jnp.ndarray:
  """The attention probabilities [B, K, G, T, S] fp32 of `attend`'s function.

  Dense on purpose: only the policies that score tokens by the prompt's attention (H2O,
  SnapKV, ...) read them, in one-shot prefill, as kvpress does with eager attention.
  """
  scale = 1.0 / np.sqrt(q.shape[-1])
  qp, kp = positions[:, :, None], positions[:, None, :]
  allowed = (kp <= qp) & (segments[:, :, None] == segments[:, None, :])  # [B, T, S]
  diagonal = allowed & (kp == qp)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  visible = allowed[:, None, None]
  if keep is not None:
    visible = visible & (diagonal[:, None, None] | (keep[:, :, None, None, :] > 0))
  return jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)


class Attention(nn.Module):
  """Llama self-attention projections; the attention itself is chosen by the caller."""

  cfg: ModelConfig

  def setup(self):
    cfg, pd = self.cfg, dtype_of(self.cfg.param_dtype)
    e, n, k, h = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.wq = param(self, "q", normal(), (e, n, h), ("embed", "heads", "head_dim"), pd)
    self.wk = param(self, "k", normal(), (e, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = param(self, "v", normal(), (e, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.wo = param(self, "o", normal(), (n, h, e), ("heads", "head_dim", "embed"), pd)

  def project(self, x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray):
    """x [B, T, E] -> q [B, T, K, G, H], k [B, T, K, H], v [B, T, K, H]; RoPE on q and k."""
    cfg, cd = self.cfg, dtype_of(self.cfg.dtype)
    x = x.astype(cd)
    q = jnp.einsum("BTE,ENH->BTNH", x, self.wq.astype(cd))
    k = jnp.einsum("BTE,EKH->BTKH", x, self.wk.astype(cd))
    v = jnp.einsum("BTE,EKH->BTKH", x, self.wv.astype(cd))
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    b, t = x.shape[:2]
    return q.reshape(b, t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim), k, v

  def output(self, attended: jnp.ndarray) -> jnp.ndarray:
    """attended [B, T, K, G, H] -> [B, T, E]."""
    cfg, cd = self.cfg, dtype_of(self.cfg.dtype)
    b, t = attended.shape[:2]
    attended = attended.reshape(b, t, cfg.num_heads, cfg.head_dim).astype(cd)
    return jnp.einsum("BTNH,NHE->BTE", attended, self.wo.astype(cd))

  def __call__(self, x, positions, segments, inv_freq, keep=None, backend=None):
    """Training view: x [B, T, E] -> [B, T, E]."""
    q, k, v = self.project(x, positions, inv_freq)
    return self.output(attend(q, k, v, positions, segments, keep, backend))
