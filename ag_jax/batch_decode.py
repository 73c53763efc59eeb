"""Batch generation from the command line (`python decode.py`): load, generate, report.

Prints each generation and a KV table (kept % per layer, cache MiB vs full MiB, tokens/s).
Prompts with known answers (the recall world, or jsonl with an `answer` field) are scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from ag_jax import atomic_io

DESCRIPTION = """\
Batch generation with a physically evicting KV cache.

With no arguments: the embedded default world (a tiny byte-level Llama and its trained
gates, shipped in ag_jax/assets) answers recall questions from its test split with
Attention-Gate eviction, and prints accuracy and the KV memory kept.

Examples:
  python decode.py
  python decode.py --policy full                       # the same prompts, no eviction
  python decode.py --model /models/Llama-2-7b-hf --gates runs/cpt/gates \\
      --prompt "The capital of France is" --budget 0.5 --max-new-tokens 32
  python decode.py --model tiny --prompt "hello" --policy streaming_llm \\
      --policy-arg sink=4 --capacity 64
"""


def add_model_arguments(p: argparse.ArgumentParser, title: str = "model"):
  """--model, --gates, --tokenizer, --dtype: what `load_model` reads (shared with evaluate)."""
  src = p.add_argument_group(title)
  src.add_argument("--model", help="an HF Llama directory (config.json + safetensors) or a preset "
                   "name from configs/models (random weights). Default: the embedded world")
  src.add_argument("--gates", help="a trained gate directory (gates.safetensors + gate_config.json)")
  src.add_argument("--tokenizer", help="'bytes' or a tokenizer.json directory "
                   "(default: the model directory, or bytes for presets)")
  src.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and compute dtype for HF models (default float32)")
  return src


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="decode.py", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_arguments(p)
  pr = p.add_argument_group("prompts")
  pr.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  pr.add_argument("--prompts-file", help="a .txt file (one prompt per line) or .jsonl "
                  "(fields: prompt, optional answer)")
  pr.add_argument("--num-prompts", type=int, default=64,
                  help="default world: how many test-split prompts (default 64)")
  ev = p.add_argument_group("eviction")
  ev.add_argument("--policy", default=None, help="ag (default with gates), full, or a baseline: "
                  "streaming_llm, h2o, snapkv, random, local")
  ev.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                  help="a policy knob, e.g. sink=4 or window=32 (repeatable)")
  ev.add_argument("--capacity", type=int, help="kept tokens per layer, sequence and KV head")
  ev.add_argument("--budget", type=float,
                  help="capacity as a fraction of prompt + new tokens, e.g. 0.25")
  gen = p.add_argument_group("generation")
  gen.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate per prompt (default 32; default world: 4)")
  gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  gen.add_argument("--top-k", type=int, default=0)
  gen.add_argument("--top-p", type=float, default=1.0)
  gen.add_argument("--batch-size", type=int, default=16)
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--kernels", default=None,
                   help="kernel backend: auto (default), reference, interpret, tpu, gpu")
  out = p.add_argument_group("output")
  out.add_argument("--json", metavar="PATH", help="also write every generation and the KV "
                   "statistics as JSON ('-' for stdout)")
  out.add_argument("--quiet", action="store_true", help="print only the summary")
  return p


@dataclass
class Prompt:
  text: str
  answer: str | None = None


def read_prompts(args) -> list[Prompt]:
  prompts = [Prompt(t) for t in args.prompt]
  if args.prompts_file:
    if not os.path.exists(args.prompts_file):
      raise FileNotFoundError(f"prompts file {args.prompts_file!r} does not exist")
    with open(args.prompts_file) as f:
      if args.prompts_file.endswith(".jsonl"):
        for n, line in enumerate(f, 1):
          if line.strip():
            row = json.loads(line)
            if "prompt" not in row:
              raise ValueError(f"{args.prompts_file}:{n} has no 'prompt' field")
            prompts.append(Prompt(row["prompt"], row.get("answer")))
      else:
        prompts += [Prompt(line.rstrip("\n")) for line in f if line.strip()]
  return prompts


def load_model(args):
  """-> (model, variables, tokenizer); no --model: the embedded default world."""
  import jax
  import ag_jax
  from ag_jax import config as config_lib

  if args.model is None:
    from ag_jax import default_world
    model, variables, tokenizer = default_world.load_default()
    return model, variables, tokenizer
  if os.path.isdir(args.model):
    import jax.numpy as jnp
    cfg, params = ag_jax.load_hf_llama(args.model, dtype=jnp.dtype(args.dtype))
    tokenizer = ag_jax.load_tokenizer(args.tokenizer or args.model)
  else:
    cfg = config_lib.preset(args.model)
    params = ag_jax.init_variables(ag_jax.Llama(cfg), jax.random.key(args.seed))["params"]
    tokenizer = ag_jax.load_tokenizer(args.tokenizer or "bytes")
  gate = None
  if args.gates:
    gate, gate_params = ag_jax.load_gates(args.gates, model_cfg=cfg)
    params = {**params, "layers": {**params["layers"], "gate": gate_params}}
  return ag_jax.Llama(cfg, gate=gate), {"params": params}, tokenizer


def make_policy(args, model):
  from ag_jax import config as config_lib
  from ag_jax import engine, policies
  if args.policy is None:
    if args.policy_arg:
      raise ValueError("--policy-arg needs --policy")
    return engine.default_policy(model)
  knobs = config_lib.parse_overrides(args.policy_arg)
  return policies.make_policy(args.policy, **knobs)


def _abridge(text: str, width: int = 72) -> str:
  text = text.replace("\n", "⏎")
  return text if len(text) <= width else text[: width // 3] + " … " + text[-(2 * width // 3):]


def run(args) -> dict:
  import ag_jax
  from ag_jax.sampling import SamplingConfig
  from tqdm import tqdm

  model, variables, tokenizer = load_model(args)
  prompts = read_prompts(args)
  if args.model is None and not prompts:
    from ag_jax import default_world
    prompts = [Prompt(p, a) for p, a in default_world.test_prompts(args.num_prompts)]
  if not prompts:
    raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
  max_new = args.max_new_tokens or (4 if args.model is None else 32)
  budget = args.budget
  if args.model is None and budget is None and args.capacity is None and args.policy in (None, "ag"):
    from ag_jax import default_world
    budget = default_world.default_budget()
  policy = make_policy(args, model)
  sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
  rows, stats = [], []
  batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
  for batch in tqdm(batches, desc="generating", unit="batch", disable=len(batches) < 2 or args.quiet,
                    file=sys.stderr):
    ids = [tokenizer.encode(p.text, add_bos=True) for p in batch]
    result = ag_jax.generate(model, variables, ids, policy=policy, max_new_tokens=max_new,
                             capacity=args.capacity, budget=budget, sampling=sampling,
                             seed=args.seed, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                             backend=args.kernels)
    stats.append(result)
    for p, text in zip(batch, result.texts(tokenizer)):
      row = {"prompt": p.text, "generation": text}
      if p.answer is not None:
        from ag_jax.data.recall import score_answer
        row["answer"], row["correct"] = p.answer, bool(score_answer(text, p.answer))
      rows.append(row)
  return summarize(rows, stats, policy, tokenizer)


def summarize(rows, stats, policy, tokenizer) -> dict:
  weights = np.array([len(r.tokens) for r in stats], np.float64)
  kept = np.average(np.stack([r.kept_ratio for r in stats]), axis=0, weights=weights)  # [L, K]
  generated = sum(int(r.num_generated.sum()) for r in stats)
  run_seconds = sum(r.run_seconds for r in stats)
  summary = {
      "policy": stats[0].policy, "capacity": stats[0].capacity, "prompts": len(rows),
      "kept_per_layer": kept.mean(axis=1).tolist(), "kept_per_layer_head": kept.tolist(),
      "kept": float(kept.mean()),
      "cache_mib": max(r.cache_bytes for r in stats) / 2**20,
      "kv_mib": max(r.kv_bytes for r in stats) / 2**20,
      "gate_cache_mib": max(r.gate_cache_bytes for r in stats) / 2**20,
      "full_kv_mib": max(r.full_kv_bytes for r in stats) / 2**20,
      "tokens_per_second": generated / max(run_seconds, 1e-9),
      "compile_seconds": sum(r.compile_seconds for r in stats),
  }
  scored = [r["correct"] for r in rows if "correct" in r]
  if scored:
    summary["accuracy"] = float(np.mean(scored))
  return {"summary": summary, "generations": rows}


def print_report(report: dict, quiet: bool = False, out=sys.stdout):
  s = report["summary"]
  if not quiet:
    for r in report["generations"]:
      mark = "" if "correct" not in r else ("  ✓" if r["correct"] else f"  ✗ (answer {r['answer']!r})")
      print(f"» {_abridge(r['prompt'])}\n  → {r['generation']!r}{mark}", file=out)
    print(file=out)
  print(f"policy: {s['policy']}   capacity: {s['capacity']} tokens per row", file=out)
  print("| layer | kept % |", file=out)
  print("|---:|---:|", file=out)
  for i, k in enumerate(s["kept_per_layer"]):
    print(f"| {i} | {100 * k:.1f} |", file=out)
  print(f"| all | {100 * s['kept']:.1f} |", file=out)
  print(f"KV cache: {s['kv_mib']:.3f} MiB allocated vs {s['full_kv_mib']:.3f} MiB full "
        f"({100 * s['kv_mib'] / max(s['full_kv_mib'], 1e-12):.1f}%); gate cache "
        f"{s['gate_cache_mib']:.3f} MiB; all cache buffers {s['cache_mib']:.3f} MiB", file=out)
  print(f"speed: {s['tokens_per_second']:.1f} tokens/s (compile {s['compile_seconds']:.1f} s "
        "not counted)", file=out)
  if "accuracy" in s:
    print(f"accuracy: {100 * s['accuracy']:.1f}% ({s['prompts']} prompts)", file=out)


def write_json(report: dict, path: str):
  if path == "-":
    json.dump(report, sys.stdout, indent=2)
    print()
    return
  atomic_io.write_text(path, json.dumps(report, indent=2))


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    report = run(args)
  except (ValueError, FileNotFoundError) as e:  # our input errors all derive from these
    print(f"error: {e}", file=sys.stderr)
    return 2
  print_report(report, quiet=args.quiet or args.json == "-",
               out=sys.stderr if args.json == "-" else sys.stdout)
  if args.json:
    write_json(report, args.json)
  return 0
