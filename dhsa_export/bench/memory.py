"""Long-context memory benchmark: prefill a long prompt and decode under a GPU memory budget.

A recipe's exact architecture with random weights (``llama3.1-8b:random``, all 32 layers by
default) prefills ``tokens`` random token ids into a transformers ``DynamicCache`` and then decodes
``decode_tokens`` tokens greedily, under ``torch.cuda.set_per_process_memory_fraction(budget /
total)``. Configurations (``--configs``):

- ``dhsa-chunked-int4``: DHSA prefill (torch-cuda kernel), chunked prefill
  (:mod:`dhsa_export.hf.chunked`), INT4 weights (:mod:`dhsa_export.hf.int4`: every decoder Linear,
  the embedding and the output projection, block 32, bf16 scales; decode through the INT4 Triton
  kernel), bf16 activations;
- ``dense-chunked-int4``: the same with dense SDPA attention;
- ``dense-int4``: INT4 + SDPA without chunking (what the chunking alone buys);
- ``plain-bf16``: the unmodified transformers model with bf16 weights and SDPA, prefilled like
  ``generate`` does (``logits_to_keep=1``). When it fails the budget it is run again without the
  cap (row ``plain-bf16-nocap``) if the GPU holds it.

INT4 models are built on the meta device and materialized one weight at a time with seeded random
weights (:func:`dhsa_export.hf.int4.materialize_int4`): the full-precision model never exists. Random
weights are fine here: this measures memory and speed; accuracy is measured on real models elsewhere.

Per row: ``prefill_ms`` (CUDA events, one 100K prefill after a short warm-up prefill + decode),
``decode_ms_per_token`` (median over the decode steps, all of them in ``decode_ms_steps``),
``peak_mb`` (``max_memory_allocated`` over prefill and decode, weights and KV cache included),
``peak_reserved_mb`` (what the allocator held, the figure the cap limits), ``load_peak_mb``,
``weights_mb``, ``kv_cache_mb``, ``ok`` / ``error``. The budget covers PyTorch's allocator; the
CUDA context (``context_mb``, about 0.7 GiB on the H200) comes on top.

Command line::

    python -m dhsa_export.bench.memory --tokens 100000 --budget-gib 24 --decode-tokens 16 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import DHSAConfig
from ..errors import DHSAError
from ..hf.chunked import DEFAULT_CHUNK_TOKENS, check_chunk_tokens, decode_step, enable_chunked_prefill, prefill
from ..hf.int4 import check_block_size
from .timing import median_ms, run_and_emit, time_call_ms

ALLOCATOR_SETTINGS = "expandable_segments:True"


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration."""

    attention: str  # "dhsa" | "dense"
    int4: bool
    chunked: bool


CONFIGS = {
    "dhsa-chunked-int4": Setup("dhsa", True, True),
    "dense-chunked-int4": Setup("dense", True, True),
    "dense-int4": Setup("dense", True, False),
    "plain-bf16": Setup("dense", False, False),
}
DEFAULT_CONFIGS = tuple(CONFIGS)
PLAIN = "plain-bf16"


