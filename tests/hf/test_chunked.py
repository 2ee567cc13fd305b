"""Chunked prefill: the same logits as the unchunked model, prefill and decode, with and without INT4."""

from __future__ import annotations

import copy

import pytest
import torch

from dhsa_export import DHSAConfig, DHSAError
from dhsa_export.hf.attention import enable_dhsa
from dhsa_export.hf.chunked import (
    SequenceChunked,
    decode_step,
    disable_chunked_prefill,
    enable_chunked_prefill,
    greedy,
    is_chunked,
    prefill,
)
from dhsa_export.hf.int4 import quantize_model

from .tiny import tiny_model


def prefill_and_decode(model, ids, steps: int = 3) -> list[torch.Tensor]:
    """Last-position logits of the prefill and of ``steps`` decode steps (fixed next tokens)."""
    with torch.no_grad():
        logits, cache = prefill(model, ids)
        out = [logits]
        for step in range(steps):
            out.append(decode_step(model, torch.tensor([[5 + step]]), cache))
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_gives_the_unchunked_logits(model_type, chunk):
    model = tiny_model(model_type)
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
    plain = prefill_and_decode(model, ids)
    assert torch.allclose(plain[0], full, atol=1e-5)  # logits_to_keep=1 is the last row
    assert enable_chunked_prefill(model, chunk) == 2 * 3 + 1
    chunked = prefill_and_decode(model, ids)
    for got, want in zip(chunked, plain):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_int4_and_chunked_dhsa_match_their_unchunked_versions():
    ids = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(2))
    model = tiny_model()
    quantize_model(model, 32)
    enable_dhsa(model, DHSAConfig(q_block=32, k_block=8, density=0.3))
    want = prefill_and_decode(model, ids)
    enable_chunked_prefill(model, 37)
    for got, ref in zip(prefill_and_decode(model, ids), want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_enable_is_idempotent_and_disable_restores_the_model():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    enable_chunked_prefill(model, 16)
    enable_chunked_prefill(model, 32)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, SequenceChunked) and not isinstance(mlp.inner, SequenceChunked)
    assert mlp.chunk_tokens == 32 and is_chunked(model)
    assert disable_chunked_prefill(model) == 7
    assert not is_chunked(model) and disable_chunked_prefill(model) == 0
    assert model.state_dict().keys() == before.keys()


def test_short_inputs_pass_straight_through_and_bad_sizes_are_refused():
    calls = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[-2])
            return x * 2

    wrapped = SequenceChunked(Probe(), 4)
    x = torch.randn(2, 10, 3)
    assert torch.equal(wrapped(x), x * 2) and calls == [4, 4, 2]
    calls.clear()
    wrapped(x[:, :4])
    assert calls == [4]
    for bad in (0, -1, 2.5):
        with pytest.raises(DHSAError, match="chunk size"):
            SequenceChunked(Probe(), bad)
    with pytest.raises(DHSAError, match="decoder"):
        enable_chunked_prefill(torch.nn.Linear(2, 2))


def test_greedy_matches_generate():
    model = tiny_model()
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(4))
    enable_chunked_prefill(model, 8)
    with torch.no_grad():
        ours = greedy(model, ids, 6)
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=0)[:, 40:]
    assert torch.equal(ours, theirs)
