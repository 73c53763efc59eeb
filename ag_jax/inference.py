"""One decoder layer acting on the evicting cache: the prefill and decode views (DESIGN §2).

Called by `DecoderLayer` inside the layer scan when the context's mode is not "train".
Both views compute exactly the training-view function: prefill *is* the training view on
right-padded prompts (padding is simply never kept), and a decode step attends over the
row's kept slots plus its own, which are exactly the keys the training view lets it see
while nothing overflows the capacity.
"""

from __future__ import annotations

import jax.numpy as jnp

import pallas_kernels
from ag_jax import cache as cache_lib
from ag_jax.attention import attend, attend_cached, attend_chunk, attention_probs


def layer_step(layer, carry, ctx, layer_index):
  if ctx.mode == "prefill":
    return _prefill(layer, carry, ctx)
  if ctx.mode == "decode":
    return _decode(layer, carry, ctx, layer_index)
  if ctx.mode == "chunk":
    return _prefill_chunk(layer, carry, ctx, layer_index)
  raise ValueError(f"unknown layer mode {ctx.mode!r}")


def _prefill(layer, x, ctx):
  """x [B, T, E] right-padded prompts -> (x, this layer's cache arrays)."""
  policy, cfg = ctx.policy, layer.cfg
  b, t = x.shape[:2]
  valid = jnp.broadcast_to(ctx.valid[:, None, :], (b, cfg.num_kv_heads, t))       # [B, K, T]
  positions = jnp.broadcast_to(ctx.positions[:, None, :], (b, cfg.num_kv_heads, t))  # [B, K, T]
  h = layer.attn_norm(x)
  prob = flags = gate_kv = None
  if policy.uses_gate:
    prob, gate_kv = layer.gate_probs(h, ctx, return_kv=True)  # [B, K, T]
    flags = prob > layer.gate.threshold
  attend_flags = policy.prefill_attend(prob, flags, valid)  # [B, K, T] bool or None
  attention_flags = None if attend_flags is None else attend_flags.astype(jnp.float32)
  q, k, v = layer.project(h, ctx.positions)  # k, v [B, T, K, H]
  out = attend(q, k, v, ctx.positions, ctx.segments, attention_flags, ctx.backend)
  probs = None
  if policy.needs_prefill_probs:  # [B, K, G, T, T]: one-shot, as kvpress's eager attention
    probs = attention_probs(q, k, ctx.positions, ctx.segments, attention_flags)
  x = layer.finish(x, out)

  extra = {"keys": k.transpose(0, 2, 1, 3)} if policy.needs_prefill_keys else {}
  if policy.splits_capacity:  # [B, 1, 1]: each row's own capacity
    extra["capacity"] = _row_capacity(ctx.row_capacity, ctx.capacity, b)[:, :, None]
  store, score = policy.prefill_select(prob, flags, valid, positions, probs, **extra)
  k_rows, v_rows = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
  k_c, v_c, score_c, src, length = pallas_kernels.compact(
      k_rows, v_rows, score.astype(jnp.float32), store, ctx.capacity,
      slots=ctx.capacity + ctx.reserve + 1, backend=ctx.backend, row_capacity=ctx.row_capacity)
  # Prompt positions are 0..T-1, so a slot's source index is its token position.
  layer_cache = dict(k=k_c, v=v_c, score=score_c, position=src, length=length,
                     gate_k=None, gate_v=None)
  if gate_kv is not None:
    # Stored in the model's dtype; the gate already rounded its k/v to it (Gate.project).
    lengths = jnp.sum(ctx.valid, axis=1)
    cache_dtype = jnp.dtype(cfg.dtype)
    for name, value in (("gate_k", gate_kv[0]), ("gate_v", gate_kv[1])):
      ring = jnp.zeros((b, value.shape[2], ctx.gate_slots, value.shape[3]), cache_dtype)
      layer_cache[name] = cache_lib.ring_update(ring, value, 0, lengths)
  return x, layer_cache


