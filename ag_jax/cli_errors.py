"""One top-level handler for the entry points: the project's input errors become one
`error: ...` line on stderr and exit status 2, never a traceback (docs/errors.md)."""

from __future__ import annotations

import sys
from typing import Callable


def user_errors() -> tuple[type, ...]:
  """The project's error types: each message names the problem and the fix."""
  from ag_jax.config import ConfigError
  from ag_jax.data.sources import DataError
  from ag_jax.engine import InferenceError
  from ag_jax.hf_checkpoint import CheckpointError
  from ag_jax.policies import PolicyError
  from ag_jax.train import TrainError
  return ConfigError, CheckpointError, DataError, InferenceError, PolicyError, TrainError


def run_cli(fn: Callable[[], int]) -> int:
  """Run `fn`; a project error prints `error: <message>` on stderr and returns 2."""
  errors = user_errors()
  try:
    return fn()
  except errors as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
