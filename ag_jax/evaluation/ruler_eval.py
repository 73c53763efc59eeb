"""The RULER-style suite under eviction, in two protocols (DESIGN §4b).

kvpress (default): prefill the context only, keep `max(1, int(T * budget))` tokens per
(layer, KV head) (T = that example's context: rows of one batch keep different counts,
`engine.prefill(..., row_capacity=)`), with room reserved for the question and answer
(`engine.prefill(..., reserve=R)`), then read question and answer through a Full policy:
nothing after the context is ever evicted. Results do not depend on the batch size.
decode: the context is prefilled under the policy and question + answer go through it too
(each example's cache is sized for its context + question + answer; AG's decode-time gating).

Answers are teacher-forced: an answer item is right when greedy decoding picks each of its
tokens (what greedy generation prints, item by item); accuracy is RULER's string_match_all,
the mean share of items right.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Sequence

import numpy as np

from ag_jax import capacity_view, engine, policies
from ag_jax.data.ruler import answer_joins
from ag_jax.evaluation.scoring import (CacheStats, batch_setting, padded_batches,
                                       resolve_setting, score_and_greedy, score_batch)

PROTOCOLS = ("kvpress", "decode")


def kvpress_capacity(context_tokens: int, budget: float | None) -> int:
  """kvpress's rounding: max(1, int(T * budget)) (the one statement the budget-aware training
  view uses too, `capacity_view.kvpress_capacity`); no budget: all T."""
  return context_tokens if budget is None else int(capacity_view.kvpress_capacity(
      context_tokens, budget))


def encode_example(tokenizer, ex: dict) -> tuple[list[int], list[int], list[tuple[int, int]]]:
  """(context ids with BOS, question + answer ids, [(start, end) of each answer item in the
  continuation]). The joins between items (ex["joins"], default ',') are teacher-forced."""
  context = tokenizer.encode(ex["context"], add_bos=True)
  cont = tokenizer.encode(ex["question"], add_bos=False)
  joins = answer_joins(ex["answers"], ex.get("joins"))
  spans = []
  for j, item in enumerate(ex["answers"]):
    if j:
      cont += tokenizer.encode(joins[j - 1], add_bos=False)
    ids = tokenizer.encode(item, add_bos=False)
    spans.append((len(cont), len(cont) + len(ids)))
    cont += ids
  return context, cont, spans


def _kvpress_settings(model, policy, lengths, budget):
  """kvpress sizes each prompt's cache by its own length: row i keeps
  max(1, int(T_i * budget)) tokens. -> [(bound policy, capacity)] per row."""
  return [resolve_setting(model, policy, int(t),
                          kvpress_capacity(int(t), budget if policy.evicts else None), None)
          for t in lengths]


def score_protocol(model, variables, contexts: Sequence[Sequence[int]],
                   continuations: Sequence[Sequence[int]], *, policy=None, budget=None,
                   protocol: str = "kvpress", batch_size: int = 8, bucket: int = 16,
                   pad_id: int = 0, backend=None):
  """Teacher-forced (log-probs, greedy hits) of each continuation after its context, and
  CacheStats; the cache as the protocol says."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  if protocol == "decode":
    return score_and_greedy(model, variables, contexts, continuations, policy=policy,
                            budget=budget, batch_size=batch_size, bucket=bucket, pad_id=pad_id,
                            backend=backend)
  if "reserve" not in inspect.signature(engine.prefill).parameters:
    raise NotImplementedError("the kvpress protocol needs engine.prefill(..., reserve=R); "
                              "this engine has none yet: use protocol='decode'")
  policy = policy or engine.default_policy(model)
  scores, greedy = [None] * len(contexts), [None] * len(contexts)
  stats = CacheStats()
  for rows, tokens, lengths, targets, active in padded_batches(
      contexts, continuations, batch_size, bucket, pad_id):
    width, steps = tokens.shape[1], targets.shape[1]
    bound, keep, row_keep = batch_setting(_kvpress_settings(model, policy, lengths, budget))
    logits, cache = engine.prefill(model, variables, tokens, lengths, policy=bound,
                                   capacity=keep if bound.evicts else width, reserve=steps,
                                   backend=backend, row_capacity=row_keep if bound.evicts else None)
    score_batch(model, variables, cache.replace(policy=policies.Full()), logits, rows,
                continuations, targets, active, width=width, policy=bound, capacity=keep,
                out=(scores, greedy, stats))
  return scores, greedy, stats


@dataclasses.dataclass
class RulerTask:
  """One suite task at one length: accuracy = mean share of answer items right."""

  name: str
  examples: Sequence[dict]
  length: int
  protocol: str = "kvpress"
  metrics = ("accuracy",)

  def run(self, model, variables, tokenizer, policy, budget=None, capacity=None,
          batch_size: int = 8, backend=None) -> dict:
    if capacity is not None:
      raise ValueError("the suite sizes caches by --budgets, not --capacities")
    encoded = [encode_example(tokenizer, ex) for ex in self.examples]
    scores, greedy, stats = score_protocol(
        model, variables, [e[0] for e in encoded], [e[1] for e in encoded], policy=policy,
        budget=budget, protocol=self.protocol, batch_size=batch_size, pad_id=tokenizer.pad_id,
        backend=backend)
    shares = [np.mean([g[a:b].all() for a, b in spans]) for g, (_, _, spans) in
              zip(greedy, encoded)]
    # Mean NLL (nats) per answer token: a smooth signal where accuracy is all 0 or all 1.
    answer_logp = [float(s[a:b].sum()) for s, (_, _, spans) in zip(scores, encoded)
                   for a, b in spans]
    answer_tokens = sum(b - a for _, _, spans in encoded for a, b in spans)
    return {"accuracy": float(np.mean(shares)),
            "answer_nll": -sum(answer_logp) / max(answer_tokens, 1),
            "examples": len(self.examples),
            "length": self.length, "protocol": self.protocol, **stats.as_dict()}


