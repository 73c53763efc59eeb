"""The embedded default world: a tiny byte-level Llama trained on the recall corpus, and its gates.

Nothing here needs a network: the model (`assets/recall_tiny/model`, HF Llama format), its
trained gates (`assets/recall_tiny/gates`) and the corpus settings (`world.json`) ship
inside the package. `configs/train/tiny_base.yaml` and `tiny_gates.yaml` reproduce them.
"""

from __future__ import annotations

import dataclasses
import json
import os

from ag_jax import atomic_io
from ag_jax.data.recall import RecallConfig, RecallSource

# The corpus the shipped model is evaluated on (the test split of this spec).
DEFAULT_RECALL_SPEC = ("recall:doc_len=64,num_facts=2,num_queries=2,key_len=1,value_len=1,"
                       "distractor=repeated")
ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "recall_tiny")


def _world() -> dict:
  path = os.path.join(ASSET_DIR, "world.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"the embedded default world is missing ({path}); reinstall ag-jax, or rebuild it with "
        "python train.py --config configs/train/tiny_base.yaml, then tiny_gates.yaml "
        "(see README)")
  with open(path) as f:
    return json.load(f)


def recall_config() -> RecallConfig:
  """The corpus settings the default model was trained and is evaluated on."""
  return RecallConfig(**_world()["recall"])


def default_budget() -> float:
  """The KV budget `python decode.py` uses for AG by default (fraction of the context)."""
  return float(_world()["budget"])


def load_default(with_gates: bool = True):
  """-> (model, variables, tokenizer) of the embedded world, gates loaded (`with_gates`)."""
  from ag_jax.checkpoint import load_gates
  from ag_jax.hf_checkpoint import load_hf_llama
  from ag_jax.model import Llama
  from ag_jax.tokenizer import ByteTokenizer

  _world()  # a clear error if the assets are missing
  cfg, params = load_hf_llama(os.path.join(ASSET_DIR, "model"))
  gate = None
  if with_gates:
    gate, gate_params = load_gates(os.path.join(ASSET_DIR, "gates"), model_cfg=cfg)
    params = {**params, "layers": {**params["layers"], "gate": gate_params}}
  return Llama(cfg, gate=gate), {"params": params}, ByteTokenizer()


def test_prompts(n: int, split: str = "test") -> list[tuple[str, str]]:
  """The first n (prompt, answer) pairs of a split of the world's recall corpus."""
  source = RecallSource(recall_config(), split, max(n, 1))
  return [(source[i]["prompt"], source[i]["answer"]) for i in range(n)]


def install(model_dir: str, gates_dir: str, recall: RecallConfig, budget: float,
            results: dict | None = None) -> str:
  """Copy a trained base model and its gates into the package assets (atomically)."""
  import shutil

  from ag_jax.checkpoint import load_gates
  from ag_jax.hf_checkpoint import load_hf_llama

  cfg, _ = load_hf_llama(model_dir)           # both must load before anything is replaced
  load_gates(gates_dir, model_cfg=cfg)
  with atomic_io.replace_dir(ASSET_DIR) as tmp:
    shutil.copytree(model_dir, os.path.join(tmp, "model"))
    shutil.copytree(gates_dir, os.path.join(tmp, "gates"))
    world = {"recall": dataclasses.asdict(recall), "budget": budget, "results": results or {}}
    with open(os.path.join(tmp, "world.json"), "w") as f:
      json.dump(world, f, indent=2)
  return ASSET_DIR


def main(argv=None) -> int:
  import argparse
  import sys

  from ag_jax.data.sources import open_source

  p = argparse.ArgumentParser(
      prog="python -m ag_jax.default_world",
      description="Install a trained tiny base model and its gates as the embedded default "
      "world that `python decode.py` runs (see README: Rebuild it).")
  p.add_argument("--install", nargs=2, metavar=("MODEL_DIR", "GATES_DIR"), required=True,
                 help="an HF-format model dir (train.py run.trainable=all writes <out>/model) "
                 "and a gates dir (<out>/gates)")
  p.add_argument("--recall", default=DEFAULT_RECALL_SPEC,
                 help=f"the recall corpus the world is evaluated on (default {DEFAULT_RECALL_SPEC!r})")
  p.add_argument("--budget", type=float, default=0.25,
                 help="the KV budget decode.py uses for AG by default (default 0.25)")
  args = p.parse_args(argv)
  from ag_jax.cli_errors import run_cli
  from ag_jax.config import ConfigError

  def go() -> int:
    if not 0.0 < args.budget <= 1.0:
      raise ConfigError(f"--budget must be a fraction in (0, 1], got {args.budget}")
    recall_source = open_source(args.recall, "test")
    path = install(*args.install, recall=recall_source.config, budget=args.budget)
    print(f"installed the default world in {path}")
    return 0
  return run_cli(go)


if __name__ == "__main__":
  raise SystemExit(main())
