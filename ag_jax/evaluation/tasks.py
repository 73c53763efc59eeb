"""Evaluation tasks under eviction: recall accuracy, perplexity, multiple choice.

Every task has a `name`, its `metrics` (the headline first) and
`run(model, variables, tokenizer, policy, capacity=, budget=, batch_size=, backend=)`
returning the metrics plus the cache statistics (`CacheStats.as_dict`).

Multiple choice follows the lm-evaluation-harness recipe: the context is prefilled through
the evicting cache and each choice (" " + text) is scored teacher-forced; `acc` picks the
highest total log-likelihood, `acc_norm` the highest per byte of the choice. Context and
choice are tokenized separately (exact for byte-level tokenizers). Data sets are read by
TFDS name with `ag_jax.data.open_source` (prepared ArrayRecord, no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Sequence

import numpy as np

import ag_jax
from ag_jax.data import DataError, open_source, score_answer
from ag_jax.evaluation.scoring import (CacheStats, perplexity, resolve_setting, score_and_greedy,
                                       score_continuations)


@dataclasses.dataclass(frozen=True)
class MCExample:
  context: str
  choices: tuple[str, ...]
  label: int  # index into choices


def _texts(values) -> list[str]:
  # A Sequence(Text) feature can come back as a list of bytes, which open_source's text
  # decoding leaves alone.
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _piqa(x) -> Optional[MCExample]:
  return MCExample(f"Question: {x['goal']}\nAnswer:", (x["sol1"], x["sol2"]), int(x["label"]))


def _arc(x) -> Optional[MCExample]:
  texts, labels = _texts(x["choices"]["text"]), [int(v) for v in x["choices"]["label"]]
  n = min(len(texts), len(labels))
  answer = int(x["answerKey"])  # ClassLabel A..E; choices carry their own labels
  if answer not in labels[:n]:
    return None
  return MCExample(f"Question: {x['question']}\nAnswer:", tuple(texts[:n]), labels.index(answer))


def _boolq(x) -> Optional[MCExample]:
  return MCExample(f"{x['passage']}\nQuestion: {x['question']}?\nAnswer:", ("no", "yes"),
                   int(bool(x["answer"])))


def _hellaswag_clean(text: str) -> str:  # lm-evaluation-harness's preprocess
  text = text.strip().replace(" [title]", ". ")
  return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(x) -> Optional[MCExample]:
  context = _hellaswag_clean(f"{x['activity_label']}: {x['context']}")
  return MCExample(context, tuple(_hellaswag_clean(e) for e in _texts(x["endings"])), int(x["label"]))


@dataclasses.dataclass(frozen=True)
class MCFormat:
  tfds_name: str             # default TFDS name (with config)
  split: str                 # default split (one with labels)
  convert: Callable[[dict], Optional[MCExample]]


MC_FORMATS = {
    "piqa": MCFormat("piqa", "validation", _piqa),
    "ai2_arc": MCFormat("ai2_arc/ARC-Challenge", "test", _arc),
    "bool_q": MCFormat("bool_q", "validation", _boolq),
    "hellaswag": MCFormat("hellaswag", "validation", _hellaswag),
}
MC_ALIASES = {"boolq": "bool_q", "arc_easy": "ai2_arc/ARC-Easy",
              "arc_challenge": "ai2_arc/ARC-Challenge"}


def mc_format(name: str) -> tuple[str, MCFormat]:
  """('tfds name[/config]', its format) of a multiple-choice data set name or alias."""
  name = MC_ALIASES.get(name, name)
  base = name.split("/")[0].split(":")[0]
  if base not in MC_FORMATS:
    raise DataError(f"no multiple-choice format for {name!r}; known: "
                    f"{', '.join(sorted(MC_FORMATS) + sorted(MC_ALIASES))}")
  fmt = MC_FORMATS[base]
  return (fmt.tfds_name if name == base else name), fmt


def load_multiple_choice(name: str, split: str | None = None, data_dir: str | None = None,
                         limit: int | None = None) -> list[MCExample]:
  """The first `limit` labelled examples of a TFDS multiple-choice data set."""
  spec, fmt = mc_format(name)
  source = open_source(spec, split or fmt.split, data_dir)
  examples = []
  for i in range(len(source)):
    example = fmt.convert(source[i])
    if example is None or not 0 <= example.label < len(example.choices) or \
        not all(example.choices):
      continue  # unlabelled (test splits) or malformed
    examples.append(example)
    if limit is not None and len(examples) >= limit:
      break
  if not examples:
    raise DataError(f"{spec!r} split {split or fmt.split!r} has no labelled examples")
  return examples


@dataclasses.dataclass
class MultipleChoiceTask:
  name: str
  examples: Sequence[MCExample]
  metrics = ("acc", "acc_norm")

  def run(self, model, variables, tokenizer, policy, **kwargs) -> dict:
    prefixes, continuations, owner = [], [], []
    for i, ex in enumerate(self.examples):
      context = tokenizer.encode(ex.context, add_bos=True)
      for choice in ex.choices:
        prefixes.append(context)
        continuations.append(tokenizer.encode(" " + choice, add_bos=False))
        owner.append(i)
    scores, stats = score_continuations(model, variables, prefixes, continuations, policy=policy,
                                        pad_id=tokenizer.pad_id, **kwargs)
    loglik = [[] for _ in self.examples]  # [example][choice]
    for i, s in zip(owner, scores):
      loglik[i].append(float(s.sum()))
    acc, acc_norm = [], []
    for ex, ll in zip(self.examples, loglik):
      per_byte = [v / len((" " + c).encode("utf-8")) for v, c in zip(ll, ex.choices)]
      acc.append(int(np.argmax(ll)) == ex.label)
      acc_norm.append(int(np.argmax(per_byte)) == ex.label)
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)),
            "examples": len(self.examples), **stats.as_dict()}


@dataclasses.dataclass
class PerplexityTask:
  name: str
  texts: Sequence[str]
  prefix_fraction: float = 0.5
  max_tokens: int | None = None  # truncate each text to this many tokens
  metrics = ("perplexity", "nll")

  def run(self, model, variables, tokenizer, policy, **kwargs) -> dict:
    rows = [tokenizer.encode(t, add_bos=True)[:self.max_tokens] for t in self.texts]
    return perplexity(model, variables, [r for r in rows if len(r) >= 2], policy=policy,
                      prefix_fraction=self.prefix_fraction, pad_id=tokenizer.pad_id, **kwargs)


@dataclasses.dataclass
class RecallTask:
  """Greedy answers to (prompt, answer) pairs, scored by `score_answer` (exact prefix).

  With `question_marker`, each prompt is split at the marker's last occurrence: the
  context before it is prefilled and evicted, and the question is read afterwards, token
  by token through the cache (the protocol of kvpress: compress the context, then ask).
  Without it the whole prompt is prefilled, and a policy that attends fully during
  prefill and evicts only afterwards (StreamingLLM, H2O, SnapKV) answers from the full
  prompt whenever the answer is the first generated token: eviction is never tested.
  """

  name: str
  examples: Sequence[tuple[str, str]]
  question_marker: str | None = None
  metrics = ("accuracy",)

  def run(self, model, variables, tokenizer, policy, **kwargs) -> dict:
    return recall_accuracy(model, variables, tokenizer, self.examples, policy=policy,
                           question_marker=self.question_marker, **kwargs)


def recall_accuracy(model, variables, tokenizer, examples: Sequence[tuple[str, str]], *,
                    policy=None, capacity: int | None = None, budget: float | None = None,
                    batch_size: int = 16, backend: str | None = None,
                    max_new_tokens: int | None = None,
                    question_marker: str | None = None) -> dict:
  """Accuracy of greedy generation on (prompt, answer) pairs through the evicting cache.

  A budget is a fraction of each example's own context (its prompt + max_new_tokens, which
  defaults to the longest answer's token count). `question_marker`: see `RecallTask`."""
  if question_marker is not None:
    return _recall_after_context(model, variables, tokenizer, examples, question_marker,
                                 policy=policy, capacity=capacity, budget=budget,
                                 batch_size=batch_size, backend=backend)
  max_new = max_new_tokens or max(len(tokenizer.encode(a, add_bos=False)) for _, a in examples)
  order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
  correct, stats = np.zeros(len(examples), bool), CacheStats()
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    ids = [tokenizer.encode(examples[i][0], add_bos=True) for i in rows]
    # generate holds each prompt to its own budget (its prompt + max_new tokens), so a row
    # answers the same in any batch; `bound` is the policy as run, for the statistics.
    bound, _ = resolve_setting(model, policy, max(map(len, ids)) + max_new, capacity, budget)
    result = ag_jax.generate(model, variables, ids, policy=bound, capacity=capacity,
                             budget=budget, max_new_tokens=max_new, eos_id=tokenizer.eos_id,
                             pad_id=tokenizer.pad_id, backend=backend)
    for i, text in zip(rows, result.texts(tokenizer)):
      correct[i] = score_answer(text, examples[i][1])
    stats.add(bound, result.capacity, result.kept_ratio, result.kv_bytes, result.cache_bytes,
              result.full_kv_bytes, len(rows))
  return {"accuracy": float(correct.mean()), "examples": len(examples), **stats.as_dict()}


