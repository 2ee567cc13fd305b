"""Greedy generation with dense or DHSA attention, batched with left padding.

Prompts go through the model's chat template unless ``raw``. A prompt that would not fit the
model's context window is an error, never a silent truncation (the published code truncated and
lost BOS and the instruction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DHSAConfig
from ..errors import DHSAError
from .attention import DHSARuntime, disable_dhsa, enable_dhsa
from .models import LoadedModel

ATTENTION_MODES = ("dense", "dhsa")


def set_attention(loaded: LoadedModel, attention: str, cfg: DHSAConfig | None = None,
                  backend: str = "auto") -> DHSARuntime | None:
    """Put the model in ``dense`` (SDPA) or ``dhsa`` mode; returns the DHSA runtime if any.

    ``backend`` picks the DHSA attention implementation (see :func:`enable_dhsa`); dense ignores it.
    """
    if attention not in ATTENTION_MODES:
        raise DHSAError(f"unknown attention {attention!r}; use one of {', '.join(ATTENTION_MODES)}")
    if attention == "dense":
        disable_dhsa(loaded.model)
        return None
    return enable_dhsa(loaded.model, cfg or DHSAConfig(), backend=backend)


def prompt_text(tokenizer, prompt: str, raw: bool = False, assistant_prefix: str = "") -> str:
    """The text fed to the model: chat template (with generation prompt) unless ``raw``."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return prompt + assistant_prefix
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix


def encode(tokenizer, texts: list[str]) -> dict:
    """Left-padded batch (the tokenizer's own special-token rules, no truncation)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: list[int]


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 32,
    raw: bool = False,
    assistant_prefix: str = "",
) -> list[Generation]:
    """Greedy decode every prompt (one left-padded batch)."""
    if max_new_tokens < 1:
        raise DHSAError(f"max_new_tokens {max_new_tokens} must be at least 1")
    tokenizer = loaded.tokenizer
    texts = [prompt_text(tokenizer, p, raw, assistant_prefix) for p in prompts]
    batch = encode(tokenizer, texts).to(loaded.model.device)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    for length in lengths:
        check_fits(length, max_new_tokens, loaded)
    output = loaded.model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
        top_k=None, pad_token_id=tokenizer.pad_token_id,
    )
    width = batch["input_ids"].shape[1]
    results = []
    for row, length in zip(output, lengths):
        new = row[width:].tolist()
        new = _until_eos(new, tokenizer)
        results.append(Generation(tokenizer.decode(new, skip_special_tokens=True), int(length), new))
    return results


def check_fits(prompt_tokens: int, max_new_tokens: int, loaded: LoadedModel) -> None:
    if prompt_tokens + max_new_tokens > loaded.max_length:
        raise DHSAError(
            f"prompt of {prompt_tokens} tokens plus {max_new_tokens} new tokens exceeds the "
            f"{loaded.max_length}-token context of {loaded.name}; shorten the prompt or pick a "
            "model with a longer context"
        )


def _until_eos(tokens: list[int], tokenizer) -> list[int]:
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for index, token in enumerate(tokens):
        if token in stop:
            return tokens[:index]
    return tokens
