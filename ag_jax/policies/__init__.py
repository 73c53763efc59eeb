"""Cache policies: which tokens a layer keeps, and how it ranks them when capacity overflows.

A policy is a small frozen (hashable, static under `jit`) object used by every layer:
  * prefill_attend  flags the prefill attention uses (None: plain causal attention);
  * prefill_select  which prompt tokens go into the cache and their scores; the
                    compaction then keeps the `capacity` highest-scoring ones per row;
  * decode_admit    whether the new token wants a slot, and its score;
  * decode_update   the scores after a decode step (H2O adds this step's attention mass);
  * eviction_score  what capacity overflow compares: a full row replaces its lowest-ranked
                    slot with the newcomer when the newcomer ranks higher.
One cache, one compaction kernel and one decode kernel serve every policy (DESIGN §2), so
ablations compare like with like. Arrays: B batch, K kv heads, G query heads per KV head,
T prompt, S cache slots.

The baselines compress the way kvpress does: prefill attends over the whole prompt, then
the cache keeps what the policy selects. Knobs that depend on the cache size (H2O's None
and fractions) are resolved by `fit(policy, capacity)`, which also shrinks the cache of
window policies to their window; call it once the capacity is known.
"""

from __future__ import annotations

import dataclasses

from ag_jax.policies.base import AttentionGate, Full, Policy, PolicyError, fit
from ag_jax.policies.baselines import H2O, Local, Random, SnapKV, StreamingLLM
from ag_jax.policies.scored import TOVA, Knorm, ObservedAttention

REGISTRY = {"ag": AttentionGate, "attention_gate": AttentionGate, "full": Full,
            "streaming_llm": StreamingLLM, "h2o": H2O, "snapkv": SnapKV, "random": Random,
            "local": Local, "observed_attention": ObservedAttention, "knorm": Knorm, "tova": TOVA}


def make_policy(name: str, **kwargs) -> Policy:
  """A policy by name (`ag`, `full`, `h2o`, ...) with its knobs; unknown names or knobs
  raise one error that lists the known ones."""
  key = name.lower().replace("-", "_")
  if key not in REGISTRY:
    raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(sorted(REGISTRY))}")
  cls = REGISTRY[key]
  known = [f.name for f in dataclasses.fields(cls) if f.repr]  # repr=False: not a knob
  unknown = sorted(set(kwargs) - set(known))
  if unknown:
    raise PolicyError(f"policy {key!r} has no knob {', '.join(unknown)}; its knobs: "
                      f"{', '.join(known) or 'none'}")
  return cls(**kwargs)


__all__ = ["AttentionGate", "Full", "H2O", "Knorm", "Local", "ObservedAttention", "TOVA", "Policy", "PolicyError", "REGISTRY", "Random",
           "SnapKV", "StreamingLLM", "fit", "make_policy"]