def _recall_after_context(model, variables, tokenizer, examples, marker: str, **kwargs) -> dict:
  """Prefill each prompt's context, then teacher-force question + answer through the cache;
  an answer is right when greedy decoding picks every one of its tokens (exactly what
  greedy generation after the question would print). Context, question and answer are
  tokenized separately (exact for byte-level tokenizers)."""
  contexts, continuations, answer_lengths = [], [], []
  for i, (prompt, answer) in enumerate(examples):
    cut = prompt.rfind(marker)
    if cut <= 0:
      raise ValueError(f"example {i}: no question marker {marker!r} after the start of the "
                       f"prompt {prompt[:40]!r}...; use question_marker=None for such prompts")
    question = tokenizer.encode(prompt[cut:], add_bos=False)
    answer_ids = tokenizer.encode(answer, add_bos=False)
    contexts.append(tokenizer.encode(prompt[:cut], add_bos=True))
    continuations.append(question + answer_ids)
    answer_lengths.append(len(answer_ids))
  _, greedy, stats = score_and_greedy(model, variables, contexts, continuations,
                                      pad_id=tokenizer.pad_id, **kwargs)
  # The question tokens are given; only the answer's tokens must be the greedy choices.
  correct = [bool(g[-n:].all()) for g, n in zip(greedy, answer_lengths)]
  return {"accuracy": float(np.mean(correct)), "examples": len(examples), **stats.as_dict()}
