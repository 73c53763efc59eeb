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
