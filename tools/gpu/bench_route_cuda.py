"""dhsa::Route in CUDA C++ (route_cuda) against the torch/Triton GPU path and the CPU fp32 reference:
time (median of CUDA-event timings) and agreement (share of (head, query block) rows whose selected
chunks differ), LLaMA-3.1-8B attention heads (32 query / 8 KV heads, head_dim 128), bf16.

    python tools/gpu/bench_route_cuda.py --lengths 8192,32768 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from dhsa_export import DHSAConfig
from dhsa_export.algo.routing import route
from dhsa_export.backends.torch_cuda import route_cuda
from dhsa_export.backends.torch_cuda.ops import routing_function
from dhsa_export.bench.timing import cuda_kernel_times, median_ms


def timed(fn, repeats=5, warmup=2) -> float:
    return median_ms(fn, warmup, repeats)


def rows(index, count):
    index, count = index.cpu(), count.cpu()
    flat_i, flat_c = index.reshape(-1, index.shape[-1]), count.reshape(-1)
    return [frozenset(flat_i[n, : flat_c[n]].tolist()) for n in range(flat_c.numel())]


def differing(a, b) -> float:
    ra, rb = rows(*a), rows(*b)
    return sum(x != y for x, y in zip(ra, rb)) / len(ra)


def random_offsets(length, gen, lo=8, hi=32):
    offsets, pos = [0], 0
    while pos < length:
        pos = min(length, pos + int(torch.randint(lo, hi + 1, (1,), generator=gen)))
        offsets.append(pos)
    return torch.tensor(offsets, dtype=torch.int32)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--cpu-reference-max", type=int, default=8192)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="per-kernel CUDA times at the largest length")
    args = parser.parse_args()
    results = []
    gen = torch.Generator().manual_seed(0)
    cases = [("vslash", "group", {}), ("vslash", "group", {"logits": "fp32"}), ("vslash", "head", {}),
             ("topk", "group", {}),
             ("vslash_blockwise", "group", {}), ("dynamic", "group", {"chunk_score": "mass"}),
             ("dynamic", "group", {"chunk_score": "mean"})]
    for length in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 32, length, 128, generator=gen).to("cuda", torch.bfloat16)
        k = torch.randn(1, 8, length, 128, generator=gen).to("cuda", torch.bfloat16)
        offsets = random_offsets(length, gen).cuda()
        for pattern, routing, extra in cases:
            cfg = DHSAConfig(pattern=pattern, head_routing=routing,
                             **{key: value for key, value in extra.items() if key != "logits"})
            if extra.get("logits") == "fp32":  # vslash logits on the CUDA cores instead of mma.sync
                os.environ["DHSA_ROUTE_LOGITS"] = "fp32"
            else:
                os.environ.pop("DHSA_ROUTE_LOGITS", None)
            off = offsets.long() if pattern == "dynamic" else None
            width = (off.numel() - 1) if off is not None else -(-length // cfg.k_block)

            def torch_eager():
                sel = route(q[0], k[0], cfg, off)
                return sel.to_block_index(width)

            graphs = routing_function()

            def torch_graph():
                sel = graphs(q[0], k[0], cfg, off)
                return sel.to_block_index(width)

            def cuda_cpp():
                return route_cuda(q, k, cfg, off[None].int() if off is not None else None, check=False)

            row = {"length": length, "pattern": pattern, "routing": routing, **extra}
            try:
                got = cuda_cpp()
                torch.cuda.synchronize()
                row["cuda_cpp_ms"] = timed(cuda_cpp)
                ref_gpu = torch_eager()
                row["torch_eager_ms"] = timed(torch_eager)
                try:
                    row["torch_graph_ms"] = timed(torch_graph)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    row["torch_graph_error"] = str(exc)[:200]
                row["differing_rows_vs_gpu_reference"] = differing(got, (ref_gpu[0][None], ref_gpu[1][None]))
                if length <= args.cpu_reference_max:
                    sel = route(q[0].float().cpu(), k[0].float().cpu(), cfg, off.long().cpu() if off is not None else None)
                    ref = sel.to_block_index(width)
                    row["differing_rows_vs_cpu_fp32_reference"] = differing(got, (ref[0][None], ref[1][None]))
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if args.profile and length == max(int(x) for x in args.lengths.split(",")) and "error" not in row:
                row["kernels_ms"] = {name.split("(")[0][-60:]: round(ms, 4)
                                     for name, _, ms in cuda_kernel_times(cuda_cpp)}
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
