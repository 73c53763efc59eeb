"""The Llama-family decoder in flax.linen, with an optional Attention-Gate before each layer.

`Llama(cfg, gate=None)` is functional: parameters are a plain pytree and `apply` is pure.
Layers run under `nn.scan` (parameters stacked on a leading `layers` axis) so compile time
does not grow with depth; `cfg.scan_layers=False` unrolls the same scan for debugging.

Three views of the same function (DESIGN §1, §2):
  * `__call__`  training view: whole sequences, hard gate flags with a straight-through
                 gradient, packed segments.
  * `prefill`   the training view on right-padded prompts that also fills the evicting cache.
  * `decode`    one token per sequence against the cache.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ag_jax import capacity_view, inference
from ag_jax.attention import Attention, attend
from ag_jax.config import GateConfig, ModelConfig
from ag_jax.gate import Gate, straight_through
from ag_jax.layers import MLP, RMSNorm, dtype_of, normal, param
from ag_jax.rope import inverse_frequencies

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class LayerContext:
  """What every layer needs besides its own weights; broadcast through the layer scan."""

  # Masks are never materialised as [T, S]: attention derives them block by block from
  # positions (causal, gate window) and segments (packed documents; prompt padding is 0).
  positions: jnp.ndarray | None = None     # [B, T] int32
  segments: jnp.ndarray | None = None      # [B, T] int32
  valid: jnp.ndarray | None = None         # [B, T] bool: prefill only, real prompt tokens
  # Training only, budget-aware (ag_jax.capacity_view): each token's segment's context
  # length and kept-token capacity, [B, T] int32; None: the gates' flags alone.
  context_length: jnp.ndarray | None = None
  context_capacity: jnp.ndarray | None = None
  # Prefill only: [B] int32 kept tokens per row, each <= capacity (the kvpress protocol
  # sizes every prompt's cache by its own length); None: `capacity` for every row.
  row_capacity: jnp.ndarray | None = None
  mode: str = flax.struct.field(pytree_node=False, default="train")
  # Prefill only (decode reads them from the cache): see ag_jax.inference.
  policy: Any = flax.struct.field(pytree_node=False, default=None)
  capacity: int = flax.struct.field(pytree_node=False, default=0)
  gate_slots: int = flax.struct.field(pytree_node=False, default=0)
  reserve: int = flax.struct.field(pytree_node=False, default=0)  # slots kept free for decode
  backend: str | None = flax.struct.field(pytree_node=False, default=None)


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  gate: GateConfig | None = None

  def setup(self):
    cfg = self.cfg
    self.attn_norm = RMSNorm(cfg.rms_eps, cfg.param_dtype)
    self.attn = Attention(cfg)
    self.mlp_norm = RMSNorm(cfg.rms_eps, cfg.param_dtype)
    self.mlp = MLP(cfg.dim, cfg.mlp_dim, cfg.dtype, cfg.param_dtype)
    if self.gate is not None:
      self.evict_gate = Gate(self.gate, cfg.dim, cfg.num_kv_heads, cfg.dtype, name="gate")
    self.inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling or ()))
    if self.gate is not None and self.gate.kind == "attention":
      self.gate_inv_freq = inverse_frequencies(self.gate.head_dim, cfg.rope_theta,
                                               dict(cfg.rope_scaling or ()))

  # The layer's parts as the cache views (ag_jax.inference) use them.

  def project(self, h, positions):
    """h [B, T, E] (normalised) -> q [B, T, K, G, H], k, v [B, T, K, H], RoPE applied."""
    return self.attn.project(h, positions, self.inv_freq)

  def finish(self, x, attended):
    """The residual x [B, T, E] plus the attention output of attended [B, T, K, G, H],
    then the MLP block."""
    return self.mlp_block(x + self.attn.output(attended).astype(x.dtype))

  def mlp_block(self, x):
    return x + self.mlp(self.mlp_norm(x)).astype(x.dtype)

  def gate_probs(self, h, ctx: LayerContext, return_kv: bool = False):
    """Keep probabilities [B, K, T] (fp32) from the normalised states h [B, T, E]."""
    gate_freq = getattr(self, "gate_inv_freq", None)
    out = self.evict_gate(h, ctx.positions, ctx.segments, gate_freq, return_kv=return_kv,
                          backend=ctx.backend)
    logits, gate_kv = out if return_kv else (out, None)
    prob = self.with_sinks(jax.nn.sigmoid(logits).transpose(0, 2, 1), ctx.positions)  # [B, K, T]
    return (prob, gate_kv) if return_kv else prob

  def gate_chunk(self, h, ctx: LayerContext, ring_k=None, ring_v=None, ring_positions=None,
                 ring_segments=None):
    """Keep probabilities [B, K, C] of a prompt chunk h [B, C, E] after its prefix, whose
    gate k/v are in the ring ([B, M, W, D]; positions, segments [B, W]); and the chunk's gate
    k, v [B, C, M, D] for the ring (None for a linear gate, which needs no ring)."""
    if self.gate.kind == "linear":
      logits, kv = self.evict_gate.linear_logits(h), None
    else:
      logits, kv = self.evict_gate.chunk(h, ctx.positions, ctx.segments, self.gate_inv_freq,
                                         ring_k, ring_v, ring_positions, ring_segments,
                                         ctx.backend)
    return self.with_sinks(jax.nn.sigmoid(logits).transpose(0, 2, 1), ctx.positions), kv

  def gate_token_kv(self, h, position):
    """A new token's gate q [B, N, D] and k, v [B, M, D] (attention gate); h [B, 1, E]."""
    gq, gk, gv = self.evict_gate.project(h, position[:, None], self.gate_inv_freq)
    return gq[:, 0], gk[:, 0], gv[:, 0]

  def gate_token_prob(self, h, position, gq=None, ring_k=None, ring_v=None):
    """A new token's keep probability [B, K] at position [B]: from its own state h [B, 1, E]
    (linear gate), or its gate query over the ring [B, M, W, D] that already holds its own
    k/v."""
    if self.gate.kind == "linear":
      logits = self.evict_gate.linear_logits(h)[:, 0]
    else:
      logits = self.evict_gate.decode_logits(gq, ring_k, ring_v, position)
    return self.with_sinks(jax.nn.sigmoid(logits)[:, :, None], position[:, None])[:, :, 0]

  def with_sinks(self, prob, positions):
    """prob [B, K, T] with the sink positions (positions [B, T] < gate.sink_tokens) at 1:
    the one place every view (training, prefill, chunks, decode) takes its keep
    probabilities from, so they agree on the sinks."""
    if not self.gate.sink_tokens:
      return prob
    return jnp.where((positions < self.gate.sink_tokens)[:, None, :], 1.0, prob).astype(prob.dtype)

  def __call__(self, carry, ctx: LayerContext, per_layer):
    """One layer in the layer scan; what the arguments carry depends on ctx.mode:

      train    carry = x [B, T, E]; per_layer = forced keep flags [B, K, T] bool, or None
               (the gates decide). Returns (x, (probs, flags)).
      prefill  carry = x; per_layer = this layer's index (unused: the layer returns its
               cache arrays, stacked by the scan).
      chunk    carry = (x [B, C, E], KVCache); per_layer = this layer's index into it.
      decode   carry = (x [B, 1, E], KVCache); per_layer = the same index.
    """
    if ctx.mode != "train":
      return inference.layer_step(self, carry, ctx, per_layer)
    x, forced_keep = carry, per_layer
    h = self.attn_norm(x)
    if self.gate is not None:
      prob = self.gate_probs(h, ctx)  # [B, K, T]
      flags = prob > self.gate.threshold
      keep = straight_through(prob, self.gate.threshold)
    else:
      prob = flags = keep = None
    if forced_keep is not None:
      flags = forced_keep.astype(bool)
      keep = flags.astype(jnp.float32)
    # Only with gates and unforced flags: Llama.__call__ checks, make_loss_fn passes the
    # arrays only for gates with train_budgets.
    if ctx.context_length is not None:
      return self.finish(x, self.attend_under_capacity(h, prob, flags, keep, ctx)), (prob, flags)
    x = x + self.attn(h, ctx.positions, ctx.segments, self.inv_freq, keep,
                      ctx.backend).astype(x.dtype)
    return self.mlp_block(x), (prob, flags)

  def attend_under_capacity(self, h, prob, flags, keep, ctx: LayerContext):
    """The budget-aware training view (ag_jax.capacity_view): queries inside a context see
    the gates' flags, queries after it see the context's top-capacity flagged tokens and
    everything after the context. h [B, T, E]; prob, flags, keep [B, K, T].
    -> attended [B, T, K, G, H]. Two passes over the keys: one per set of key flags."""
    q, k, v = self.project(h, ctx.positions)
    inside = attend(q, k, v, ctx.positions, ctx.segments, keep, ctx.backend)
    after_keep = capacity_view.after_context_keep(prob, flags, ctx.positions, ctx.segments,
                                                  ctx.context_length, ctx.context_capacity)
    after = attend(q, k, v, ctx.positions, ctx.segments, after_keep, ctx.backend)
    _, after_context = capacity_view.regions(ctx.positions, ctx.context_length, ctx.context_capacity)
    return jnp.where(after_context[:, :, None, None, None], after, inside)


