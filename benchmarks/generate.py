"""End-to-end generation: tokens/s of `ag_jax.generate` vs a plain full-cache Python loop.

Variants, on one model with random weights, the same random prompts [B, P] and N new tokens,
greedy, no EOS (every row generates exactly N tokens):

  loop-full       `prefill(policy=Full())`, then N - 1 calls of the jitted `decode_step`
                  with an argmax in between: one dispatch per token, what a HF-style loop
                  does (N tokens: the first comes from the prefill logits, as in generate)
  generate-full   `generate(policy=Full())`: prefill + `lax.while_loop`, one program
  generate-ag@r   `generate(policy=AttentionGate(), budget=r)`: the gated model (random
                  gates, same base weights) keeping ceil(r x (P + N)) tokens per row

Time = one whole call, prompts on the host to tokens on the host, prefill included (median
over interleaved rounds, compilation excluded by a warm-up call); tokens/s = B x N / time.
loop-full and generate-full run the same gate-free model on the same full cache, so their
tokens must be identical; a difference is recorded as an error. "cache" is every buffer the
final cache holds (K/V, bookkeeping and, for AG, the gate's fp32 ring over the whole context,
which outweighs the K/V saved on the tiny model); "kv" is the K/V buffers alone.

  python benchmarks/generate.py --size tiny --out generate.json
"""

from __future__ import annotations

import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from ag_jax import engine  # noqa: E402
from ag_jax.config import GateConfig, preset  # noqa: E402
from ag_jax.model import Llama, init_variables  # noqa: E402
from ag_jax.policies import AttentionGate, Full  # noqa: E402
from decode import without_gate  # noqa: E402

SIZES = {
    "tiny": dict(model="tiny", batch=4, prompt_len=512, new_tokens=64, rounds=5),
    "accelerator": dict(model="llama3_2_1b", batch=8, prompt_len=4096, new_tokens=128, rounds=3),
}
RATIOS = "0.5,0.25"


def loop_full(model, variables, prompts, new_tokens: int):
  """prompts [B, P] -> (tokens [B, N] on the host, final cache). One dispatch per token and
  no host sync until the end: the best a plain loop can do without fusing the steps."""
  logits, cache = engine.prefill(model, variables, prompts, policy=Full(),
                                 max_new_tokens=new_tokens)  # logits [B, V]
  token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B], as greedy `sample`
  out = [token]
  for _ in range(new_tokens - 1):
    logits, cache = engine.decode_step(model, variables, cache, token)  # cache donated
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out.append(token)
  return np.asarray(jnp.stack(out, axis=1)), cache


