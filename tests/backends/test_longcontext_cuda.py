"""GPU: INT4 weights and chunked prefill on CUDA, and the memory benchmark at a small size.

- quantization on the GPU gives the CPU's packing; INT4 layers in bf16 stay within bf16 rounding of
  the fp32 dequantized product;
- a tiny random Llama (bf16) with INT4 weights gives the same logits chunked and unchunked, with
  SDPA and with the DHSA kernel (torch-cuda vs reference backend);
- ``bench_memory`` at 8K tokens with the LLaMA-3.1-8B shape (2 layers) runs every config, chunking
  lowers the peak, the INT4 build never holds the full-precision model, and a budget below the
  weights is an out-of-memory row followed by the uncapped row.
"""

from __future__ import annotations

import pytest
import torch

from dhsa_export import DHSAConfig

pytestmark = pytest.mark.gpu


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def tiny_llama(layers: int = 1):
    """head_dim 64 (a kernel size); one layer, so routing sees identical inputs in both backends."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=512,
                                  max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def logits_of(model, ids, steps: int = 3) -> list[torch.Tensor]:
    from dhsa_export.hf.chunked import decode_step, prefill

    with torch.no_grad():
        logits, cache = prefill(model, ids)
        out = [logits.float()]
        for step in range(steps):
            out.append(decode_step(model, torch.tensor([[7 + step]], device="cuda"), cache).float())
    return out


def test_gpu_quantization_matches_cpu_and_bf16_layers_match_fp32():
    from dhsa_export.hf.int4 import Int4Linear, dequantize_int4, quantize_int4

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 4096, generator=gen) * 0.02
    cpu, gpu = quantize_int4(weight, 32), quantize_int4(weight.cuda(), 32)
    assert int((gpu.packed.cpu() != cpu.packed).sum()) <= 1e-5 * cpu.packed.numel()
    assert torch.equal(gpu.scales.cpu(), cpu.scales)
    x = torch.randn(300, 4096, generator=gen)
    want = x @ dequantize_int4(cpu).t()
    got = Int4Linear(gpu)(x.cuda().bfloat16())
    assert got.dtype == torch.bfloat16 and rel(got.cpu(), want) < 1e-2


@pytest.mark.parametrize("attention", ["sdpa", "dhsa"])
def test_chunked_int4_tiny_model_matches_unchunked(attention):
    from dhsa_export.hf.attention import enable_dhsa
    from dhsa_export.hf.chunked import enable_chunked_prefill
    from dhsa_export.hf.int4 import quantize_model

    model = tiny_llama()
    assert quantize_model(model, 32) == 9
    if attention == "dhsa":
        runtime = enable_dhsa(model, DHSAConfig(density=0.2, q_block=64, k_block=16), backend="torch-cuda")
    ids = torch.randint(0, 512, (1, 1500), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    plain = logits_of(model, ids)
    enable_chunked_prefill(model, 256)
    chunked = logits_of(model, ids)
    # SDPA: bf16 rounding only. DHSA: the chunked norms may round differently from the unchunked
    # ones, and a near-tie block selection can then flip (a sanity bound, not the kernel check)
    bound = 2e-2 if attention == "sdpa" else 1e-1
    for got, want in zip(chunked, plain):
        assert not torch.isnan(got).any()
        assert rel(got, want) < bound, rel(got, want)
    if attention == "dhsa":
        assert runtime.backend == "torch-cuda"
        # the kernel check: the same chunked INT4 model, routing on identical inputs
        runtime_ref = enable_dhsa(model, DHSAConfig(density=0.2, q_block=64, k_block=16), backend="reference")
        reference = logits_of(model, ids)
        assert runtime_ref.backend == "reference"
        assert rel(chunked[0], reference[0]) < 2e-2, rel(chunked[0], reference[0])


@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("shape", [(1, 4096, 14336), (3, 14336, 4096), (8, 300, 70), (1, 128256, 4096)])
def test_int4_rows_kernel_matches_dequantize_then_matmul(shape, block_size):
    from dhsa_export.backends.torch_cuda.int4_triton import int4_rows_matmul, ready
    from dhsa_export.hf.int4 import dequantize_int4, quantize_int4

    assert ready(torch.device("cuda"))
    rows, out_features, in_features = shape
    gen = torch.Generator(device="cuda").manual_seed(rows + in_features)
    weight = quantize_int4(torch.randn(out_features, in_features, device="cuda", generator=gen) * 0.02, block_size)
    x = torch.randn(rows, in_features, device="cuda", generator=gen)
    want = x @ dequantize_int4(weight, torch.float32).t()
    got = int4_rows_matmul(x.bfloat16(), weight.packed, weight.scales, in_features, block_size)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel(got, want) < 1e-2, rel(got, want)
    exact = int4_rows_matmul(x, weight.packed, weight.scales, in_features, block_size)
    assert rel(exact, want) < 1e-5, rel(exact, want)


def test_int4_linear_uses_the_kernel_for_decode_rows_only(monkeypatch):
    from dhsa_export.backends.torch_cuda import int4_triton
    from dhsa_export.hf.int4 import Int4Linear, quantize_int4

    calls = []
    real = int4_triton.int4_rows_matmul
    monkeypatch.setattr(int4_triton, "int4_rows_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    gen = torch.Generator(device="cuda").manual_seed(5)
    layer = Int4Linear(quantize_int4(torch.randn(512, 1024, device="cuda", generator=gen), 32),
                       bias=torch.randn(512, device="cuda", generator=gen))
    decode = torch.randn(1, 1, 1024, device="cuda", generator=gen).bfloat16()
    prefill = torch.randn(1, 64, 1024, device="cuda", generator=gen).bfloat16()
    want = torch.nn.functional.linear(decode.float(), layer.dequantize(torch.float32), layer.bias.float())
    assert rel(layer(decode), want) < 1e-2
    layer(prefill)
    assert calls == [(1, 1, 1024)]
    monkeypatch.setenv(int4_triton.ENV_SWITCH, "0")
    assert rel(layer(decode), want) < 1e-2 and len(calls) == 1


def test_memory_benchmark_small_run():
    from dhsa_export.bench.memory import bench_memory

    before = torch.cuda.memory_allocated()
    result = bench_memory("llama3.1-8b:random", layers=2, tokens=32768, decode_tokens=3, budget_gib=24,
                          chunk_tokens=4096, warmup_tokens=512, log=print)
    rows = {row["config"]: row for row in result["rows"]}
    assert list(rows) == ["dhsa-chunked-int4", "dense-chunked-int4", "dense-int4", "plain-bf16"]
    for row in rows.values():
        assert row["ok"], row
        assert row["peak_reserved_mb"] <= 24 * 1024
        assert len(row["decode_ms_steps"]) == 3
    assert rows["dhsa-chunked-int4"]["dhsa_backend"] == "torch-cuda"
    # at 32K one unchunked [L, 14336] bf16 MLP intermediate is 0.9 GiB, and three are alive
    assert rows["dense-chunked-int4"]["peak_mb"] < rows["dense-int4"]["peak_mb"] - 1000
    assert result["machine"]["int4_decode_kernel"] == {"cuda:0": True}
    int4_row = rows["dense-int4"]
    # built weight by weight: the load peak is the INT4 weights plus about one slab's temporaries
    assert int4_row["load_peak_mb"] < int4_row["weights_mb"] + 1536, int4_row
    assert int4_row["weights_mb"] < 0.4 * rows["plain-bf16"]["weights_mb"]
    assert result["torch_int4"]["_weight_int4pack_mm"]
    assert torch.cuda.memory_allocated() - before < 2**26  # models, caches and probes were freed


def test_memory_budget_is_enforced_and_plain_is_rerun_without_it():
    from dhsa_export.bench.memory import bench_memory

    result = bench_memory("llama3.1-8b:random", layers=2, tokens=1024, decode_tokens=1, budget_gib=1.0,
                          configs=["plain-bf16"], warmup_tokens=256, log=print)
    capped, free = result["rows"]
    assert not capped["ok"] and capped["error"].startswith("out of memory in load"), capped
    assert free["config"] == "plain-bf16-nocap" and free["ok"] and free["peak_mb"] > 1024
    probe = torch.zeros(2**28, device="cuda")  # 1 GiB: the cap is lifted again
    del probe