def parse_configs(value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        raise DHSAError(f"unknown memory-benchmark configs {unknown or value!r}; use a comma list of "
                        f"{', '.join(CONFIGS)}")
    return names


def resolve_configs(names, int4: bool = True) -> list[tuple[str, Setup]]:
    """``(row name, Setup)`` per config; ``int4=False`` gives the INT4 configs bf16 weights
    (renamed ``*-bf16``) to show what the weights alone cost."""
    resolved = []
    for name in names:
        setup = CONFIGS[name]
        if setup.int4 and not int4:
            setup, name = Setup(setup.attention, False, setup.chunked), name.replace("int4", "bf16")
        resolved.append((name, setup))
    return resolved


def recipe_config(model: str, layers: int | None):
    """The transformers config of ``RECIPE:random`` (validated like the prefill benchmark)."""
    from .prefill import build_random_model

    return build_random_model(model, layers, torch.bfloat16, device="meta").config


def estimate(config, tokens: int, int4: bool, block_size: int = 32) -> dict:
    """Bytes the weights and the bf16 KV cache need (no activations), from the config alone."""
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    linear = layers * (hidden * (q_out + 2 * kv_out) + q_out * hidden + 3 * hidden * ffn)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embeddings = config.vocab_size * hidden * (1 if tied else 2)
    per_weight = (0.5 + 2 / block_size) if int4 else 2.0  # nibbles + one bf16 scale per block
    kv = tokens * layers * 2 * kv_out * 2
    return {"weights_bytes": int((linear + embeddings) * per_weight), "kv_cache_bytes": int(kv),
            "linear_params": int(linear), "embedding_params": int(embeddings)}


def build_model(model: str, layers: int | None, setup: Setup, block_size: int, seed: int, device):
    """bf16 model on ``device``; INT4 ones built on the meta device and materialized weight by weight."""
    from ..hf.int4 import materialize_int4
    from .prefill import build_random_model

    if not setup.int4:
        return build_random_model(model, layers, torch.bfloat16, device=device)
    net = build_random_model(model, layers, torch.bfloat16, device="meta")
    materialize_int4(net, device, block_size=block_size, seed=seed)
    return net.eval()


def configure(net, setup: Setup, cfg: DHSAConfig, chunk_tokens: int, device):
    """Attention and chunking of ``setup``; returns the DHSA runtime (or None)."""
    from ..hf.attention import disable_dhsa, enable_dhsa

    if setup.chunked:
        enable_chunked_prefill(net, chunk_tokens)
    if setup.attention == "dense":
        disable_dhsa(net)
        return None
    backend = "torch-cuda" if torch.device(device).type == "cuda" else "reference"
    return enable_dhsa(net, cfg, backend=backend)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers cache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def run_generation(net, ids: torch.Tensor, decode_tokens: int, device, row: dict, phase: list) -> list[int]:
    """Prefill then greedy decode, timing both into ``row``; ``phase[0]`` names the running step."""
    phase[0] = "prefill"
    (logits, cache), row["prefill_ms"] = time_call_ms(lambda: prefill(net, ids), device)
    tokens = [int(logits.argmax(-1))]
    phase[0] = "decode"
    steps = []
    for _ in range(decode_tokens):
        token = torch.tensor([[tokens[-1]]], device=ids.device)
        logits, ms = time_call_ms(lambda: decode_step(net, token, cache), device)
        steps.append(round(ms, 2))
        tokens.append(int(logits.argmax(-1)))
    # the median: the first step after a long prefill can carry one-time costs (seen: ~0.7 s in the
    # first configuration of a process only), which a mean over 16 tokens would spread over all
    row["decode_ms_per_token"] = statistics.median(steps) if steps else None
    row["decode_ms_steps"] = steps
    row["kv_cache_mb"] = round(kv_cache_bytes(cache) / 2**20, 2)
    return tokens


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_index(device) -> int:
    """The CUDA device index (some torch.cuda calls refuse a bare "cuda")."""
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def set_budget(budget_bytes: int | None, device) -> None:
    """Cap PyTorch's allocator at ``budget_bytes`` (None: the whole GPU)."""
    if torch.device(device).type != "cuda":
        return
    device = cuda_index(device)
    total = torch.cuda.get_device_properties(device).total_memory
    if budget_bytes is not None and budget_bytes > total:
        raise DHSAError(f"budget {budget_bytes / 2**30:.1f} GiB exceeds the GPU's {total / 2**30:.1f} GiB; "
                        "pass a smaller --budget-gib")
    torch.cuda.set_per_process_memory_fraction(1.0 if budget_bytes is None else budget_bytes / total, device)


def _memory_mb(device) -> dict:
    if torch.device(device).type != "cuda":
        return {}
    return {"peak_mb": round(torch.cuda.max_memory_allocated(cuda_index(device)) / 2**20, 1),
            "peak_reserved_mb": round(torch.cuda.max_memory_reserved(cuda_index(device)) / 2**20, 1)}


def _reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(cuda_index(device))
        torch.cuda.reset_peak_memory_stats(cuda_index(device))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_config(name: str, setup: Setup, *, model: str, layers: int | None, tokens: int, decode_tokens: int,
               budget_bytes: int | None, cfg: DHSAConfig, chunk_tokens: int, block_size: int,
               warmup_tokens: int, seed: int, device, net=None) -> tuple[dict, object]:
    """One row (see the module docstring). An out-of-memory error is a row with ``ok: false`` and
    the phase it happened in, not an exception. Returns ``(row, model)`` so a failed plain model
    can be measured again without the cap; pass it back as ``net`` to skip building."""
    row = {"config": name, "tokens": tokens, "attention": setup.attention, "int4": setup.int4,
           "chunked": setup.chunked, "chunk_tokens": chunk_tokens if setup.chunked else None,
           "budget_gib": None if budget_bytes is None else round(budget_bytes / 2**30, 2),
           "prefill_ms": None, "decode_ms_per_token": None, "ok": False, "error": None}
    phase = ["load"]
    _free()
    set_budget(budget_bytes, device)
    _reset_peak(device)
    try:
        if net is None:
            start = time.perf_counter()
            net = build_model(model, layers, setup, block_size, seed, device)
            row["load_s"] = round(time.perf_counter() - start, 1)
        if torch.device(device).type == "cuda":
            row["weights_mb"] = round(torch.cuda.memory_allocated(cuda_index(device)) / 2**20, 1)
            row["load_peak_mb"] = _memory_mb(device)["peak_mb"]
        runtime = configure(net, setup, cfg, chunk_tokens, device)
        vocab = net.config.vocab_size
        gen = torch.Generator(device=device).manual_seed(seed + tokens)
        with torch.inference_mode():
            phase[0] = "warmup"
            warm = torch.randint(0, vocab, (1, min(warmup_tokens, tokens)), device=device, generator=gen)
            run_generation(net, warm, min(2, decode_tokens), device, {}, phase)
            del warm
            _free()
            _reset_peak(device)
            ids = torch.randint(0, vocab, (1, tokens), device=device, generator=gen)
            if runtime is not None:
                runtime.reset_stats()
            row["new_tokens"] = run_generation(net, ids, decode_tokens, device, row, phase)[1:]
        if runtime is not None:
            row["causal_block_fraction"] = round(runtime.stats.causal_block_fraction, 4)
            row["dhsa_backend"] = runtime.backend
        row["ok"] = True
    except Exception as exc:  # noqa: BLE001 - an OOM is a result; anything else is re-raised below
        if not _is_oom(exc):
            raise
        row["error"] = f"out of memory in {phase[0]}: {str(exc).splitlines()[0][:300]}"
    row.update(_memory_mb(device))
    return row, net


def bench_memory(model: str = "llama3.1-8b:random", layers: int | None = None, tokens: int = 100_000,
                 decode_tokens: int = 16, budget_gib: float = 24.0, configs=DEFAULT_CONFIGS,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, block_size: int = 32, density: float = 0.125,
                 pattern: str = "vslash", warmup_tokens: int = 2048, seed: int = 0,
                 retry_without_cap: bool = True, int4: bool = True, device: str = "cuda", log=print) -> dict:
    """Run every config in ``configs`` (see the module docstring); returns ``{"machine", "config",
    "estimates", "rows"}``. On CPU (tests) the budget is not enforced and memory is not reported."""
    if tokens < 1 or decode_tokens < 0:
        raise DHSAError(f"tokens {tokens} must be positive and decode tokens {decode_tokens} non-negative")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise DHSAError("bench memory needs a CUDA GPU; run it on the GPU machine (tools/gpu/run_bench.sh)")
    cfg = DHSAConfig(density=density, pattern=pattern)
    check_block_size(block_size)
    check_chunk_tokens(chunk_tokens)
    budget_bytes = int(budget_gib * 2**30)
    config = recipe_config(model, layers)
    rows, runs = [], resolve_configs(configs, int4)
    try:
        for name, setup in runs:
            common = dict(model=model, layers=layers, tokens=tokens, decode_tokens=decode_tokens, cfg=cfg,
                          chunk_tokens=chunk_tokens, block_size=block_size, warmup_tokens=warmup_tokens,
                          seed=seed, device=device)
            row, net = run_config(name, setup, budget_bytes=budget_bytes, **common)
            rows.append(row)
            log(format_row(row))
            if name == PLAIN and not row["ok"] and retry_without_cap and torch.device(device).type == "cuda":
                if row["error"].startswith("out of memory in load"):
                    net = None  # never built: build it again without the cap
                retry, net = run_config(name + "-nocap", setup, budget_bytes=None, net=net, **common)
                rows.append(retry)
                log(format_row(retry))
            del net
            _free()
    finally:
        set_budget(None, device)
    return {"machine": _machine(device), "torch_int4": probe_torch_int4(device), "config": _run_config(model, config, tokens, decode_tokens, budget_gib,
                                                                chunk_tokens, block_size, cfg, warmup_tokens),
            "estimates": {name: estimate(config, tokens + decode_tokens, setup.int4, block_size)
                          for name, setup in runs},
            "rows": rows}


TORCH_INT4_OPS = ("_weight_int4pack_mm", "_convert_weight_to_int4pack", "_weight_int4pack_mm_for_cpu",
                  "_weight_int4pack_mm_with_scales_and_zeros")


def probe_torch_int4(device, rows: int = 14336, cols: int = 4096, block_size: int = 32) -> dict:
    """Whether torch's own int4 matmul (tinygemm) runs here on our packing, and how one decode-sized
    product (one token against a ``[rows, cols]`` weight) compares with dequantize + matmul and
    with :class:`dhsa_export.hf.int4.Int4Linear` (the Triton kernel on CUDA).

    Information for the report only: the benchmark always uses dequantize + matmul (see
    :mod:`dhsa_export.hf.int4` for why).
    """
    from ..hf.int4 import Int4Linear, dequantize_int4, quantize_int4

    info = {name: hasattr(torch.ops.aten, name) for name in TORCH_INT4_OPS}
    if torch.device(device).type != "cuda" or not info["_weight_int4pack_mm"]:
        return info
    gen = torch.Generator(device=device).manual_seed(0)
    weight = quantize_int4(torch.randn(rows, cols, device=device, generator=gen, dtype=torch.bfloat16) * 0.02,
                           block_size)
    x = torch.randn(1, cols, device=device, generator=gen, dtype=torch.bfloat16)
    layer = Int4Linear(weight)
    want = x.float() @ dequantize_int4(weight, torch.float32).t()
    try:
        swapped = ((weight.packed & 0x0F) << 4) | (weight.packed >> 4)  # tinygemm: even index high
        tiled = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), 8)
        scales_zeros = torch.stack([weight.scales.t(), torch.zeros_like(weight.scales.t())], -1).contiguous()
        fused = lambda: torch.ops.aten._weight_int4pack_mm(x, tiled, block_size, scales_zeros)  # noqa: E731
        got = fused()
        info["tinygemm_rel_err"] = float((got.float() - want).norm() / want.norm())
        info["tinygemm_ms"] = round(median_ms(fused, 3, 20), 4)
    except Exception as exc:  # noqa: BLE001 - a missing kernel is the answer, not a failure
        info["tinygemm_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    dequantized = lambda: F.linear(x, dequantize_int4(weight, x.dtype))  # noqa: E731
    info["dequant_matmul_ms"] = round(median_ms(dequantized, 3, 20), 4)
    info["int4_linear_ms"] = round(median_ms(lambda: layer(x), 3, 20), 4)  # the Triton kernel when on
    info["int4_linear_rel_err"] = float((layer(x).float() - want).norm() / want.norm())
    info["shape"] = [rows, cols]
    return info


def _machine(device) -> dict:
    from .attention import machine_info

    info = machine_info()
    info["allocator"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if torch.device(device).type == "cuda":
        from ..backends.torch_cuda import int4_triton

        info["int4_decode_kernel"] = int4_triton.status() or "not used"
    if torch.device(device).type == "cuda":
        free, total = torch.cuda.mem_get_info(cuda_index(device))
        info["context_mb"] = round((total - free - torch.cuda.memory_reserved(cuda_index(device))) / 2**20, 1)
    return info


def _run_config(model, config, tokens, decode_tokens, budget_gib, chunk_tokens, block_size, cfg, warmup_tokens) -> dict:
    return {"model": model, "layers": config.num_hidden_layers, "tokens": tokens, "decode_tokens": decode_tokens,
            "budget_gib": budget_gib, "chunk_tokens": chunk_tokens, "int4_block_size": block_size,
            "int4_modules": "every decoder Linear + embedding + lm_head (random weights, seed 0)",
            "activations": "bfloat16", "dhsa": cfg.to_dict(), "warmup_tokens": warmup_tokens,
            "cache": "transformers DynamicCache (bf16)", "batch": 1}


def format_row(row: dict) -> str:
    def num(value, fmt):
        return format(value, fmt) if value is not None else "-"

    status = "ok" if row["ok"] else f"FAILED ({row['error']})"
    return (f"{row['config']:<20} {row['tokens']:>7} prefill={num(row['prefill_ms'], '.0f')} ms "
            f"decode={num(row['decode_ms_per_token'], '.1f')} ms/token peak={num(row.get('peak_mb'), '.0f')} MiB "
            f"reserved={num(row.get('peak_reserved_mb'), '.0f')} MiB {status}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| config | tokens | budget GiB | prefill ms | decode ms/token | peak MiB | peak reserved MiB | "
             "weights MiB | KV cache MiB | result |", "|" + "---|" * 10]
    for r in rows:
        cell = lambda key, fmt: format(r[key], fmt) if r.get(key) is not None else "-"  # noqa: E731
        result = "ok" if r["ok"] else r["error"].split(":")[0]
        lines.append(f"| {r['config']} | {r['tokens']} | {r['budget_gib'] if r['budget_gib'] is not None else 'none'} | "
                     f"{cell('prefill_ms', '.0f')} | {cell('decode_ms_per_token', '.1f')} | {cell('peak_mb', '.0f')} | "
                     f"{cell('peak_reserved_mb', '.0f')} | {cell('weights_mb', '.0f')} | {cell('kv_cache_mb', '.0f')} | "
                     f"{result} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Long-context prefill + decode under a GPU memory budget")
    parser.add_argument("--model", default="llama3.1-8b:random")
    parser.add_argument("--layers", type=int, default=None, help="default: all of the recipe's layers")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    parser.add_argument("--int4-block-size", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.125)
    parser.add_argument("--pattern", default="vslash")
    parser.add_argument("--no-int4", dest="int4", action="store_false",
                        help="bf16 weights for the configs that are INT4 by default")
    parser.add_argument("--json", default=None, help="write the result here (and print a table)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_SETTINGS)  # before CUDA starts
    return run_and_emit(
        lambda: bench_memory(args.model, args.layers, args.tokens, args.decode_tokens, args.budget_gib,
                             parse_configs(args.configs), args.chunk_tokens, args.int4_block_size,
                             args.density, args.pattern, int4=args.int4),
        args.json, markdown_table)


if __name__ == "__main__":
    raise SystemExit(main())
