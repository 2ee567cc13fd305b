"""Whole-model prefill benchmark on CUDA: dense SDPA attention vs DHSA (torch-cuda backend).

A recipe's architecture with random bf16 weights and fewer layers (``llama3.1-8b:random``, 2 layers
by default), built directly on the GPU from the recipe (no tokenizer, no weights on disk). One
forward over ``tokens`` random token ids with ``use_cache=False``; only the last position goes
through ``lm_head`` (a 128K x 128K-vocabulary logits tensor would dominate time and memory).

- ``dense_ms``: the model with ``attn_implementation="sdpa"``;
- ``dhsa_ms``: the same model after :func:`dhsa_export.hf.attention.enable_dhsa` with
  ``backend="torch-cuda"`` (routing in torch on the GPU + the CUDA block-sparse kernel);
- CUDA-event medians of ``repeats`` forwards after ``warmup``;
- ``*_peak_mb``: ``torch.cuda.max_memory_allocated`` during one forward minus what was allocated
  before it (weights and inputs), in MiB.

Command line::

    python -m dhsa_export.bench.prefill --tokens 32768,131072 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..config import DHSAConfig
from ..errors import DHSAError
from .attention import machine_info
from .timing import event_times_ms, run_and_emit


def build_random_model(model: str, layers: int | None, dtype: torch.dtype, device: str = "cuda"):
    """``RECIPE:random`` (or ``RECIPE``) with seeded random weights, created directly on ``device``.

    Built from the recipe's config (``AutoConfig.for_model`` + ``from_config``), so it needs
    neither a tokenizer nor a weights download; dense attention is SDPA.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..hf.recipes import load_recipe, recipe_names

    name = model[: -len(":random")] if model.endswith(":random") else model
    if name not in recipe_names():
        raise DHSAError(f"unknown model {model!r}; the prefill benchmark takes RECIPE:random with RECIPE "
                        f"one of {', '.join(recipe_names())}")
    recipe = load_recipe(name)
    fields = dict(recipe.config)
    model_type = fields.pop("model_type")
    if layers is not None:
        if not 1 <= layers <= fields["num_hidden_layers"]:
            raise DHSAError(f"layers {layers} outside 1..{fields['num_hidden_layers']} for {name}")
        fields["num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **fields)
    config.architectures = [recipe.architecture]
    torch.manual_seed(0)
    with torch.device(device):
        built = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return built.eval()


def last_position_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Prefill without a KV cache; ``lm_head`` on the last position only: ``[B, 1, vocab]``."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    return model.lm_head(hidden[:, -1:])


def _time_forward(fn, warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms over ``repeats`` after ``warmup``, peak MiB above the allocation before a forward)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = event_times_ms(fn, warmup=0, repeats=repeats)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return statistics.median(times), peak


def bench_prefill(model: str = "llama3.1-8b:random", layers: int = 2,
                  tokens: list[int] | tuple[int, ...] = (32768, 131072), density: float = 0.125,
                  pattern: str = "vslash", warmup: int = 1, repeats: int = 5, seed: int = 0,
                  log=print) -> dict:
    """Prefill latency and peak memory of a random-weights model, dense SDPA vs DHSA (torch-cuda).

    Returns ``{"machine", "config", "rows": [{"tokens", "dense_ms", "dhsa_ms", "speedup",
    "dense_peak_mb", "dhsa_peak_mb", ...}]}`` (see the module docstring for the definitions).
    """
    if not torch.cuda.is_available():
        raise DHSAError("bench_prefill needs a CUDA GPU; run it on the GPU machine (tools/gpu/run_bench.sh)")
    from ..hf.attention import disable_dhsa, enable_dhsa

    cfg = DHSAConfig(density=density, pattern=pattern)
    net = build_random_model(model, layers, torch.bfloat16)
    weights_mb = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    vocab = net.config.vocab_size
    rows = []
    for length in tokens:
        t0 = time.perf_counter()
        gen = torch.Generator(device="cuda").manual_seed(seed + length)
        ids = torch.randint(0, vocab, (1, length), device="cuda", generator=gen)
        row = {"tokens": length, "pattern": cfg.effective_pattern(length), "density": density}
        with torch.inference_mode():
            disable_dhsa(net)
            row["dense_ms"], row["dense_peak_mb"] = _time_forward(lambda: last_position_logits(net, ids),
                                                                  warmup, repeats)
            dense_logits = last_position_logits(net, ids).float()
            runtime = enable_dhsa(net, cfg, backend="torch-cuda")
            row["dhsa_ms"], row["dhsa_peak_mb"] = _time_forward(lambda: last_position_logits(net, ids),
                                                                warmup, repeats)
            runtime.reset_stats()
            dhsa_logits = last_position_logits(net, ids).float()
            row["causal_block_fraction"] = runtime.stats.causal_block_fraction
            row["backend"] = runtime.backend
            disable_dhsa(net)
        row["speedup"] = row["dense_ms"] / row["dhsa_ms"]
        # how far the sparse prefill moves the next-token distribution (random weights: a sanity
        # check that both ran the same model, not an accuracy figure)
        row["last_logits_rel_diff"] = float((dhsa_logits - dense_logits).norm() / dense_logits.norm())
        row["same_argmax"] = bool(dhsa_logits.argmax(-1).eq(dense_logits.argmax(-1)).all())
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        log(format_row(row))
        del ids, dense_logits, dhsa_logits
        torch.cuda.empty_cache()
    config = {"model": model, "layers": layers, "dtype": "bfloat16", "weights_mb": round(weights_mb, 1),
              "dhsa": cfg.to_dict(), "warmup": warmup, "repeats": repeats}
    return {"machine": machine_info(), "config": config, "rows": rows}


def format_row(row: dict) -> str:
    return (f"{row['tokens']:>7} {row['pattern']:<17} dense={row['dense_ms']:9.2f} ms "
            f"dhsa={row['dhsa_ms']:9.2f} ms x{row['speedup']:.2f} "
            f"peak dense={row['dense_peak_mb']:.0f} MiB dhsa={row['dhsa_peak_mb']:.0f} MiB "
            f"cbf={row['causal_block_fraction']:.3f}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| tokens | pattern | dense_ms | dhsa_ms | speedup | dense_peak_mb | dhsa_peak_mb | causal_block_fraction |",
             "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['pattern']} | {r['dense_ms']:.1f} | {r['dhsa_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['dense_peak_mb']:.0f} | {r['dhsa_peak_mb']:.0f} | "
                     f"{r['causal_block_fraction']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="DHSA whole-model prefill benchmark (CUDA)")
    parser.add_argument("--model", default="llama3.1-8b:random")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", default="32768,131072")
    parser.add_argument("--density", type=float, default=0.125)
    parser.add_argument("--pattern", default="vslash")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the result here (and print a table)")
    args = parser.parse_args(argv)
    return run_and_emit(
        lambda: bench_prefill(args.model, args.layers, [int(t) for t in args.tokens.split(",")],
                              args.density, args.pattern, args.warmup, args.repeats),
        args.json, markdown_table)


if __name__ == "__main__":
    raise SystemExit(main())
