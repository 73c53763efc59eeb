"""Smoke tests: every benchmark runs at a toy size, writes its JSON and prints its table last.

No timing assertions (timings on a shared CPU mean nothing); the benchmarks' numbers are
recorded in benchmarks/RESULTS.md. Each benchmark is imported and its `main(argv)` called
in-process, so jax starts once.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import compaction  # noqa: E402
import decode  # noqa: E402
import generate  # noqa: E402
import kernel_check  # noqa: E402
import memory  # noqa: E402
import train_step  # noqa: E402

import ag_jax  # noqa: E402
from ag_jax import engine  # noqa: E402


def run(module, argv, tmp_path, capsys):
  out = tmp_path / f"{module.__name__}.json"
  module.main(["--size", "tiny", "--out", str(out)] + argv)
  text = capsys.readouterr().out
  lines = [l for l in text.strip().splitlines() if l.strip()]
  assert lines[-1].startswith("|") and any(l.startswith("|---") for l in lines), text
  data = json.loads(out.read_text())
  assert {"benchmark", "environment", "settings", "rows", "errors"} <= set(data)
  assert {"date", "jax", "device_kind", "command"} <= set(data["environment"])
  assert data["rows"] and not data["errors"], data["errors"]
  return data


def test_decode(tmp_path, capsys):
  data = run(decode, ["--contexts", "64", "--batches", "2", "--ratios", "0.5", "--steps", "1",
                      "--rounds", "1", "--copy-mib", "4"], tmp_path, capsys)
  assert [r["config"] for r in data["rows"]] == ["full", "ag@0.5"]
  row = data["rows"][1]
  for key in ("step_s", "tokens_per_s", "floor_s", "x_floor", "speedup", "floor_ratio",
              "kv_bytes", "gate_bytes", "weight_bytes"):
    assert np.isfinite(row[key]), key
  assert row["capacity"] == 32 and data["copy_bandwidth"]["bytes_per_s"] > 0
  assert set(data["targets"]) == {"ag_step_le_1.15x_floor", "speedup_ge_0.9x_floor_ratio"}


def test_decode_cache_is_what_prefill_builds(tiny_cfg, tiny_gate):
  # The benchmark's directly built cache must be the pytree prefill returns (same shapes,
  # dtypes and static fields), so decode_step runs the very program it runs after prefill.
  model = ag_jax.Llama(tiny_cfg, gate=tiny_gate)
  variables = ag_jax.init_variables(model, jax.random.key(0))
  tokens = np.ones((2, 24), np.int32)
  _, real = jax.eval_shape(lambda: ag_jax.prefill(model, variables, tokens, max_new_tokens=8,
                                                   capacity=12))  # traced, not compiled
  built = decode.make_cache(model, batch=2, context=24, capacity=12, backend=None,
                            planned_context=32)
  shape = lambda c: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), c)  # noqa: E731
  assert jax.tree_util.tree_structure(real) == jax.tree_util.tree_structure(built)
  assert shape(real) == shape(built)
  token = jnp.zeros((2,), jnp.int32)
  logits, built = ag_jax.decode_step(model, variables, built, token)
  assert np.isfinite(np.asarray(logits)).all() and int(built.next_position[0]) == 25
  # Recompiling per step would dominate decode time: later steps must hit the jit cache.
  size = engine._decode_step._cache_size()
  for _ in range(3):
    _, built = ag_jax.decode_step(model, variables, built, token)
  assert engine._decode_step._cache_size() == size


def test_memory(tmp_path, capsys):
  data = run(memory, ["--batch", "1", "--prompt", "32", "--new-tokens", "32", "--budgets",
                      "1,0.5", "--fit-contexts", "1k"], tmp_path, capsys)
  rows = {r["config"]: r for r in data["rows"]}
  assert set(rows) == {"full", "ag@1", "ag@0.5"}
  for r in rows.values():  # the measured allocation is the cache's buffers, nothing else
    assert r["measured_bytes"] == r["buffer_sum_bytes"], r
  assert "deviation" in rows["ag@0.5"] and data["fit"]["rows"][0]["context"] == 1024


def test_generate(tmp_path, capsys):
  data = run(generate, ["--batch", "2", "--prompt-len", "32", "--new-tokens", "4", "--ratios",
                        "0.5", "--rounds", "1"], tmp_path, capsys)
  rows = {r["variant"]: r for r in data["rows"]}
  assert list(rows) == ["loop-full", "generate-full", "generate-ag@0.5"]
  assert rows["generate-full"]["same_tokens_as_loop"] is True  # also: no error recorded
  assert rows["generate-ag@0.5"]["capacity"] == 18  # ceil(0.5 x (32 + 4))
  assert rows["generate-ag@0.5"]["kv_bytes"] < rows["generate-full"]["kv_bytes"]
  assert all(r["tokens_per_s"] > 0 and r["speedup"] > 0 for r in rows.values())


def test_compaction(tmp_path, capsys):
  data = run(compaction, ["--shape", "1,2,256,32", "--keeps", "0.5", "--rounds", "1"],
             tmp_path, capsys)
  assert {r["variant"] for r in data["rows"]} == {"reference end-to-end", "reference moves only"}
  assert all(r["bytes_per_s"] > 0 and r["vs_copy"] > 0 for r in data["rows"])


def test_train_step(tmp_path, capsys):
  data = run(train_step, ["--layers", "1", "--batch", "1", "--seq", "16", "--rounds", "1"],
             tmp_path, capsys)
  rows = {r["program"]: r for r in data["rows"]}
  assert set(rows) == {"frozen floor", "gate step", "full step", "gate step, dense attention"}
  assert rows["frozen floor"]["x_floor"] == 1.0 and rows["gate step"]["tokens_per_s"] > 0
  assert rows["gate step, dense attention"]["x_blocked_gate_step"] > 0
  assert data["targets"]["gate_step_le_1.15x_frozen_floor"]["value"] > 0


def test_train_step_memory(tmp_path, capsys):
  # The blocked attention never holds [T, S]; the dense statement does (fp32 logits and
  # probabilities per layer): at T=512 the difference is several [T, S] buffers.
  data = run(train_step, ["--memory", "--layers", "1", "--batch", "1", "--seq", "512"],
             tmp_path, capsys)
  rows = {r["program"]: r for r in data["rows"]}
  assert set(rows) == {"gate step", "gate step, dense attention"}
  ts = 512 * 512 * 4  # one fp32 [T, S] buffer per (kv head x group)
  assert rows["gate step, dense attention"]["temp_bytes"] > rows["gate step"]["temp_bytes"] + ts


def test_kernel_check(tmp_path, capsys):
  data = run(kernel_check, [], tmp_path, capsys)
  assert data["summary"] == {"decode_attention": True, "compact": True}


def test_decode_step_updates_the_stacked_cache_in_place(tiny_cfg, tiny_gate):
  # A decode step writes one slot per (layer, row) of the stacked [L, B, K, S, ...] buffers.
  # Found by this benchmark: when a buffer is written, read and written again (or two
  # versions of it are live), XLA copies the whole stack, twice per layer per step, which
  # made decode O(layers x cache) per step. The compiled step must not copy any of them.
  model = ag_jax.Llama(tiny_cfg, gate=tiny_gate)  # the gated step has every buffer
  variables = jax.eval_shape(lambda: ag_jax.init_variables(model, jax.random.key(0)))
  cache = jax.eval_shape(lambda: decode.make_cache(model, 2, 64, 32, backend=None))
  hlo = engine._decode_step.lower(variables, cache, jnp.zeros((2,), jnp.int32),
                                  model=model).compile().as_text()
  stacked = {f"[{','.join(map(str, x.shape))}]" for x in (cache.k, cache.v, cache.score,
                                                          cache.position, cache.gate_k)
             if x is not None}
  copies = [line.strip()[:120] for line in hlo.splitlines()
            if " copy(" in line and any(s in line.split("copy(")[0] for s in stacked)]
  assert not copies, copies


def test_serve(tmp_path, capsys):
  import serve
  data = run(serve, ["--prompts", "5", "--prompt-lens", "16,30", "--answer-lens", "3,9",
                     "--full-slots", "2", "--budgets", "0.25", "--rounds", "1",
                     "--prefill-chunk", "16"], tmp_path, capsys)
  full, ag = data["rows"]
  assert (full["variant"], ag["variant"]) == ("full", "ag@0.25")
  # One memory limit: AG's smaller slots fit more of them in it.
  assert full["cache_bytes"] <= full["limit_bytes"] and ag["cache_bytes"] <= ag["limit_bytes"]
  assert ag["slots"] > full["slots"] and ag["capacity"] < full["capacity"]
  for row in (full, ag):
    for mode in ("continuous", "static"):
      assert row[mode]["tokens"] == data["rows"][0][mode]["tokens"] > 0  # same requested tokens
      assert np.isfinite(row[mode]["tokens_per_s"])
