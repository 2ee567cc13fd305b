"""Where the routing time goes on the GPU (LLaMA-3.1-8B head shape, bf16, batch 1).

    python3 tools/gpu/profile_routing.py --tokens 32768 [--pattern vslash] [--json OUT.json]

Times each stage of ``dhsa_export.algo.routing`` with CUDA events (median of 5 after warm-up) and
prints torch.profiler's top operators of one full ``route`` call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from dhsa_export import DHSAConfig
from dhsa_export.algo import routing as R
from dhsa_export.algo.layout import BlockGrid, Selection, fixed_offsets


def timed(fn, repeats=5, warmup=2):
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times), out


# ---- candidate fixes, measured by --candidates (dhsa_export.algo is left untouched) ----

def segment_means_index_add(x, offsets):
    """One pass: scatter-add rows into their segment (no scan along the sequence dim)."""
    from dhsa_export.algo.layout import chunk_id_per_token, chunk_lengths

    seg = chunk_id_per_token(offsets)
    sums = torch.zeros(x.shape[0], offsets.numel() - 1, x.shape[-1], device=x.device, dtype=torch.float32)
    sums.index_add_(1, seg, x.float())
    return sums / chunk_lengths(offsets).clamp(min=1).to(sums.dtype)[None, :, None]


def segment_means_inner_scan(x, offsets):
    """Same prefix-sum formula, but the scan runs along the innermost (contiguous) dim."""
    from dhsa_export.algo.layout import chunk_lengths

    xt = x.float().transpose(-1, -2).contiguous()  # [H, D, L]
    prefix = torch.nn.functional.pad(xt.cumsum(dim=-1), (1, 0))
    sums = (prefix[..., offsets[1:]] - prefix[..., offsets[:-1]]).transpose(-1, -2)
    return sums / chunk_lengths(offsets).clamp(min=1).to(sums.dtype)[None, :, None]


def last_queries_probabilities_gqa(q, k, grid, head_group, n_last):
    """GQA-aware: one bmm per KV head over its query heads (no repeat_interleave of K)."""
    import math

    hq, hkv, d = q.shape[0], k.shape[0], q.shape[-1]
    g = hq // hkv
    q_last = q[:, -n_last:].float().reshape(hkv, g * n_last, d)
    logits = torch.bmm(q_last, k.float().transpose(1, 2)).reshape(hq, n_last, -1) / math.sqrt(d)
    positions = torch.arange(q.shape[1] - n_last, q.shape[1], device=q.device) + grid.q_offset
    future = torch.arange(k.shape[1], device=q.device)[None, :] > positions[:, None]
    probs = logits.masked_fill(future[None], -math.inf).softmax(dim=-1)
    return R.group_mean(probs, head_group), positions


def candidates(q, k, cfg, repeats=5):
    base_ms, base = timed(lambda: R.route(q, k, cfg), repeats)
    rows = {"original": (base_ms, 0.0)}
    saved = (R.segment_means, R.last_queries_probabilities)
    trials = {
        "segment_means=index_add": (segment_means_index_add, saved[1]),
        "segment_means=inner_scan": (segment_means_inner_scan, saved[1]),
        "index_add + gqa_lqp": (segment_means_index_add, last_queries_probabilities_gqa),
    }
    try:
        for name, (sm, lqp) in trials.items():
            R.segment_means, R.last_queries_probabilities = sm, lqp
            ms, sel = timed(lambda: R.route(q, k, cfg), repeats)
            differ = float((sel.mask != base.mask).float().mean())
            rows[name] = (ms, differ)
    finally:
        R.segment_means, R.last_queries_probabilities = saved
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--pattern", default="vslash")
    parser.add_argument("--json", default=None)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--patched", action="store_true",
                        help="profile with the candidate fixes applied (index_add segment means, GQA probabilities)")
    parser.add_argument("--candidates", default=None,
                        help="comma-separated token counts: time route() with the candidate fixes only")
    args = parser.parse_args()
    if args.candidates:
        result = {}
        for L in (int(t) for t in args.candidates.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(32, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(8, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            cfg = DHSAConfig(pattern=args.pattern)
            rows = candidates(q, k, cfg)
            result[L] = {n: {"route_ms": ms, "mask_entries_differing": d} for n, (ms, d) in rows.items()}
            for n, (ms, d) in rows.items():
                print(f"{L:>7} {cfg.effective_pattern(L):<17} {n:28s} route {ms:9.3f} ms   mask differs {d:.2e}")
            del q, k
            torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return
    if args.patched:
        R.segment_means, R.last_queries_probabilities = segment_means_index_add, last_queries_probabilities_gqa
    L = args.tokens
    cfg = DHSAConfig(pattern=args.pattern)
    pattern = cfg.effective_pattern(L)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(32, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(8, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    grid = BlockGrid.build(L, fixed_offsets(L, cfg.k_block, "cuda"), cfg.q_block)
    hg = 4
    stages = {}
    stages["route (total)"], sel = timed(lambda: R.route(q, k, cfg))
    stages["to_block_index"], _ = timed(lambda: sel.to_block_index())
    stages["block_scores"], score = timed(lambda: R.block_scores(q, k, grid, hg, False))
    stages["segment_means(q)"], _ = timed(lambda: R.segment_means(q, grid.q_offsets))
    if pattern == "vslash":
        n_last = min(cfg.q_block, L)
        stages["last_queries_probabilities"], (probs, positions) = timed(
            lambda: R.last_queries_probabilities(q, k, grid, hg, n_last))

        def lines():
            vertical = probs.sum(dim=1)
            offsets = positions[:, None] - torch.arange(L, device="cuda")[None, :]
            valid = offsets >= 0
            slash = torch.zeros_like(vertical)
            flat = offsets.clamp(min=0).reshape(-1).expand(probs.shape[0], -1)
            slash.scatter_add_(1, flat, (probs * valid[None]).reshape(probs.shape[0], -1))
            return vertical, slash

        stages["vertical+slash scatter_add"], (vertical, slash) = timed(lines)
        budget_tokens = cfg.budget_tokens(L)
        stages["top_lines_mask x2"], _ = timed(
            lambda: (R.top_lines_mask(vertical, budget_tokens // 2), R.top_lines_mask(slash, budget_tokens // 2)))
        stages["scatter_lines_to_blocks"], _ = timed(lambda: R.scatter_lines_to_blocks(vertical, slash, grid))
    forced = (grid.sink(cfg.k_block) | grid.diagonal())[None]
    weights = torch.ones(grid.num_chunks, device="cuda")
    stages["select_under_budget"], _ = timed(
        lambda: R.select_under_budget(score, grid.causal(), forced, weights, cfg.budget_blocks(L),
                                      R.vslash_dense_rows(grid, cfg, L)))
    for name, ms in stages.items():
        print(f"{name:32s} {ms:9.3f} ms")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        R.route(q, k, cfg)
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=40)

    def self_gpu_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    total_gpu = sum(self_gpu_us(e) for e in events) / 1e3
    print(f"profiled route(): GPU busy {total_gpu:.3f} ms (sum of self GPU times)")
    for e in sorted(events, key=self_gpu_us, reverse=True)[: args.top]:
        print(f"  {e.key[:60]:60s} {self_gpu_us(e) / 1e3:8.3f} ms  x{e.count}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": L, "pattern": pattern, "stages_ms": stages}, f, indent=2)
        with open(args.json.replace(".json", "_profile.txt"), "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
