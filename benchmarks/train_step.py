"""Gate-training step time vs its floor (a frozen-base forward + backward) and vs a full
fine-tune step of the same model; tokens/s and, on an accelerator, model FLOP/s utilisation.

Three programs, compiled once and timed side by side on the same random batch:
  gate step     the library's train step with trainable="gates": LM + eviction loss,
                gradients w.r.t. the gate subtree only, AdamW on the gates (ag_jax.train_step).
  frozen floor  the gate-free base model, LM loss, gradient w.r.t. one scalar that scales the
                embedded inputs. The backward pass therefore runs through every layer down
                to the input (as the layer-0 gate's gradient requires) but computes no weight
                gradient and updates nothing: the least a gate step can do on top of the
                forward. (A final-norm parameter would not do: its gradient needs no backward
                through the layers.)
  full step     the same gated model with trainable="all": every weight's gradient, AdamW on
                all of them.
  gate step, dense attention
                the gate step with backend="dense": the [T, S] statement of the gated
                attention by plain autodiff, the baseline the blocked attention replaced
                (compared side by side at a size where both fit; --no-dense skips it).
Target: gate step <= 1.15 x frozen floor.

--memory compiles the gate step (and its dense variant) on abstract weights and reports
XLA's memory analysis (temporaries, arguments) without running it, e.g. the long-context
target (<= 16 GiB of temporaries):
  python benchmarks/train_step.py --memory --model llama3_2_1b --batch 1 --seq 8192 --remat full

Model FLOPs per token (matmuls as computed; attention over the full T x S score matrix as
the training view computes it, gates ignored): forward F = 2 N + 4 L T (heads x head_dim);
the floor and the gate step need F + an activation backward (2 N + 8 L T hd) = 4 N + 12 L T hd;
the full step 6 N + 12 L T hd. N = weights used by matmuls (the embedding gather is not one).

  python benchmarks/train_step.py --size tiny --out train_step.json
"""

from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from ag_jax import losses  # noqa: E402
from ag_jax.config import GateConfig, preset  # noqa: E402
from ag_jax.model import Llama, init_variables  # noqa: E402
from ag_jax import train_step as step_lib  # noqa: E402

GRIDS = {
    "tiny": dict(model="tiny", batch=4, seq=256, rounds=7, inner=2),
    "accelerator": dict(model="llama3_8b", batch=2, seq=1024, rounds=5, inner=2),
}
PEAK_BF16_FLOPS = {  # dense bf16 peak per chip, by device_kind substring
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "v6": 918e12, "v5p": 459e12,
    "v5 lite": 197e12, "v5e": 197e12, "v4": 275e12,
}


def peak_flops(kind: str) -> float | None:
  return next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in kind.lower()), None)


def model_flops(cfg, params: dict, tokens: int, seq: int) -> dict[str, float]:
  embed = 0 if cfg.tie_embeddings else params["embed"].size
  layers = {k: v for k, v in params["layers"].items() if k != "gate"}
  n = sum(x.size for x in jax.tree_util.tree_leaves({**params, "layers": layers})) - embed
  attn = cfg.num_layers * seq * cfg.num_heads * cfg.head_dim  # per token
  return {"forward": tokens * (2 * n + 4 * attn), "no_weight_grad": tokens * (4 * n + 12 * attn),
          "full": tokens * (6 * n + 12 * attn), "matmul_params": n}


def floor_loss(module, tokens, positions, segment_ids, targets, loss_mask, input_scale):
  """LM loss of the base with the embedded inputs scaled by `input_scale` (a scalar)."""
  x = module.embed(tokens) * input_scale.astype(module.cfg.dtype)
  x, _ = module.layers(x, module.context(positions, segment_ids), None)
  return losses.lm_loss(module.logits(x), targets, loss_mask)[0]


def make_batch(cfg, batch: int, seq: int) -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1))
  return {"tokens": jnp.asarray(tokens[:, :-1], jnp.int32),
          "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
          "segment_ids": jnp.ones((batch, seq), jnp.int32),
          "loss_mask": jnp.ones((batch, seq), jnp.float32)}


