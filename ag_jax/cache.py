"""The evicting KV cache: static shapes, ragged contents (DESIGN §2).

Per layer and (batch, KV head) row, slots [0, length) hold the kept tokens' keys (after
RoPE, so moving them never changes their positions) and values; slot `length` is where the
next token is written, so every row has `capacity + 1` slots. Slots >= length are garbage
and never read. `score` ranks slots when more tokens want to stay than fit.

The gate's own small k/v cache covers every token (not only kept ones): the gate of a new
token attends over the whole context, or the last `gate_window` tokens, as in training.
It is a ring: position p lives in slot p % gate_slots.

A cache is planned at prefill for `planned_context` positions (prompt width + the tokens to
decode): its gate ring and a non-evicting cache are sized for exactly that, so the engine
refuses to decode past it rather than silently compute another function.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class KVCache:
  k: jnp.ndarray              # [L, B, K, S, H] with S = capacity + 1
  v: jnp.ndarray              # [L, B, K, S, H]
  score: jnp.ndarray          # [L, B, K, S] float32
  position: jnp.ndarray       # [L, B, K, S] int32: the token position each slot holds
  length: jnp.ndarray         # [L, B, K] int32: kept tokens per row
  gate_k: jnp.ndarray | None  # [L, B, N, W, D]: gate keys of the last W tokens (ring)
  gate_v: jnp.ndarray | None  # [L, B, N, W, D]
  next_position: jnp.ndarray  # [B] int32: position of the next token of each sequence
  seen: jnp.ndarray           # [B] int32: tokens that went through the cache (prompt + new)
  policy: Any = flax.struct.field(pytree_node=False, default=None)
  backend: str | None = flax.struct.field(pytree_node=False, default=None)
  # Positions 0..planned_context-1 may be decoded; None: unplanned (built by hand).
  planned_context: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def capacity(self) -> int:
    return self.k.shape[3] - 1

  @property
  def nbytes(self) -> int:
    """Bytes of the buffers really allocated (cache + gate cache + bookkeeping)."""
    arrays = [self.k, self.v, self.score, self.position, self.length, self.gate_k, self.gate_v]
    return int(sum(a.nbytes for a in arrays if a is not None))

  @property
  def kv_nbytes(self) -> int:
    return int(self.k.nbytes + self.v.nbytes)

  @property
  def gate_nbytes(self) -> int:
    return int(sum(a.nbytes for a in (self.gate_k, self.gate_v) if a is not None))


def full_kv_nbytes(num_layers: int, batch: int, num_kv_heads: int, head_dim: int, context: int,
                   dtype) -> int:
  """Bytes of the k and v buffers a full (non-evicting) cache of `context` tokens needs."""
  return 2 * num_layers * batch * num_kv_heads * context * head_dim * np.dtype(dtype).itemsize


def ring_from_prompt(x: jnp.ndarray, lengths: jnp.ndarray, slots: int) -> jnp.ndarray:
  """Gate k or v of right-padded prompts into the ring layout.

  x [B, T, N, D], lengths [B] -> [B, N, W, D]. Slot s holds the latest prompt position
  q < length with q % W == s; slots no prompt position maps to are zero (never read: a
  ring slot s is read only once the position reaches s).
  """
  b, t = x.shape[:2]
  s = jnp.arange(slots)[None, :]  # [1, W]
  last = lengths[:, None] - 1     # [B, 1]
  source = s + slots * jnp.maximum((last - s) // slots, 0)  # [B, W]
  present = s <= last
  gathered = jnp.take_along_axis(x, jnp.clip(source, 0, t - 1)[:, :, None, None], axis=1)
  gathered = jnp.where(present[:, :, None, None], gathered, 0)  # [B, W, N, D]
  return gathered.transpose(0, 2, 1, 3)


def ring_valid(slots: int, position: jnp.ndarray) -> jnp.ndarray:
  """[B, W] bool: ring slots holding one of the last W positions up to `position` [B]."""
  return jnp.arange(slots)[None, :] <= position[:, None]


def write_rows(buffer: jnp.ndarray, layer, slot: jnp.ndarray, value: jnp.ndarray,
               active: jnp.ndarray | None = None) -> jnp.ndarray:
  """buffer [L, B, K, S, ...]; write value [B, K, ...] at slot [B, K] of `layer`, in place.

  active [B] bool: rows where it is False keep their old contents bit for bit (finished
  sequences change nothing in the cache, so decoding can continue from it exactly)."""
  b, k = slot.shape
  bi = jnp.arange(b)[:, None]
  ki = jnp.arange(k)[None, :]
  value = value.astype(buffer.dtype)
  if active is not None:
    old = buffer[layer, bi, ki, slot]  # [B, K, ...]
    value = jnp.where(active.reshape((b,) + (1,) * (value.ndim - 1)), value, old)
  return buffer.at[layer, bi, ki, slot].set(value)


def kept_ratio(cache: KVCache) -> jnp.ndarray:
  """[L, K] fraction of the tokens seen that each layer and KV head keeps (batch mean)."""
  seen = jnp.maximum(cache.seen, 1).astype(jnp.float32)  # [B]
  return jnp.mean(cache.length / seen[None, :, None], axis=1)
