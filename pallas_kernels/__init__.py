"""Pallas kernels for the ragged KV cache, each with a pure-jnp reference beside it.

Imports nothing from `ag_jax`: the kernels only know about arrays. Every public function
takes `backend=` ("tpu", "gpu", "interpret", "reference", or None/"auto"); see
`resolve_backend`.
"""

from pallas_kernels.backend import resolve_backend
from pallas_kernels.compact import compact, compact_reference
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.gated_attention import (gated_attention, gated_attention_dense,
                                           gated_attention_reference)

__all__ = [
    "compact",
    "compact_reference",
    "decode_attention",
    "decode_attention_reference",
    "gated_attention",
    "gated_attention_dense",
    "gated_attention_reference",
    "resolve_backend",
]