def main(argv=None):
  p = common.parser(__doc__.split("\n\n")[0])
  p.add_argument("--model", help="model preset")
  p.add_argument("--layers", type=int, help="override the preset's layer count")
  p.add_argument("--batch", type=int)
  p.add_argument("--seq", type=int, help="tokens per sequence")
  p.add_argument("--remat", default="none", help="remat policy (none, full, dots, ...)")
  p.add_argument("--no-full", action="store_true", help="skip the full fine-tune step")
  p.add_argument("--no-dense", action="store_true", help="skip the dense-attention gate step")
  p.add_argument("--memory", action="store_true",
                 help="compile only (abstract weights) and report the compiled memory")
  args = p.parse_args(argv)
  size = common.resolve_size(args.size)
  g = GRIDS[size]
  name, batch, seq = args.model or g["model"], args.batch or g["batch"], args.seq or g["seq"]
  rounds = args.rounds or g["rounds"]
  cfg = preset(name, [f"num_layers={args.layers}"] if args.layers else [])
  res = common.Results(args.out, "train_step", dict(size=size, model=name, layers=cfg.num_layers,
                                                    batch=batch, seq=seq, remat=args.remat,
                                                    rounds=rounds))
  gated = Llama(cfg, gate=GateConfig(), remat=args.remat)
  plain = Llama(cfg, remat=args.remat)
  if args.memory:
    return memory_report(res, gated, cfg, batch, seq, args)
  variables = init_variables(gated, jax.random.key(0))
  data = make_batch(cfg, batch, seq)
  tx, schedule = step_lib.make_optimizer(1e-3, total_steps=1000)

  gates, frozen = step_lib.split_params(variables["params"], "gates")
  floor_grad = jax.jit(jax.value_and_grad(
      lambda s, params, b: plain.apply({"params": params}, b["tokens"], b["positions"],
                                       b["segment_ids"], b["targets"], b["loss_mask"], s,
                                       method=floor_loss)))
  programs = {  # label -> (jitted fn, state, other args); the state is donated and threaded
      "frozen floor": (floor_grad, None, (frozen, data)),
      "gate step": (jax.jit(step_lib.make_train_step(gated, tx, schedule, "gates"),
                            donate_argnums=(0,)),
                    step_lib.init_state(gates, tx), (frozen, data)),
  }
  if not args.no_dense:
    programs["gate step, dense attention"] = (
        jax.jit(step_lib.make_train_step(gated, tx, schedule, "gates", backend="dense"),
                donate_argnums=(0,)),
        step_lib.init_state(jax.tree_util.tree_map(jnp.copy, gates), tx), (frozen, data))
  if not args.no_full:
    programs["full step"] = (
        jax.jit(step_lib.make_train_step(gated, tx, schedule, "all"), donate_argnums=(0,)),
        step_lib.init_state(jax.tree_util.tree_map(jnp.copy, variables["params"]), tx),
        ({}, data))
  compiled = common.compile_all([
      (label, lambda fn=fn, st=st, a=a: fn.lower(jnp.float32(1.0) if st is None else st, *a))
      for label, (fn, st, a) in programs.items()])

  state, samplers = {}, {}
  for label, (_, st, a) in programs.items():
    if isinstance(compiled[label], Exception):
      res.add("errors", {"program": label, "error": repr(compiled[label])[:2000]})
      continue
    state[label] = jnp.float32(1.0) if st is None else st

    def run(label=label, exe=compiled[label], a=a, threaded=st is not None):
      out = exe(state[label], *a)
      if threaded:
        state[label] = out[0]
      return out

    try:
      common.block(run())  # warm-up
      samplers[label] = common.timed(run, g["inner"])
    except Exception as e:  # e.g. the full step running out of device memory
      res.add("errors", {"program": label, "error": repr(e)[:2000]})
  del variables
  times = common.interleaved(samplers, rounds)

  flops = model_flops(cfg, {**frozen, "layers": {**frozen["layers"], "gate": gates}},
                      batch * seq, seq)
  peak = peak_flops(res.data["environment"]["device_kind"]) if cfg.dtype == "bfloat16" else None
  floor = times.get("frozen floor")
  for label, t in times.items():
    work = flops["full"] if label == "full step" else flops["no_weight_grad"]
    row = dict(program=label, step_s=t["median_s"], step_min_s=t["min_s"],
               tokens_per_s=batch * seq / t["median_s"], model_flops=work,
               flops_per_s=work / t["median_s"])
    row["mfu"] = row["flops_per_s"] / peak if peak else None
    if floor:
      row["x_floor"] = t["median_s"] / floor["median_s"]
    if label == "gate step, dense attention" and "gate step" in times:
      row["x_blocked_gate_step"] = t["median_s"] / times["gate step"]["median_s"]
    res.add("rows", row)
  gate_row = next((r for r in res.data["rows"] if r["program"] == "gate step"), None)
  x = gate_row.get("x_floor") if gate_row else None
  res.set("targets", {"gate_step_le_1.15x_frozen_floor": {"met": None if x is None else x <= 1.15,
                                                          "value": x}})
  res.set("flops", flops)
  for e in res.data["errors"]:
    print(f"error: {e}")
  print(f"target gate step <= 1.15 x frozen floor: {common.fmt(None if x is None else x <= 1.15)}"
        f" ({common.fmt(x)})")
  print(f"\nTraining step, {name} ({cfg.num_layers} layers), batch {batch} x {seq} tokens, "
        f"{res.data['environment']['device_kind']}, peak {common.fmt(peak)} FLOP/s\n")
  print(common.markdown_table(
      ["program", "step ms", "x frozen floor", "x blocked gate step", "tokens/s",
       "model TFLOP/s", "MFU"],
      [[r["program"], 1e3 * r["step_s"], r.get("x_floor"), r.get("x_blocked_gate_step"),
        r["tokens_per_s"], r["flops_per_s"] / 1e12, r["mfu"]] for r in res.data["rows"]]))
  return res.data


