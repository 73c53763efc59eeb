"""Data: sources (TFDS ArrayRecord, the recall corpus), local corpus preparation, packing,
and a deterministic, resumable, process-sliced batch iterator. See each module's doc."""

from ag_jax.data.iterator import DataIterator, epoch_permutation, merge_states
from ag_jax.data.packing import RowPacker, build_row, pack_documents, stack_rows, tokenize_example
from ag_jax.data.recall import (RecallConfig, RecallSource, generate_example, parse_document,
                                score_answer)
from ag_jax.data.sources import DataError, TextDecodedSource, open_source


def __getattr__(name):
  # Imported lazily so that `python -m ag_jax.data.local_corpus` runs the module only once.
  if name in ("prepare_local_corpus", "read_documents"):
    from ag_jax.data import local_corpus  # pylint: disable=g-import-not-at-top
    return getattr(local_corpus, name)
  raise AttributeError(f"module 'ag_jax.data' has no attribute {name!r}")


__all__ = [
    "DataError", "DataIterator", "RecallConfig", "RecallSource", "RowPacker",
    "TextDecodedSource", "build_row", "epoch_permutation", "generate_example",
    "merge_states", "open_source", "pack_documents", "parse_document",
    "prepare_local_corpus", "read_documents", "score_answer", "stack_rows",
    "tokenize_example",
]