def main(argv=None):
  p = common.parser(__doc__.split("\n\n")[0])
  p.add_argument("--model", help="model preset (default: tiny, or llama3_2_1b on an accelerator)")
  p.add_argument("--batch", type=int, help="prompts per batch (B)")
  p.add_argument("--prompt-len", type=int, help="tokens per prompt (P)")
  p.add_argument("--new-tokens", type=int, help="tokens generated per prompt (N)")
  p.add_argument("--ratios", default=RATIOS, help=f"AG budgets, kept / context (default {RATIOS})")
  args = p.parse_args(argv)
  size = common.resolve_size(args.size)
  d = SIZES[size]
  name = args.model or d["model"]
  batch, prompt_len = args.batch or d["batch"], args.prompt_len or d["prompt_len"]
  new_tokens, rounds = args.new_tokens or d["new_tokens"], args.rounds or d["rounds"]
  ratios = common.floats(args.ratios)
  res = common.Results(args.out, "generate", dict(
      size=size, model=name, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
      ratios=ratios, rounds=rounds, sampling="greedy", eos="none"))

  cfg = preset(name)
  gated, plain = Llama(cfg, gate=GateConfig()), Llama(cfg)
  v_gated = init_variables(gated, jax.random.key(0))
  v_plain = without_gate(v_gated)  # the same base weight arrays, no gates
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)  # [B, P]

  # name -> a call returning (tokens [B, N], cache bytes, kv bytes, capacity)
  calls = {"loop-full": lambda: _loop_call(plain, v_plain, prompts, new_tokens),
           "generate-full": lambda: _generate_call(plain, v_plain, prompts, new_tokens, Full(),
                                                   None)}
  for r in ratios:
    calls[f"generate-ag@{r:g}"] = lambda r=r: _generate_call(gated, v_gated, prompts, new_tokens,
                                                             AttentionGate(), r)

  # Warm-up: compiles (and allocates) once, so the rounds time running only.
  warm, runs = {}, {}
  for label, call in calls.items():
    if args.budget_s and res.elapsed() > args.budget_s:
      res.add("skipped", {"variant": label, "reason": "time budget"})
      continue
    try:
      start = time.perf_counter()
      warm[label] = call()
      warm[label]["first_call_s"] = time.perf_counter() - start
      runs[label] = common.timed(call)
    except Exception as e:  # e.g. out of memory at accelerator sizes: recorded, the rest run
      res.add("errors", {"variant": label, "error": repr(e)[:2000]})
    print(f"{label}: warmed up at {res.elapsed():.0f}s", flush=True)
  times = common.interleaved(runs, rounds)

  loop = warm.get("loop-full")
  if loop is not None and "generate-full" in warm:
    if not np.array_equal(loop["tokens"], warm["generate-full"]["tokens"]):
      diff = np.argwhere(loop["tokens"] != warm["generate-full"]["tokens"])
      res.add("errors", {"variant": "generate-full", "error": "tokens differ from loop-full; "
                         f"first (row, step) differing: {diff[0].tolist()}, "
                         f"{len(diff)} of {loop['tokens'].size} tokens differ"})
  for label, t in times.items():
    w, sec = warm[label], t["median_s"]
    row = dict(variant=label, seconds=sec, min_s=t["min_s"], max_s=t["max_s"],
               tokens_per_s=batch * new_tokens / sec, capacity=w["capacity"],
               context=prompt_len + new_tokens, cache_bytes=w["cache_bytes"],
               kv_bytes=w["kv_bytes"], first_call_s=w["first_call_s"],
               # generate measures its compilation; for the loop: first call - median run
               compile_s=w.get("compile_s", max(0.0, w["first_call_s"] - sec)))
    if loop is not None:
      row["speedup"] = times["loop-full"]["median_s"] / sec
      # Token equality is the check for the full cache; with eviction, agreement is a number.
      row["token_agreement"] = float(np.mean(loop["tokens"] == w["tokens"]))
      row["same_tokens_as_loop"] = (bool(np.array_equal(loop["tokens"], w["tokens"]))
                                    if label.endswith("-full") else None)
    res.add("rows", row)

  for s in res.data["skipped"]:
    print(f"skipped: {s}")
  for e in res.data["errors"]:
    print(f"error: {e}")
  headers = ["variant", "capacity", "s / run", "tok/s", "speedup", "compile s", "cache",
             "kv", "same tokens as loop", "token agreement"]
  print(f"\nGenerate, {name} random weights, B={batch} P={prompt_len} N={new_tokens}, greedy, "
        f"{res.data['environment']['device_kind']}, median of {rounds} rounds\n")
  print(common.markdown_table(headers, [
      [r["variant"], r["capacity"], r["seconds"], r["tokens_per_s"], r.get("speedup"),
       r["compile_s"], common.gib(r["cache_bytes"]), common.gib(r["kv_bytes"]),
       r.get("same_tokens_as_loop"), r.get("token_agreement")] for r in res.data["rows"]]))
  return res.data


def _loop_call(model, variables, prompts, new_tokens):
  tokens, cache = loop_full(model, variables, prompts, new_tokens)
  return dict(tokens=tokens, cache_bytes=cache.nbytes, kv_bytes=cache.kv_nbytes,
              capacity=int(cache.k.shape[3]) - 1)  # k: [L, B, K, capacity + 1, H]


def _generate_call(model, variables, prompts, new_tokens, policy, budget):
  out = engine.generate(model, variables, prompts, policy=policy, budget=budget,
                        max_new_tokens=new_tokens)  # greedy, no EOS: defaults
  # compile_s: exact on the first (compiling) call; later calls reuse the executable.
  return dict(tokens=out.tokens, cache_bytes=out.cache_bytes, kv_bytes=out.kv_bytes,
              capacity=out.capacity, compile_s=out.compile_seconds)


if __name__ == "__main__":
  main()
