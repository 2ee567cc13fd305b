"""A tiny random decoder of a transformers architecture, shared by the chunked-prefill and INT4 tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=4096)


def tiny_config(model_type: str = "llama", **extra):
    """``SMALL`` for ``model_type`` (Mistral without its sliding window), ``extra`` overriding."""
    window = {"sliding_window": None} if model_type == "mistral" else {}
    return AutoConfig.for_model(model_type, **{**SMALL, **window, **extra})


def tiny_model(model_type: str = "llama", **extra):
    """Seeded random fp32 model of :func:`tiny_config`, in eval mode."""
    config = tiny_config(model_type, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()