def build_ruler_tasks(tokenizer, tasks: Sequence[str], lengths: Sequence[int], num_examples: int,
                      split: str = "test", protocol: str = "kvpress", **knobs) -> list[RulerTask]:
  from ag_jax.data import ruler  # pylint: disable=g-import-not-at-top
  out = []
  for task in tasks:
    for length in lengths:
      config = ruler.RulerConfig(task=task, length=length, **knobs)
      examples = [ruler.generate_example(config, tokenizer, split, i) for i in range(num_examples)]
      out.append(RulerTask(f"{task}@{length}", examples, length, protocol))
  return out


# ---------------------------------------------------------------------------------------------
# Bits per byte on held-out stdlib files

LONG_RANGE_BYTES = 512


def long_range_mask(text: str, distance: int = LONG_RANGE_BYTES) -> np.ndarray:
  """bool [bytes of text]: bytes of identifiers whose previous occurrence starts at least
  `distance` bytes earlier (identifiers never seen before are not in the subset)."""
  import re  # pylint: disable=g-import-not-at-top
  data = text.encode("utf-8")
  mask = np.zeros(len(data), bool)
  last: dict[bytes, int] = {}
  for m in re.finditer(rb"[A-Za-z_][A-Za-z0-9_]*", data):
    word, at = m.group(), m.start()
    if word in last and at - last[word] >= distance:
      mask[m.start():m.end()] = True
    last[word] = at
  return mask


def bpb_windows(tokenizer, num: int, context: int = 2048, split: str = "test"):
  """[(ids with BOS, per-token byte lengths, window text)] of consecutive stdlib text."""
  from ag_jax.data import stdlib  # pylint: disable=g-import-not-at-top
  stream = "".join(t for _, t in stdlib.read_texts(split))
  out, at = [], 0
  chunk = context * 8  # chars: more than `context` tokens of code
  while len(out) < num and at < len(stream):
    text = stream[at:at + chunk]
    ids = tokenizer.encode(text, add_bos=False)[:context - 1]
    nbytes = [len(tokenizer.decode(ids[:k + 1]).encode("utf-8")) for k in range(len(ids))]
    text = tokenizer.decode(ids)
    sizes = np.diff([0] + nbytes)
    out.append(([tokenizer.bos_id] + ids, sizes, text))
    at += len(text)
  return out


def token_byte_sizes(tokenizer, ids: Sequence[int]) -> np.ndarray:
  nbytes = [len(tokenizer.decode(list(ids[:k + 1])).encode("utf-8")) for k in range(len(ids))]
  return np.diff([0] + nbytes)


@dataclasses.dataclass
class StdlibBpbTask:
  """Bits per byte of the second half of each 2k-token window given its first half (the
  context the policy compresses): whole text and the long-range identifier subset."""

  name: str
  windows: Sequence[tuple]
  protocol: str = "kvpress"
  metrics = ("bpb", "bpb_long_range")

  def run(self, model, variables, tokenizer, policy, budget=None, capacity=None,
          batch_size: int = 4, backend=None) -> dict:
    contexts, conts, weights = [], [], []
    total_bytes, long_bytes = 0, 0
    for ids, _, text in self.windows:
      cut = len(ids) // 2
      contexts.append(ids[:cut])
      conts.append(ids[cut:])
      sizes = token_byte_sizes(tokenizer, ids[1:])  # bytes of each text token
      mask = long_range_mask(text)
      offsets = np.concatenate([[0], np.cumsum(sizes)])
      frac = np.array([mask[offsets[k]:offsets[k + 1]].mean() if sizes[k] else 0.0
                       for k in range(len(sizes))])
      scored = slice(cut - 1, None)  # ids[cut:] are text tokens cut-1 ...
      weights.append(frac[scored])
      total_bytes += int(sizes[scored].sum())
      long_bytes += float((frac[scored] * sizes[scored]).sum())
    scores, _, stats = score_protocol(model, variables, contexts, conts, policy=policy,
                                      budget=budget, protocol=self.protocol,
                                      batch_size=batch_size, pad_id=tokenizer.pad_id,
                                      backend=backend)
    nll = -sum(float(s.sum()) for s in scores)
    nll_long = -sum(float((s * w).sum()) for s, w in zip(scores, weights))
    ln2 = float(np.log(2.0))
    return {"bpb": nll / ln2 / total_bytes,
            "bpb_long_range": nll_long / ln2 / max(long_bytes, 1e-9),
            "bytes": total_bytes, "long_range_bytes": long_bytes, "protocol": self.protocol,
            "examples": len(self.windows), **stats.as_dict()}
