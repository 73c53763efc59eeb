"""GQA self-attention: projections, and the training-view attention with key keep flags.

Letters in einsum strings: B batch, T query time, S key time, K kv heads, G query heads per
KV head, H head dim, E embed. K/V are never repeated per query head: queries are grouped
as [B, T, K, G, H] instead.

Training view (DESIGN §1): query i may use key j iff `allowed[i, j]` (causal, same segment)
and (`keep[j]` or i == j). The flag multiplies the key's weight inside the softmax:
`a_ij = m_ij exp(l_ij) / sum_k m_ik exp(l_ik)`. With a straight-through `keep` (forward exactly
0/1, backward through the keep probability) the gradient reaches the gate.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ag_jax.config import ModelConfig
from ag_jax.layers import dtype_of, normal, param
from ag_jax.rope import apply_rope

# A masked key's would-be weight enters only the gradient: d a_ik / d m_j ~ exp(l_j - max)/Z,
# the max over the *visible* keys. Left unclipped this is the exact derivative, and it is
# useless as a straight-through signal: a trained model's evicted attention sink can have a
# logit 20-30 above every visible key, so its flag's gradient reaches 1e11 and, through the
# global norm clip, drowns every other gate gradient (gate training then stalls with the LM
# loss far above the base model's). Clipping at 0 bounds each masked key's would-be weight by
# that of the strongest visible key, so the straight-through gradient stays O(1) per key,
# while the forward pass (masked weight exactly 0) is unchanged.
_MAX_MASKED_EXPONENT = 0.0


def allowed_mask(q_segments: jnp.ndarray, k_segments: jnp.ndarray, q_positions: jnp.ndarray,
                 k_positions: jnp.ndarray, window: int | None = None) -> jnp.ndarray:
  """[B, T, S] bool: causal by position, same segment, optionally within `window` tokens."""
  qp, kp = q_positions[:, :, None], k_positions[:, None, :]
  allowed = (kp <= qp) & (q_segments[:, :, None] == k_segments[:, None, :])
  if window is not None:
    allowed &= kp > qp - window
  return allowed


def gated_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, allowed: jnp.ndarray,
                    keep: jnp.ndarray | None = None, return_probs: bool = False):
  """Attention with optional multiplicative key flags.

  q [B, T, K, G, H]; k, v [B, S, K, H]; allowed [B, T, S] bool (T == S, diagonal True);
  keep None or [B, K, S] float (0/1 forward; may carry a straight-through gradient).
  Returns out [B, T, K, G, H] (q.dtype) and, if asked, probs [B, K, G, T, S] fp32.
  """
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  allowed = allowed[:, None, None, :, :]  # [B, 1, 1, T, S]
  if keep is None:
    weights = jnp.where(allowed, 1.0, 0.0)
  else:
    t, s = allowed.shape[-2:]
    diagonal = jnp.arange(t)[:, None] == jnp.arange(s)[None, :]  # [T, S]
    key_flags = keep.astype(jnp.float32)[:, :, None, None, :]  # [B, K, 1, 1, S]
    weights = jnp.where(allowed, jnp.where(diagonal, 1.0, key_flags), 0.0)  # [B, K, 1, T, S]
  visible = jax.lax.stop_gradient(weights) > 0
  row_max = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  shifted = logits - row_max  # <= 0 on visible keys
  # Only masked keys are clipped, and by a select, not jnp.minimum: at a tie (the visible
  # max sits exactly at 0) minimum's gradient is split in half, which would halve the
  # gradient through every row's strongest visible key.
  clipped = jnp.where(visible | (shifted < _MAX_MASKED_EXPONENT), shifted, _MAX_MASKED_EXPONENT)
  exponent = jnp.where(allowed, clipped, -jnp.inf)
  unnormalised = weights * jnp.exp(exponent)  # [B, K, G, T, S]
  probs = unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  return (out, probs) if return_probs else out


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

  def __call__(self, x, positions, allowed, inv_freq, keep=None):
    q, k, v = self.project(x, positions, inv_freq)
    return self.output(gated_attention(q, k, v, allowed, keep))
