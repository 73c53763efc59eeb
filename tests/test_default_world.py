"""The embedded default world: the shipped tiny model and gates, and the recipes that made them.

Accuracy is computed here with a plain forward pass (argmax at the prompt's last position),
independently of the engine; the engine's AG numbers are checked against it.
"""

import os

import numpy as np
import pytest

import ag_jax
from ag_jax import default_world, engine
from ag_jax.policies import AttentionGate
from ag_jax.train import train
from ag_jax.train_config import load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROMPTS = 64


@pytest.fixture(scope="module")
def world():
  model, variables, tokenizer = ag_jax.load_default()
  pairs = default_world.test_prompts(NUM_PROMPTS)
  prompts = [tokenizer.encode(p, add_bos=True) for p, _ in pairs]
  answers = np.array([tokenizer.encode(a, add_bos=False)[0] for _, a in pairs])
  return model, variables, tokenizer, prompts, answers


def test_world_json_names_a_valid_corpus_and_budget():
  cfg = default_world.recall_config()
  assert cfg.value_len == 1 and cfg.num_facts >= 2
  assert 0 < default_world.default_budget() <= 0.5


def test_full_cache_accuracy_on_the_test_split(world):
  model, variables, _, prompts, answers = world
  tokens, lengths = engine.pad_prompts(prompts)
  keep = np.ones((model.cfg.num_layers, len(prompts), model.cfg.num_kv_heads, tokens.shape[1]),
                 bool)  # every flag forced on: the base model with its full cache
  logits = np.asarray(model.apply(variables, tokens, keep=keep))
  predicted = logits[np.arange(len(prompts)), lengths - 1].argmax(-1)
  assert (predicted == answers).mean() >= 0.95  # measured: 1.0


def test_attention_gate_keeps_under_30_percent_and_still_answers(world):
  model, variables, _, prompts, answers = world
  result = engine.generate(model, variables, prompts, policy=AttentionGate(),
                           budget=default_world.default_budget(), max_new_tokens=1)
  accuracy = (result.tokens[:, 0] == answers).mean()
  assert accuracy >= 0.9, accuracy  # measured: 0.986 on 512 test prompts
  assert float(result.kept_ratio.mean()) <= 0.3  # measured: 0.291 on 512
  assert result.kv_bytes <= 0.55 * result.full_kv_bytes  # the cache allocated: the budget


@pytest.mark.parametrize("recipe,extra", [
    ("tiny_base.yaml", []),
    ("tiny_gates.yaml", [f"model.hf_path={os.path.join(default_world.ASSET_DIR, 'model')}"]),
])
def test_recipes_run_a_few_steps(recipe, extra, tmp_path):
  cfg = load_train_config(os.path.join(ROOT, "configs", "train", recipe), extra + [
      f"run.out_dir={tmp_path}", "run.steps=2", "run.eval_every=0", "data.eval_split=null",
      "data.batch_size=8", "checkpoint.every=0", "run.progress=false"])
  result = train(cfg)
  assert result.history and np.isfinite(result.history[-1]["loss"])
  if cfg.gate is None:
    assert ag_jax.load_hf_llama(result.model_dir)[0].num_layers == 4
  else:
    gate_cfg, _ = ag_jax.load_gates(result.gates_dir)
    assert gate_cfg == cfg.gate


def test_recall_asks_the_question_after_the_context_is_evicted(world):
  """The evaluation protocol: prefill the context, then read the question through the cache.
  Prefilling the whole prompt would let StreamingLLM answer from its full-attention prefill."""
  from ag_jax.evaluation import recall_accuracy
  from ag_jax.policies import Full, StreamingLLM
  model, variables, tokenizer, _, _ = world
  examples = default_world.test_prompts(NUM_PROMPTS)
  kwargs = dict(question_marker="?", batch_size=32)
  full = recall_accuracy(model, variables, tokenizer, examples, policy=Full(), **kwargs)
  assert full["accuracy"] >= 0.95  # as the plain forward pass above
  # Without overflow the AG cache is exactly the training view: same answers either way.
  ag_after = recall_accuracy(model, variables, tokenizer, examples, policy=AttentionGate(),
                             budget=1.0, **kwargs)
  ag_whole = recall_accuracy(model, variables, tokenizer, examples, policy=AttentionGate(),
                             budget=1.0, batch_size=32)
  assert ag_after["accuracy"] == ag_whole["accuracy"] >= 0.9
  # A recency window of 1/8 of the context cannot hold the facts once the question comes.
  window = recall_accuracy(model, variables, tokenizer, examples, policy=StreamingLLM(),
                           budget=0.125, **kwargs)
  whole = recall_accuracy(model, variables, tokenizer, examples, policy=StreamingLLM(),
                          budget=0.125, batch_size=32)
  assert window["accuracy"] < 0.5 <= whole["accuracy"]
