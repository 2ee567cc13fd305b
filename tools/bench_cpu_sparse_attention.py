"""CPU time of one sparse attention layer: "reference" (per-block masked SDPA) vs "torch-gather".

    PYTHONPATH=. python tools/bench_cpu_sparse_attention.py --tokens 2048,4096,8192 [--json OUT]

Random fp32 q/k/v with the head shapes of SmolLM2-135M (9 q / 3 kv heads) and Qwen2.5-0.5B
(14 q / 2 kv), head_dim 64; selections of vslash / topk / dynamic (similarity chunks) at density
0.125, group routing. Best of ``--repeats`` wall times per backend, dense causal SDPA alongside,
and the largest difference between the two backends' outputs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dhsa_export import DHSAConfig
from dhsa_export.algo import route
from dhsa_export.algo.attention import block_sparse_attention, dense_attention, gathered_sparse_attention
from dhsa_export.algo.boundaries import similarity_boundaries

SHAPES = {"smollm2-135m": (9, 3), "qwen2.5-0.5b": (14, 2)}


def best_of(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="2048,4096,8192")
    parser.add_argument("--patterns", default="vslash,topk,dynamic")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for shape, (hq, hkv) in SHAPES.items():
        for length in [int(t) for t in args.tokens.split(",")]:
            gen = torch.Generator().manual_seed(length)
            q = torch.randn(hq, length, 64, generator=gen)
            k = torch.randn(hkv, length, 64, generator=gen) + torch.randn(1, 1, 64, generator=gen)
            v = torch.randn(hkv, length, 64, generator=gen)
            dense_s, _ = best_of(lambda: dense_attention(q, k, v), args.repeats)
            for pattern in args.patterns.split(","):
                offsets = similarity_boundaries(k, 8, 32) if pattern == "dynamic" else None
                selection = route(q, k, DHSAConfig(pattern=pattern), offsets)
                ref_s, ref = best_of(lambda: block_sparse_attention(q, k, v, selection), args.repeats)
                gather_s, got = best_of(lambda: gathered_sparse_attention(q, k, v, selection), args.repeats)
                row = {
                    "shape": shape, "tokens": length, "pattern": pattern,
                    "causal_block_fraction": round(selection.causal_block_fraction(), 3),
                    "reference_s": round(ref_s, 3), "torch_gather_s": round(gather_s, 3),
                    "dense_sdpa_s": round(dense_s, 3), "speedup": round(ref_s / gather_s, 2),
                    "max_abs_diff": float((got - ref).abs().max()),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
