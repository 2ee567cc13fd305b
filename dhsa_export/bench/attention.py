"""Attention benchmark on CUDA: DHSA (routing + block-sparse kernel) vs SDPA and FlexAttention.

One attention layer, batch 1, bf16, causal prefill, random inputs. Times are CUDA-event medians of
``repeats`` runs after ``warmup`` runs:

- ``routing_ms``: routing as the torch-cuda backend runs it (:func:`route_batch`: fixed-block
  patterns replayed from a CUDA graph, :mod:`dhsa_export.backends.torch_cuda.routing_graph`, up to
  its token limit) + conversion to the op's ``block_index`` / ``block_count``;
  ``routing_eager_ms``: the same with eager :func:`dhsa_export.algo.routing.route` (no host
  synchronization on the fixed-block patterns: the time is the GPU work, or the launch time where
  that is longer); ``graph_vs_eager_mask_diff`` counts mask entries where the two differ (0);
  ``routing_graph``: what the graph cache held (entries, MiB, replays);
- ``attention_ms``: the CUDA kernel (index validation + attention) given those indices;
- ``dhsa_ms``: routing + kernel queued back to back and timed as one region (the op as a model
  runs it: one part's host work overlaps the other's GPU work); ``dhsa_parts_sum_ms`` =
  ``routing_ms + attention_ms`` (each part timed alone, so both launch gaps count);
  ``dhsa_eager_routing_ms`` = ``routing_eager_ms + attention_ms``;
- ``sdpa_ms``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)``;
- ``flex_ms``: compiled ``flex_attention`` given the SAME selection as a 128 x 128 BlockMask (Flex's
  default tiles): a 128-key block is visited if any of its four 32-key chunks is selected; it is a
  "full" block (no mask_mod) if all four are selected and it lies wholly below the diagonal; other
  visited blocks apply ``mask_mod`` = (chunk of kv_idx selected) & (kv_idx <= q_idx), so Flex computes
  exactly the same function as the kernel (checked: ``rel_err_vs_flex``) but visits the 128-wide
  union of the selection (``flex_block_fraction``);
- ``flex_kv32_ms``: the same selection as a 128 x 32 BlockMask (kv blocks = exactly the selected
  chunks, causal mask_mod on the diagonal band) with ``kernel_options={"BLOCK_N": 32}``;
- ``speedup.flex`` is against the faster of the two FlexAttention timings.

Command line::

    python -m dhsa_export.bench.attention --tokens 8192,32768 --json out.json
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F

from ..config import DHSAConfig
from ..errors import DHSAError
from .timing import median_ms, run_and_emit

SHAPES = {
    # name: (query heads, kv heads, head_dim)
    "llama3.1-8b": (32, 8, 128),
    "mistral-7b": (32, 8, 128),
    "qwen2.5-0.5b": (14, 2, 64),
    "smollm2-135m": (9, 3, 64),
}


_time_ms = median_ms


def warm_gpu(seconds: float = 0.5) -> None:
    """Run bf16 matrix products for ``seconds`` so the first timings do not see idle clocks
    (an idle H200 sits at ~345 MHz; launch-bound work such as routing alone may not ramp it)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def machine_info() -> dict:
    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1))
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


