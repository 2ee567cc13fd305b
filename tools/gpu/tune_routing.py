"""Tile / launch settings of the v9 vslash routing kernels on the GPU (LLaMA-3.1-8B heads, bf16).

    python3 tools/gpu/tune_routing.py --tokens 8192,32768 --json tune.json

Times (CUDA events, median of ``--repeats``) for every setting in ``STATS`` / ``LINES``
(``routing_triton.TUNE`` keys, applied through ``DHSA_ROUTING_TUNE``): pass 1 (``_row_stats2`` +
``_merge_lse``), the whole ``last_queries_line_sums``, ``top_line_prefixes`` and the old
``last_queries_probabilities`` + ``line_sums`` for comparison; the line sums of each setting are
checked against the default's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dhsa_export.backends.torch_cuda import routing_fused, routing_triton  # noqa: E402
from dhsa_export.bench import timing  # noqa: E402

STATS = [dict(stats_block_n=64, stats_warps=4, stats_stages=3, stats_splits=32),
         dict(stats_block_n=128, stats_warps=8, stats_stages=3, stats_splits=32),
         dict(stats_block_n=128, stats_warps=4, stats_stages=3, stats_splits=32),
         dict(stats_block_n=64, stats_warps=4, stats_stages=4, stats_splits=64),
         dict(stats_block_n=128, stats_warps=8, stats_stages=2, stats_splits=16),
         dict(stats_block_n=64, stats_warps=8, stats_stages=3, stats_splits=64)]
LINES = [dict(lines_warps=8, lines_stages=2, lines_programs_per_sm=2),
         dict(lines_warps=4, lines_stages=2, lines_programs_per_sm=2),
         dict(lines_warps=8, lines_stages=3, lines_programs_per_sm=2),
         dict(lines_warps=8, lines_stages=1, lines_programs_per_sm=2),
         dict(lines_warps=8, lines_stages=2, lines_programs_per_sm=1),
         dict(lines_warps=8, lines_stages=2, lines_programs_per_sm=4),
         dict(lines_warps=4, lines_stages=3, lines_programs_per_sm=3)]
TOPLINES = [8, 16, 32]


def median_ms(fn, repeats):
    return timing.median_ms(fn, 3, repeats)


def set_tune(conf: dict):
    os.environ["DHSA_ROUTING_TUNE"] = ",".join(f"{k}={v}" for k, v in conf.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="8192,32768")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = []
    for length in [int(t) for t in args.tokens.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(length)
        q = torch.randn(32, length, 128, device="cuda", generator=gen).bfloat16()
        k = (torch.randn(8, length, 128, device="cuda", generator=gen) + 0.5).bfloat16()
        q_last = q[:, -128:]
        set_tune({})
        ref_v, ref_p, block = routing_triton.last_queries_line_sums(q_last, k, 4, 128)
        row = {"tokens": length}
        row["v8_probs_plus_line_sums_ms"] = median_ms(
            lambda: routing_fused.line_sums(routing_triton.last_queries_probabilities(q_last, k, 4, 128)), args.repeats)
        keep = length // 16
        for warps in TOPLINES:
            set_tune({"toplines_warps": warps})
            row[f"top_line_prefixes_w{warps}_ms"] = median_ms(
                lambda: routing_fused.top_line_prefixes(ref_v, ref_p, block, 128, keep, keep), args.repeats)
        set_tune({})
        v8_v, v8_s = routing_fused.line_sums(routing_triton.last_queries_probabilities(q_last, k, 4, 128))
        row["top_line_prefixes_direct_ms"] = median_ms(
            lambda: routing_fused.top_line_prefixes(v8_v, v8_s, 0, 128, keep, keep), args.repeats)
        torch.cuda.synchronize()
        # GPU time of each kernel alone (no host): CUDA graph of 10 calls
        for name, fn in (("v9_line_sums", lambda: routing_triton.last_queries_line_sums(q_last, k, 4, 128)),
                         ("v8_probs_line_sums", lambda: routing_fused.line_sums(
                             routing_triton.last_queries_probabilities(q_last, k, 4, 128))),
                         ("top_lines", lambda: routing_fused.top_line_prefixes(ref_v, ref_p, block, 128, keep, keep))):
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                for _ in range(10):
                    fn()
            row[f"{name}_gpu_ms"] = median_ms(graph.replay, 5) / 10
        sweeps = []
        for conf in STATS + LINES:
            set_tune(conf)
            try:
                v, p, _ = routing_triton.last_queries_line_sums(q_last, k, 4, 128)
                err = float(((v - ref_v).abs().max() / ref_v.abs().max()).item())
                total = median_ms(lambda: routing_triton.last_queries_line_sums(q_last, k, 4, 128), args.repeats)
                sweeps.append({**conf, "line_sums_ms": round(total, 4), "rel_err_vs_default": err})
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile
                sweeps.append({**conf, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(length, sweeps[-1], flush=True)
        set_tune({})
        row["sweep"] = sweeps
        from dhsa_export.algo import routing as R

        row["v8_topk_cumsum_ms"] = median_ms(
            lambda: (R.keep_top_lines(ref_v, keep).cumsum(-1), R.keep_top_lines(ref_v, keep).cumsum(-1)), args.repeats)
        print(length, {k: v for k, v in row.items() if k != "sweep"}, flush=True)
        results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
