"""The embedded default world: a tiny Llama over the stdlib BPE, trained on the RULER-style
suite (key-addressed retrieval in stdlib-code haystacks), and its Attention-Gates.

Nothing here needs a network: the model with its tokenizer (`assets/ruler_tiny/model`, HF
Llama format + tokenizer.json), its trained gates (`assets/ruler_tiny/gates`) and the suite
settings the world is asked on (`world.json`) ship inside the package. The haystacks are the
Python standard library source of the running interpreter, read at run time.
`configs/train/ruler_base.yaml` and `ruler_gates.yaml` reproduce the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os

from ag_jax import atomic_io
from ag_jax.data.ruler import RETRIEVAL_TASKS, RulerConfig

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "ruler_tiny")
DEFAULT_TASKS = RETRIEVAL_TASKS
DEFAULT_LENGTH = 512


def _world() -> dict:
  path = os.path.join(ASSET_DIR, "world.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"the embedded default world is missing ({path}); reinstall ag-jax, or rebuild it with "
        "python train.py --config configs/train/ruler_base.yaml, then ruler_gates.yaml, then "
        "python -m ag_jax.default_world --install (see README)")
  with open(path) as f:
    return json.load(f)


def suite() -> tuple[tuple[str, ...], RulerConfig]:
  """(tasks, settings) of the questions `python decode.py` asks: the world's test split."""
  world = _world()["suite"]
  return tuple(world["tasks"]), RulerConfig(**world["config"])


def default_budget() -> float:
  """The KV budget `python decode.py` uses for AG by default (fraction of the prompt)."""
  return float(_world()["budget"])


def load_default(with_gates: bool = True):
  """-> (model, variables, tokenizer) of the embedded world, gates loaded (`with_gates`)."""
  from ag_jax.checkpoint import load_gates
  from ag_jax.hf_checkpoint import load_hf_llama
  from ag_jax.model import Llama
  from ag_jax.tokenizer import HFTokenizer

  _world()  # a clear error if the assets are missing
  model_dir = os.path.join(ASSET_DIR, "model")
  cfg, params = load_hf_llama(model_dir)
  gate = None
  if with_gates:
    gate, gate_params = load_gates(os.path.join(ASSET_DIR, "gates"), model_cfg=cfg)
    params = {**params, "layers": {**params["layers"], "gate": gate_params}}
  return Llama(cfg, gate=gate), {"params": params}, HFTokenizer(model_dir)


def test_prompts(n: int, split: str = "test", tokenizer=None) -> list[tuple[str, list[str]]]:
  """The first n (prompt, answer items) of the world's suite, the tasks taken in turn."""
  from ag_jax.data.ruler import generate_example
  tasks, config = suite()
  if tokenizer is None:  # the model's own, without loading its weights
    from ag_jax.tokenizer import HFTokenizer
    tokenizer = HFTokenizer(os.path.join(ASSET_DIR, "model"))
  out = []
  for i in range(n):
    task = tasks[i % len(tasks)]
    ex = generate_example(dataclasses.replace(config, task=task), tokenizer, split,
                          i // len(tasks))
    out.append((ex["prompt"], list(ex["answers"])))
  return out


def install(model_dir: str, gates_dir: str, tokenizer_dir: str, config: RulerConfig,
            tasks: tuple[str, ...], budget: float) -> str:
  """Copy a trained base model, its tokenizer and its gates into the package assets
  (atomically: everything loads first, then the old world is replaced whole)."""
  import shutil

  from ag_jax.checkpoint import load_gates
  from ag_jax.hf_checkpoint import load_hf_llama
  from ag_jax.tokenizer import HFTokenizer

  cfg, _ = load_hf_llama(model_dir)           # all must load before anything is replaced
  load_gates(gates_dir, model_cfg=cfg)
  tokenizer = HFTokenizer(tokenizer_dir)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens, more than "
                     f"the model's vocab_size {cfg.vocab_size}: pass the model's own tokenizer")
  with atomic_io.replace_dir(ASSET_DIR) as tmp:
    shutil.copytree(model_dir, os.path.join(tmp, "model"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
      if os.path.exists(os.path.join(tokenizer_dir, name)):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(tmp, "model"))
    shutil.copytree(gates_dir, os.path.join(tmp, "gates"))
    world = {"suite": {"tasks": list(tasks), "config": dataclasses.asdict(config)},
             "budget": budget}
    with open(os.path.join(tmp, "world.json"), "w") as f:
      json.dump(world, f, indent=2)
  return ASSET_DIR


def main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(
      prog="python -m ag_jax.default_world",
      description="Install a trained base model, its tokenizer and its gates as the embedded "
      "default world that `python decode.py` runs (see README: Rebuild it).")
  p.add_argument("--install", nargs=2, metavar=("MODEL_DIR", "GATES_DIR"), required=True,
                 help="an HF-format model dir (train.py run.trainable=all writes <out>/model) "
                 "and a gates dir (<out>/gates)")
  p.add_argument("--tokenizer", default="stdlib_bpe:2048",
                 help="the model's tokenizer: a spec (default stdlib_bpe:2048) or a directory "
                 "with tokenizer.json; it ships with the model")
  p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                 help=f"the suite tasks decode.py asks (default {','.join(DEFAULT_TASKS)})")
  p.add_argument("--length", type=int, default=DEFAULT_LENGTH,
                 help=f"context tokens of decode.py's questions (default {DEFAULT_LENGTH})")
  p.add_argument("--budget", type=float, default=0.25,
                 help="the KV budget decode.py uses for AG by default (default 0.25)")
  args = p.parse_args(argv)
  from ag_jax.cli_errors import run_cli
  from ag_jax.config import ConfigError

  def go() -> int:
    from ag_jax.tokenizer import STDLIB_BPE_PREFIX, stdlib_bpe_dir
    if not 0.0 < args.budget <= 1.0:
      raise ConfigError(f"--budget must be a fraction in (0, 1], got {args.budget}")
    tasks = tuple(t for t in args.tasks.split(",") if t)
    try:
      config = RulerConfig(length=args.length)
      for t in tasks:
        RulerConfig(task=t)
    except ValueError as e:
      raise ConfigError(f"--tasks / --length: {e}") from None
    tok_dir = args.tokenizer
    if tok_dir.startswith(STDLIB_BPE_PREFIX + ":"):
      size = tok_dir.split(":", 1)[1]
      if not size.isdigit():
        raise ConfigError(f"--tokenizer {args.tokenizer!r}: the BPE size must be a number of "
                          "tokens, e.g. stdlib_bpe:2048")
      tok_dir = stdlib_bpe_dir(int(size))
    elif not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
      raise ConfigError(f"--tokenizer {args.tokenizer!r}: no tokenizer.json there; pass "
                        "stdlib_bpe:SIZE or a directory holding tokenizer.json")
    try:
      path = install(*args.install, tok_dir, config, tasks, args.budget)
    except ValueError as e:  # the tokenizer does not fit the model
      raise ConfigError(str(e)) from None
    print(f"installed the default world in {path}")
    return 0
  return run_cli(go)


if __name__ == "__main__":
  raise SystemExit(main())
