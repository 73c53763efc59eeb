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
  """`"bytes"` -> ByteTokenizer; a directory or tokenizer.json path -> HFTokenizer."""
  if spec in ("bytes", "byte"):
    return ByteTokenizer()
  return HFTokenizer(spec)
