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
  # [B] int32, each <= capacity: row b holds at most row_capacity[b] tokens (rows of one
  # batch sized by their own lengths); None: `capacity` for every row.
  row_capacity: jnp.ndarray | None = None
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


def gate_slots(gate, context: int) -> int:
  """Ring slots of the gate cache for a plan of `context` positions: the gate's window, or
  the whole context when it has none (or the context is shorter)."""
  return min(gate.window, context) if gate.window else context


def gate_cache_nbytes(gate, num_layers: int, batch: int, context: int, dtype) -> int:
  """Bytes of the gate's k and v rings for a plan of `context` positions (0 for a linear
  gate, which keeps no cache)."""
  if gate is None or gate.kind == "linear":
    return 0
  return (2 * num_layers * batch * gate.kv_heads * gate_slots(gate, context) * gate.head_dim
          * np.dtype(dtype).itemsize)


def ring_positions(slots: int, start: int | jnp.ndarray) -> jnp.ndarray:
  """[W] int32: the position ring slot s holds once positions < `start` are written (the
  latest q < start with q % W == s); negative for slots nothing has been written to."""
  s = jnp.arange(slots)
  return s + slots * jnp.floor_divide(start - 1 - s, slots)


def ring_update(ring: jnp.ndarray, x: jnp.ndarray, start, lengths: jnp.ndarray) -> jnp.ndarray:
  """Write a chunk of gate k or v into the ring, each slot its latest position.

  ring [B, M, W, D]; x [B, C, M, D] holds positions start..start+C-1; lengths [B]: positions
  >= a row's length are padding and never written. -> [B, M, W, D]. C may exceed W (a
  one-shot prompt): slot s then takes the latest position of the chunk with q % W == s.
  """
  c, w = x.shape[1], ring.shape[2]
  last = jnp.minimum(lengths, start + c)[:, None] - 1              # [B, 1] last real position
  q = jnp.arange(w)[None, :] + w * jnp.floor_divide(last - jnp.arange(w)[None, :], w)  # [B, W]
  written = q >= start                                              # q <= last by construction
  gathered = jnp.take_along_axis(x, jnp.clip(q - start, 0, c - 1)[:, :, None, None], axis=1)
  return jnp.where(written[:, None, :, None], gathered.transpose(0, 2, 1, 3).astype(ring.dtype), ring)


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