def _prefill_chunk(layer, carry, ctx, l):
  """carry = (x [B, C, E]: a chunk of right-padded prompts at positions ctx.positions, the
  same start in every row; KVCache holding the compacted prompt before it); l: layer index.

  The chunk attends to the kept tokens plus itself (causally), gets its flags, and is
  compacted with the kept tokens into the cache: memory O(capacity + C) per layer, never
  the prompt's whole K/V. Equal to one-shot prefill while nothing overflows the capacity.
  """
  x, kv = carry
  policy, cfg = ctx.policy, layer.cfg
  b, c = x.shape[:2]
  shape = (b, cfg.num_kv_heads, c)
  valid = jnp.broadcast_to(ctx.valid[:, None, :], shape)              # [B, K, C]
  positions = jnp.broadcast_to(ctx.positions[:, None, :], shape)      # [B, K, C]
  h = layer.attn_norm(x)
  prob = flags = None
  if policy.uses_gate:
    prob, kv = _chunk_gate(layer, h, ctx, kv, l)                      # [B, K, C]
    flags = prob > layer.gate.threshold
  attend_flags = policy.prefill_attend(prob, flags, valid)            # [B, K, C] or None
  q, k, v = layer.project(h, ctx.positions)                           # k, v [B, C, K, H]

  slots = kv.k.shape[3]
  held = jnp.arange(slots)[None, None, :] < kv.length[l][..., None]   # [B, K, S]
  chunk_keep = jnp.ones(shape, bool) if attend_flags is None else attend_flags
  # Layer l's K/V are read once, here, so the in-place write of the compacted rows below
  # cannot force a copy of the whole cache.
  out, cand_k, cand_v = attend_chunk(q, k, v, ctx.positions, ctx.segments, chunk_keep,
                                     kv.k[l], kv.v[l], held, ctx.backend)
  x = layer.finish(x, out)

  extra = {"keys": k.transpose(0, 2, 1, 3)} if policy.needs_prefill_keys else {}
  store, score = policy.chunk_select(prob, flags, valid, positions, **extra)
  k_c, v_c, score_c, src, length = pallas_kernels.compact(
      cand_k, cand_v, jnp.concatenate([kv.score[l], score.astype(jnp.float32)], axis=-1),
      jnp.concatenate([held, store], axis=-1), ctx.capacity, slots=slots, backend=ctx.backend,
      row_capacity=ctx.row_capacity)
  candidates = jnp.concatenate([kv.position[l], positions], axis=-1)  # [B, K, S + C]
  position = jnp.where(src >= 0, jnp.take_along_axis(candidates, jnp.maximum(src, 0), -1), -1)
  kv = kv.replace(k=kv.k.at[l].set(k_c), v=kv.v.at[l].set(v_c), score=kv.score.at[l].set(score_c),
                  position=kv.position.at[l].set(position), length=kv.length.at[l].set(length))
  return (x, kv), None


def _chunk_gate(layer, h, ctx, kv, l):
  """Keep probabilities [B, K, C] of a prompt chunk; the gate ring with the chunk written."""
  if layer.gate.kind == "linear":
    return layer.gate_chunk(h, ctx)[0], kv
  start = ctx.positions[0, 0]
  lengths = start + jnp.sum(ctx.valid, axis=1)  # [B]: rows that ended earlier write nothing
  ring_positions = jnp.broadcast_to(cache_lib.ring_positions(kv.gate_k.shape[3], start),
                                    (h.shape[0], kv.gate_k.shape[3]))  # [B, W]
  ring_segments = jnp.where((ring_positions >= 0) & (ring_positions < lengths[:, None]), 1, -1)
  prob, (gk, gv) = layer.gate_chunk(h, ctx, kv.gate_k[l], kv.gate_v[l], ring_positions,
                                    ring_segments)
  kv = kv.replace(
      gate_k=kv.gate_k.at[l].set(cache_lib.ring_update(kv.gate_k[l], gk, start, lengths)),
      gate_v=kv.gate_v.at[l].set(cache_lib.ring_update(kv.gate_v[l], gv, start, lengths)))
  return prob, kv


def _decode_gate(layer, h, position, cache, l, active):
  """The new token's keep probability [B, K] from the gate's ring cache; updated cache.

  Rows not `active` [B] leave their ring untouched.
  """
  if layer.gate.kind == "linear":
    return layer.gate_token_prob(h, position), cache
  gq, gk, gv = layer.gate_token_kv(h, position)  # gq [B, N, D]; gk, gv [B, M, D]
  slots = cache.gate_k.shape[3]
  ring_slot = jnp.broadcast_to((position % slots)[:, None], gk.shape[:2])  # [B, M]
  gate_k = cache_lib.write_rows(cache.gate_k, l, ring_slot, gk, active)
  gate_v = cache_lib.write_rows(cache.gate_v, l, ring_slot, gv, active)
  prob = layer.gate_token_prob(h, position, gq, gate_k[l], gate_v[l])
  return prob, cache.replace(gate_k=gate_k, gate_v=gate_v)


