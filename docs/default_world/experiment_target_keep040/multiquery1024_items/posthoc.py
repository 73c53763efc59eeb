"""Scratch measurement (not part of the package, no tests): AG's flags applied after a full-attention
prefill (a kvpress-style press) instead of AG proper, where an evicted token is invisible to the
later context tokens too. usage (repository root): python posthoc.py GATES LENGTH N TASK BUDGETS"""
import dataclasses, json, sys, types
import numpy as np
from ag_jax.batch_decode import load_model
from ag_jax.data import ruler
from ag_jax.evaluation.ruler_eval import encode_example, score_protocol
from ag_jax.policies import AttentionGate

@dataclasses.dataclass(frozen=True)
class PostHocAG(AttentionGate):
  def prefill_attend(self, prob, flags, valid):
    return None

gates_dir, length, n, task = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
budgets = [float(b) for b in sys.argv[5].split(",")]
args = types.SimpleNamespace(model="ag_jax/assets/ruler_tiny/model", gates=gates_dir, dtype="float32", tokenizer=None, seed=0)
model, variables, tok = load_model(args)
cfg = ruler.RulerConfig(task=task, length=length)
enc = [encode_example(tok, ruler.generate_example(cfg, tok, "test", i)) for i in range(n)]
for b in budgets:
  for name, pol in (("posthoc", PostHocAG()),):
    _, greedy, stats = score_protocol(model, variables, [e[0] for e in enc], [e[1] for e in enc],
                                      policy=pol, budget=b, pad_id=tok.pad_id)
    acc = np.mean([np.mean([g[a:bb].all() for a, bb in spans]) for g, (_, _, spans) in zip(greedy, enc)])
    print(task, length, name, b, f"{100*acc:.2f}", stats.as_dict().get("kept"), flush=True)
