"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus); static shapes, jit-safe."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0            # 0: no top-k cut
  top_p: float = 1.0        # 1: no nucleus cut

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: jnp.ndarray, rng: jax.Array, cfg: SamplingConfig) -> jnp.ndarray:
  """logits [B, V] -> tokens [B] int32."""
  if cfg.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / cfg.temperature
  if cfg.top_k > 0:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it < p.
    cutoff_index = jnp.sum(cumulative - jax.nn.softmax(sorted_logits, axis=-1) < cfg.top_p, axis=-1)
    cutoff = jnp.take_along_axis(sorted_logits, (cutoff_index - 1)[:, None], axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
