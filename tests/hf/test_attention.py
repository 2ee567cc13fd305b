"""transformers integration through the attention registry, for Llama, Qwen2 and Mistral."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dhsa_export import DHSAConfig
from dhsa_export.hf.attention import ATTENTION_NAME, disable_dhsa, enable_dhsa

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=4096)


def tiny_model(model_type: str):
    extra = {"sliding_window": None} if model_type == "mistral" else {}
    config = AutoConfig.for_model(model_type, **SMALL, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_density_one_matches_sdpa_and_sparse_differs(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(0, 300, (1, 700), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        runtime = enable_dhsa(model, DHSAConfig(density=1.0, q_block=64, k_block=16))
        assert model.config._attn_implementation == ATTENTION_NAME
        exact = model(ids).logits
        assert runtime.stats.calls == SMALL["num_hidden_layers"]
        enable_dhsa(model, DHSAConfig(density=0.1, q_block=64, k_block=16, pattern="topk"))
        sparse = model(ids).logits
        disable_dhsa(model)
        back = model(ids).logits
    assert (exact - dense).abs().max().item() < 1e-4
    assert (sparse - dense).abs().max().item() > 1e-3
    assert torch.equal(back, dense)


def test_no_class_is_patched():
    from transformers.models.llama import modeling_llama

    before = modeling_llama.LlamaAttention.forward
    enable_dhsa(tiny_model("llama"), DHSAConfig())
    assert modeling_llama.LlamaAttention.forward is before


@pytest.mark.parametrize("pattern", ["vslash", "dynamic"])
def test_left_padded_batch_generates_like_single(pattern):
    model = tiny_model("llama")
    enable_dhsa(model, DHSAConfig(pattern=pattern, q_block=32, k_block=8, density=0.2))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 300, (n,), generator=gen) for n in (250, 180)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:]
        for row, prompt in enumerate(prompts):
            single = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
            assert torch.equal(single[0, len(prompt):], batched[row])
