"""`decode.py --prompts-file`: continuous batching over a prompt file (ag_jax.serving), each
result appended to `--output PATH.jsonl` as its row ends; a rerun resumes after the prompts
already written.

Every output line is one prompt: {id, prompt, generation, tokens, kept, stop, [answer,
correct], run}. `run` names what produced it (model, gates, policy, capacity, plan,
sampling); a rerun that would produce something else refuses to append to that file.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from ag_jax.config import ConfigError


def add_arguments(p) -> None:
  g = p.add_argument_group("continuous batching (with --prompts-file)")
  g.add_argument("--output", metavar="PATH.jsonl",
                 help="append each result as a JSON line as soon as its row ends; rerun with "
                      "the same --output to resume after the prompts already written")
  g.add_argument("--slots", type=int, help="sequences decoding at once (default --batch-size)")
  g.add_argument("--memory-gb", type=float, metavar="GB",
                 help="size the slots to fit this much cache memory (instead of --slots)")
  g.add_argument("--steps-per-sync", type=int, default=32, metavar="N",
                 help="decode steps between host checks when no row ends sooner (default 32)")


def check_args(args) -> None:
  if args.output and not args.prompts_file:
    raise ConfigError("--output streams the results of --prompts-file; give --prompts-file "
                      "(or use --json for --prompt)")
  if (args.slots is not None or args.memory_gb is not None) and not args.prompts_file:
    raise ConfigError("--slots and --memory-gb size continuous batching, which runs with "
                      "--prompts-file; with --prompt use --batch-size")
  if args.slots is not None and args.memory_gb is not None:
    raise ConfigError("give --slots or --memory-gb, not both")
  if args.slots is not None and args.slots < 1:
    raise ConfigError(f"--slots must be a positive integer, got {args.slots}")
  if args.memory_gb is not None and not args.memory_gb > 0:
    raise ConfigError(f"--memory-gb must be positive, got {args.memory_gb}")
  if args.steps_per_sync < 1:
    raise ConfigError(f"--steps-per-sync must be a positive integer, got {args.steps_per_sync}")
  if args.output:
    if not args.output.endswith(".jsonl"):
      raise ConfigError(f"--output {args.output!r}: results are JSON lines; give a path "
                        "ending in .jsonl")
    from ag_jax.batch_decode import check_writable
    check_writable(args.output, "--output")


def read_done(path: str, run: dict) -> tuple[dict, int]:
  """The results already in `path` by prompt id, and the byte length of its complete lines
  (an interrupted write can leave a partial last line: it is dropped and redone)."""
  if not os.path.exists(path):
    return {}, 0
  with open(path, "rb") as f:
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  done = {}
  for n, line in enumerate(complete.decode("utf-8", "replace").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      raise ConfigError(f"--output {path}:{n} is not a JSON line written by decode.py; "
                        "choose another --output") from None
    if not isinstance(row, dict) or "id" not in row or "run" not in row:
      raise ConfigError(f"--output {path}:{n} is not a result line of decode.py (no id or "
                        "run); choose another --output")
    if row["run"] != run:
      differs = sorted(k for k in set(run) | set(row["run"]) if row["run"].get(k) != run.get(k))
      raise ConfigError(f"--output {path} holds results of another run (it differs in "
                        f"{', '.join(differs)}); resume with the same flags and prompts file, "
                        "or give a new --output")
    done[row["id"]] = row
  return done, len(complete)


def run_file(args, model, variables, tokenizer, prompts, policy, sampling, max_new: int,
             budget) -> dict:
  """Decode `prompts` with a SlotEngine; -> {"summary", "generations"} (this run's rows)."""
  from tqdm import tqdm

  from ag_jax import serving
  from ag_jax.batch_decode import score_generation

  limits = [max_new if p.max_new_tokens is None else p.max_new_tokens for p in prompts]
  ids = [tokenizer.encode(p.text, add_bos=True) for p in prompts]
  kwargs = dict(slots=args.slots if args.memory_gb is None else None,
                memory_bytes=None if args.memory_gb is None else args.memory_gb * 2**30)
  if kwargs["slots"] is None and kwargs["memory_bytes"] is None:
    kwargs["slots"] = args.batch_size
  # Planned (and every check made) before the output file is touched.
  engine = serving.SlotEngine(
      model, variables, max_prompt_tokens=max(len(t) for t in ids), max_new_tokens=max(limits),
      policy=policy, capacity=args.capacity, budget=budget, sampling=sampling, seed=args.seed,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, backend=args.kernels,
      prefill_chunk=args.prefill_chunk, steps_per_sync=args.steps_per_sync, **kwargs)
  run = {"model": args.model or "default world", "gates": args.gates,
         "policy": engine.bound_policy.describe(), "capacity": engine.capacity,
         "context": engine.context, "max_new_tokens": max_new, "sampling": [
             args.temperature, args.top_k, args.top_p], "seed": args.seed,
         "prompts_file": os.path.basename(args.prompts_file)}
  done, keep_bytes = read_done(args.output, run) if args.output else ({}, 0)
  todo = [i for i, p in enumerate(prompts) if p.id not in done]
  # seed=i: a prompt samples with the same key whether or not the run was resumed.
  requests = (serving.Request(i, ids[i], limits[i], seed=i) for i in todo)

  out = None
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    out = open(args.output, "ab")
    out.truncate(keep_bytes)  # a partial last line from an interrupted run
  rows, generated, start = [], 0, time.perf_counter()
  bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="prompt",
             desc="decoding", file=sys.stderr, disable=args.quiet or len(todo) < 2)
  try:
    for c in engine.run(requests):
      p = prompts[c.id]
      text = tokenizer.decode(c.tokens)
      row = {"id": p.id, "prompt": p.text, "generation": text, "tokens": c.tokens,
             "kept": round(c.kept, 6), "stop": c.stop}
      if p.answer is not None:
        row["answer"], row["correct"] = p.answer, score_generation(text, p.answer)
      row["run"] = run
      if out is not None:
        out.write((json.dumps(row) + "\n").encode("utf-8"))
        out.flush()
      rows.append(row)
      generated += len(c.tokens)
      bar.update(1)
      bar.set_postfix(tokens_per_s=f"{generated / max(time.perf_counter() - start, 1e-9):.0f}")
  finally:
    bar.close()
    if out is not None:
      out.close()
  seconds = time.perf_counter() - start
  every = [*done.values(), *rows]
  summary = {
      "policy": run["policy"], "capacity": engine.capacity, "context": engine.context,
      "slots": engine.slots, "prompts": len(prompts), "prompts_now": len(rows),
      "prompts_before": len(prompts) - len(todo), "tokens_now": generated,
      "seconds": seconds, "tokens_per_second": generated / max(seconds, 1e-9),
      "cache_mib": engine.cache_bytes / 2**20, "full_kv_mib": engine.full_kv_bytes / 2**20,
      "kept": float(np.mean([r["kept"] for r in every])) if every else 0.0,
      "compiles": engine.compiles, "buckets": list(engine.buckets), "output": args.output,
      "gates": args.gates or ("default world" if args.model is None else None)}
  scored = [r["correct"] for r in every if "correct" in r]
  if scored:
    summary["accuracy"] = float(np.mean(scored))
  return {"summary": summary, "generations": rows}


