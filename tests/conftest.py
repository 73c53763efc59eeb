"""Test set-up: 8 simulated CPU devices (before jax is imported) and shared tiny fixtures."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers such as hf_fixtures

import jax  # noqa: E402
import pytest  # noqa: E402

from ag_jax.config import GateConfig, ModelConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
  """A 2-layer GQA model small enough to compile in seconds on 2 cores."""
  return ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64, max_position=256)


@pytest.fixture(scope="session")
def tiny_gate() -> GateConfig:
  return GateConfig(num_heads=2, head_dim=8)


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


def spread_variables(model, seed: int = 0, scale: float = 0.3) -> dict:
  """Model variables with base weights large enough that attention patterns matter.

  Default inits (std 0.02) make attention nearly uniform and logits nearly constant, so a
  wrong mask would hide under tolerance; base matrices become N(0, scale), norm scales
  1 + N(0, 0.1). Gate parameters keep their init (bias -> p ~ init_keep_prob).
  """
  import ag_jax
  import numpy as np
  variables = ag_jax.init_variables(model, jax.random.key(seed))
  rng = np.random.RandomState(seed + 1000)

  def spread(path, x):
    keys = [getattr(k, "key", "") for k in path]
    if "gate" in keys:
      return x
    noise = rng.standard_normal(x.shape).astype(np.float32)
    value = 1.0 + 0.1 * noise if keys[-1] == "scale" else scale * noise
    return jax.numpy.asarray(value, x.dtype)

  return jax.tree_util.tree_map_with_path(spread, variables)


def token_batch(b: int = 2, t: int = 13, vocab: int = 64, seed: int = 0) -> dict:
  """A training batch of random tokens for `train_step.make_loss_fn`: row 1 padded from
  position 9 on, ~80% of the real positions in the loss (weight 1)."""
  import numpy as np
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
  seg = np.ones((b, t), np.int32)
  seg[1, 9:] = 0  # padding at the end of row 1
  mask = (rng.uniform(size=(b, t)) > 0.2) & (seg > 0)
  return dict(tokens=tokens, targets=jnp.roll(tokens, -1, 1),
              positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
              segment_ids=jnp.asarray(seg), loss_mask=jnp.asarray(mask, jnp.float32))


@pytest.fixture(scope="module", autouse=True)
def _fresh_compile_caches():
  """Drop every compiled program after each test module. One process compiling ~500 tests'
  programs grew to 6 GiB and segfaulted inside XLA's CPU compiler (jax 0.10.2, in
  test_slot_engine after test_sharding; each module alone passes)."""
  yield
  jax.clear_caches()
