"""Tokenize documents and pack them into fixed-length rows with segment ids.

A row of `seq_len` tokens holds whole documents one after another ("segments", numbered
1, 2, ... in the row; 0 is padding). Packing is greedy and in order: a document that does
not fit in what is left of the row starts the next row, and the rest of the row is padding.
Documents are never split across rows just to fill a row (that would cut a recall fact
off from its query); only a document longer than `seq_len` is cut, into chunks of
`seq_len` tokens with a stride of `seq_len - 1`. Each chunk is its own segment (positions
restart at 0), and consecutive chunks share one token, so every next-token prediction of
the document is trained exactly once.

Per row (all [seq_len]):
  tokens       int32   the input ids, pad_id on padding
  targets      int32   tokens[t + 1] when t + 1 is in the same segment, else pad_id
  positions    int32   0, 1, 2, ... restarting at each segment
  segment_ids  int32   1, 2, ... per segment, 0 on padding
  context_length int32 per token, its segment's context: the leading tokens (BOS included)
                       that the kvpress protocol compresses before the question (an
                       example's "context_tokens"); 0 for a segment without one (plain
                       text, or a document cut across rows). Budget-aware gate training
                       (`ag_jax.capacity_view`) reads it.
  loss_mask    float32 the weight of targets[t]: 0 on padding and on a segment's last
                       token; for SFT examples 0 unless the target is a response token (so
                       the last prompt token, which predicts the first response token, is
                       trained, and no prompt token is ever a target); 1 elsewhere, except
                       that a response token as target weighs `response_weight` when a
                       document carries weights (`tokenize_weighted`)

LM documents are `[bos] + text + [eos]`; SFT examples are `[bos] + prompt` followed by
`response + [eos]`, tokenized separately. With a response weight W != 1
(`data.response_weight`), an LM document that has a non-empty response is tokenized the SFT
way too (prompt and response apart, all of it trained), and its response tokens (EOS
included) weigh W as targets: in the RULER mix the answers are ~2% of the tokens, and this
concentrates the loss on the lookup without dropping the language modelling. `lm_loss`
divides by the weight sum, so W = 1 is exactly the unweighted mean. A document may also
carry a `prompt_weight` (the RULER mix's copy rows: 0, their filler is random tokens that no
model can predict, and its gradient is only noise); it weighs the prompt tokens as targets;
and an `eos_weight` for the EOS after its response (copy rows: 0, nothing announces the end).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

ROW_KEYS = ("tokens", "targets", "positions", "segment_ids", "context_length", "loss_mask")


def _as_str(value) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, np.ndarray) and value.shape == ():
    return _as_str(value.item())
  return str(value)


def tokenize_example(example: dict, tokenizer, *, sft: bool = False, text_field: str = "text",
                     prompt_field: str = "prompt",
                     response_field: str = "response") -> tuple[np.ndarray, int]:
  """(token ids int32, num_prompt): ids with index < num_prompt are never targets."""
  if sft:
    missing = [f for f in (prompt_field, response_field) if f not in example]
    if missing:
      raise KeyError(f"SFT example has no field(s) {missing}; it has {sorted(example)}")
    prompt = tokenizer.encode(_as_str(example[prompt_field]), add_bos=True, add_eos=False)
    response = tokenizer.encode(_as_str(example[response_field]), add_bos=False, add_eos=True)
    return np.asarray(prompt + response, np.int32), len(prompt)
  if text_field not in example:
    raise KeyError(f"example has no field {text_field!r}; it has {sorted(example)}")
  ids = tokenizer.encode(_as_str(example[text_field]), add_bos=True, add_eos=True)
  return np.asarray(ids, np.int32), 0


def tokenize_weighted(example: dict, tokenizer, *, sft: bool = False,
                      response_weight: float = 1.0, text_field: str = "text",
                      prompt_field: str = "prompt", response_field: str = "response"
                      ) -> tuple[np.ndarray, int, np.ndarray | None]:
  """(token ids int32 [n], num_prompt, weights float32 [n] or None): weights[i] is token i's
  weight as a target (None: all 1, `tokenize_example` exactly). With response_weight != 1,
  the response tokens (and the EOS after them) weigh response_weight; documents without a
  response (plain LM text) stay unweighted. An example's "prompt_weight" (default 1) weighs
  its prompt tokens, its "eos_weight" (default: the response's) the EOS after its response.
  An example with "pieces", [(text, is_target), ...] whose texts join to its text, is
  tokenized piece by piece (cut them at spaces, so the pieces give the text's tokens): target
  pieces weigh response_weight, the rest prompt_weight (a drill has many targets where a
  question has one); the EOS weighs as the last piece unless eos_weight says."""
  fields = dict(text_field=text_field, prompt_field=prompt_field, response_field=response_field)
  prompt_weight = float(example.get("prompt_weight", 1.0))
  eos_weight = example.get("eos_weight")
  if example.get("pieces") and not sft:
    ids, weights = [tokenizer.bos_id], [0.0]
    for text, is_target in example["pieces"]:
      piece = tokenizer.encode(_as_str(text), add_bos=False)
      ids += piece
      weights += [response_weight if is_target else prompt_weight] * len(piece)
    ids.append(tokenizer.eos_id)  # after a target (an answer) it weighs as one, by default
    last_is_target = example["pieces"][-1][1]
    weights.append(float(eos_weight) if eos_weight is not None else
                   response_weight if last_is_target else prompt_weight)
    return np.asarray(ids, np.int32), 0, np.asarray(weights, np.float32)
  if response_weight == 1.0 and prompt_weight == 1.0 and eos_weight is None:
    return (*tokenize_example(example, tokenizer, sft=sft, **fields), None)
  if not sft and not (prompt_field in example and _as_str(example.get(response_field, ""))):
    return (*tokenize_example(example, tokenizer, sft=False, **fields), None)
  # Prompt and response apart (the SFT tokenization), so the response's first token is known.
  ids, num_response_start = tokenize_example(example, tokenizer, sft=True, **fields)
  weights = np.full(len(ids), prompt_weight, np.float32)
  weights[num_response_start:] = response_weight
  if eos_weight is not None:
    weights[-1] = float(eos_weight)  # the response's EOS
  return ids, (num_response_start if sft else 0), weights


def example_context_tokens(example: dict) -> int:
  """An example's leading context tokens, BOS included (its "context_tokens"; 0: none)."""
  return int(example.get("context_tokens", 0) or 0)


def build_row(pieces: Sequence[tuple], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One packed row from (tokens, num_prompt[, weights[, context_tokens]]) pieces whose
  lengths sum to <= seq_len; weights [n] (None: all 1) are each token's weight as a target;
  context_tokens (default 0) the piece's leading context (see `context_length`)."""
  row = {k: np.zeros(seq_len, np.int32) for k in ROW_KEYS[:-1]}
  row["tokens"][:] = pad_id
  row["targets"][:] = pad_id
  row["loss_mask"] = np.zeros(seq_len, np.float32)
  start = 0
  for segment, (tokens, num_prompt, *rest) in enumerate(pieces, start=1):
    weights = rest[0] if rest else None
    context_tokens = int(rest[1]) if len(rest) > 1 else 0
    n, end = len(tokens), start + len(tokens)
    if end > seq_len:
      raise ValueError(f"pieces of {end} tokens do not fit in a row of {seq_len}")
    row["tokens"][start:end] = tokens
    row["targets"][start:end - 1] = tokens[1:]
    row["positions"][start:end] = np.arange(n)
    row["segment_ids"][start:end] = segment
    row["context_length"][start:end] = context_tokens if context_tokens < n else 0
    # Target of position t is token t + 1: trained iff that token is past the prompt.
    row["loss_mask"][start:end - 1] = np.arange(1, n) >= num_prompt
    if weights is not None:
      row["loss_mask"][start:end - 1] *= weights[1:]
    start = end
  return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """[batch, seq_len] arrays from a list of rows."""
  return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}


@dataclasses.dataclass
class Pending:
  """The document being packed: `tokens[offset:]` is still to place. `ref` names it."""

  ref: int
  tokens: np.ndarray
  num_prompt: int
  offset: int = 0
  weights: np.ndarray | None = None  # [len(tokens)] target weights; None: all 1
  context_tokens: int = 0  # leading context tokens (row key context_length); 0: none


# A supplier returns the next document as (ref, tokens, num_prompt[, weights[,
# context_tokens]]), or None when done.
Supplier = Callable[[], "tuple | None"]


class RowPacker:
  """Greedy in-order packer; its only state between rows is `pending`."""

  def __init__(self, seq_len: int, pad_id: int):
    if seq_len < 2:
      raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    self.seq_len, self.pad_id = seq_len, pad_id
    self.pending: Pending | None = None

  def _next_chunk(self) -> tuple[np.ndarray, int, np.ndarray | None, int]:
    p = self.pending
    cut = slice(p.offset, p.offset + self.seq_len)
    weights = None if p.weights is None else p.weights[cut]
    # A document cut across rows loses its context: its question is in another segment.
    whole = p.offset == 0 and len(p.tokens) <= self.seq_len
    return p.tokens[cut], max(0, p.num_prompt - p.offset), weights, \
        p.context_tokens if whole else 0

  def _advance(self) -> None:
    p = self.pending
    if p.offset + self.seq_len >= len(p.tokens):
      self.pending = None
    else:  # overlap one token so the boundary prediction is trained in the next chunk
      p.offset += self.seq_len - 1

  def next_row(self, supply: Supplier) -> dict[str, np.ndarray] | None:
    """The next packed row, or None once `supply` is exhausted and nothing is pending."""
    pieces, used = [], 0
    while True:
      if self.pending is None:
        doc = supply()
        if doc is None:
          break
        ref, tokens, num_prompt, *rest = doc
        self.pending = Pending(ref, tokens, num_prompt, weights=rest[0] if rest else None,
                               context_tokens=int(rest[1]) if len(rest) > 1 else 0)
      chunk, num_prompt, weights, context_tokens = self._next_chunk()
      if used + len(chunk) > self.seq_len:
        break  # starts the next row
      pieces.append((chunk, num_prompt, weights, context_tokens))
      used += len(chunk)
      self._advance()
    return build_row(pieces, self.seq_len, self.pad_id) if pieces else None


def pack_documents(examples: Iterable[dict], tokenizer, seq_len: int, *,
                   sft: bool = False, response_weight: float = 1.0,
                   **fields) -> Iterator[dict[str, np.ndarray]]:
  """Packed rows of a stream of examples, in order (no shuffling, one pass)."""
  stream = iter(enumerate(examples))

  def supply():
    for i, example in stream:
      tokens, num_prompt, weights = tokenize_weighted(
          example, tokenizer, sft=sft, response_weight=response_weight, **fields)
      if len(tokens) >= 2:  # a lone token has nothing to predict
        return i, tokens, num_prompt, weights, example_context_tokens(example)
    return None

  packer = RowPacker(seq_len, tokenizer.pad_id)
  while (row := packer.next_row(supply)) is not None:
    yield row
