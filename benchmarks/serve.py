"""Serving throughput: continuous batching (ag_jax.serving) vs static batches, Full vs AG,
under one cache-memory limit.

A few hundred random prompts of mixed lengths, each with its own answer length (greedy, no
EOS: row i generates exactly its m_i tokens), one model with random weights (AG: random
gates, the same base weights). The memory limit is what `--full-slots` Full slots need;
each policy then runs as many slots as fit in it, every slot planned for the longest
prompt + the longest answer with capacity budget x that context.

  continuous  SlotEngine: a finished row's slot is refilled with the next prompt at once
  static      `generate` on batches of `slots` prompts in order, padded to the batch's
              longest prompt, decoding until its longest answer ends (the extra tokens of
              short answers are not counted); one compilation per batch shape

Time: the whole run over the prompt set (median over interleaved rounds), prefill included, compilation excluded (a warm-up
compiles every prefill width first; `generate` times its compilation apart). tokens/s
counts the m_i requested tokens only; TPOT (time per output token) is each prompt's time
from its prefill to its end over its tokens, the median over prompts (continuous only).

  python benchmarks/serve.py --size tiny --out serve.json
  python benchmarks/serve.py --size accelerator        # Llama-3.2-1B shapes, lent GPU
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from ag_jax import engine, serving  # noqa: E402
from ag_jax.config import preset  # noqa: E402
from ag_jax.model import Llama, init_variables  # noqa: E402
from ag_jax.policies import AttentionGate, Full  # noqa: E402
from decode import without_gate  # noqa: E402

SIZES = {
    "tiny": dict(model="tiny", prompts=64, prompt_lens=(512, 1536), answer_lens=(64, 512),
                 full_slots=8, chunk=512, rounds=1),
    "accelerator": dict(model="llama3_2_1b", prompts=384, prompt_lens=(1024, 6144),
                        answer_lens=(128, 1024), full_slots=16, chunk=1024, rounds=1),
}
BUDGETS = "0.5,0.25"


def workload(n: int, prompt_lens, answer_lens, vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(prompt_lens[0], prompt_lens[1] + 1, n)
  answers = rng.integers(answer_lens[0], answer_lens[1] + 1, n)
  return [serving.Request(i, rng.integers(1, vocab, int(p)).tolist(), int(a))
          for i, (p, a) in enumerate(zip(lengths, answers))]


def run_continuous(eng: serving.SlotEngine, requests) -> dict:
  start = time.perf_counter()
  done = list(eng.run(requests))
  seconds = time.perf_counter() - start
  tokens = sum(len(c.tokens) for c in done)
  assert tokens == sum(r.max_new_tokens for r in requests)  # no EOS: every limit is met
  return dict(seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds,
              tpot_ms=1e3 * float(np.median([c.seconds / len(c.tokens) for c in done])))


def run_static(model, variables, requests, policy, capacity, slots, chunk) -> dict:
  seconds, tokens, shapes = 0.0, 0, set()
  for i in range(0, len(requests), slots):
    batch = requests[i:i + slots]
    new = max(r.max_new_tokens for r in batch)
    out = engine.generate(model, variables, [r.tokens for r in batch], policy=policy,
                          capacity=capacity, max_new_tokens=new, prefill_chunk=chunk)
    seconds += out.run_seconds  # compilation excluded, as for continuous
    tokens += sum(r.max_new_tokens for r in batch)
    shapes.add((max(len(r.tokens) for r in batch), new))
  return dict(seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds, tpot_ms=None,
              compiles=len(shapes))


def main(argv=None):
  p = common.parser(__doc__.split("\n\n")[0])
  p.add_argument("--model", help="model preset (default: tiny, or llama3_2_1b on an accelerator)")
  p.add_argument("--prompts", type=int, help="number of prompts")
  p.add_argument("--full-slots", type=int, help="the memory limit: what this many Full slots need")
  p.add_argument("--budgets", default=BUDGETS, help=f"AG budgets (default {BUDGETS})")
  p.add_argument("--prompt-lens", help="MIN,MAX prompt tokens (uniform)")
  p.add_argument("--answer-lens", help="MIN,MAX answer tokens (uniform)")
  p.add_argument("--prefill-chunk", type=int, help="prefill chunk (0: one-shot)")
  p.add_argument("--no-static", action="store_true", help="skip the static-batching runs")
  common.add_gate_window(p)
  args = p.parse_args(argv)
  size = common.resolve_size(args.size)
  d = dict(SIZES[size])
  for key in ("prompt_lens", "answer_lens"):
    if getattr(args, key):
      d[key] = tuple(common.ints(getattr(args, key)))
  if args.prefill_chunk is not None:
    d["chunk"] = args.prefill_chunk or None
  name, n = args.model or d["model"], args.prompts or d["prompts"]
  full_slots = args.full_slots or d["full_slots"]
  budgets = common.floats(args.budgets)
  rounds = args.rounds or d["rounds"]
  cfg = preset(name)
  max_prompt, max_new = d["prompt_lens"][1], d["answer_lens"][1]
  cfg = dataclasses.replace(cfg, max_position=max(cfg.max_position, max_prompt + max_new))
  gate_cfg = common.gate_config(args.gate_window)
  res = common.Results(args.out, "serve", dict(
      size=size, model=name, prompts=n, prompt_lens=d["prompt_lens"],
      answer_lens=d["answer_lens"], full_slots=full_slots, budgets=budgets,
      prefill_chunk=d["chunk"], rounds=rounds, gate=dataclasses.asdict(gate_cfg), sampling="greedy",
      eos="none"))
  gated, plain = Llama(cfg, gate=gate_cfg), Llama(cfg)
  v_gated = init_variables(gated, jax.random.key(0))
  v_plain = without_gate(v_gated)
  requests = workload(n, d["prompt_lens"], d["answer_lens"], cfg.vocab_size)

  common_kw = dict(max_prompt_tokens=max_prompt, max_new_tokens=max_new,
                   prefill_chunk=d["chunk"])
  full_slot = serving.SlotEngine(plain, v_plain, slots=1, policy=Full(), **common_kw).slot_bytes
  limit = full_slots * full_slot
  variants = [("full", plain, v_plain, Full(), None)]
  variants += [(f"ag@{b:g}", gated, v_gated, AttentionGate(), b) for b in budgets]
  engines = {}
  for label, model, variables, policy, budget in variants:
    eng = serving.SlotEngine(model, variables, memory_bytes=limit, policy=policy, budget=budget,
                             **common_kw)
    # Warm-up: one prompt per prefill width compiles everything the timed runs use.
    list(eng.run([serving.Request(f"w{w}", [1] * w, 2) for w in eng.buckets]))
    engines[label] = (eng, model, variables, policy)
  # Rounds: each runs every variant once, so a noisy neighbour slows all of them alike.
  runs = {label: {"continuous": [], "static": []} for label in engines}
  for r in range(rounds):
    for label, (eng, model, variables, policy) in engines.items():
      if args.budget_s and res.elapsed() > args.budget_s:
        res.add("skipped", {"variant": label, "round": r, "reason": "time budget"})
        continue
      runs[label]["continuous"].append(run_continuous(eng, requests))
      if not args.no_static:
        runs[label]["static"].append(run_static(model, variables, requests, policy,
                                                eng.capacity, eng.slots, d["chunk"]))
      print(f"round {r} {label}: {eng.slots} slots, continuous "
            f"{runs[label]['continuous'][-1]['tokens_per_s']:.0f} tokens/s at "
            f"{res.elapsed():.0f}s", flush=True)
  for label, (eng, *_) in engines.items():
    if not runs[label]["continuous"]:
      continue
    row = dict(variant=label, slots=eng.slots, capacity=eng.capacity, context=eng.context,
               slot_bytes=eng.slot_bytes, cache_bytes=eng.cache_bytes, limit_bytes=limit,
               compiles=eng.compiles, rounds=len(runs[label]["continuous"]))
    for mode, done in runs[label].items():
      if done:  # the round with the median time
        row[mode] = sorted(done, key=lambda x: x["seconds"])[(len(done) - 1) // 2]
    res.add("rows", row)

  rows = res.data["rows"]
  full = next((r for r in rows if r["variant"] == "full"), None)
  table = []
  for r in rows:
    c, s = r["continuous"], r.get("static")
    table.append([r["variant"], r["slots"], r["capacity"], common.gib(r["cache_bytes"]),
                  None if full is None else r["slots"] / full["slots"], c["tokens_per_s"],
                  None if full is None else c["tokens_per_s"] / full["continuous"]["tokens_per_s"],
                  c["tpot_ms"], None if s is None else s["tokens_per_s"],
                  None if s is None else c["tokens_per_s"] / s["tokens_per_s"]])
  print(f"\nServing {n} prompts of {d['prompt_lens'][0]}-{d['prompt_lens'][1]} tokens, answers "
        f"{d['answer_lens'][0]}-{d['answer_lens'][1]}, {name} random weights, memory limit "
        f"{common.gib(limit)} (= {full_slots} Full slots), "
        f"{res.data['environment']['device_kind']}\n")
  print(common.markdown_table(
      ["policy", "slots", "capacity", "cache", "slots / full", "tok/s continuous",
       "vs full", "TPOT ms", "tok/s static", "continuous / static"], table))
  return res.data


if __name__ == "__main__":
  main()
