"""Chunked prefill for transformers decoders: no full-length MLP, norm or logits activations.

At 100K tokens and LLaMA-3 8B shape one ``[L, 14336]`` bf16 MLP intermediate is 2.9 GB and an
RMSNorm's fp32 temporaries are 1.6 GB each, while the residual stream itself is 0.8 GB. Both the
MLP and the norms are position-wise, so running them over slices of the sequence computes the same
values with only a slice's intermediates alive:

- :func:`enable_chunked_prefill` wraps each decoder layer's ``input_layernorm``,
  ``post_attention_layernorm`` and ``mlp`` and the final norm in :class:`SequenceChunked`, which
  applies the module to ``chunk_tokens`` positions at a time into one preallocated output (an INT4
  MLP is dequantized once per layer, not once per chunk). Attention stays one call per layer
  (DHSA kernel or SDPA), and decode steps (one position) pass straight through.
- :func:`prefill` / :func:`decode_step` run the model with a KV cache and ``logits_to_keep=1``, so
  only the last position goes through the output projection (a ``[100K, 128256]`` logits tensor
  would be 25.6 GB in bf16).

Wrapping renames the wrapped modules' state-dict keys (``mlp.inner.*``);
:func:`disable_chunked_prefill` restores the model (do that before saving or exporting).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import DHSAError
from .int4 import dequantized_weights

DEFAULT_CHUNK_TOKENS = 8192
LAYER_MODULES = ("input_layernorm", "post_attention_layernorm", "mlp")


class SequenceChunked(nn.Module):
    """Applies a position-wise module to ``[..., L, H]`` inputs ``chunk_tokens`` positions at a time.

    Exact for position-wise modules (each output row depends only on its input row); the output
    is written into one preallocated tensor, so only one chunk's intermediates exist at a time.
    """

    def __init__(self, inner: nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        super().__init__()
        check_chunk_tokens(chunk_tokens)
        self.inner = inner
        self.chunk_tokens = chunk_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-2]
        if length <= self.chunk_tokens:
            return self.inner(x)
        out = None
        with dequantized_weights(self.inner):
            for start in range(0, length, self.chunk_tokens):
                end = min(length, start + self.chunk_tokens)
                y = self.inner(x[..., start:end, :])
                if out is None:
                    out = y.new_empty(*x.shape[:-1], y.shape[-1])
                out[..., start:end, :] = y
                del y
        return out

    def extra_repr(self) -> str:
        return f"chunk_tokens={self.chunk_tokens}"


def check_chunk_tokens(chunk_tokens: int) -> None:
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise DHSAError(f"chunk size {chunk_tokens!r} must be a positive number of tokens, e.g. 8192")


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model`` for ``*ForCausalLM``, or the model itself)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise DHSAError(f"{type(model).__name__} has no decoder with .layers and .norm; chunked "
                        "prefill supports LLaMA-, Qwen2- and Mistral-style models")
    return inner


def _chunk_targets(model: nn.Module):
    """(parent, attribute) pairs of every module chunked prefill wraps."""
    stack = decoder(model)
    targets = [(layer, name) for layer in stack.layers for name in LAYER_MODULES if hasattr(layer, name)]
    return targets + [(stack, "norm")]


def enable_chunked_prefill(model: nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Wrap the position-wise modules (see module doc); returns how many are wrapped.

    Calling it again changes the chunk size of the wrapped modules instead of wrapping twice.
    """
    check_chunk_tokens(chunk_tokens)
    count = 0
    for parent, name in _chunk_targets(model):
        module = getattr(parent, name)
        if isinstance(module, SequenceChunked):
            module.chunk_tokens = chunk_tokens
        else:
            setattr(parent, name, SequenceChunked(module, chunk_tokens))
        count += 1
    return count


def disable_chunked_prefill(model: nn.Module) -> int:
    """Unwrap what :func:`enable_chunked_prefill` wrapped; returns how many were unwrapped."""
    count = 0
    for parent, name in _chunk_targets(model):
        module = getattr(parent, name)
        if isinstance(module, SequenceChunked):
            setattr(parent, name, module.inner)
            count += 1
    return count


def is_chunked(model: nn.Module) -> bool:
    return any(isinstance(getattr(p, n), SequenceChunked) for p, n in _chunk_targets(model))


def new_cache(model: nn.Module):
    """An empty transformers ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers versions whose DynamicCache takes no config
        return DynamicCache()


def _cache_argument(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` in newer transformers, else ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def forward_last(model: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """One forward with ``cache`` (updated in place); logits of the last position ``[B, vocab]``."""
    kwargs = {_cache_argument(model): cache}
    output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
    return output.logits[:, -1]


def prefill(model: nn.Module, input_ids: torch.Tensor, cache=None):
    """Prefill ``input_ids [B, L]``: returns ``(last-position logits [B, vocab], cache)``."""
    cache = new_cache(model) if cache is None else cache
    return forward_last(model, input_ids, cache), cache


def decode_step(model: nn.Module, token: torch.Tensor, cache) -> torch.Tensor:
    """One greedy decode step from ``token [B, 1]``; returns the logits ``[B, vocab]``."""
    return forward_last(model, token, cache)


@torch.inference_mode()
def greedy(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation ``[B, new_tokens]`` through :func:`prefill` and :func:`decode_step`
    (no padding support: one unpadded batch), the loop the memory benchmark times."""
    logits, cache = prefill(model, input_ids)
    tokens = [logits.argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        tokens.append(decode_step(model, tokens[-1], cache).argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)