def selection_to_block_mask(selection, num_heads: int, q_len: int, k_len: int, block: int = 128):
    """128 x 128 FlexAttention BlockMask computing exactly ``selection`` (see module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask

    grid = selection.grid
    cfg_q_block = int(grid.q_offsets[1] - grid.q_offsets[0])
    k_block = int(grid.chunk_offsets[1] - grid.chunk_offsets[0])
    if cfg_q_block != block or block % k_block or grid.q_offset != 0:
        raise DHSAError(
            f"FlexAttention conversion needs q_block == {block}, k_block dividing {block} and Lq == Lk "
            f"(got q_block {cfg_q_block}, k_block {k_block}, q_offset {grid.q_offset})"
        )
    ratio = block // k_block
    head_group = selection.head_group
    mask = selection.mask  # [Hr, nQ, nC]
    hr, n_q, n_c = mask.shape
    n_k = math.ceil(k_len / block)
    padded = F.pad(mask, (0, n_k * ratio - n_c)).view(hr, n_q, n_k, ratio)
    any_sel = padded.any(-1)
    chunk_exists = torch.zeros(n_k * ratio, dtype=torch.bool, device=mask.device)
    chunk_exists[:n_c] = True
    all_sel = (padded | ~chunk_exists.view(n_k, ratio)[None, None]).all(-1)
    q_idx = torch.arange(n_q, device=mask.device)[:, None]
    k_idx = torch.arange(n_k, device=mask.device)[None, :]
    below = (k_idx < q_idx)[None]  # whole 128-key block before the query block's first query
    causal = (k_idx <= q_idx)[None]
    full = any_sel & all_sel & below & ((k_idx + 1) * block <= k_len)[None]
    partial = any_sel & causal & ~full

    def to_indices(m):
        m = m.repeat_interleave(head_group, dim=0)[None]  # [1, Hq, nQ, nK]
        counts = m.sum(-1).to(torch.int32)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts, order

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)
    selected = mask.contiguous()
    chunk_len = k_block

    def mask_mod(b, h, q_index, kv_index):
        return selected[h // head_group, q_index // block, kv_index // chunk_len] & (kv_index <= q_index)

    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                          mask_mod=mask_mod, seq_lengths=(q_len, k_len))
    visited = float(((partial | full).float().sum()) / (causal.float().sum() * hr))
    return block_mask, visited


def selection_to_block_mask_exact(selection, num_heads: int, q_len: int, k_len: int):
    """FlexAttention BlockMask at the selection's own granularity (q_block x k_block, e.g. 128 x 32):
    the kv blocks are exactly the selected chunks; chunks wholly before the query block are "full",
    the others (diagonal band) apply mask_mod = (chunk selected) & causal. Needs ``kernel_options={"BLOCK_N": k_block}``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    grid = selection.grid
    q_block = int(grid.q_offsets[1] - grid.q_offsets[0])
    k_block = int(grid.chunk_offsets[1] - grid.chunk_offsets[0])
    if grid.q_offset != 0:
        raise DHSAError("FlexAttention conversion needs Lq == Lk")
    mask = selection.mask  # [Hr, nQ, nC]
    n_q, n_c = mask.shape[1], mask.shape[2]
    chunk_end = torch.arange(1, n_c + 1, device=mask.device) * k_block
    q_start = torch.arange(n_q, device=mask.device) * q_block
    before = (chunk_end[None, :] <= q_start[:, None])[None]
    full = mask & before
    partial = mask & ~before

    def to_indices(m):
        m = m.repeat_interleave(selection.head_group, dim=0)[None]  # [1, Hq, nQ, nC]
        counts = m.sum(-1).to(torch.int32)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts, order

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)

    selected = mask.contiguous()
    head_group = selection.head_group

    def mask_mod(b, h, q_index, kv_index):  # exact also where the kernel ignores the block lists
        return selected[h // head_group, q_index // q_block, kv_index // k_block] & (kv_index <= q_index)

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(q_block, k_block),
                                    mask_mod=mask_mod, seq_lengths=(q_len, k_len))


def bench_attention(tokens: list[int], shape: str = "llama3.1-8b", density: float = 0.125,
                    pattern: str = "vslash", warmup: int = 3, repeats: int = 5, flex: bool = True,
                    sdpa: bool = True, variants: tuple[str, ...] = ("auto",), seed: int = 0,
                    flex_exact: bool = True, log=print) -> dict:
    """Benchmark one attention layer per sequence length; returns ``{"machine", "rows"}`` (see module doc)."""
    if not torch.cuda.is_available():
        raise DHSAError("bench_attention needs a CUDA GPU; run it on the GPU machine (tools/gpu/run_bench.sh)")
    if shape not in SHAPES:
        raise DHSAError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    cfg = DHSAConfig(density=density, pattern=pattern)
    flex_fn = None
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex_fn = torch.compile(flex_attention, dynamic=False)
    rows = []
    warm_gpu()
    for length in tokens:
        # one function per length: its tensors (and its routing graphs) are freed when it returns
        row = _bench_length(length, SHAPES[shape], cfg, warmup, repeats, sdpa, flex_fn, flex_exact,
                            variants, seed)
        row["shape"] = shape
        rows.append(row)
        log(format_row(row))
        torch.cuda.empty_cache()
    return {"machine": machine_info(), "rows": rows}


def random_qkv(length: int, heads: tuple[int, int, int] = SHAPES["llama3.1-8b"], seed: int = 0):
    """Seeded random bf16 ``q [1, Hq, L, D]``, ``k`` / ``v [1, Hkv, L, D]`` on the GPU (the benchmarks'
    and the GPU tools' inputs)."""
    hq, hkv, d = heads
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(1, h, length, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                 for h in (hq, hkv, hkv))


