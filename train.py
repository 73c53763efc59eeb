"""Train Attention-Gates (or, with run.trainable=all, a whole model). See --help."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
recipes (configs/train/*.yaml):
  tiny.yaml           tiny byte-level model on the generated recall corpus; CPU, ~1 minute
  ruler_base.yaml     the default world's base: a tiny BPE Llama on the RULER-style suite
                      over stdlib code, from scratch; CPU, ~86 minutes
  ruler_gates.yaml    its Attention-Gates, base frozen; CPU, ~50 minutes
  cpt_llama2_7b.yaml  the paper's setting: frozen Llama-2-7B, 5,000 RedPajama samples,
                      4k context, target keep 0.5 (needs the HF weights and a prepared
                      local RedPajama sample; see the comments in the file)

  A recipe has the sections model, gate, data, optim, mesh, checkpoint, run. An unknown
  key is an error that lists the valid ones.

overrides (key=value after the flags, dotted into the sections, values parsed as yaml):
  python train.py --config configs/train/tiny.yaml run.steps=50 gate.target_keep=0.3
  python train.py --config configs/train/tiny.yaml gate.eviction_loss=hinge data.batch_size=16
  python train.py --config configs/train/tiny.yaml mesh.data=2 mesh.fsdp=4
  python train.py --config configs/train/tiny.yaml gate=null run.trainable=all \\
      run.out_dir=runs/tiny_base          # pretrain a base model instead of gates
  python train.py --config configs/train/tiny.yaml model.hf_path=runs/tiny_base/model \\
      gate.eviction_loss=hinge            # then train gates on it
  python train.py --config configs/train/cpt_llama2_7b.yaml model.hf_path=/ckpt/llama2

outputs (in run.out_dir):
  gates/               gates.safetensors + gate_config.json (ag_jax.load_gates reads them)
  model/               the trained model as an HF directory (run.trainable=all only)
  checkpoints/         orbax checkpoints (gates, optimizer, step, data order, config); a
                       rerun of the same command resumes from the latest one
  metrics.jsonl        train and eval metrics per log interval
  events.out.tfevents  TensorBoard: tensorboard --logdir <run.out_dir>
  train_config.json    the resolved config

multi-host: run the same command on every host. Cloud TPU slices, SLURM and
JAX_COORDINATOR_ADDRESS are detected; otherwise pass --coordinator HOST:PORT
--num-processes N --process-id I.

exit status: 0 done, 2 bad input (config, data, checkpoint) or a non-finite loss.
"""


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="train.py", description="Train Attention-Gates on a frozen Llama (DESIGN §1).",
      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, metavar="RECIPE.yaml",
                      help="a training recipe, e.g. configs/train/tiny.yaml")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="recipe overrides, e.g. run.steps=100 gate.target_keep=0.3")
  parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
  parser.add_argument("--num-processes", type=int, help="number of processes")
  parser.add_argument("--process-id", type=int, help="this process's index")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from ag_jax.cli_errors import run_cli
  return run_cli(lambda: _train(args))


def _train(args) -> int:
  import time

  import jax

  from ag_jax.sharding import maybe_initialize_distributed
  from ag_jax.train import train
  from ag_jax.train_config import load_train_config
  start = time.perf_counter()
  cfg = load_train_config(args.config, args.overrides)  # before touching any device
  maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  result = train(cfg)
  where = result.gates_dir or result.model_dir
  minutes = (time.perf_counter() - start) / 60
  if result.resumed_from is None:
    steps = f"{result.step} steps"
  elif result.resumed_from == result.step:
    steps = f"no steps (the checkpoint is at run.steps={result.step} already)"
  else:
    steps = f"steps {result.resumed_from + 1}-{result.step} (resumed from step {result.resumed_from})"
  print(f"trained {steps} on {jax.process_count()} process(es), "
        f"{jax.device_count()} devices in {minutes:.1f} min (wall)"
        + (f"; wrote {where}" if where else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
