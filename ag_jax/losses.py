"""Training losses and gate statistics (DESIGN §1): `L = L_LM + lambda * L_evict`.

Letters: L layers, B batch, K KV heads, T time, V vocab. Everything is computed in fp32.
`valid` marks real tokens (packed segments, not padding): padding has no KV entry to keep
or evict, so it never enters a keep ratio or the eviction loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ag_jax.config import GateConfig


def lm_loss(logits: jnp.ndarray, targets: jnp.ndarray,
            loss_mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Mean next-token cross entropy over the tokens `loss_mask` selects.

  logits [B, T, V]; targets [B, T] int; loss_mask [B, T] (1 = trained; SFT prompts and
  padding are 0, set by the data). Returns (mean loss, token count), both fp32 scalars;
  an all-masked batch gives loss 0 rather than 0/0.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32),
                                         axis=-1)[..., 0]  # [B, T]
  mask = loss_mask.astype(jnp.float32)
  count = jnp.sum(mask)
  return -jnp.sum(target_log_probs * mask) / jnp.maximum(count, 1.0), count


def layer_mean_prob(probs: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """probs [L, B, K, T], valid [B, T] -> [L]: each layer's mean keep probability over the
  valid tokens and all KV heads."""
  weight = valid.astype(jnp.float32)[None, :, None, :]  # [1, B, 1, T]
  num_kv_heads = probs.shape[2]
  total = jnp.sum(probs.astype(jnp.float32) * weight, axis=(1, 2, 3))  # [L]
  return total / jnp.maximum(jnp.sum(valid) * num_kv_heads, 1.0)


def eviction_loss(probs: jnp.ndarray, valid: jnp.ndarray, gate_cfg: GateConfig) -> jnp.ndarray:
  """The pressure toward the target keep ratio rho (`gate_cfg.target_keep`), a scalar.

  hinge (default): mean_l relu(mean_p[l] - rho)^2  (only keeping too much is penalised)
  l2:              mean_l (mean_p[l] - rho)^2      (keeping too little is penalised too)
  linear:          mean_l mean_p[l]                (the paper's v1: fewer is always better)
  """
  mean_p = layer_mean_prob(probs, valid)  # [L]
  rho = gate_cfg.target_keep
  if gate_cfg.eviction_loss == "hinge":
    per_layer = jnp.square(jax.nn.relu(mean_p - rho))
  elif gate_cfg.eviction_loss == "l2":
    per_layer = jnp.square(mean_p - rho)
  elif gate_cfg.eviction_loss == "linear":
    per_layer = mean_p
  else:  # GateConfig validates this; a new kind must be added here too
    raise ValueError(f"unknown eviction_loss {gate_cfg.eviction_loss!r}")
  return jnp.mean(per_layer)


def keep_stats(probs: jnp.ndarray, flags: jnp.ndarray, valid: jnp.ndarray) -> dict:
  """Hard keep ratios (the fraction of KV entries actually kept) and the mean probability.

  probs, flags [L, B, K, T]; valid [B, T]. Returns
    keep_ratio            scalar  over all layers, heads and valid tokens
    keep_ratio_per_layer  [L]
    keep_ratio_per_head   [L, K]
    mean_prob             scalar  mean keep probability (what the eviction loss sees)
    mean_prob_per_layer   [L]
  """
  weight = valid.astype(jnp.float32)[None, :, None, :]  # [1, B, 1, T]
  num_valid = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
  kept = flags.astype(jnp.float32) * weight  # [L, B, K, T]
  per_head = jnp.sum(kept, axis=(1, 3)) / num_valid  # [L, K]
  mean_prob_per_layer = layer_mean_prob(probs, valid)  # [L]
  return {
      "keep_ratio": jnp.mean(per_head),
      "keep_ratio_per_layer": jnp.mean(per_head, axis=1),
      "keep_ratio_per_head": per_head,
      "mean_prob": jnp.mean(mean_prob_per_layer),
      "mean_prob_per_layer": mean_prob_per_layer,
  }