def _bench_length(length: int, heads: tuple[int, int, int], cfg: DHSAConfig, warmup: int, repeats: int,
                  sdpa: bool, flex_fn, flex_exact: bool, variants: tuple[str, ...], seed: int) -> dict:
    """One row of :func:`bench_attention`: DHSA (routing eager and from CUDA graphs, kernel) and the
    baselines at ``length`` tokens."""
    from ..backends.torch_cuda import launch, raise_on_error_flag, route_batch, selections_to_indices
    from ..backends.torch_cuda.library import VARIANTS
    from ..backends.torch_cuda.routing_graph import RoutingGraphCache

    hq, hkv, d = heads
    q, k, v = random_qkv(length, heads, seed + length)
    row = {"tokens": length, "pattern": cfg.effective_pattern(length), "density": cfg.density,
           "head_routing": cfg.head_routing}
    graphs = RoutingGraphCache()  # this length's graphs only (limits from the environment)

    def routing(graph_cache=graphs):
        sels, variable = route_batch(q, k, cfg, graphs=graph_cache)
        return sels, selections_to_indices(sels, variable)

    t0 = time.perf_counter()
    row["routing_eager_ms"] = _time_ms(lambda: routing(False), warmup, repeats)
    eager_sels, (eager_index, _, _) = routing(False)
    row["routing_ms"] = _time_ms(routing, warmup, repeats)
    sels, (index, count, offsets) = routing()
    row["routing_graph"] = graphs.info()
    row["routing_graph_used"] = graphs.counts["replays"] > 0
    row["graph_vs_eager_mask_diff"] = int((sels[0].mask != eager_sels[0].mask).sum())
    row["graph_vs_eager_index_equal"] = bool(torch.equal(index, eager_index))
    row["causal_block_fraction"] = sels[0].causal_block_fraction()
    row["budget_blocks"] = cfg.budget_blocks(length)

    # correctness guard: indices valid
    out, ws = launch(q, k, v, index, count, offsets, cfg.q_block, cfg.k_block)
    raise_on_error_flag(ws)
    by_variant = {}
    for name in variants:
        vid = VARIANTS[name]
        by_variant[name] = _time_ms(
            lambda: launch(q, k, v, index, count, offsets, cfg.q_block, cfg.k_block, variant=vid),
            warmup, repeats)
    row["attention_ms_by_variant"] = by_variant
    row["attention_ms"] = by_variant.get("auto", min(by_variant.values()))

    def dhsa_op():  # the op as a caller runs it: routing, then the kernel, queued back to back
        _, (op_index, op_count, op_offsets) = routing()
        return launch(q, k, v, op_index, op_count, op_offsets, cfg.q_block, cfg.k_block)

    # timed as one region: the host work of one part overlaps the GPU work of the other, as in a
    # model; the sum of the separately timed parts counts both parts' launch gaps
    row["dhsa_ms"] = _time_ms(dhsa_op, warmup, repeats)
    row["dhsa_parts_sum_ms"] = row["routing_ms"] + row["attention_ms"]
    row["dhsa_eager_routing_ms"] = row["routing_eager_ms"] + row["attention_ms"]
    # achieved rate over the computed (selected) area, 4*D flops per (query, key) pair
    pairs = row["causal_block_fraction"] * hq * length * (length + 1) / 2
    row["attention_tflops_effective"] = 4 * d * pairs / (row["attention_ms"] * 1e-3) / 1e12
    row["attention_tflops_by_variant"] = {name: 4 * d * pairs / (ms * 1e-3) / 1e12 for name, ms in by_variant.items()}

    baselines = {}
    if sdpa:
        baselines["sdpa_ms"] = _time_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            warmup, repeats)
    if flex_fn is not None:
        _time_flex(row, baselines, flex_fn, flex_exact, q, k, v, out, sels[0], cfg, warmup, repeats)
    row["baselines"] = baselines
    ref_times = {"sdpa": baselines.get("sdpa_ms")}
    flex_times = [baselines[n] for n in ("flex_ms", "flex_kv32_ms") if n in baselines]
    if flex_times:
        ref_times["flex"] = min(flex_times)  # the faster FlexAttention conversion
    ref_times = {n: t for n, t in ref_times.items() if t is not None}
    row["speedup"] = {name: ms / row["dhsa_ms"] for name, ms in ref_times.items()}
    row["speedup_eager_routing"] = {name: ms / row["dhsa_eager_routing_ms"] for name, ms in ref_times.items()}
    row["speedup_attention_only"] = {name: ms / row["attention_ms"] for name, ms in ref_times.items()}
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def _time_flex(row, baselines, flex_fn, flex_exact, q, k, v, out, selection, cfg, warmup, repeats) -> None:
    """FlexAttention with the selection as a 128 x 128 and (``flex_exact``) a q_block x k_block
    BlockMask: times into ``baselines``, agreement with the kernel's ``out`` into ``row``."""
    hq, length = q.shape[1], q.shape[2]
    try:
        block_mask, visited = selection_to_block_mask(selection, hq, length, length)
        row["flex_block_fraction"] = visited
        flex_out = flex_fn(q, k, v, block_mask=block_mask, enable_gqa=True)
        row["rel_err_vs_flex"] = float((out.float() - flex_out.float()).norm() / flex_out.float().norm())
        del flex_out
        baselines["flex_ms"] = _time_ms(
            lambda: flex_fn(q, k, v, block_mask=block_mask, enable_gqa=True), warmup, repeats)
    except Exception as exc:  # noqa: BLE001 - report, keep the other numbers
        row["flex_error"] = f"{type(exc).__name__}: {exc}"[:500]
    if not flex_exact:
        return
    try:
        exact_mask = selection_to_block_mask_exact(selection, hq, length, length)
        options = {"BLOCK_N": cfg.k_block}
        flex_out = flex_fn(q, k, v, block_mask=exact_mask, enable_gqa=True, kernel_options=options)
        row["rel_err_vs_flex_kv32"] = float((out.float() - flex_out.float()).norm() / flex_out.float().norm())
        del flex_out
        baselines["flex_kv32_ms"] = _time_ms(
            lambda: flex_fn(q, k, v, block_mask=exact_mask, enable_gqa=True, kernel_options=options),
            warmup, repeats)
    except Exception as exc:  # noqa: BLE001
        row["flex_kv32_error"] = f"{type(exc).__name__}: {exc}"[:500]


