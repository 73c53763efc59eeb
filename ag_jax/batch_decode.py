"""Batch generation from the command line (`python decode.py`): load, generate, report.

Prints each generation and a KV table (kept % per layer, cache MiB vs full MiB, tokens/s).
Prompts with known answers (the default world, or jsonl with an `answer` field) are scored.
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

With no arguments: the embedded default world (a tiny Llama over a BPE of Python's standard
library, and its trained gates, shipped in ag_jax/assets) answers RULER-style questions
from its test split (magic numbers hidden in 512 tokens of stdlib code: the tasks, length
and default budget are in ag_jax/assets/ruler_tiny/world.json) with Attention-Gate
eviction, and prints each answer, the accuracy and the KV memory kept.

Examples:
  python decode.py
  python decode.py --policy full                       # the same prompts, no eviction
  python decode.py --model /models/Llama-2-7b-hf --gates runs/cpt/gates \\
      --prompt "The capital of France is" --budget 0.5 --max-new-tokens 32
  python decode.py --model tiny --prompt "hello" --policy streaming_llm \\
      --policy-arg sink=4 --capacity 64
  python decode.py --model /models/Llama-3.2-1B --gates runs/gates --budget 0.25 \\
      --prompts-file prompts.jsonl --output results.jsonl --memory-gb 8

--prompt runs static batches of --batch-size prompts. --prompts-file runs continuous
batching: a fixed number of slots (--slots, or as many as fit in --memory-gb), each
refilled with the next prompt as soon as its sequence ends, every result appended to
--output as it ends (a rerun resumes after them). Under --budget each prompt keeps at most
budget x (its own tokens + max new tokens), in static batches and in slots alike (slots
are sized for the longest prompt), so a prompt's answer never depends on its neighbours.
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
                  "(fields: prompt, optional answer: a string the generation must start with, or a list "
                  "of items that must all occur in its first line)")
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
  ev.add_argument("--prefill-chunk", type=int, metavar="TOKENS",
                  help="prefill long prompts in chunks of this many tokens, each compacted into "
                       "the cache before the next: memory O(capacity + chunk) instead of O(prompt). "
                       "ag gives the one-shot result exactly; full, streaming_llm, local, random and "
                       "knorm do while nothing overflows (under a budget later chunks see only "
                       "the kept tokens); h2o, snapkv, tova and observed_attention score by the "
                       "whole prompt's attention and refuse it")
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
  from ag_jax import stream_decode
  stream_decode.add_arguments(p)
  return p


@dataclass
class Prompt:
  text: str
  answer: str | list[str] | None = None  # one string (a prefix match) or answer items
  id: object = None                  # a prompts file's "id" (jsonl) or line number
  max_new_tokens: int | None = None  # a jsonl line's own limit (continuous batching)


def _config_error(message: str):
  from ag_jax.config import ConfigError
  return ConfigError(message)


def check_args(args) -> None:
  """Checks of the flags alone, before anything is loaded or compiled."""
  positive = {"--max-new-tokens": args.max_new_tokens, "--batch-size": args.batch_size,
              "--num-prompts": args.num_prompts, "--capacity": args.capacity,
              "--prefill-chunk": args.prefill_chunk}
  for flag, value in positive.items():
    if value is not None and value < 1:
      raise _config_error(f"{flag} must be a positive integer, got {value}")
  if args.budget is not None and not 0.0 < args.budget <= 1.0:
    raise _config_error(f"--budget must be a fraction in (0, 1], got {args.budget}")
  if args.temperature < 0:
    raise _config_error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
  if args.top_k < 0:
    raise _config_error(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
  if not 0.0 < args.top_p <= 1.0:
    raise _config_error(f"--top-p must be in (0, 1], got {args.top_p}")
  if args.prompt and args.prompts_file:
    raise _config_error("give --prompt (static batches) or --prompts-file (continuous "
                        "batching), not both")
  if args.policy_arg and args.policy is None:
    raise _config_error("--policy-arg needs --policy (e.g. --policy streaming_llm --policy-arg sink=4)")
  if args.json and args.json != "-":
    check_writable(args.json, "--json")
  from ag_jax import stream_decode
  stream_decode.check_args(args)


def check_writable(path: str, flag: str) -> None:
  """`path` can be written (probed in its nearest existing folder), before the run starts."""
  import tempfile
  if os.path.isdir(path):
    raise _config_error(f"{flag} {path!r} is a directory; give a file path, e.g. {path}/out.json")
  folder = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise _config_error(f"{flag} {path!r} cannot be written: {folder!r} is a file, not a folder; "
                        "choose another path")
  try:
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise _config_error(f"{flag} {path!r} cannot be written ({e.strerror} in {folder!r}); choose a "
                        "writable path") from None


def read_prompts(args) -> list[Prompt]:
  prompts = [Prompt(t, id=i) for i, t in enumerate(args.prompt)]
  if args.prompts_file:
    path = args.prompts_file
    if not os.path.isfile(path):
      raise _config_error(f"prompts file {path!r} does not exist")
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    except UnicodeDecodeError:
      raise _config_error(f"prompts file {path!r} is not UTF-8 text") from None
    if path.endswith(".jsonl"):
      for n, line in enumerate(lines, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise _config_error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each "
                              'line must be an object like {"prompt": "...", "answer": "..."}') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
          raise _config_error(f"{path}:{n}: each line must be a JSON object with a string "
                              "'prompt' field (and optionally 'answer', 'id', 'max_new_tokens')")
        answer, limit, ident = row.get("answer"), row.get("max_new_tokens"), row.get("id", n)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
          raise _config_error(f"{path}:{n}: max_new_tokens must be a positive integer, got "
                              f"{limit!r}")
        if isinstance(ident, bool) or not isinstance(ident, (int, str)):
          raise _config_error(f"{path}:{n}: id must be a string or an integer, got {ident!r}")
        if isinstance(answer, list) and not (answer and all(isinstance(a, str) for a in answer)):
          raise _config_error(f"{path}:{n}: answer must be a string or a non-empty list of "
                              f"strings (answer items), got {answer!r}")
        if answer is not None and not isinstance(answer, list):
          answer = str(answer)
        prompts.append(Prompt(row["prompt"], answer, ident, limit))
    else:
      prompts += [Prompt(line, id=n) for n, line in enumerate(lines, 1) if line.strip()]
  seen = set()
  for p in prompts:
    if p.id in seen:
      raise _config_error(f"{args.prompts_file}: prompt id {p.id!r} appears twice; every "
                          "prompt needs its own id (a jsonl 'id' field, or the line number)")
    seen.add(p.id)
  return prompts


# Answers of the default world end with EOS; its longest (vt: five names, each after "the
# variables assigned X are") is ~37 tokens.
DEFAULT_WORLD_NEW_TOKENS = 48


def load_model(args):
  """-> (model, variables, tokenizer); no --model: the embedded default world."""
  import jax
  import ag_jax
  from ag_jax import config as config_lib

  if args.model is None:
    from ag_jax import default_world
    if args.gates is None:
      return default_world.load_default()
    # --gates without --model: the gates run on the default world's base model, which they
    # must have been trained for (load_gates checks), never silently the built-in gates.
    model, variables, tokenizer = default_world.load_default(with_gates=False)
    gate, gate_params = ag_jax.load_gates(args.gates, model_cfg=model.cfg)
    params = variables["params"]
    params = {**params, "layers": {**params["layers"], "gate": gate_params}}
    return ag_jax.Llama(model.cfg, gate=gate), {"params": params}, tokenizer
  looks_like_path = os.sep in args.model or args.model.startswith((".", "~"))
  if os.path.isdir(args.model):
    import jax.numpy as jnp
    cfg, params = ag_jax.load_hf_llama(args.model, dtype=jnp.dtype(args.dtype))
    tokenizer = _tokenizer(args.tokenizer or args.model)
  elif looks_like_path and not args.model.endswith((".yaml", ".yml")):
    raise _config_error(f"--model {args.model!r}: no such model directory; pass a local HF model "
                        "directory (config.json + *.safetensors) or a preset name such as tiny")
  else:
    if args.gates and not os.path.exists(args.gates):
      raise _config_error(f"--gates {args.gates!r} does not exist; pass a gate export directory "
                          "(gates.safetensors + gate_config.json)")
    cfg = config_lib.preset(args.model)
    params = ag_jax.init_variables(ag_jax.Llama(cfg), jax.random.key(args.seed))["params"]
    tokenizer = _tokenizer(args.tokenizer or "bytes")
  gate = None
  if args.gates:
    gate, gate_params = ag_jax.load_gates(args.gates, model_cfg=cfg)
    params = {**params, "layers": {**params["layers"], "gate": gate_params}}
  return ag_jax.Llama(cfg, gate=gate), {"params": params}, tokenizer


def _tokenizer(spec: str):
  import ag_jax
  try:
    return ag_jax.load_tokenizer(spec)
  except (FileNotFoundError, OSError, ValueError) as e:
    raise _config_error(f"--tokenizer {spec!r}: {e}") from None


def _knob_fits(value, hint) -> bool:
  import typing
  if hint is typing.Any:
    return True
  if typing.get_origin(hint) is typing.Union:
    return any(_knob_fits(value, h) for h in typing.get_args(hint))
  if hint is type(None):
    return value is None
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, hint) if isinstance(hint, type) else True


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               type(None): "null"}


def parse_policy_args(policy: str, items) -> dict:
  """`["window=32"]` -> {"window": 32}, each value checked against the policy's knob type."""
  import typing

  import yaml

  from ag_jax import policies
  key = policy.lower().replace("-", "_")
  if key not in policies.REGISTRY:
    raise policies.PolicyError(f"unknown policy {policy!r}; known policies: "
                               f"{', '.join(sorted(policies.REGISTRY))}")
  cls = policies.REGISTRY[key]
  hints = typing.get_type_hints(cls)
  knobs = {}
  for item in items:
    name, sep, raw = item.partition("=")
    name = name.strip()
    if not sep or not name:
      raise _config_error(f"--policy-arg {item!r} is not KEY=VALUE (e.g. window=32)")
    if name not in hints:
      known = [f.name for f in __import__("dataclasses").fields(cls)]
      raise policies.PolicyError(f"policy {key!r} has no knob {name}; its knobs: "
                                 f"{', '.join(known) or 'none'}")
    try:
      value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
      value = raw
    if not _knob_fits(value, hints[name]):
      hint = hints[name]
      options = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
      expected = " or ".join(_TYPE_WORDS.get(o, getattr(o, "__name__", str(o))) for o in options)
      raise policies.PolicyError(f"--policy-arg {item!r}: the {key} knob {name} needs "
                                 f"{expected}, got {raw!r}")
    knobs[name] = value
  return knobs


