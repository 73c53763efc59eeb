"""Configs (validation, presets, overrides) and tokenizers."""

import json
import os

import pytest

from ag_jax import config
from ag_jax.config import ConfigError, GateConfig, ModelConfig
from ag_jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

BASE = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


@pytest.mark.parametrize("name", ["llama2_7b", "llama3_8b", "llama3_1_8b", "llama3_2_1b",
                                  "mistral_7b", "tiny"])
def test_presets_load(name):
  cfg = config.preset(name)
  assert cfg.num_heads % cfg.num_kv_heads == 0
  hash(cfg)  # static-argument friendly


def test_preset_values_match_known_models():
  cfg = config.preset("llama3_1_8b")
  assert (cfg.num_kv_heads, cfg.mlp_dim, cfg.rope_type) == (8, 14336, "llama3")
  assert config.preset("llama3_2_1b").tie_embeddings


def test_overrides_apply_and_parse_types():
  cfg = config.preset("tiny", ["num_layers=2", "dtype=bfloat16", "rope_theta=5e2"])
  assert (cfg.num_layers, cfg.dtype, cfg.rope_theta) == (2, "bfloat16", 500.0)
  assert isinstance(cfg.rope_theta, float)


def test_unknown_override_lists_valid_keys():
  with pytest.raises(ConfigError, match=r"unknown config key num_layer;.*num_layers"):
    config.preset("tiny", ["num_layer=3"])


def test_unknown_preset_lists_known():
  with pytest.raises(ConfigError, match="known presets: .*llama2_7b"):
    config.preset("llama9")


def test_override_syntax_error():
  with pytest.raises(ConfigError, match="key=value"):
    config.parse_overrides(["num_layers"])


def test_nested_overrides():
  assert config.parse_overrides(["a.b=3", "a.c=null", "d=[1, 2]"]) == {"a": {"b": 3, "c": None}, "d": [1, 2]}


@pytest.mark.parametrize("field,value,message", [
    ("num_kv_heads", 3, "num_heads \\(4\\) must be divisible by num_kv_heads \\(3\\)"),
    ("head_dim", 7, "head_dim must be even"),
    ("dtype", "float64", "dtype must be one of"),
    ("dim", 0, "dim must be a positive integer"),
])
def test_model_config_validation_names_the_field(field, value, message):
  with pytest.raises(ConfigError, match=message):
    ModelConfig(**{**BASE, field: value})


@pytest.mark.parametrize("field,value,message", [
    ("target_keep", 0.0, "target_keep must be in \\(0, 1\\]"),
    ("target_keep", 1.5, "target_keep must be in \\(0, 1\\]"),
    ("kind", "mlp", "kind must be one of"),
    ("eviction_loss", "l1", "eviction_loss must be one of"),
    ("window", 0, "window must be a positive integer"),
    ("distill_weight", -1.0, "distill_weight must be a number >= 0"),
    ("distill_weight", "1", "distill_weight must be a number >= 0"),
    ("distill_under_budget", "no", "distill_under_budget must be true or false"),
    ("distill_under_budget", False, "needs gate.distill_weight > 0 and gate.train_budgets"),
])
def test_gate_config_validation(field, value, message):
  with pytest.raises(ConfigError, match=message):
    GateConfig(**{field: value})


def test_from_hf_reads_old_and_new_rope_fields():
  hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16}
  old = ModelConfig.from_hf({**hf, "rope_theta": 5.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
  new = ModelConfig.from_hf({**hf, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                       "rope_theta": 5.0}})
  assert old.rope_type == new.rope_type == "linear" and old.rope_theta == new.rope_theta == 5.0
  assert old.head_dim == 4 and old.num_kv_heads == 2


def test_byte_tokenizer_roundtrip():
  tok = load_tokenizer("bytes")
  ids = tok.encode("héllo", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < tok.vocab_size
  assert tok.decode(ids) == "héllo"


def test_hf_tokenizer_from_local_json(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<unk>", "<s>", "</s>"])  # as HF files mark them
  tok.save(str(tmp_path / "tokenizer.json"))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
  hf = load_tokenizer(str(tmp_path))
  assert isinstance(hf, HFTokenizer)
  assert hf.encode("hello world", add_bos=True, add_eos=True) == [1, 3, 4, 2]
  assert (hf.bos_id, hf.eos_id, hf.vocab_size) == (1, 2, 5)
  assert hf.decode([1, 3, 4, 2]) == "hello world"


def test_hf_tokenizer_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    HFTokenizer(str(tmp_path))
  assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
  assert not os.path.exists(tmp_path / "tokenizer.json")
