"""The embedded default world: the shipped long-context model, its tokenizer and gates, and the
recipes that made them.

Full-cache accuracy is computed here with a plain forward pass (teacher-forced answers,
argmax), independently of the engine; the engine's AG generations are scored by text.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest

import ag_jax
from ag_jax import default_world, engine
from ag_jax.batch_decode import DEFAULT_WORLD_NEW_TOKENS, score_generation
from ag_jax.data import ruler
from ag_jax.evaluation.ruler_eval import encode_example
from ag_jax.policies import AttentionGate
from ag_jax.train import train
from ag_jax.train_config import load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_TASK = 8


@pytest.fixture(scope="module")
def world():
  model, variables, tokenizer = ag_jax.load_default()
  tasks, _ = default_world.suite()
  pairs = default_world.test_prompts(PER_TASK * len(tasks), tokenizer=tokenizer)
  return model, variables, tokenizer, pairs


def test_world_json_names_the_suite_and_a_budget():
  tasks, config = default_world.suite()
  assert set(tasks) <= set(ruler.RETRIEVAL_TASKS) and "niah_multikey" in tasks
  assert config.length >= 512 and config.haystack == "stdlib"
  assert 0 < default_world.default_budget() <= 0.5


def test_the_tokenizer_ships_with_the_model_and_holds_every_key_and_value(world):
  _, _, tokenizer, _ = world
  assert os.path.exists(os.path.join(default_world.ASSET_DIR, "model", "tokenizer.json"))
  for piece in ruler.required_tokens():
    assert len(tokenizer.encode(piece, add_bos=False)) == 1, piece


def test_full_cache_accuracy_per_task(world):
  """Teacher-forced as the suite scores: every answer item's tokens are the argmax after the
  prompt, the joins and the items before it, the whole context in view (every keep flag on).
  One right-padded batch: under the causal mask a row's logits do not see its padding."""
  model, variables, tokenizer, _ = world
  tasks, config = default_world.suite()
  rows = []  # (task, context, continuation, spans)
  for task in tasks:
    for i in range(PER_TASK):
      ex = ruler.generate_example(dataclasses.replace(config, task=task), tokenizer, "test", i)
      rows.append((task, *encode_example(tokenizer, ex)))
  width = max(len(c) + len(k) for _, c, k, _ in rows)
  tokens = np.full((len(rows), width), tokenizer.pad_id, np.int32)  # [B, T]
  for r, (_, context, continuation, _) in enumerate(rows):
    tokens[r, :len(context) + len(continuation)] = context + continuation
  keep = np.ones((model.cfg.num_layers, len(rows), model.cfg.num_kv_heads, width), bool)
  logits = np.asarray(jax.jit(model.apply)(variables, tokens, keep=keep))  # [B, T, V]
  for task in tasks:
    hits = []
    for r, (row_task, context, continuation, spans) in enumerate(rows):
      if row_task == task:
        predicted = logits[r, len(context) - 1:len(context) + len(continuation) - 1].argmax(-1)
        hits += [bool((predicted[a:b] == continuation[a:b]).all()) for a, b in spans]
    assert np.mean(hits) >= 0.85, (task, hits)  # measured at 512: multikey 1.0, multiquery 0.94


def test_attention_gate_answers_under_the_default_budget(world):
  model, variables, tokenizer, pairs = world
  prompts = [tokenizer.encode(p, add_bos=True) for p, _ in pairs]
  result = engine.generate(model, variables, prompts, policy=AttentionGate(),
                           budget=default_world.default_budget(),
                           max_new_tokens=DEFAULT_WORLD_NEW_TOKENS,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  texts = result.texts(tokenizer)
  accuracy = np.mean([score_generation(t, a) for t, (_, a) in zip(texts, pairs)])
  assert accuracy >= 0.5, accuracy
  budget = default_world.default_budget()
  assert float(result.kept_ratio.mean()) <= budget + 0.05
  assert result.kv_bytes <= (budget + 0.05) * result.full_kv_bytes


@pytest.mark.parametrize("recipe,extra", [
    ("ruler_base.yaml", []),
    ("ruler_gates.yaml", [f"model.hf_path={os.path.join(default_world.ASSET_DIR, 'model')}"]),
])
def test_recipes_run_a_few_steps(recipe, extra, tmp_path):
  cfg = load_train_config(os.path.join(ROOT, "configs", "train", recipe), extra + [
      f"run.out_dir={tmp_path}", "run.steps=2", "run.eval_every=0", "data.eval_split=null",
      "data.seq_len=128", "data.batch_size=8", "checkpoint.every=0",
      "run.progress=false"])
  result = train(cfg)
  assert result.history and np.isfinite(result.history[-1]["loss"])
  if cfg.gate is None:
    assert ag_jax.load_hf_llama(result.model_dir)[0].num_layers == 4
  else:
    gate_cfg, _ = ag_jax.load_gates(result.gates_dir)
    assert gate_cfg == cfg.gate


def test_a_recency_window_fails_where_the_full_cache_answers(world):
  """The world discriminates: under the kvpress protocol (context compressed, question read
  with room), keeping the last 1/8 of the context loses the needles."""
  from ag_jax.evaluation.ruler_eval import build_ruler_tasks
  from ag_jax.policies import Full, StreamingLLM
  model, variables, tokenizer, _ = world
  _, config = default_world.suite()
  (task,) = build_ruler_tasks(tokenizer, ["niah_multikey"], [config.length], 16)
  full = task.run(model, variables, tokenizer, Full())["accuracy"]
  window = task.run(model, variables, tokenizer, StreamingLLM(), budget=0.125)["accuracy"]
  assert full >= 0.85 and window < 0.6 * full, (full, window)


def test_evaluate_without_a_model_tables_the_world_on_the_suite(tmp_path):
  """`python -m ag_jax.evaluate` with no --model runs the world's own table (--task ruler),
  and the table flags apply to it."""
  import json

  from ag_jax import evaluate
  assert evaluate.main(["--num-examples", "2", "--budgets", "0.5", "--policy", "ag",
                        "--lengths", "256", "--subtasks", "niah_multikey", "--quiet",
                        "--out", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "results.json").read_text())
  assert {(r["task"], r["length"], r["policy"], r["budget"]) for r in rows} == {
      ("niah_multikey", 256, "ag", 0.5)}
