"""Scratch measurement (not part of the package, no tests): per multiquery item, right or
not under the full cache and under AG at budget B (kvpress protocol), the asked needle's token
position, and per layer the share of KV heads whose flags keep its value / its line before
the value. usage (repository root): python mq_items.py GATES LENGTH N BUDGET OUT.json"""
import json, sys, types
import numpy as np
import jax, jax.numpy as jnp
from ag_jax.batch_decode import load_model
from ag_jax.data import ruler
from ag_jax.evaluation.ruler_eval import encode_example, score_protocol
from ag_jax.evaluation.needle_probe import value_span
from ag_jax.evaluation.sweep import parse_policy

gates_dir, length, n, budget, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
args = types.SimpleNamespace(model="ag_jax/assets/ruler_tiny/model", gates=gates_dir, dtype="float32",
                             tokenizer=None, seed=0)
model, variables, tok = load_model(args)
cfg = ruler.RulerConfig(task="niah_multiquery", length=length)
exs = [ruler.generate_example(cfg, tok, "test", i) for i in range(n)]
enc = [encode_example(tok, e) for e in exs]
res = {}
for name, pol, b in (("full", parse_policy("full"), None), ("ag", parse_policy("ag"), budget)):
  _, greedy, _ = score_protocol(model, variables, [e[0] for e in enc], [e[1] for e in enc],
                                policy=pol, budget=b, pad_id=tok.pad_id)
  res[name] = [[bool(g[a:bb].all()) for a, bb in spans] for g, (_, _, spans) in zip(greedy, enc)]
gates = jax.jit(lambda t: model.apply(variables, t, return_gates=True)[1])
rows = []
for i, (e, (ctx, _, _)) in enumerate(zip(exs, enc)):
  padded = np.full((1, length + 8), tok.pad_id, np.int32); padded[0, :len(ctx)] = ctx
  probs, flags = gates(jnp.asarray(padded))
  for j, a in enumerate(e["asked"]):
    v0, v1 = value_span(tok, {**e, "asked": [a]})  # the value's token span
    line = ruler.niah_line(e["needle_keys"][a], e["needle_values"][a])
    p0 = len(tok.encode(e["context"][:e["context"].index(line)]))  # the line's first token
    kept = np.asarray(flags[:, 0, :, v0:v1]).all(-1)  # [L, K]
    keyk = np.asarray(flags[:, 0, :, p0:v0]).mean(-1)  # [L, K] share of line-before-value tokens kept
    rows.append({"ex": i, "item": j, "pos": v0, "len": len(ctx), "full": res["full"][i][j],
                 "ag": res["ag"][i][j], "kept_layers": kept.mean(-1).tolist(),
                 "prefix_kept_layers": keyk.mean(-1).tolist(),
                 "minprob_layers": np.asarray(probs[:, 0, :, v0:v1]).min(-1).mean(-1).tolist()})
json.dump(rows, open(out, "w"))
full = np.array([r["full"] for r in rows]); ag = np.array([r["ag"] for r in rows])
pos = np.array([r["pos"] for r in rows]); kl = np.array([r["kept_layers"] for r in rows])
print("items", len(rows), "full", full.mean(), "ag", ag.mean())
lost = full & ~ag; gained = ~full & ag
print("lost", lost.sum(), "gained", gained.sum())
for lo, hi in ((0, 256), (256, 512), (512, 768), (768, 2000)):
  m = (pos >= lo) & (pos < hi)
  print(f"pos {lo}-{hi}: n={m.sum()} full={full[m].mean():.3f} ag={ag[m].mean():.3f} lost={lost[m].sum()} value kept per layer={np.round(kl[m].mean(0),2)}")
print("lost items: value kept per layer", np.round(kl[lost].mean(0), 2) if lost.any() else None)
print("ok-under-ag items: value kept per layer", np.round(kl[ag].mean(0), 2))
