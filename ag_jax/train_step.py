"""The trainable subset, the optimizer and the jitted train / eval steps.

Gate training (`trainable="gates"`) differentiates the loss with respect to the gate
subtree `params["layers"]["gate"]` only; the frozen base params are a plain,
non-differentiated argument, so the backward pass computes activation gradients (the
gates of layer l see the gradient through layers > l) but no weight gradient of the base,
and the optimizer state holds gate leaves only. `trainable="all"` trains every parameter
(how the tiny base model of the embedded world is pretrained).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ag_jax import losses
from ag_jax.model import Llama

GATE_PATH = ("layers", "gate")
NO_DECAY = ("bias", "scale")  # biases and norm scales: weight decay would only shift them


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: updates applied so far
  trainable: Any         # the trainable params (gate subtree, or all params)
  opt_state: Any         # optax state over `trainable` only


# ---------------------------------------------------------------------------------------------
# The trainable filter


def split_params(params: dict, trainable: str) -> tuple[Any, dict]:
  """params -> (trainable params, frozen params). "gates": the gate subtree and the base
  without it; "all": everything and nothing."""
  if trainable == "all":
    return params, {}
  if trainable != "gates":
    raise ValueError(f"trainable must be 'gates' or 'all', got {trainable!r}")
  layers = dict(params["layers"])
  if "gate" not in layers:
    raise ValueError("trainable='gates' but the params have no gate (params['layers']['gate'])")
  gates = layers.pop("gate")
  return gates, {**params, "layers": layers}


def merge_params(trainable_params: Any, frozen: dict, trainable: str) -> dict:
  """The inverse of `split_params`."""
  if trainable == "all":
    return trainable_params
  return {**frozen, "layers": {**frozen["layers"], "gate": trainable_params}}


# ---------------------------------------------------------------------------------------------
# Optimizer


def make_optimizer(lr: float, total_steps: int, warmup: int = 0, decay_steps: int | None = None,
                   end_lr_fraction: float = 0.1, weight_decay: float = 0.0,
                   clip: float | None = 1.0, b1: float = 0.9,
                   b2: float = 0.95) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with linear warmup from 0 to `lr`, cosine decay to `lr * end_lr_fraction`, and
  global-norm clipping. Returns (transformation, schedule: step -> lr)."""
  decay_steps = max(1, (total_steps - warmup) if decay_steps is None else decay_steps)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=warmup + decay_steps,
      end_value=lr * end_lr_fraction)

  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY, params)

  parts = [] if clip is None else [optax.clip_by_global_norm(clip)]
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule


def init_state(trainable_params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable_params,
                    opt_state=tx.init(trainable_params))


# ---------------------------------------------------------------------------------------------
# Steps


def training_forward(module: Llama, tokens, positions, segment_ids, backend=None,
                     context_length=None, capacity=None):
  """The training view up to the output projection (a `method=` for `Llama.apply`).

  -> (hidden [B, T, E] after the final norm, head [E, V], (probs, flags)): what
  `Llama.__call__(..., return_gates=True)` computes before its logits, so the LM loss can be
  taken in chunks (`losses.lm_loss_chunked`) and [B, T, V] never exists. `backend` picks the
  gated attention (None: the dispatcher's choice; "dense": the [T, S] statement, benchmarks).
  context_length, capacity [B, T]: the budget-aware view (`ag_jax.capacity_view`).
  """
  ctx = module.context(positions, segment_ids, backend=backend, context_length=context_length,
                       context_capacity=capacity)
  x, gates = module.layers(module.embed(tokens), ctx, None)
  head = module.embedding.T if module.cfg.tie_embeddings else module.lm_head
  return module.final_norm(x), head, gates


