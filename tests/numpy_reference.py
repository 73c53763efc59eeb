"""An independent numpy Llama forward with DESIGN §1 key flags, written loop-by-loop.

Slow and obvious on purpose: the reference the training view and the cache are held to.
"""

from __future__ import annotations

import numpy as np


def _rms(x, scale, eps):
  return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x, pos, theta):  # x [T, N, D], pos [T]
  d = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  ang = pos[:, None, None] * inv[None, None, :]
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def forward(params, cfg, tokens, keep):
  """tokens [T] int; keep [layers, K, T] bool (query i sees key j<i iff keep[l, k, j]).

  Returns logits [T, V] float64. Default rope only; one sequence, one segment.
  """
  p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
  t = len(tokens)
  pos = np.arange(t, dtype=np.float64)
  x = p["embed"][np.asarray(tokens)]
  g = cfg.num_heads // cfg.num_kv_heads
  for l in range(cfg.num_layers):
    h = _rms(x, p["layers.attn_norm.scale"][l], cfg.rms_eps)
    q = _rope(np.einsum("te,enh->tnh", h, p["layers.attn.q"][l]), pos, cfg.rope_theta)
    k = _rope(np.einsum("te,ekh->tkh", h, p["layers.attn.k"][l]), pos, cfg.rope_theta)
    v = np.einsum("te,ekh->tkh", h, p["layers.attn.v"][l])
    out = np.zeros_like(q)
    for n in range(cfg.num_heads):
      kv = n // g
      for i in range(t):
        js = [j for j in range(i + 1) if j == i or keep[l, kv, j]]
        logits = np.array([q[i, n] @ k[j, kv] for j in js]) / np.sqrt(cfg.head_dim)
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out[i, n] = sum(wj * v[j, kv] for wj, j in zip(w, js))
    x = x + np.einsum("tnh,nhe->te", out, p["layers.attn.o"][l])
    h = _rms(x, p["layers.mlp_norm.scale"][l], cfg.rms_eps)
    a, b = h @ p["layers.mlp.wi_0"][l], h @ p["layers.mlp.wi_1"][l]
    x = x + (a / (1 + np.exp(-a)) * b) @ p["layers.mlp.wo"][l]
  x = _rms(x, p["final_norm.scale"], cfg.rms_eps)
  head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
  return x @ head


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
