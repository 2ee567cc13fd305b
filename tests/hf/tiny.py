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


def byte_tokenizer():
    """A byte-level tokenizer built in memory (one token per byte, ``</s>`` as EOS and padding), so
    tests can save a complete model folder without any downloaded tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")


def save_tiny_model_folder(folder, model_type: str = "llama", **extra) -> str:
    """A loadable Hugging Face folder (config, safetensors weights, tokenizer) of :func:`tiny_model`."""
    tiny_model(model_type, **extra).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)
