"""Weight-only INT4 for torch models: quantization error bound, packing layout, modules, whole models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from dhsa_export import DHSAError
from dhsa_export.hf import int4
from dhsa_export.hf.int4 import (
    Int4Embedding,
    Int4Linear,
    dequantize_int4,
    dequantized_weights,
    int4_nbytes,
    materialize_int4,
    quantize_int4,
    quantize_model,
)

from .tiny import tiny_config, tiny_model


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape,block", [((64, 128), 32), ((10, 70), 32), ((33, 256), 128), ((5, 16), 16)])
def test_error_is_at_most_half_a_scale_step(shape, block):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 0.05
    packed = quantize_int4(weight, block)
    width = -(-shape[1] // block) * block
    assert packed.packed.dtype == torch.uint8 and packed.packed.shape == (shape[0], width // 2)
    assert packed.scales.dtype == torch.bfloat16 and packed.scales.shape == (shape[0], width // block)
    restored = dequantize_int4(packed, torch.float32)
    assert restored.shape == weight.shape
    step = packed.scales.float().repeat_interleave(block, dim=1)[:, : shape[1]]
    # half a step, plus the bf16 rounding of the scale (|w| <= 7 * scale * (1 + 2^-8))
    assert bool(((restored - weight).abs() <= step * (0.5 + 7 * 2**-8) + 1e-12).all())
    assert rel(restored, weight) < (0.1 if block <= 32 else 0.15)  # Gaussian weights: ~0.09 / ~0.12


def test_grid_values_survive_exactly_and_zero_blocks_stay_zero():
    scale = torch.tensor(0.125)
    grid = torch.arange(-7, 8, dtype=torch.float32)
    weight = torch.cat([grid, grid.flip(0), torch.zeros(2)])[None].repeat(3, 1) * scale  # K = 32
    weight[1] = 0.0
    packed = quantize_int4(weight, 32)
    assert torch.equal(dequantize_int4(packed), weight)
    assert float(packed.scales[1, 0]) == 0.0


def test_two_nibbles_per_byte_even_index_in_the_low_nibble():
    weight = torch.zeros(1, 32)
    weight[0, 0], weight[0, 1], weight[0, 31] = 7.0, -7.0, 1.0
    packed = quantize_int4(weight, 32).packed
    assert int(packed[0, 0]) == (7 + 8) | ((-7 + 8) << 4)
    assert int(packed[0, 15]) >> 4 == 1 + 8 and int(packed[0, 15]) & 0xF == 8


def test_block_size_and_shape_are_checked():
    with pytest.raises(DHSAError, match="block size 48"):
        quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(DHSAError, match="2-D"):
        quantize_int4(torch.randn(4, 4, 32), 32)


def test_int4_linear_matches_the_dequantized_weight_in_every_path(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(96, 40, bias=True)
    x = torch.randn(2, 7, 96, generator=gen)
    layer = Int4Linear.from_linear(linear, 32)
    want = F.linear(x, layer.dequantize(torch.float32), linear.bias.detach())
    assert torch.allclose(layer(x), want, atol=1e-6)
    monkeypatch.setattr(int4, "SLAB_ELEMENTS", 96 * 8)  # several output slabs
    assert torch.allclose(layer(x), want, atol=1e-6)
    with dequantized_weights(layer):
        assert torch.allclose(layer(x), want, atol=1e-6)
        assert layer._held is not None
    assert layer._held is None


def test_int4_embedding_gathers_dequantized_rows():
    embedding = torch.nn.Embedding(50, 64)
    module = Int4Embedding(quantize_int4(embedding.weight.detach(), 32), torch.float32)
    ids = torch.tensor([[0, 49, 7], [7, 7, 1]])
    table = dequantize_int4(module.weight_int4)
    assert torch.equal(module(ids), F.embedding(ids, table))


def _dequantized_copy(model_type: str, quantized) -> torch.nn.Module:
    """The fp model whose weights are exactly the int4 model's dequantized weights."""
    reference = tiny_model(model_type)
    names = dict(quantized.named_modules())
    for name, module in reference.named_modules():
        target = names.get(name)
        if isinstance(target, (Int4Linear, Int4Embedding)):
            module.weight.data.copy_(dequantize_int4(target.weight_int4))
    return reference


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_quantized_model_computes_its_dequantized_weights_and_stays_close_to_fp(model_type):
    fp = tiny_model(model_type)
    quantized = tiny_model(model_type)
    assert quantize_model(quantized, 32) == 2 * 7 + 2  # 7 Linear per layer + embedding + lm_head
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in quantized.modules())
    ids = torch.randint(0, 300, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = quantized(ids).logits
        exact = _dequantized_copy(model_type, quantized)(ids).logits
        full = fp(ids).logits
    assert torch.allclose(got, exact, atol=1e-5)
    # random Normal(0, 0.02) weights, block 32: about 0.21 measured (a real model: next test)
    assert rel(got, full) < 0.3
    assert int4_nbytes(quantized) < sum(p.numel() for p in fp.parameters()) * 0.6


def test_generate_runs_on_a_quantized_model_and_embedding_only_options():
    model = tiny_model()
    assert quantize_model(model, 32, embeddings=False, lm_head=False) == 14
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 24)


def test_tied_embeddings_share_one_packed_copy():
    model = tiny_model(tie_word_embeddings=True)
    with pytest.raises(DHSAError, match="ties"):
        quantize_model(tiny_model(tie_word_embeddings=True), 32, lm_head=False)
    quantize_model(model, 32)
    assert model.get_output_embeddings().packed is model.get_input_embeddings().packed


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_materialize_from_meta_builds_a_seeded_int4_model(model_type, tied):
    config = tiny_config(model_type, tie_word_embeddings=tied)

    def build(seed):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        assert materialize_int4(model, "cpu", block_size=32, seed=seed, dtype=torch.float32) == 16
        return model.eval()

    first, again, other = build(0), build(0), build(1)
    tensors = list(first.named_parameters()) + list(first.named_buffers())
    assert not any(t.is_meta for _, t in tensors)
    assert all(float(m.weight.min()) == 1.0 for n, m in first.named_modules() if n.endswith("norm"))
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = first(ids).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, again(ids).logits)
        assert not torch.equal(logits, other(ids).logits)
    assert first.model.rotary_emb.inv_freq.device.type == "cpu"


@pytest.mark.model
def test_quantized_chunked_default_model_answers_paris():
    from dhsa_export.hf.chunked import enable_chunked_prefill
    from dhsa_export.hf.generate import generate
    from dhsa_export.hf.models import load_model

    loaded = load_model()  # a private copy: the session fixture must stay fp32
    quantize_model(loaded.model, 32)
    enable_chunked_prefill(loaded.model, 16)
    text = generate(loaded, ["What is the capital of France?"], max_new_tokens=12)[0].text
    assert "Paris" in text
