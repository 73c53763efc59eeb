"""The gate training loop: build the run from a TrainConfig, train, evaluate, checkpoint,
export. `train.py` at the repository root is a thin CLI over `train(cfg)`.

Per step: this process packs its rows of the global batch, `sharding.global_batch` makes
the global arrays, the jitted step updates the TrainState in place (donated). Metrics stay
on device until a log, eval or save step, where they are fetched together; a non-finite
loss found there stops the run before anything is saved after it, so the last checkpoint
is always one whose losses were all finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from ag_jax import sharding as sharding_lib
from ag_jax.checkpoint import TrainCheckpointer, abstract_like, export_gates
from ag_jax.config import ConfigError
from ag_jax.train_config import TrainConfig
from ag_jax.train_setup import Run, build_run, eval_batches


class TrainError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says where and what to do."""


@dataclasses.dataclass
class TrainResult:
  step: int                      # the last step trained
  history: list[dict]            # one dict per log interval (means over the interval)
  eval_history: list[dict]       # one dict per evaluation
  gates_dir: str | None          # where the gates were exported
  model_dir: str | None          # where the base model was written (trainable=all)
  trainable: Any = None          # the final trainable params on the host (gates, or all)
  resumed_from: int | None = None  # the checkpoint step this run continued, if any


def _host(tree):
  """Whole arrays on the host, also when they are sharded over several processes."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def gather_data_state(iterator) -> dict:
  """The iterator state of every process merged into one (restorable under any count)."""
  state = iterator.get_state()
  if jax.process_count() == 1:
    return state
  from jax.experimental import multihost_utils

  from ag_jax.data import merge_states
  encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
  longest = int(np.max(multihost_utils.process_allgather(np.array([encoded.size]))))
  padded = np.zeros(longest, np.uint8)
  padded[:encoded.size] = encoded
  everyone = multihost_utils.process_allgather(padded)  # [processes, longest]
  states = [json.loads(bytes(row).rstrip(b"\0").decode()) for row in everyone]
  return merge_states(states)


def _mean_metrics(pending: list[tuple[int, dict]]) -> dict:
  values = [m for _, m in pending]
  return {k: np.mean([np.asarray(v[k]) for v in values], axis=0) for k in values[0]}


def _scalars(prefix: str, metrics: dict) -> dict[str, float]:
  """Flat TensorBoard scalars: per-layer arrays become prefix/keep_ratio/layer_3 etc."""
  out = {}
  for key, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[f"{prefix}{key}"] = float(value)
    elif value.ndim == 1:
      name = key.replace("_per_layer", "")
      out.update({f"{prefix}{name}/layer_{i}": float(v) for i, v in enumerate(value)})
  return out


def _jsonable(metrics: dict) -> dict:
  return {k: np.asarray(v).tolist() for k, v in metrics.items()}


class _Logger:
  """metrics.jsonl + TensorBoard + the tqdm bar, on process 0 only."""

  def __init__(self, cfg: TrainConfig, start: int):
    self.active = jax.process_index() == 0
    self.writer = self.bar = self.jsonl = None
    if not self.active:
      return
    from tensorboardX import SummaryWriter
    from tqdm import tqdm
    self.writer = SummaryWriter(cfg.run.out_dir, purge_step=start + 1)  # drop re-run steps
    self.jsonl = open(os.path.join(cfg.run.out_dir, "metrics.jsonl"), "a")
    self.bar = tqdm(total=cfg.run.steps, initial=start, desc="train", unit="step",
                    disable=not cfg.run.progress, dynamic_ncols=True)

  def step(self):
    if self.bar is not None:
      self.bar.update(1)

  def log(self, step: int, kind: str, metrics: dict) -> None:
    if not self.active:
      return
    self.jsonl.write(json.dumps({"step": step, "kind": kind, **_jsonable(metrics)}) + "\n")
    self.jsonl.flush()
    prefix = "" if kind == "train" else f"{kind}/"
    for name, value in _scalars(prefix, metrics).items():
      self.writer.add_scalar(name, value, step)
    if kind == "train" and not self.bar.disable:
      postfix = {"loss": f"{float(metrics['loss']):.4f}"}
      if "keep_ratio" in metrics:
        postfix["keep"] = f"{float(metrics['keep_ratio']):.3f}"
      if "tokens_per_s" in metrics:
        postfix["tok/s"] = f"{float(metrics['tokens_per_s']):.0f}"
      self.bar.set_postfix(postfix, refresh=False)
    else:  # eval results, and every train log when there is no bar (e.g. logs to a file)
      self.bar.write(f"step {step} {kind}: " + ", ".join(
          f"{k}={float(v):.4g}" for k, v in metrics.items() if np.ndim(v) == 0))

  def close(self):
    if self.active:
      self.bar.close()
      self.writer.close()
      self.jsonl.close()


def _check_finite(pending: list[tuple[int, dict]], last_saved: int | None, ckpt_dir: str) -> None:
  """Raise at the first step whose loss or gradient is not finite (a NaN gradient would
  poison the params even while its loss still looks fine)."""
  for step, metrics in pending:
    for name in ("loss", "grad_norm"):
      value = float(metrics[name])
      if not math.isfinite(value):
        kept = (f"the last good checkpoint is step {last_saved} in {ckpt_dir}"
                if last_saved is not None else "no checkpoint had been saved yet")
        what = "the loss" if name == "loss" else "the gradient norm"
        raise TrainError(
            f"{what} became {value} at step {step}; training stopped ({kept}). Lower "
            "optim.lr, keep optim.clip set, or check the data and base weights")


def _evaluate(run: Run, state) -> dict:
  metrics = [run.eval_step(state.trainable, run.frozen, sharding_lib.global_batch(b, run.mesh))
             for b in eval_batches(run)]
  return _mean_metrics([(0, m) for m in jax.device_get(metrics)])


def _save(run: Run, checkpointer: TrainCheckpointer, state, step: int) -> None:
  checkpointer.save(step, state, gather_data_state(run.iterator), run.cfg.to_dict())


# Settings a resumed run may change: they decide how the run is watched, stored or laid
# out on devices, not what it computes. Any other difference from the checkpoint's config
# is refused (a warning names these).
HARMLESS_ON_RESUME = ("run.out_dir", "run.eval_every", "run.eval_batches", "run.log_every",
                      "run.progress", "run.remat", "run.seed", "run.steps", "checkpoint.",
                      "mesh.", "data.eval_split", "data.data_dir")
_ABSENT = object()


def _flat(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict) or not tree:
    return {prefix[:-1]: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}."))
  return out


def config_diff(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(dotted key, saved value, current value) of every setting that differs. A key the
  checkpoint lacks (written by older code) counts only when not at its default."""
  defaults = _flat(json.loads(json.dumps(TrainConfig().to_dict())))
  old, new = _flat(saved), _flat(current)
  diff = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
    if a is _ABSENT and b == defaults.get(key, _ABSENT):
      continue
    if a != b:
      diff.append((key, a, b))
  return diff