def make_loss_fn(model: Llama, trainable: str, loss_chunk: int | None = None,
                 backend: str | None = None) -> Callable:
  """(trainable params, frozen params, batch) -> (loss, metrics).

  The LM loss is taken over `loss_chunk` positions at a time (`losses.lm_loss_chunked`):
  whole [B, T, V] logits exist neither in the forward nor in the backward pass. With
  `gate.distill_weight`, the frozen base run with no gate (nothing evicted) is the teacher
  of a KL term, chunked the same way (`losses.distill_kl_chunked`): on every position or,
  with `gate.distill_under_budget` false, on those that train with no capacity.
  """
  gate_cfg = model.gate
  budget_aware = gate_cfg is not None and gate_cfg.train_budgets is not None
  distill = gate_cfg is not None and gate_cfg.distill_weight > 0
  if distill and trainable != "gates":
    raise ValueError("gate.distill_weight needs trainable='gates': the teacher is the frozen base")
  # The teacher: the same frozen base with no gate, so nothing is evicted (the full cache).
  teacher = Llama(model.cfg, gate=None, remat=model.remat) if distill else None

  def loss_fn(trainable_params, frozen, batch):
    params = merge_params(trainable_params, frozen, trainable)
    # The capacity rule of the kvpress protocol inside the view (gate.train_budgets): the
    # data iterator drew each row's capacity (`capacity_view.draw_capacity`).
    under_budget = dict(context_length=batch["context_length"],
                        capacity=batch["context_capacity"]) if budget_aware else {}
    hidden, head, (probs, flags) = model.apply(  # hidden [B, T, E]; probs, flags [L, B, K, T]
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
        backend, method=training_forward, **under_budget)
    lm, count = losses.lm_loss_chunked(hidden, head, batch["targets"], batch["loss_mask"],
                                       loss_chunk)
    metrics = {"lm_loss": lm, "tokens": count}
    loss = lm
    if distill:
      teacher_hidden, _, _ = teacher.apply(  # [B, T, E]; `frozen` is the base without gates
          {"params": frozen}, batch["tokens"], batch["positions"], batch["segment_ids"], backend,
          method=training_forward)
      distill_mask = batch["loss_mask"]  # [B, T]
      if not gate_cfg.distill_under_budget:  # GateConfig refuses it without train_budgets
        # only the positions with no capacity, where the flags alone decide what stays
        distill_mask = distill_mask * (batch["context_capacity"] == 0)
      kl = losses.distill_kl_chunked(hidden, teacher_hidden, head, distill_mask, loss_chunk)
      loss = loss + gate_cfg.distill_weight * kl
      metrics["distill_kl"] = kl
    if gate_cfg is not None:
      valid = batch["segment_ids"] > 0  # [B, T]: real tokens, not padding
      evict = losses.eviction_loss(probs, valid, gate_cfg)
      loss = loss + gate_cfg.eviction_weight * evict
      metrics["evict_loss"] = evict
      metrics.update(losses.keep_stats(probs, flags, valid))
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


def make_train_step(model: Llama, tx: optax.GradientTransformation, schedule: Callable,
                    trainable: str = "gates", loss_chunk: int | None = None,
                    backend: str | None = None) -> Callable:
  """(state, frozen, batch) -> (state, metrics); pure, jit it with `jit_train_step`."""
  loss_fn = make_loss_fn(model, trainable, loss_chunk, backend)

  def train_step(state: TrainState, frozen: dict, batch: dict):
    # Gradients w.r.t. argument 0 only: the frozen base is a constant of the backward pass.
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, frozen, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    new_state = TrainState(step=state.step + 1,
                           trainable=optax.apply_updates(state.trainable, updates),
                           opt_state=opt_state)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
    return new_state, metrics

  return train_step


def make_eval_step(model: Llama, trainable: str = "gates",
                   loss_chunk: int | None = None) -> Callable:
  """(trainable params, frozen params, batch) -> metrics (no gradient)."""
  loss_fn = make_loss_fn(model, trainable, loss_chunk)
  return lambda trainable_params, frozen, batch: loss_fn(trainable_params, frozen, batch)[1]


def jit_train_step(train_step: Callable, state_shardings: TrainState, frozen_shardings: Any,
                   batch_sharding: jax.sharding.Sharding,
                   metrics_sharding: jax.sharding.Sharding) -> Callable:
  """jit with explicit shardings; the state's buffers are donated (updated in place)."""
  return jax.jit(train_step,
                 in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                 out_shardings=(state_shardings, metrics_sharding),
                 donate_argnums=(0,))


def jit_eval_step(eval_step: Callable, trainable_shardings: Any, frozen_shardings: Any,
                  batch_sharding: jax.sharding.Sharding,
                  metrics_sharding: jax.sharding.Sharding) -> Callable:
  return jax.jit(eval_step, in_shardings=(trainable_shardings, frozen_shardings, batch_sharding),
                 out_shardings=metrics_sharding)
