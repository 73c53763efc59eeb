"""One decoder layer acting on the evicting cache: the prefill and decode views (DESIGN §2).

Called by `DecoderLayer` inside the layer scan when the context's mode is not "train".
Both views compute exactly the training-view function: prefill *is* the training view on
right-padded prompts (padding is simply never kept), and a decode step attends over the
row's kept slots plus its own, which are exactly the keys the training view lets it see
while nothing overflows the capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from ag_jax import cache as cache_lib
from ag_jax.attention import attend, attention_probs


def layer_step(layer, carry, ctx, layer_index):
  if ctx.mode == "prefill":
    return _prefill(layer, carry, ctx)
  if ctx.mode == "decode":
    return _decode(layer, carry, ctx, layer_index)
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
  q, k, v = layer.attn.project(h, ctx.positions, layer.inv_freq)  # k, v [B, T, K, H]
  out = attend(q, k, v, ctx.positions, ctx.segments, attention_flags, ctx.backend)
  probs = None
  if policy.needs_prefill_probs:  # [B, K, G, T, T]: one-shot, as kvpress's eager attention
    probs = attention_probs(q, k, ctx.positions, ctx.segments, attention_flags)
  x = layer.mlp_block(x + layer.attn.output(out).astype(x.dtype))

  extra = {"keys": k.transpose(0, 2, 1, 3)} if policy.needs_prefill_keys else {}
  store, score = policy.prefill_select(prob, flags, valid, positions, probs, **extra)
  k_rows, v_rows = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
  k_c, v_c, score_c, src, length = pallas_kernels.compact(
      k_rows, v_rows, score.astype(jnp.float32), store, ctx.capacity, slots=ctx.capacity + ctx.reserve + 1,
      backend=ctx.backend)
  # Prompt positions are 0..T-1, so a slot's source index is its token position.
  layer_cache = dict(k=k_c, v=v_c, score=score_c, position=src, length=length,
                     gate_k=None, gate_v=None)
  if gate_kv is not None:
    # The gate computes in fp32 but its cache is stored in the model's dtype: in bf16 this
    # halves the gate cache, which covers every token and so costs a real share of memory.
    lengths = jnp.sum(ctx.valid, axis=1)
    cache_dtype = jnp.dtype(cfg.dtype)
    for name, value in (("gate_k", gate_kv[0]), ("gate_v", gate_kv[1])):
      layer_cache[name] = cache_lib.ring_from_prompt(value, lengths, ctx.gate_slots).astype(cache_dtype)
  return x, layer_cache


def _decode_gate(layer, h, position, cache, l, active):
  """The new token's keep probability [B, K] from the gate's ring cache; updated cache.

  Rows not `active` [B] leave their ring untouched."""
  gate = layer.gate
  if gate.kind == "linear":
    return jax.nn.sigmoid(layer.evict_gate.linear_logits(h)[:, 0]), cache
  gq, gk, gv = layer.evict_gate.project(h, position[:, None], layer.gate_inv_freq)  # [B, 1, N, D]
  slots = cache.gate_k.shape[3]
  ring_slot = jnp.broadcast_to((position % slots)[:, None], gk.shape[:1] + gk.shape[2:3])  # [B, N]
  gate_k = cache_lib.write_rows(cache.gate_k, l, ring_slot, gk[:, 0], active)
  gate_v = cache_lib.write_rows(cache.gate_v, l, ring_slot, gv[:, 0], active)
  keys, values = gate_k[l], gate_v[l]  # [B, N, W, D]
  scores = jnp.einsum("BND,BNWD->BNW", gq[:, 0], keys) / np.sqrt(gate.head_dim)
  scores = jnp.where(cache_lib.ring_valid(slots, position)[:, None, :], scores, -jnp.inf)
  attended = jnp.einsum("BNW,BNWD->BND", jax.nn.softmax(scores, axis=-1), values)
  logits = layer.evict_gate.read_out(attended[:, None])[:, 0]  # [B, K]
  return jax.nn.sigmoid(logits), cache.replace(gate_k=gate_k, gate_v=gate_v)


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
  q, k, v = layer.attn.project(h, position[:, None], layer.inv_freq)  # k, v [B, 1, K, H]
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
  # The stacked buffers go in whole and the kernel reads layer l in place: slicing
  # k_all[l] here would copy the layer's K/V (a read and a write of it) every step.
  attended = pallas_kernels.decode_attention(
      q[:, 0], k_all, v_all, length + 1, return_mass=policy.needs_decode_mass,
      backend=kv.backend, layer=l)
  out, mass = attended if policy.needs_decode_mass else (attended, None)  # out [B, K, G, H]
  updated = policy.decode_update(score, slot_position, mass, position_bk)
  score = jnp.where(active[:, None, None], updated, score)  # a finished row's scores stay

  # Admission: below capacity a kept newcomer just stays. At capacity it replaces the
  # lowest-ranked slot if it ranks higher; otherwise it is dropped (overwritten next step).
  capacity = kv.capacity
  rank = policy.eviction_score(score, slot_position, position_bk)     # [B, K, S]
  slots = jnp.arange(capacity + 1)
  victim = jnp.argmin(jnp.where(slots < capacity, rank, jnp.inf), axis=-1)  # [B, K]
  newcomer_rank = jnp.take_along_axis(rank, length[..., None], axis=-1)[..., 0]
  victim_rank = jnp.take_along_axis(rank, victim[..., None], axis=-1)[..., 0]
  full = length >= capacity
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
  x = x + layer.attn.output(out[:, None]).astype(x.dtype)
  return (layer.mlp_block(x), kv), None


def _set_rows(rows: jnp.ndarray, slot: jnp.ndarray, value: jnp.ndarray) -> jnp.ndarray:
  """rows [B, K, S]; set rows[b, k, slot[b, k]] = value[b, k]."""
  b, k = slot.shape
  return rows.at[jnp.arange(b)[:, None], jnp.arange(k)[None, :], slot].set(value.astype(rows.dtype))