def _show(value) -> str:
  return "(absent)" if value is _ABSENT else json.dumps(value)


def check_resume(cfg: TrainConfig, saved_cfg: dict, step: int, directory: str) -> None:
  """Refuse a resume whose settings differ from the checkpoint's in what they compute, and
  a run.steps below the checkpoint's step; warn about the harmless differences."""
  current = json.loads(json.dumps(cfg.to_dict()))  # as it reads back from JSON
  diff = config_diff(saved_cfg, current)
  refused = [d for d in diff if not d[0].startswith(HARMLESS_ON_RESUME)]
  if refused:
    raise ConfigError(
        f"the checkpoint at step {step} in {directory} was trained with other settings: "
        + "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in refused)
        + ". Rerun with the checkpoint's values to continue it, or set run.out_dir (or "
        "checkpoint.dir) to a new folder to start a new run")
  if cfg.run.steps < step:
    raise ConfigError(
        f"run.steps={cfg.run.steps} is below the step of the checkpoint in {directory} "
        f"({step}): set run.steps>={step} to continue it, or set run.out_dir (or checkpoint.dir) "
        "to a new folder to start a new run")
  harmless = [d for d in diff if d[0].startswith(HARMLESS_ON_RESUME)]
  if harmless and jax.process_index() == 0:
    note = ""
    if any(k == "run.steps" for k, _, _ in harmless) and cfg.optim.decay_steps is None:
      note = " (the cosine schedule now spans the new run.steps)"
    print("warning: resuming with settings that differ from the checkpoint's: "
          + "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in harmless) + note,
          file=sys.stderr, flush=True)