def format_row(row: dict) -> str:
    b = row.get("baselines", {})
    s = row.get("speedup", {})
    fmt = lambda x: f"{x:8.3f}" if isinstance(x, (int, float)) else f"{'-':>8}"  # noqa: E731
    return (f"{row['tokens']:>7} {row['pattern']:<17} cbf={row['causal_block_fraction']:.3f} "
            f"route={fmt(row['routing_ms'])} route_eager={fmt(row.get('routing_eager_ms'))} "
            f"attn={fmt(row['attention_ms'])} dhsa={fmt(row['dhsa_ms'])} "
            f"sdpa={fmt(b.get('sdpa_ms'))} flex={fmt(b.get('flex_ms'))} flex_kv32={fmt(b.get('flex_kv32_ms'))} "
            f"x_sdpa={fmt(s.get('sdpa'))} x_flex={fmt(s.get('flex'))} "
            f"variants={ {k: round(v, 3) for k, v in row.get('attention_ms_by_variant', {}).items()} }"
            + (f" flex_error={row['flex_error']}" if "flex_error" in row else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="DHSA attention benchmark (CUDA)")
    parser.add_argument("--tokens", default="8192,32768,65536,131072")
    parser.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--density", type=float, default=0.125)
    parser.add_argument("--pattern", default="vslash")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="auto",
                        help="kernel variants to time (library.VARIANTS), e.g. auto,m128w4,wgmma")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--no-sdpa", action="store_true")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    return run_and_emit(
        lambda: bench_attention(
            [int(t) for t in args.tokens.split(",")], shape=args.shape, density=args.density,
            pattern=args.pattern, warmup=args.warmup, repeats=args.repeats, flex=not args.no_flex,
            sdpa=not args.no_sdpa, variants=tuple(args.variants.split(",")),
        ),
        args.json, markdown_table)


def markdown_table(rows: list[dict]) -> str:
    """The summary table of a result (also used in docs/GPU_NOTES.md)."""
    lines = ["| tokens | pattern | causal_block_fraction | routing_ms (eager) | attention_ms | dhsa_ms | sdpa_ms | "
             "flex_ms | speedup sdpa | speedup flex |", "|" + "---|" * 10]
    for r in rows:
        b, s = r.get("baselines", {}), r.get("speedup", {})
        cell = lambda x, f="{:.3f}": f.format(x) if isinstance(x, (int, float)) else "-"  # noqa: E731
        lines.append(
            f"| {r['tokens']} | {r['pattern']} | {cell(r['causal_block_fraction'])} | {cell(r['routing_ms'])} "
            f"({cell(r.get('routing_eager_ms'))}) | "
            f"{cell(r['attention_ms'])} | {cell(r['dhsa_ms'])} | {cell(b.get('sdpa_ms'))} | {cell(b.get('flex_ms'))} | "
            f"{cell(s.get('sdpa'), '{:.2f}x')} | {cell(s.get('flex'), '{:.2f}x')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