def memory_report(res, gated, cfg, batch: int, seq: int, args) -> dict:
  """Compiled memory of the gate step (blocked and, unless --no-dense, dense attention)
  on abstract weights: nothing is allocated or run, so real model sizes fit on a laptop."""
  tx, schedule = step_lib.make_optimizer(1e-3, total_steps=1000)
  params = jax.eval_shape(lambda: init_variables(gated, jax.random.key(0)))["params"]
  gates, frozen = step_lib.split_params(params, "gates")
  state = jax.eval_shape(lambda g: step_lib.init_state(g, tx), gates)
  data = jax.eval_shape(lambda: make_batch_shapes(batch, seq))
  backends = {"gate step": None}
  if not args.no_dense:
    backends["gate step, dense attention"] = "dense"
  for label, backend in backends.items():
    step = jax.jit(step_lib.make_train_step(gated, tx, schedule, "gates", backend=backend),
                   donate_argnums=(0,))
    try:
      stats = step.lower(state, frozen, data).compile().memory_analysis()
      res.add("rows", dict(program=label, temp_bytes=stats.temp_size_in_bytes,
                           argument_bytes=stats.argument_size_in_bytes,
                           output_bytes=stats.output_size_in_bytes))
    except Exception as e:  # e.g. a compiler without memory analysis
      res.add("errors", {"program": label, "error": repr(e)[:2000]})
  for e in res.data["errors"]:
    print(f"error: {e}")
  print(f"\nGate-training step memory (compiled, abstract weights), {res.data['settings']['model']}"
        f" ({cfg.num_layers} layers), batch {batch} x {seq} tokens, remat {args.remat}, "
        f"{res.data['environment']['device_kind']}\n")
  print(common.markdown_table(
      ["program", "temporaries", "arguments", "outputs"],
      [[r["program"], common.gib(r["temp_bytes"]), common.gib(r["argument_bytes"]),
        common.gib(r["output_bytes"])] for r in res.data["rows"]]))
  return res.data


def make_batch_shapes(batch: int, seq: int) -> dict:
  """make_batch's arrays (for jax.eval_shape: only their shapes and dtypes are used)."""
  ints = jnp.zeros((batch, seq), jnp.int32)
  return {"tokens": ints, "targets": ints, "positions": ints, "segment_ids": ints,
          "loss_mask": jnp.zeros((batch, seq), jnp.float32)}


if __name__ == "__main__":
  main()