def read_saved_config(checkpointer: TrainCheckpointer, step: int) -> dict:
  ocp = checkpointer._ocp  # pylint: disable=protected-access
  return checkpointer.manager.restore(
      step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def _truncate_metrics(out_dir: str, step: int) -> None:
  """Drop metrics.jsonl lines after `step`: steps run again are logged once."""
  path = os.path.join(out_dir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):
        continue  # a line cut short by a crash
  from ag_jax import atomic_io
  atomic_io.write_text(path, "".join(kept))


def _restore(run: Run, checkpointer: TrainCheckpointer, state):
  step = checkpointer.latest_step()
  state, data_state, _ = checkpointer.restore(step, abstract_like(state))
  try:
    run.iterator.set_state(data_state)
  except ValueError as e:
    raise ConfigError(f"cannot continue the data order of the checkpoint at step {step} in "
                      f"{checkpointer.directory}: {e}") from None
  return state, step


def train(cfg: TrainConfig) -> TrainResult:
  """Run training as `cfg` says; resumes from the latest checkpoint in checkpoint.dir."""
  ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.run.out_dir, "checkpoints")
  checkpointer = TrainCheckpointer(ckpt_dir, cfg.checkpoint.every, cfg.checkpoint.keep,
                                   cfg.checkpoint.async_save)
  try:
    latest = checkpointer.latest_step()
    if latest is not None:  # checked before anything is built or compiled
      if not cfg.checkpoint.resume:
        raise ConfigError(f"checkpoint.dir {ckpt_dir} already holds steps "
                          f"{checkpointer.all_steps()}; set checkpoint.resume=true to continue "
                          "that run, or choose an empty checkpoint.dir")
      check_resume(cfg, read_saved_config(checkpointer, latest), latest, checkpointer.directory)
    run = build_run(cfg)
    state = run.state
    start, last_saved = 0, None
    if latest is not None:
      state, start = _restore(run, checkpointer, state)
      last_saved = start
      if jax.process_index() == 0:
        print(f"resuming from step {start} (checkpoint {checkpointer.directory})", flush=True)
  except BaseException:
    checkpointer.close()
    raise
  _truncate_metrics(cfg.run.out_dir, start)
  logger = _Logger(cfg, start)
  history, eval_history, pending = [], [], []
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  timer, timed_steps = None, 0
  try:
    for step in range(start + 1, cfg.run.steps + 1):
      batch = sharding_lib.global_batch(next(run.iterator), run.mesh)
      state, metrics = run.train_step(state, run.frozen, batch)
      pending.append((step, metrics))
      logger.step()
      if timer is None:  # the first step compiles: time from the end of it
        jax.block_until_ready(metrics)
        timer = time.perf_counter()
      else:
        timed_steps += 1
      last = step == cfg.run.steps
      do_eval = run.has_eval and (last or (cfg.run.eval_every and step % cfg.run.eval_every == 0))
      do_save = last or checkpointer.should_save(step)
      if last or do_eval or do_save or step % cfg.run.log_every == 0:
        pending = jax.device_get(pending)
        _check_finite(pending, last_saved, ckpt_dir)
        logged = _mean_metrics(pending)
        if timed_steps:
          logged["tokens_per_s"] = np.float32(timed_steps * tokens_per_step /
                                              (time.perf_counter() - timer))
        history.append({"step": step, **_jsonable(logged)})
        logger.log(step, "train", logged)
        pending = []
        if do_eval:
          evaluated = _evaluate(run, state)
          eval_history.append({"step": step, **_jsonable(evaluated)})
          logger.log(step, "eval", evaluated)
        if do_save:
          _save(run, checkpointer, state, step)
          last_saved = step
        timer, timed_steps = time.perf_counter(), 0  # throughput excludes eval and saving
  finally:
    checkpointer.wait()
    checkpointer.close()
    logger.close()
  result = _finish(run, state, history, eval_history)
  result.resumed_from = None if latest is None else start
  return result


def _finish(run: Run, state, history, eval_history) -> TrainResult:
  cfg = run.cfg
  trainable = _host(state.trainable)  # only what trained: a frozen 7B base stays on device
  gates = trainable if cfg.run.trainable == "gates" else trainable["layers"].get("gate")
  gates_dir = model_dir = None
  if jax.process_index() == 0:
    if cfg.gate is not None:
      gates_dir = export_gates(os.path.join(cfg.run.out_dir, "gates"), cfg.gate, run.model_cfg,
                               gates)
    if cfg.run.trainable == "all":
      from ag_jax.hf_checkpoint import save_hf_llama
      model_dir = os.path.join(cfg.run.out_dir, "model")
      save_hf_llama(model_dir, run.model_cfg, trainable)
  return TrainResult(int(state.step), history, eval_history, gates_dir, model_dir, trainable)
