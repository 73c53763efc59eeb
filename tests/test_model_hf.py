"""The Flax Llama equals HF transformers (PyTorch CPU, eager attention) on tiny random checkpoints."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ag_jax
from ag_jax.config import ConfigError
from ag_jax.hf_checkpoint import CheckpointError
from hf_fixtures import LLAMA3_SCALING, hf_logits, make_hf_model

TOKENS = np.random.RandomState(0).randint(0, 61, size=(3, 40))  # batch 3 > 1, positions past 16

GRID = {
    "mha_default_untied": dict(heads=4, kv_heads=4),
    "gqa_llama3_scaling": dict(heads=4, kv_heads=2, rope_scaling=LLAMA3_SCALING),
    "mqa_linear_scaling_tied": dict(heads=4, kv_heads=1, tie=True,
                                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gqa_head_dim_16_not_dim_over_heads": dict(heads=4, kv_heads=2, head_dim=16),
    "mistral_style": dict(heads=4, kv_heads=1, model_type="mistral"),
}


def _save(model, path, **kw):
  model.save_pretrained(path, **kw)
  return str(path)


@pytest.mark.parametrize("name", sorted(GRID))
def test_logits_match_transformers_fp32(name, tmp_path):
  model = make_hf_model(**GRID[name])
  cfg, params = ag_jax.load_hf_llama(_save(model, tmp_path), dtype=jnp.float32)
  ours = np.asarray(ag_jax.Llama(cfg).apply({"params": params}, jnp.asarray(TOKENS)))
  diff = np.abs(ours - hf_logits(model, TOKENS)).max()
  print(f"{name}: max |diff| = {diff:.2e}")
  assert diff < 1e-4


def test_sharded_checkpoint(tmp_path):
  model = make_hf_model(layers=3, rope_scaling=LLAMA3_SCALING)
  path = _save(model, tmp_path, max_shard_size="20KB")
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
  cfg, params = ag_jax.load_hf_llama(path)
  ours = np.asarray(ag_jax.Llama(cfg).apply({"params": params}, jnp.asarray(TOKENS)))
  assert np.abs(ours - hf_logits(model, TOKENS)).max() < 1e-4


def test_bf16_params_relative_error(tmp_path):
  model = make_hf_model(rope_scaling=LLAMA3_SCALING)
  cfg, params = ag_jax.load_hf_llama(_save(model, tmp_path), dtype=jnp.bfloat16)
  assert params["layers"]["attn"]["q"].dtype == jnp.bfloat16
  ours = np.asarray(ag_jax.Llama(cfg).apply({"params": params}, jnp.asarray(TOKENS)), np.float32)
  ref = hf_logits(model, TOKENS)
  rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  print(f"bf16 relative error {rel:.2e}")
  assert rel < 2e-2


def test_unrolled_layers_equal_scanned(tmp_path):
  model = make_hf_model()
  cfg, params = ag_jax.load_hf_llama(_save(model, tmp_path))
  scanned = ag_jax.Llama(cfg).apply({"params": params}, jnp.asarray(TOKENS))
  unrolled_cfg = ag_jax.ModelConfig(**{**cfg.__dict__, "scan_layers": False})
  unrolled = ag_jax.Llama(unrolled_cfg).apply({"params": params}, jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), atol=1e-5)


def test_packed_segments_equal_separate_runs(tiny_cfg):
  import jax
  model = ag_jax.Llama(tiny_cfg)
  variables = ag_jax.init_variables(model, jax.random.key(1))
  rng = np.random.RandomState(1)
  doc_a, doc_b = rng.randint(0, 64, 7), rng.randint(0, 64, 9)
  packed = np.concatenate([doc_a, doc_b])[None]
  segments = np.array([[1] * 7 + [2] * 9])
  positions = np.array([list(range(7)) + list(range(9))])
  out = np.asarray(model.apply(variables, jnp.asarray(packed), jnp.asarray(positions),
                               jnp.asarray(segments)))[0]
  alone_a = np.asarray(model.apply(variables, jnp.asarray(doc_a[None])))[0]
  alone_b = np.asarray(model.apply(variables, jnp.asarray(doc_b[None])))[0]
  np.testing.assert_allclose(out[:7], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[7:], alone_b, atol=1e-5)
  # Without segment ids the second document would see the first: the test can fail.
  mixed = np.asarray(model.apply(variables, jnp.asarray(packed)))[0]
  assert np.abs(mixed[7:] - alone_b).max() > 1e-3


# --- loader errors: one message naming the tensor or field ----------------------------------


@pytest.fixture
def saved(tmp_path):
  return _save(make_hf_model(), tmp_path)


def _edit_config(path, **changes):
  file = os.path.join(path, "config.json")
  with open(file) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(file, "w") as f:
    json.dump(cfg, f)


def _edit_tensors(path, fn):
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  fn(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_error_wrong_shape(saved):
  _edit_tensors(saved, lambda t: t.update({"model.layers.1.mlp.up_proj.weight":
                                           np.zeros((5, 32), np.float32)}))
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
    ag_jax.load_hf_llama(saved)


def test_error_missing_tensor(saved):
  _edit_tensors(saved, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
  with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*missing"):
    ag_jax.load_hf_llama(saved)


def test_error_unexpected_tensor(saved):
  _edit_tensors(saved, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias":
                                           np.zeros(32, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
    ag_jax.load_hf_llama(saved)


def test_error_model_type(saved):
  _edit_config(saved, model_type="gpt2")
  with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
    ag_jax.load_hf_llama(saved)


def test_error_rope_type(saved):
  _edit_config(saved, rope_scaling={"rope_type": "yarn", "factor": 4.0},
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0})
  with pytest.raises(ConfigError, match="rope_scaling type 'yarn' is not supported"):
    ag_jax.load_hf_llama(saved)


def test_error_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="no config.json"):
    ag_jax.load_hf_llama(str(tmp_path))
  with pytest.raises(CheckpointError, match="does not exist"):
    ag_jax.load_hf_llama(str(tmp_path / "nope"))


def test_save_hf_llama_roundtrips_through_transformers(tiny_cfg, tmp_path):
  import transformers
  from conftest import spread_variables
  model = ag_jax.Llama(tiny_cfg)
  params = spread_variables(model, seed=7, scale=0.15)["params"]
  ag_jax.save_hf_llama(str(tmp_path / "out"), tiny_cfg, params)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
  tokens = np.random.RandomState(2).randint(0, 64, (2, 10))
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  assert np.abs(ours - hf_logits(hf.eval(), tokens)).max() < 1e-4
  cfg2, params2 = ag_jax.load_hf_llama(str(tmp_path / "out"))
  assert cfg2 == tiny_cfg