def print_report(report: dict, quiet: bool = False, out=sys.stdout) -> None:
  from ag_jax.batch_decode import print_generations
  s = report["summary"]
  if not quiet:
    print_generations(report["generations"], out, with_id=True)
  gates = f"   gates: {s['gates']}" if s.get("gates") else ""
  print(f"policy: {s['policy']}   capacity: {s['capacity']} tokens per row, planned context "
        f"{s['context']}{gates}", file=out)
  print(f"continuous batching: {s['slots']} slots, {s['compiles']} compiled programs "
        f"(prefill widths {', '.join(map(str, s['buckets']))})", file=out)
  before = f" ({s['prompts_before']} already in {s['output']})" if s["prompts_before"] else ""
  print(f"prompts: {s['prompts_now']} decoded now{before}; {s['tokens_now']} tokens in "
        f"{s['seconds']:.1f} s: {s['tokens_per_second']:.1f} tokens/s (compilation included)",
        file=out)
  print(f"KV cache: {s['cache_mib']:.3f} MiB for {s['slots']} slots (all buffers) vs "
        f"{s['full_kv_mib']:.3f} MiB of full k/v "
        f"({100 * s['cache_mib'] / max(s['full_kv_mib'], 1e-12):.1f}%); kept "
        f"{100 * s['kept']:.1f}% of the tokens seen", file=out)
  if "accuracy" in s:
    print(f"accuracy: {100 * s['accuracy']:.1f}% ({s['prompts']} prompts)", file=out)
