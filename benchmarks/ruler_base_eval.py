"""Full-cache accuracy of a base model on the RULER-style suite, per task and length, and its
stdlib bits per byte (configs/train/ruler_base.yaml's numbers).

  python benchmarks/ruler_base_eval.py --model runs/ruler_base/model
  python benchmarks/ruler_base_eval.py --config configs/train/ruler_base.yaml   # latest checkpoint
      [--lengths 256,512,1024,1536,2048] [--examples 40] [--tasks ...] [--out results.json]

The protocol is "decode" with the Full policy: nothing is evicted, so this is the base
model's own accuracy (RULER's string_match_all, answers teacher-forced, greedy hits) on the
test split. With --config the weights come from the newest checkpoint of that run (the run
may still be training), so the numbers can be read before the export at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_TASKS = "niah_multikey,niah_multivalue,niah_multiquery,vt"


def load_from_model_dir(path: str):
  from ag_jax.hf_checkpoint import load_hf_llama
  from ag_jax.model import Llama
  cfg, params = load_hf_llama(path)
  return Llama(cfg), {"params": params}, None


def load_from_checkpoint(config_path: str, overrides=()):
  """(model, variables, step) of the latest checkpoint of a `trainable: all` recipe."""
  import jax
  from ag_jax.checkpoint import TrainCheckpointer, abstract_like
  from ag_jax.model import Llama
  from ag_jax.train_config import load_train_config
  from ag_jax.train_setup import build_run
  cfg = load_train_config(config_path, overrides)
  if cfg.run.trainable != "all" or cfg.gate is not None:
    raise SystemExit("--config needs a base-model recipe (trainable: all, gate: null)")
  ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.run.out_dir, "checkpoints")
  checkpointer = TrainCheckpointer(ckpt_dir, 0, 1, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise SystemExit(f"no checkpoint in {ckpt_dir} yet")
    run = build_run(cfg)
    state, _, _ = checkpointer.restore(step, abstract_like(run.state))
  finally:
    checkpointer.close()
  params = jax.device_get(state.trainable)
  return Llama(run.model_cfg), {"params": params}, step


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--model", help="an exported HF directory (runs/ruler_base/model)")
  src.add_argument("--config", help="a training recipe: its latest checkpoint")
  p.add_argument("--tokenizer", default="stdlib_bpe:2048")
  p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated (cwe too)")
  p.add_argument("--lengths", default="256,512,1024,1536,2048")
  p.add_argument("--examples", type=int, default=40, help="per task and length")
  p.add_argument("--split", default="test")
  p.add_argument("--bpb-windows", type=int, default=8, help="2k-token stdlib windows; 0: skip")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--out", help="write the results as JSON here")
  args = p.parse_args(argv)

  from ag_jax import policies
  from ag_jax.evaluation import ruler_eval
  from ag_jax.tokenizer import load_tokenizer

  t0 = time.time()
  if args.model:
    model, variables, step = load_from_model_dir(args.model)
  else:
    model, variables, step = load_from_checkpoint(args.config)
  tok = load_tokenizer(args.tokenizer)
  lengths = [int(x) for x in args.lengths.split(",") if x]
  tasks = [t for t in args.tasks.split(",") if t]
  longest = max(lengths) + 64  # question and answer after the context
  if longest > model.cfg.max_position:
    raise SystemExit(f"lengths up to {max(lengths)} need max_position >= {longest}, the model "
                     f"has {model.cfg.max_position}")
  rows = []
  for task in ruler_eval.build_ruler_tasks(tok, tasks, lengths, args.examples, split=args.split,
                                           protocol="decode"):
    t = time.time()
    got = task.run(model, variables, tok, policies.Full(), batch_size=args.batch_size)
    rows.append({"task": task.name.split("@")[0], "length": task.length,
                 "accuracy": got["accuracy"], "examples": got["examples"]})
    print(f"{task.name:28s} acc={got['accuracy']:.3f} ({time.time() - t:.0f}s)", flush=True)
  result = {"model": args.model or args.config, "step": step, "split": args.split,
            "protocol": "decode", "policy": "full", "tokenizer": args.tokenizer,
            "accuracy": rows}
  if args.bpb_windows:
    windows = ruler_eval.bpb_windows(tok, args.bpb_windows, context=2048, split=args.split)
    bpb = ruler_eval.StdlibBpbTask("stdlib_bpb", windows, protocol="decode").run(
        model, variables, tok, policies.Full(), batch_size=4)
    result["bpb"] = {k: bpb[k] for k in ("bpb", "bpb_long_range", "bytes", "examples")}
    print(f"stdlib bpb={bpb['bpb']:.4f} long-range bpb={bpb['bpb_long_range']:.4f} "
          f"({bpb['bytes']} bytes)", flush=True)
  # The table: tasks down, lengths across.
  print("\n" + "task".ljust(18) + "".join(f"{n:>8d}" for n in lengths))
  for task in tasks:
    accs = {r["length"]: r["accuracy"] for r in rows if r["task"] == task}
    print(task.ljust(18) + "".join(f"{accs[n]:8.3f}" for n in lengths))
  result["seconds"] = time.time() - t0
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