def make_policy(args, model):
  from ag_jax import engine, policies
  if args.policy is None:
    if args.policy_arg:
      raise _config_error("--policy-arg needs --policy")
    return engine.default_policy(model)
  return policies.make_policy(args.policy, **parse_policy_args(args.policy, args.policy_arg))


def _abridge(text: str, width: int = 72) -> str:
  text = text.replace("\n", "⏎")
  return text if len(text) <= width else text[: width // 3] + " … " + text[-(2 * width // 3):]


def run(args) -> dict:
  import ag_jax
  from ag_jax.sampling import SamplingConfig
  from tqdm import tqdm

  check_args(args)
  prompts = read_prompts(args)
  if args.prompts_file and not prompts:
    raise _config_error(f"prompts file {args.prompts_file!r} holds no prompts")
  if args.model is not None and not prompts:
    raise _config_error("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
  if args.policy is not None:
    parse_policy_args(args.policy, args.policy_arg)  # knob errors before any weights load
  model, variables, tokenizer = load_model(args)
  if args.model is None and not prompts:
    from ag_jax import default_world
    prompts = [Prompt(p, a) for p, a in default_world.test_prompts(args.num_prompts)]
  max_new = args.max_new_tokens if args.max_new_tokens is not None else (
      DEFAULT_WORLD_NEW_TOKENS if args.model is None else 32)
  budget = args.budget
  if args.model is None and budget is None and args.capacity is None and args.policy in (None, "ag"):
    from ag_jax import default_world
    budget = default_world.default_budget()
  policy = make_policy(args, model)
  sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
  if args.prompts_file:
    from ag_jax import stream_decode
    return stream_decode.run_file(args, model, variables, tokenizer, prompts, policy, sampling,
                                  max_new, budget)
  rows, stats = [], []
  batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
  for batch in tqdm(batches, desc="generating", unit="batch", disable=len(batches) < 2 or args.quiet,
                    file=sys.stderr):
    ids = [tokenizer.encode(p.text, add_bos=True) for p in batch]
    result = ag_jax.generate(model, variables, ids, policy=policy, max_new_tokens=max_new,
                             capacity=args.capacity, budget=budget, sampling=sampling,
                             seed=args.seed, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                             backend=args.kernels, prefill_chunk=args.prefill_chunk)
    stats.append(result)
    for p, text in zip(batch, result.texts(tokenizer)):
      row = {"prompt": p.text, "generation": text}
      if p.answer is not None:
        row["answer"], row["correct"] = p.answer, score_generation(text, p.answer)
      rows.append(row)
  report = summarize(rows, stats, policy, tokenizer)
  report["summary"]["gates"] = args.gates or ("default world" if args.model is None else None)
  return report


def score_generation(text: str, answer) -> bool:
  """A hit: one answer string must start the generation (exact match, the recall world's
  rule); a list of answer items must all occur in its first line (RULER's
  string_match_all, all items, over the answer line: a model that rambles on after its
  answer would otherwise be credited with any number it happens to write)."""
  if isinstance(answer, str):
    from ag_jax.data.recall import score_answer
    return bool(score_answer(text, answer))
  from ag_jax.data.ruler import score_items
  return score_items(text.split("\n", 1)[0], answer) == 1.0


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


def print_generations(rows, out=sys.stdout, with_id: bool = False):
  """Each prompt (abridged), its generation and, when scored, the hit or the answer."""
  for r in rows:
    mark = "" if "correct" not in r else ("  ✓" if r["correct"] else f"  ✗ (answer {r['answer']!r})")
    ident = f"[{r['id']}] " if with_id else ""
    print(f"» {ident}{_abridge(r['prompt'])}\n  → {r['generation']!r}{mark}", file=out)
  print(file=out)


def print_report(report: dict, quiet: bool = False, out=sys.stdout):
  s = report["summary"]
  if not quiet:
    print_generations(report["generations"], out)
  gates = f"   gates: {s['gates']}" if s.get("gates") else ""
  print(f"policy: {s['policy']}   capacity: {s['capacity']} tokens per row{gates}", file=out)
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
  from ag_jax.cli_errors import run_cli

  def go() -> int:
    report = run(args)
    from ag_jax import stream_decode
    printer = stream_decode.print_report if args.prompts_file else print_report
    printer(report, quiet=args.quiet or args.json == "-",
            out=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
      write_json(report, args.json)
    return 0
  return run_cli(go)
