"""Time (or hand to ncu) the block-sparse attention kernel alone on a real routing selection.

LLaMA-3.1-8B heads (32 q / 8 kv, D 128), bf16, group routing, density 0.125, the pattern the
backend uses at that length. Prints the kernel's median time (CUDA events, after warm-up), the
achieved TFLOP/s over the computed area, and the shape of the work: CTAs, key tiles per CTA (mean,
max) and the critical path in tiles, so that a time can be split into "work" and "tail".

    python3 tools/gpu/profile_kernel.py --tokens 8192,32768 --variants auto,wgmma
    ncu --clock-control none --set full -k regex:bsa_wgmma --launch-skip 2 --launch-count 1 \\
        python3 tools/gpu/profile_kernel.py --tokens 32768 --launches 3
"""

from __future__ import annotations

import argparse
import json

import torch


def work_shape(count: torch.Tensor, k_block: int, key_tile: int = 128, tiles_per_qblock: int = 4) -> dict:
    """Key tiles per CTA from ``block_count [B, Hr, nQ]`` (fixed chunks of ``k_block`` keys)."""
    keys = count.to(torch.int64) * k_block
    tiles = (keys + key_tile - 1) // key_tile
    per_cta = tiles.repeat_interleave(tiles_per_qblock, dim=-1).flatten().float()
    return {"ctas": int(per_cta.numel()), "tiles_mean": float(per_cta.mean()),
            "tiles_max": int(per_cta.max()), "tiles_total": int(per_cta.sum())}


def main(argv=None) -> int:
    from dhsa_export.backends.torch_cuda import launch, raise_on_error_flag, route_batch, selections_to_indices
    from dhsa_export.backends.torch_cuda.library import VARIANTS
    from dhsa_export.bench.attention import random_qkv
    from dhsa_export.bench.timing import median_ms
    from dhsa_export.config import DHSAConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="32768")
    parser.add_argument("--variants", default="auto")
    parser.add_argument("--launches", type=int, default=0, help="just launch N times (for ncu); no timing")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cfg = DHSAConfig(density=0.125)
    rows = []
    for length in (int(t) for t in args.tokens.split(",")):
        q, k, v = random_qkv(length, seed=length)
        sels, variable = route_batch(q, k, cfg, graphs=False)
        index, count, offsets = selections_to_indices(sels, variable)
        cbf = sels[0].causal_block_fraction()
        flops = 4 * 128 * cbf * 32 * length * (length + 1) / 2
        for name in args.variants.split(","):
            vid = VARIANTS[name]
            out, ws = launch(q, k, v, index, count, offsets, cfg.q_block, cfg.k_block, variant=vid)
            raise_on_error_flag(ws)
            if args.launches:
                for _ in range(args.launches):
                    launch(q, k, v, index, count, offsets, cfg.q_block, cfg.k_block, variant=vid)
                torch.cuda.synchronize()
                continue
            ms = median_ms(lambda: launch(q, k, v, index, count, offsets, cfg.q_block, cfg.k_block, variant=vid),
                           3, args.repeats)
            row = {"tokens": length, "variant": name, "pattern": cfg.effective_pattern(length),
                   "causal_block_fraction": cbf, "kernel_ms": ms, "tflops": flops / ms / 1e9,
                   **work_shape(count, cfg.k_block)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
