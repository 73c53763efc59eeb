"""Training losses and gate statistics (DESIGN §1): `L = L_LM + lambda * L_evict`, plus
`mu * KL(full cache || gated view)` when `GateConfig.distill_weight` (mu) is set.

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
  """Mean next-token cross entropy over the tokens `loss_mask` selects, weighted by it.

  logits [B, T, V]; targets [B, T] int; loss_mask [B, T] float weights (1 = trained; SFT
  prompts and padding are 0; a response token may weigh more, `data.response_weight`; all
  set by the data). Returns (weighted mean loss sum(w * nll) / sum(w), weight sum), both
  fp32 scalars (the weight sum is the token count when weights are 0/1); an all-masked
  batch gives loss 0 rather than 0/0.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32),
                                         axis=-1)[..., 0]  # [B, T]
  mask = loss_mask.astype(jnp.float32)
  count = jnp.sum(mask)
  return -jnp.sum(target_log_probs * mask) / jnp.maximum(count, 1.0), count


DEFAULT_LOSS_CHUNK_TOKENS = 1024  # tokens (batch x positions) per chunk of the chunked LM loss


def _sum_over_chunks(per_chunk, arrays: tuple, chunk: int | None) -> jnp.ndarray:
  """sum over chunks of `per_chunk(*chunk_arrays)`; arrays [B, T, ...] are cut along T into
  chunks of `chunk` positions (default DEFAULT_LOSS_CHUNK_TOKENS // B), the last one
  zero-padded (a padded position must have a zero mask in per_chunk's arguments). Each chunk
  runs under `jax.checkpoint`: the backward pass recomputes one chunk's temporaries at a
  time, so no [B, T, V] array exists in either pass."""
  b, t = arrays[0].shape[:2]
  chunk = max(1, DEFAULT_LOSS_CHUNK_TOKENS // b) if chunk is None else int(chunk)
  chunk = min(chunk, t)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    arrays = tuple(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) for x in arrays)
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # [n, B, C, ...]
  body = jax.checkpoint(lambda args: per_chunk(*args), prevent_cse=False,
                        policy=jax.checkpoint_policies.nothing_saveable)
  return jnp.sum(jax.lax.map(body, tuple(split(x) for x in arrays)))


def lm_loss_chunked(hidden: jnp.ndarray, head: jnp.ndarray, targets: jnp.ndarray,
                    loss_mask: jnp.ndarray, chunk: int | None = None
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`lm_loss` of the logits `hidden @ head`, without ever holding [B, T, V].

  hidden [B, T, E] (after the final norm, in the model's dtype); head [E, V] (the output
  projection, cast to hidden's dtype as `Llama.logits` does); targets, loss_mask [B, T].
  The sequence is cut into chunks of `chunk` positions (default: DEFAULT_LOSS_CHUNK_TOKENS
  // B; the last chunk is padded with masked positions). Each chunk computes its fp32
  logits [B, chunk, V], their logsumexp and the target logit, under `jax.checkpoint`: the
  backward pass recomputes one chunk's logits at a time, so forward and backward hold
  O(B x chunk x V), never [B, T, V]. Returns (mean loss, token count) like `lm_loss`.
  """
  mask = loss_mask.astype(jnp.float32)
  head = head.astype(hidden.dtype)

  def chunk_nll(h, tgt, m):  # [B, C, E], [B, C], [B, C]
    logits = jnp.einsum("BCE,EV->BCV", h, head, preferred_element_type=jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
    target_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]  # [B, C]
    # where, not a product: a masked position's logits may be anything (even inf)
    return jnp.sum(jnp.where(m > 0, (log_z - target_logit) * m, 0.0))

  total = _sum_over_chunks(chunk_nll, (hidden, targets.astype(jnp.int32), mask), chunk)
  count = jnp.sum(mask)
  return total / jnp.maximum(count, 1.0), count


def distill_kl_chunked(hidden: jnp.ndarray, teacher_hidden: jnp.ndarray, head: jnp.ndarray,
                       loss_mask: jnp.ndarray, chunk: int | None = None) -> jnp.ndarray:
  """Weighted mean over positions of KL(teacher || student) between the next-token
  distributions softmax(teacher_hidden @ head) and softmax(hidden @ head), fp32.

  hidden, teacher_hidden [B, T, E] (after the final norm; the teacher's carries no gradient:
  it is the frozen base without eviction, `GateConfig.distill_weight`); head [E, V];
  loss_mask [B, T] weights, as `lm_loss` takes them. Chunked like `lm_loss_chunked`: never
  [B, T, V]. An all-masked batch gives 0.
  """
  mask = loss_mask.astype(jnp.float32)
  head = head.astype(hidden.dtype)
  teacher_hidden = jax.lax.stop_gradient(teacher_hidden.astype(hidden.dtype))

  def chunk_kl(h, th, m):  # [B, C, E], [B, C, E], [B, C]
    log_q = jax.nn.log_softmax(
        jnp.einsum("BCE,EV->BCV", h, head, preferred_element_type=jnp.float32), axis=-1)
    log_p = jax.nn.log_softmax(
        jnp.einsum("BCE,EV->BCV", th, head, preferred_element_type=jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B, C]
    return jnp.sum(jnp.where(m > 0, kl * m, 0.0))

  total = _sum_over_chunks(chunk_kl, (hidden, teacher_hidden, mask), chunk)
  return total / jnp.maximum(jnp.sum(mask), 1.0)


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
