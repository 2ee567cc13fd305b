"""Routing time on the GPU, before/after, per pattern and length (LLaMA-3.1-8B head shape, bf16).

    python3 tools/gpu/profile_routing.py --tokens 8192,32768,65536,131072 \
        [--baseline .baseline/algo_head] [--profile 32768:vslash,131072:vslash_blockwise] [--json OUT]

For every (length, pattern) it times, with CUDA events (median of ``--repeats`` after warm-up):

- ``route_ms``: :func:`dhsa_export.algo.routing.route` alone;
- ``route_index_ms``: route + conversion to the kernel's ``block_index`` / ``block_count``
  (:func:`dhsa_export.backends.torch_cuda.selections_to_indices`, what ``bench_attention`` calls
  ``routing_ms``);
- ``route_torch_ms``: route with the Triton probability kernels off (``DHSA_ROUTING_TRITON=0``);
- ``route_unfused_ms`` / ``route_unfused_index_ms`` / ``unfused_route_graph_*``: the same with the
  fused routing kernels off (``DHSA_ROUTING_FUSED=0``, :mod:`routing_fused`; the v7 code path), and
  ``fused_vs_unfused_mask_diff``;
- ``route_graph_ms`` / ``route_graph_index_ms``: the same two replayed from a CUDA graph
  (:mod:`dhsa_export.backends.torch_cuda.routing_graph`, token limit lifted so 128K is timed too),
  ``graph_mask_diff`` (mask entries differing from eager route: 0 expected, same kernels) and
  ``graph_mb`` (static inputs + the graph's memory pool);
- ``baseline_ms``: route of the frozen earlier version in ``--baseline`` (see compare_routing.py),
  and ``mask_diff``: mask entries where the two selections differ (fp32 summation order on the GPU
  can flip near-ties; 0 expected on the CPU).

``vslash`` is also timed above 64K (``vslash_blockwise_above=0``), next to the default
switch to ``vslash_blockwise``. ``--profile`` prints torch.profiler's top CUDA kernels of one call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_routing import load_baseline  # noqa: E402

from dhsa_export import DHSAConfig  # noqa: E402
from dhsa_export.algo import route  # noqa: E402
from dhsa_export.algo.boundaries import make_chunker  # noqa: E402
from dhsa_export.backends.torch_cuda import routing_fused, routing_graph, routing_triton, selections_to_indices  # noqa: E402
from dhsa_export.bench.attention import warm_gpu  # noqa: E402
from dhsa_export.bench.timing import median_ms  # noqa: E402

PATTERNS = ("topk", "ashape", "vslash", "vslash_blockwise", "dynamic")


def timed(fn, repeats=5, warmup=2):
    return median_ms(fn, warmup, repeats)


def inputs(length: int, seed: int = 0):
    """LLaMA-3.1-8B head shape; keys with a shared mean direction like real LLM keys."""
    gen = torch.Generator(device="cuda").manual_seed(seed + length)
    q = torch.randn(32, length, 128, device="cuda", generator=gen).bfloat16()
    bias = torch.randn(1, 1, 128, device="cuda", generator=gen)
    k = (torch.randn(8, length, 128, device="cuda", generator=gen) + bias).bfloat16()
    return q, k


def measure(length: int, pattern: str, baseline, repeats: int) -> dict:
    q, k = inputs(length)
    overrides = {"vslash_blockwise_above": 0} if pattern == "vslash" else {}
    cfg = DHSAConfig(pattern=pattern, **overrides)
    offsets = make_chunker(cfg)(k) if pattern == "dynamic" else None
    row = {"tokens": length, "pattern": pattern, "effective": cfg.effective_pattern(length)}

    def with_index():
        sel = route(q, k, cfg, offsets)
        return selections_to_indices([sel], sel.grid.chunk_block is None)

    row["route_ms"] = timed(lambda: route(q, k, cfg, offsets), repeats)
    row["route_index_ms"] = timed(with_index, repeats)
    new = route(q, k, cfg, offsets)
    row["causal_block_fraction"] = new.causal_block_fraction()
    os.environ[routing_triton.ENV_SWITCH] = "0"
    try:
        row["route_torch_ms"] = timed(lambda: route(q, k, cfg, offsets), repeats)
        torch_mask = route(q, k, cfg, offsets).mask
    finally:
        os.environ.pop(routing_triton.ENV_SWITCH, None)
    row["triton_vs_torch_mask_diff"] = int((torch_mask != new.mask).sum())
    os.environ[routing_fused.ENV_SWITCH] = "0"  # before: the torch steps after the scores (v7)
    try:
        row["route_unfused_ms"] = timed(lambda: route(q, k, cfg, offsets), repeats)
        row["route_unfused_index_ms"] = timed(with_index, repeats)
        unfused = route(q, k, cfg, offsets)
        if cfg.effective_pattern(length) in routing_graph.GRAPH_PATTERNS:
            row.update({f"unfused_{key}": v for key, v in measure_graph(q, k, cfg, unfused, repeats).items()})
    finally:
        os.environ.pop(routing_fused.ENV_SWITCH, None)
    row["fused_vs_unfused_mask_diff"] = int((unfused.mask != new.mask).sum())
    if cfg.effective_pattern(length) in routing_graph.GRAPH_PATTERNS:
        row.update(measure_graph(q, k, cfg, new, repeats))
    if baseline is not None:
        try:
            row["baseline_ms"] = timed(lambda: baseline.route(q, k, cfg, offsets), repeats)
            row["mask_diff"] = int((baseline.route(q, k, cfg, offsets).mask != new.mask).sum())
        except torch.OutOfMemoryError as exc:  # noqa: PERF203
            row["baseline_error"] = f"OOM: {exc}"[:200]
    row["mask_entries"] = new.mask.numel()
    return row


def measure_graph(q, k, cfg, eager, repeats: int) -> dict:
    """Routing replayed from a CUDA graph (no token limit, no memory budget), against ``eager``."""
    cache = routing_graph.RoutingGraphCache(max_mb=1 << 20)
    os.environ[routing_graph.ENV_MAX_TOKENS] = "0"
    try:
        def with_index():
            sel = cache.route(q, k, cfg)
            return selections_to_indices([sel], False)

        out = {"route_graph_ms": timed(lambda: cache.route(q, k, cfg), repeats),
               "route_graph_index_ms": timed(with_index, repeats)}
        graph = cache.route(q, k, cfg)
        out["graph_mask_diff"] = int((graph.mask != eager.mask).sum())
        out["graph_index_equal"] = bool(torch.equal(graph.to_block_index(eager.grid.num_chunks)[0],
                                                    eager.to_block_index(eager.grid.num_chunks)[0]))
        out["graph_mb"] = cache.info()["mb"]
        out["graph_replays"] = cache.counts["replays"]
    finally:
        os.environ.pop(routing_graph.ENV_MAX_TOKENS, None)
        cache.clear()
    return out


def profile_once(length: int, pattern: str, top: int = 14) -> str:
    q, k = inputs(length)
    cfg = DHSAConfig(pattern=pattern, vslash_blockwise_above=0 if pattern == "vslash" else 65536)
    route(q, k, cfg)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sel = route(q, k, cfg)
        selections_to_indices([sel], False)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="8192,32768,65536,131072")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--baseline", default=".baseline/algo_head", help="'' to skip the before timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", default="32768:vslash,131072:vslash_blockwise")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    baseline = load_baseline(Path(args.baseline)) if args.baseline and Path(args.baseline).is_dir() else None
    rows = []
    warm_gpu()
    for length in [int(t) for t in args.tokens.split(",")]:
        for pattern in args.patterns.split(","):
            row = measure(length, pattern, baseline, args.repeats)
            rows.append(row)
            print(json.dumps({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
            torch.cuda.empty_cache()
    profiles = {}
    for item in filter(None, args.profile.split(",")):
        length, pattern = item.split(":")
        profiles[item] = profile_once(int(length), pattern)
        print(f"== profile {item}\n{profiles[item]}", flush=True)
    nan = float("nan")
    print("| tokens | pattern | baseline_ms | unfused route+index (graph) | route_ms | route_torch_ms | "
          "route_index_ms | mask_diff | fused_vs_unfused_mask_diff | route_graph_ms | route_graph_index_ms | "
          "graph_mask_diff | graph_mb |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['pattern']} | {r.get('baseline_ms', nan):.2f} | "
              f"{r['route_unfused_index_ms']:.2f} ({r.get('unfused_route_graph_index_ms', nan):.2f}) | "
              f"{r['route_ms']:.2f} | "
              f"{r['route_torch_ms']:.2f} | {r['route_index_ms']:.2f} | {r.get('mask_diff', '-')} | "
              f"{r['fused_vs_unfused_mask_diff']} | "
              f"{r.get('route_graph_ms', nan):.2f} | {r.get('route_graph_index_ms', nan):.2f} | "
              f"{r.get('graph_mask_diff', '-')} | {r.get('graph_mb', '-')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "profiles": profiles, "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