def _decode(layer, carry, ctx, l):
  """carry = (x [B, 1, E], KVCache); l: this layer's index into the stacked cache."""
  x, kv = carry
  policy, cfg, active = kv.policy, layer.cfg, ctx.valid              # active [B]
  position = kv.next_position                                         # [B]
  position_bk = jnp.broadcast_to(position[:, None], (x.shape[0], cfg.num_kv_heads))  # [B, K]
  h = layer.attn_norm(x)
  prob = flags = None
  if policy.uses_gate:
    prob, kv = _decode_gate(layer, h, position, kv, l, active)
    flags = prob > layer.gate.threshold
  q, k, v = layer.project(h, position[:, None])                       # k, v [B, 1, K, H]
  extra = {"key": k[:, 0]} if policy.needs_prefill_keys else {}       # Knorm scores the key
  keep, new_score = policy.decode_admit(prob, flags, position_bk, **extra)  # [B, K]
  keep = keep & active[:, None]  # finished sequences keep nothing and write nothing

  # Write the newcomer at slot `length` (always free), attend over [0, length] inclusive.
  length = kv.length[l]                                               # [B, K]
  k_all = cache_lib.write_rows(kv.k, l, length, k[:, 0], active)
  v_all = cache_lib.write_rows(kv.v, l, length, v[:, 0], active)
  # Every stacked buffer is updated from its own latest version only, so XLA can update
  # it in place (reusing the original buffer for a second update would copy all layers).
  score_all = cache_lib.write_rows(kv.score, l, length, new_score, active)
  position_all = cache_lib.write_rows(kv.position, l, length, position_bk, active)
  score, slot_position = score_all[l], position_all[l]                # [B, K, S]
  # The stacked buffers go in whole and layer l is read in place.
  attended = attend_cached(q[:, 0], k_all, v_all, length + 1, l,
                           return_mass=policy.needs_decode_mass, backend=kv.backend)
  out, mass = attended if policy.needs_decode_mass else (attended, None)  # out [B, K, G, H]
  updated = policy.decode_update(score, slot_position, mass, position_bk)
  score = jnp.where(active[:, None, None], updated, score)  # a finished row's scores stay

  # Admission: below capacity a kept newcomer just stays. At capacity it replaces the
  # lowest-ranked slot if it ranks higher; otherwise it is dropped (overwritten next step).
  capacity = kv.capacity
  # [B, 1]: each row's own capacity (a row never holds more, so slot `length` is free).
  row_capacity = _row_capacity(kv.row_capacity, capacity, x.shape[0])
  extra = {"capacity": row_capacity[..., None]} if policy.splits_capacity else {}
  rank = policy.eviction_score(score, slot_position, position_bk, **extra)  # [B, K, S]
  slots = jnp.arange(capacity + 1)
  victim = jnp.argmin(jnp.where(slots < row_capacity[..., None], rank, jnp.inf), axis=-1)  # [B, K]
  newcomer_rank = jnp.take_along_axis(rank, length[..., None], axis=-1)[..., 0]
  victim_rank = jnp.take_along_axis(rank, victim[..., None], axis=-1)[..., 0]
  full = length >= row_capacity
  replace = keep & full & (newcomer_rank > victim_rank)
  target = jnp.where(replace, victim, length)  # rewriting slot `length` is a no-op
  # The second in-place write of k_all/v_all must come after the attention's reads of
  # them. XLA orders in-place updates only by data dependencies (not by optimization
  # barriers, on CPU at least), and without one it copies the whole [L, ...] K and V twice
  # per layer per step. Make `target` depend on the attention output: x * 0 converts to 0
  # for every x (XLA's float-to-int conversion maps NaN to 0) and is not simplified away.
  target = target + (jnp.sum(out) * 0).astype(target.dtype)
  # Slot `length` holds the newcomer's score and position (a finished row's old ones).
  score_newcomer = jnp.take_along_axis(score, length[..., None], axis=-1)[..., 0]
  position_newcomer = jnp.take_along_axis(slot_position, length[..., None], axis=-1)[..., 0]
  kv = kv.replace(
      k=cache_lib.write_rows(k_all, l, target, k[:, 0], active),
      v=cache_lib.write_rows(v_all, l, target, v[:, 0], active),
      score=score_all.at[l].set(_set_rows(score, target, score_newcomer)),
      position=position_all.at[l].set(_set_rows(slot_position, target, position_newcomer)),
      length=kv.length.at[l].set(length + (keep & ~full)),
  )
  return (layer.finish(x, out[:, None]), kv), None


def _row_capacity(row_capacity, capacity: int, batch: int) -> jnp.ndarray:
  """[B, 1] int32: each row's capacity (`row_capacity` [B], or `capacity` for all)."""
  if row_capacity is None:
    return jnp.full((batch, 1), capacity, jnp.int32)
  return jnp.asarray(row_capacity, jnp.int32)[:, None]


def _set_rows(rows: jnp.ndarray, slot: jnp.ndarray, value: jnp.ndarray) -> jnp.ndarray:
  """rows [B, K, S]; set rows[b, k, slot[b, k]] = value[b, k]."""
  b, k = slot.shape
  return rows.at[jnp.arange(b)[:, None], jnp.arange(k)[None, :], slot].set(value.astype(rows.dtype))
