"""GQA self-attention: projections, and its three views: the training view with key keep
flags (`attend`, also one-shot prefill), a prefill chunk over the kept tokens plus itself
(`attend_chunk`), and a decode step over a row's cache slots (`attend_cached`).

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


def attend_chunk(q, k, v, positions, segments, chunk_keep, cached_k, cached_v, held,
                 backend: str | None = None):
  """Prefill-chunk view: a chunk of queries attends to the row's kept tokens plus itself.

  q [B, C, K, G, H]; k, v [B, C, K, H] (the chunk's); positions, segments [B, C];
  chunk_keep [B, K, C] bool (a dropped chunk token is seen by itself only); cached_k,
  cached_v [B, K, S, H] (this layer's cache slots) with held [B, K, S] (slots in use).
  -> out [B, C, K, G, H], and the candidates k, v [B, K, S + C, H] (kept slots, then the
  chunk) that the caller compacts. Equal to `attend` over the whole prompt while the kept
  tokens are exactly the training view's visible keys.
  """
  b, slots = held.shape[0], held.shape[2]
  cand_k = jnp.concatenate([cached_k, k.transpose(0, 2, 1, 3)], axis=2)  # [B, K, S + C, H]
  cand_v = jnp.concatenate([cached_v, v.transpose(0, 2, 1, 3)], axis=2)
  # Kept tokens all precede the chunk: position -1 passes the causal test, segment 1 is
  # every real query's; `held` masks the free slots.
  key_positions = jnp.concatenate([jnp.full((b, slots), -1, jnp.int32), positions], axis=1)
  key_segments = jnp.concatenate([jnp.ones((b, slots), jnp.int32), segments], axis=1)
  keep = jnp.concatenate([held, chunk_keep], axis=-1).astype(jnp.float32)  # [B, K, S + C]
  out = pallas_kernels.gated_attention(
      q, cand_k.transpose(0, 2, 1, 3), cand_v.transpose(0, 2, 1, 3), positions, key_positions,
      segments, key_segments, keep, backend=backend)
  return out, cand_k, cand_v


def attend_cached(q, k_all, v_all, lengths, layer, return_mass: bool = False,
                  backend: str | None = None):
  """Decode view: q [B, K, G, H], one query per row, over slots [0, lengths) [B, K] of
  `layer` in the stacked cache k_all, v_all [L, B, K, S, H] (read in place: slicing the
  layer out here would copy its K/V every step). -> out [B, K, G, H] (and each slot's
  attention mass [B, K, S] with return_mass)."""
  return pallas_kernels.decode_attention(q, k_all, v_all, lengths, return_mass=return_mass,
                                         backend=backend, layer=layer)


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
