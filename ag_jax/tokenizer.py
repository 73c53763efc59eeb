"""Tokenizers behind one small interface: bytes for tiny models, `tokenizer.json` for HF models.

Both expose `encode(text, add_bos=...) -> list[int]`, `decode(ids) -> str`, `vocab_size`
and the special ids `bos_id`, `eos_id`, `pad_id`. Loading never executes code: the HF
path goes through the `tokenizers` library reading JSON only.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; then PAD=256, BOS=257, EOS=258 (vocab 259)."""

  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if i < 256:
        out.append(i)
      elif not skip_special:
        out.extend({256: b"<pad>", 257: b"<s>", 258: b"</s>"}.get(i, b"?"))
    return out.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class HFTokenizer:
  """A local HF `tokenizer.json` (+ optional `tokenizer_config.json` for special tokens)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _Tok  # deferred: only HF models need it

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise FileNotFoundError(
          f"no tokenizer.json at {path!r}: pass an HF model directory that contains "
          "tokenizer.json, or use --tokenizer bytes for byte-level models")
    self._tok = _Tok.from_file(file)
    self._tok.no_padding()
    self._tok.no_truncation()
    cfg = {}
    cfg_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    if os.path.exists(cfg_file):
      with open(cfg_file) as f:
        cfg = json.load(f)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._special_id(cfg.get("bos_token"), ["<s>", "<|begin_of_text|>"])
    self.eos_id = self._special_id(cfg.get("eos_token"), ["</s>", "<|end_of_text|>", "<|eot_id|>"])
    pad = self._special_id(cfg.get("pad_token"), ["<pad>", "<unk>"])
    self.pad_id = pad if pad >= 0 else self.eos_id

  def _special_id(self, configured, fallbacks: list[str]) -> int:
    if isinstance(configured, dict):  # older configs store AddedToken dicts
      configured = configured.get("content")
    for name in ([configured] if configured else []) + fallbacks:
      i = self._tok.token_to_id(name)
      if i is not None:
        return i
    return -1

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if add_bos and self.bos_id >= 0:
      ids = [self.bos_id] + ids
    if add_eos and self.eos_id >= 0:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def __repr__(self) -> str:
    return f"HFTokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(spec: str) -> Tokenizer:
  """`"bytes"` -> ByteTokenizer; `"stdlib_bpe:2048"` -> the stdlib BPE of that vocab size
  (`stdlib_bpe`); a directory or tokenizer.json path -> HFTokenizer."""
  if spec in ("bytes", "byte"):
    return ByteTokenizer()
  if spec.startswith(STDLIB_BPE_PREFIX + ":") and not os.path.exists(spec):
    size = spec.split(":", 1)[1]
    if not size.isdigit():
      raise ValueError(f"tokenizer {spec!r}: use {STDLIB_BPE_PREFIX}:VOCAB_SIZE, e.g. "
                       f"{STDLIB_BPE_PREFIX}:2048")
    return stdlib_bpe(int(size))
  return HFTokenizer(spec)


# ---------------------------------------------------------------------------------------------
# Training a byte-level BPE (the `tokenizers` library), e.g. on the stdlib's train split.

BPE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
STDLIB_BPE_PREFIX = "stdlib_bpe"


def train_bpe_tokenizer(texts, vocab_size: int, out_dir: str | None = None, *,
                        required: Sequence[str] = (), required_count: int = 4000) -> "HFTokenizer":
  """A byte-level BPE trained on `texts` (an iterable of str), saved as out_dir/tokenizer.json
  (+ tokenizer_config.json naming <s>, </s>, <pad>) when out_dir is given.

  `required` strings (e.g. " amber", " 41": with their leading space) must each become one
  token: each is added `required_count` times to the counts, which puts their merges ahead
  of the corpus's rarer ones; the result is checked. Training is deterministic for the same
  texts in the same order (the library breaks count ties by the pair's ids).
  """
  from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

  tok = _Tok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)

  def stream():
    yield from texts
    for piece in required:  # one piece per line: pre-tokenized alone, counted required_count times
      yield (piece + "\n") * required_count

  tok.train_from_iterator(stream(), trainer)
  missing = [p for p in required if len(tok.encode(p, add_special_tokens=False).ids) != 1]
  if missing:
    raise ValueError(f"{len(missing)} required strings are not single tokens at vocab_size "
                     f"{vocab_size} (e.g. {missing[:5]}); raise vocab_size or required_count")
  if out_dir is None:
    import tempfile
    out_dir = tempfile.mkdtemp(prefix="bpe_")
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f, indent=2)
  return HFTokenizer(out_dir)


def stdlib_bpe_dir(vocab_size: int = 2048, cache_dir: str | None = None) -> str:
  """The directory of the stdlib BPE of `vocab_size` (trained on first use, then cached).

  It is trained on the stdlib train split (`ag_jax.data.stdlib`) with the RULER suite's key
  words and values as required single tokens. Cached under $AG_JAX_CACHE (default
  ~/.cache/ag_jax) by interpreter version and vocab size: deterministic given the
  interpreter, so every process of a run sees the same ids.
  """
  import sys

  from ag_jax import atomic_io
  from ag_jax.data import ruler, stdlib

  root = cache_dir or os.environ.get("AG_JAX_CACHE") or os.path.expanduser("~/.cache/ag_jax")
  import hashlib
  # The interpreter (its stdlib is the corpus) and the required tokens name the tokenizer.
  ident = "\n".join([sys.version, stdlib.stdlib_root(), *ruler.required_tokens()])
  tag = f"py{sys.version_info[0]}.{sys.version_info[1]}_" + \
      hashlib.sha256(ident.encode("utf-8")).hexdigest()[:10]
  where = os.path.join(root, f"{STDLIB_BPE_PREFIX}_{vocab_size}_{tag}")
  if os.path.exists(os.path.join(where, "tokenizer.json")):
    return where
  texts = [text for _, text in stdlib.read_texts("train")]
  with atomic_io.replace_dir(where) as tmp:
    train_bpe_tokenizer(texts, vocab_size, tmp, required=ruler.required_tokens())
  return where


def stdlib_bpe(vocab_size: int = 2048) -> "HFTokenizer":
  """`load_tokenizer("stdlib_bpe:2048")`: the stdlib BPE (see `stdlib_bpe_dir`)."""
  return HFTokenizer(stdlib_bpe_dir(vocab_size))