class Llama(nn.Module):
  cfg: ModelConfig
  gate: GateConfig | None = None
  remat: str = "none"

  def setup(self):
    cfg = self.cfg
    pd = dtype_of(cfg.param_dtype)
    self.embedding = param(self, "embed", normal(0.02), (cfg.vocab_size, cfg.dim),
                           ("vocab", "embed"), pd)
    layer = DecoderLayer
    if REMAT_POLICIES.get(self.remat, "missing") == "missing":
      raise ValueError(f"unknown remat policy {self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
    if self.remat != "none":
      layer = nn.remat(layer, prevent_cse=False, policy=REMAT_POLICIES[self.remat])
    self.layers = nn.scan(
        layer, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, 0), length=cfg.num_layers,
        unroll=1 if cfg.scan_layers else cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.gate, name="layers")
    self.final_norm = RMSNorm(cfg.rms_eps, cfg.param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = param(self, "lm_head", normal(), (cfg.dim, cfg.vocab_size),
                           ("embed", "vocab"), pd)

  def embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
    return jnp.take(self.embedding, tokens, axis=0).astype(dtype_of(self.cfg.dtype))

  def logits(self, x: jnp.ndarray) -> jnp.ndarray:
    """x [B, T, E] -> fp32 logits [B, T, V]."""
    x = self.final_norm(x)
    head = self.embedding.T if self.cfg.tie_embeddings else self.lm_head
    return jnp.einsum("BTE,EV->BTV", x, head.astype(x.dtype), preferred_element_type=jnp.float32)

  def context(self, positions, segment_ids, **static) -> LayerContext:
    return LayerContext(positions, segment_ids.astype(jnp.int32), **static)

  def __call__(self, tokens, positions=None, segment_ids=None, keep=None, return_gates=False,
               context_length=None, capacity=None):
    """Training view. tokens int32 [B, T] -> logits [B, T, V] (fp32).

    positions [B, T] (default 0..T-1), segment_ids [B, T] (default all 1: one document;
    packed documents never attend to each other), keep [layers, B, K, T] bool forces the
    flags instead of the gates. return_gates adds (probs, flags), each [layers, B, K, T]
    (probs is None without a gate). context_length, capacity [B, T] int32: the budget-aware
    view (ag_jax.capacity_view), equal to the kvpress protocol's prefill + Full read-out.
    """
    if (context_length is None) != (capacity is None):
      raise ValueError("the budget-aware view needs context_length and capacity together")
    if context_length is not None and (keep is not None or self.gate is None):
      raise ValueError("the budget-aware view ranks the gates' keep probabilities: it needs "
                       "gates and no forced keep flags")
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
    segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    ctx = self.context(positions, segment_ids, context_length=context_length,
                       context_capacity=capacity)
    x, (probs, flags) = self.layers(self.embed(tokens), ctx, keep)
    logits = self.logits(x)
    return (logits, (probs, flags)) if return_gates else logits

  def prefill(self, tokens, lengths, policy, capacity: int, gate_slots: int, backend=None,
              all_logits: bool = False, reserve: int = 0, row_capacity=None):
    """Right-padded prompts tokens [B, T], lengths [B] -> (logits, per-layer cache arrays).

    logits: [B, V] at each prompt's last token, or [B, T, V] with all_logits. The cache
    arrays are stacked over layers; `ag_jax.engine.prefill` wraps them in a KVCache.
    Each row keeps at most `capacity` prompt tokens (row b: row_capacity[b], when given)
    in `capacity + reserve + 1` slots.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = positions < lengths[:, None]
    ctx = self.context(positions, valid.astype(jnp.int32), mode="prefill", policy=policy,
                       capacity=capacity, gate_slots=gate_slots, reserve=reserve,
                       backend=backend)
    ctx = ctx.replace(valid=valid, row_capacity=row_capacity)
    x, layer_cache = self.layers(self.embed(tokens), ctx, None)
    if not all_logits:  # only the last prompt token's hidden state goes through the head
      x = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
      return self.logits(x)[:, 0], layer_cache
    return self.logits(x), layer_cache

  def prefill_chunk(self, tokens, start, lengths, cache, policy, capacity: int, backend=None,
                    row_capacity=None):
    """One chunk of right-padded prompts: tokens [B, C] at positions start..start+C-1
    (lengths [B]), cache: the KVCache of the prompt before it. -> (hidden [B, C, E] before
    the final norm, the cache with the chunk compacted in). `ag_jax.engine` scans chunks."""
    b, c = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    valid = positions < lengths[:, None]
    ctx = LayerContext(positions, valid.astype(jnp.int32), valid, row_capacity=row_capacity,
                       mode="chunk", policy=policy, capacity=capacity, backend=backend)
    (x, cache), _ = self.layers((self.embed(tokens), cache), ctx, jnp.arange(self.cfg.num_layers))
    return x, cache

  def decode(self, tokens, cache, active=None):
    """tokens [B] at cache.next_position -> (logits [B, V], cache after this token).

    active [B] bool (default all): inactive rows (finished sequences) keep nothing and do
    not advance, so their cache and statistics stay as they were.
    """
    active = jnp.ones(tokens.shape, bool) if active is None else active
    ctx = LayerContext(mode="decode", valid=active)
    x = self.embed(tokens[:, None])  # [B, 1, E]
    (x, cache), _ = self.layers((x, cache), ctx, jnp.arange(self.cfg.num_layers))
    step = active.astype(jnp.int32)
    cache = cache.replace(next_position=cache.next_position + step, seen=cache.seen + step)
    return self.logits(x)[:, 0], cache


def init_variables(model: Llama, rng: jax.Array) -> dict:
  """Random variables as plain arrays ({"params": ...}), logical-axis boxes removed."""
  init = jax.jit(lambda key: nn.meta.unbox(model.init(key, jnp.zeros((1, 2), jnp.int32))))
  return init(rng)


def logical_axes(model: Llama) -> dict:
  """The logical axis names of every parameter, as a pytree of PartitionSpecs (no compute)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  return nn.get_partition_spec(abstract)
