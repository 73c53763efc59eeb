"""Tiny random HF Llama/Mistral checkpoints written with `save_pretrained` (no hub access)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def make_hf_model(*, heads=4, kv_heads=2, dim=32, head_dim=None, layers=2, vocab=61, mlp=48,
                  rope_scaling=None, tie=False, model_type="llama", seed=0, scale=0.15):
  """A random `LlamaForCausalLM` (or Mistral) whose weights are large enough that a wrong
  mapping shows in the logits: all matrices N(0, scale), norm weights 1 + N(0, 0.2)."""
  torch.manual_seed(seed)
  kwargs = dict(vocab_size=vocab, hidden_size=dim, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=500.0)
  if head_dim is not None:
    kwargs["head_dim"] = head_dim
  if model_type == "mistral":
    config = transformers.MistralConfig(sliding_window=None, **kwargs)
    model = transformers.MistralForCausalLM(config)
  else:
    if rope_scaling is not None:
      kwargs["rope_scaling"] = dict(rope_scaling)
    config = transformers.LlamaConfig(**kwargs)
    model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(scale * torch.randn_like(p))
  model.config._attn_implementation = "eager"
  return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
