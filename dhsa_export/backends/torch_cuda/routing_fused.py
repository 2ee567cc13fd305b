"""Fused fixed-block routing on CUDA: the steps after the scores in two Triton kernels.

:func:`dhsa_export.algo.routing.route` for ``topk``, ``ashape``, ``vslash`` and ``vslash_blockwise``
is ~110 small torch ops (``vslash``), most of them elementwise passes, gathers, a stable segmented
argsort and scatters over ``[Hr, nQ, nC]`` tensors, then the conversion to the kernel's block
indices. Here (CUDA + Triton only; the CPU path and the reference are untouched):

1. ``_line_sums`` (``vslash``, ``vslash_blockwise``): vertical (column) and slash (diagonal) sums of
   the probabilities in one read, per (routing head, tile of columns / offsets). Replaces
   ``probs.sum(1)`` and ``sum_along_diagonals_of_last_rows`` (flip + pad + strided sum) or
   ``sum_along_diagonals`` (multiply + gather + multiply + sum).
2. ``_select_rows``: one program per (routing head, query block) computes the row's ranking score
   (the line scatter to blocks from the prefix sums of the kept lines, ``line_rank`` with the
   fallback, or the raw block score), the geometry (causal, sink, diagonal / local window, dense
   rows), the budget selection (forced blocks first, then the ``budget - forced`` best candidates,
   ties in chunk order: the rank of the budget's last block is found by a 32-step bisection on the
   order-preserving int32 image of the fp32 scores, equal scores are taken in chunk order by a
   prefix count) and writes the mask, the kernel's ``block_index`` (ascending, padded with -1,
   width ``nC``), ``block_count`` and (v9) the row's selected token pairs, from which
   :func:`causal_fraction` gives ``Selection.causal_block_fraction_tensor()``.

3. ``_top_lines`` (``vslash``, v9): per (routing head, vertical / slash) the prefix sums of the
   ``keep`` largest lines, the others 0 (``cumsum(keep_top_lines(...))`` in one launch: a 31-step
   bisection on the int32 image of the fp32 line sums, ties at the threshold kept in index order,
   then a chunked scan in which a line not kept repeats the last kept prefix bit for bit).

What stays in torch: block means and the block-score GEMM, the last-queries probabilities
(:mod:`.routing_triton`), the block softmax of ``vslash_blockwise`` and its top lines (``topk``).
:func:`query_parts` / :func:`route_parts` split the routing into what it reads of ``q`` (block
means, the last ``q_block`` rows) and the rest, so that the routing graphs copy only those.

Agreement with the torch path: ``_select_rows`` performs the same fp32 operations on the same
inputs as ``scatter_lines_to_blocks`` / ``line_rank`` / ``select_under_budget`` /
``to_block_index`` (same prefix-sum differences, same ``1 + line``, same clamp; the selection rule
with stable ties is exact), so for ``topk`` / ``ashape`` the selection is bit-identical, and for the
``vslash`` patterns it is bit-identical given the same line sums and top lines (``topk`` +
``cumsum`` with ``USE_LINE_KERNEL = False``). The line sums of ``_line_sums``
add the same fp32 numbers in another order than torch's reductions (rows in groups of 16, then a
tree), so a line whose mass ties another's to the last bits can be ranked differently (the torch
``topk`` itself picks arbitrarily among exactly equal lines). Tested on the GPU
(``tests/backends/test_routing_fused.py``): line sums within 1e-5 relative, selections equal except
on a small share of near-tie entries, attention output within the GPU tolerance.

Switch: ``DHSA_ROUTING_FUSED=0`` runs the torch path. A kernel failure is warned once and routing
carries on in torch. Rows longer than :data:`MAX_CHUNKS` blocks (8192: 256K keys at ``k_block`` 32)
take the torch path (one program holds a whole row).
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch

from ...algo.layout import BlockGrid, Selection
from . import routing_triton

try:  # Triton is optional: without it routing stays in torch
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - ImportError, or a broken install
    triton = None
    tl = None

ENV_SWITCH = "DHSA_ROUTING_FUSED"  # "0": the torch path (A/B timing, debugging)
PATTERNS = ("topk", "ashape", "vslash", "vslash_blockwise")
MAX_CHUNKS = 8192
USE_LINE_KERNEL = True  # tests set False to check the selection kernel bit for bit against torch
# v9 experiment: vslash line sums straight from the logits (_probs_lines; no probabilities matrix).
# Measured slower than v8's probabilities + _line_sums on the H200 (0.62 vs 0.50 ms at 32K, see
# docs/GPU_NOTES.md v9), so off by default; DHSA_ROUTING_PROBS_LINES=1 turns it on.
USE_PROBS_LINES = os.environ.get("DHSA_ROUTING_PROBS_LINES", "0") == "1"
USE_TOP_LINES = True  # v9: _top_lines after v8's line sums too (False: topk + cumsum, the v8 path)
_FAILED: list[str] = []

MODE_VSLASH, MODE_BLOCKWISE, MODE_SCORE = 0, 1, 2


def enabled() -> bool:
    return triton is not None and os.environ.get(ENV_SWITCH, "1") != "0" and not _FAILED


def supports(q: torch.Tensor, grid: BlockGrid, pattern: str) -> bool:
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (enabled() and on_device and pattern in PATTERNS and grid.chunk_block is not None
            and 1 <= grid.num_chunks <= MAX_CHUNKS and grid.num_q_blocks >= 1)


if triton is not None:

    # scalar sizes are not specialized (no recompilation per shape; they are not alignment-critical)
    @triton.jit(do_not_specialize=["n_rows", "width", "query_length", "q_offset", "q_block", "k_block"])
    def _line_sums(P, V_OUT, S_OUT, n_rows, width, query_length, q_offset, q_block, k_block,
                   MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """vertical[c] = sum_i P[i, c]; slash[o] = sum_i P[i, pos(i) - o] (columns >= 0 only), where
        pos(i) = width - n_rows + i (MODE 0: rows are the last key positions) or the block
        diagonal (q_last(i) // k_block) of query block i (MODE 1)."""
        head = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = cols < width
        base = P + head * n_rows * width
        v = tl.zeros([BLOCK], tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for first in range(0, n_rows, ROWS):
            rows = first + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            ptr = base + rows[:, None].to(tl.int64) * width
            v += tl.sum(tl.load(ptr + cols[None, :], mask=row_ok[:, None] & valid[None, :], other=0.0), 0)
            if MODE == 0:
                pos = width - n_rows + rows
            else:
                pos = (tl.minimum((rows + 1) * q_block, query_length) - 1 + q_offset) // k_block
            col = pos[:, None] - cols[None, :]
            s += tl.sum(tl.load(ptr + col, mask=row_ok[:, None] & valid[None, :] & (col >= 0), other=0.0), 0)
        tl.store(V_OUT + head * width + cols, v, mask=valid)
        tl.store(S_OUT + head * width + cols, s, mask=valid)

    @triton.jit(do_not_specialize=["num_q_blocks", "num_chunks", "line_length", "query_length", "q_offset",
                                   "q_block", "k_block", "key_length", "sink_limit", "local_tokens", "budget",
                                   "dense_first", "dense_last"])
    def _select_rows(A, B, F, MASK_OUT, INDEX_OUT, COUNT_OUT, AREA_OUT,
                     num_q_blocks, num_chunks, line_length, query_length, q_offset, q_block, k_block,
                     key_length, sink_limit, local_tokens, budget, dense_first, dense_last,
                     MODE: tl.constexpr, BLOCK_C: tl.constexpr):
        """One (routing head, query block) row: rank, forced/causal/dense geometry, budget selection
        with stable ties, mask + block_index + block_count."""
        row = tl.program_id(0).to(tl.int64)
        head = row // num_q_blocks
        i = (row % num_q_blocks).to(tl.int32)
        c = tl.arange(0, BLOCK_C)
        in_range = c < num_chunks
        start = c * k_block
        end = tl.minimum(start + k_block, key_length)
        q_first = i * q_block + q_offset
        q_last = tl.minimum((i + 1) * q_block, query_length) - 1 + q_offset
        causal = in_range & (start <= q_last)
        forced_first = tl.maximum(q_first - local_tokens, 0)
        forced = causal & ((start < sink_limit) | ((end > forced_first) & (start <= q_last)))

        fallback = tl.load(F + row * num_chunks + c, mask=in_range, other=0.0)
        if MODE == 0:  # scatter_lines_to_blocks from the prefix sums (cumsum; prefix[0] = 0)
            line_base = head * line_length
            v_hi = tl.load(A + line_base + end - 1, mask=in_range & (end > 0), other=0.0)
            v_lo = tl.load(A + line_base + start - 1, mask=in_range & (start > 0), other=0.0)
            max_offset = line_length - 1
            o_min = tl.minimum(tl.maximum(q_first - (end - 1), 0), max_offset + 1)
            o_max = tl.minimum(tl.maximum(q_last - start, -1), max_offset)
            upper = tl.maximum(o_max + 1, 0)
            lower = tl.minimum(o_min, max_offset + 1)
            s_hi = tl.load(B + line_base + upper - 1, mask=in_range & (upper > 0), other=0.0)
            s_lo = tl.load(B + line_base + lower - 1, mask=in_range & (lower > 0), other=0.0)
            lines = (v_hi - v_lo) + tl.where(o_max < o_min, 0.0, s_hi - s_lo)
            rank = tl.where(lines > 0, 1.0 + lines, tl.minimum(tl.maximum(fallback, 0.0), 0.999))
        elif MODE == 1:  # vertical per chunk + slash per block diagonal
            diag = q_last // k_block
            v = tl.load(A + head * num_chunks + c, mask=in_range, other=0.0)
            s = tl.load(B + head * num_chunks + tl.maximum(diag - c, 0), mask=in_range, other=0.0)
            lines = v + tl.where(causal, s, 0.0)
            rank = tl.where(lines > 0, 1.0 + lines, tl.minimum(tl.maximum(fallback, 0.0), 0.999))
        else:
            rank = fallback

        candidate = causal & ~forced
        n_forced = tl.sum(forced.to(tl.int32), 0)
        n_candidates = tl.sum(candidate.to(tl.int32), 0)
        take_total = tl.minimum(tl.maximum(budget - n_forced, 0), n_candidates)
        # order-preserving signed int32 image of the fp32 rank (-0.0 folded onto +0.0); blocks that
        # are not candidates get INT_MIN (a real rank never maps there: only a NaN pattern would)
        bits = (rank + 0.0).to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.where(candidate, key, -2147483648)
        # largest threshold t with #(key >= t) >= take_total: the rank of the last block taken
        # (a 32-step bisection over the int32 range; v8 did the same in int64, 2x the instructions)
        threshold = tl.full([], -2147483648, tl.int32)
        threshold = tl.where(tl.sum((key >= 0).to(tl.int32), 0) >= take_total, 0, threshold)
        step = tl.full([], 1073741824, tl.int32)
        for _ in range(31):
            trial = threshold + step
            count = tl.sum((key >= trial).to(tl.int32), 0)
            threshold = tl.where(count >= take_total, trial, threshold)
            step = step // 2
        above = key > threshold
        equal = candidate & (key == threshold)
        equal_order = tl.cumsum(equal.to(tl.int32), 0)
        take_equal = take_total - tl.sum(above.to(tl.int32), 0)
        chosen = candidate & (above | (equal & (equal_order <= take_equal)))
        selected = forced | chosen
        dense = (i < dense_first) | ((i == num_q_blocks - 1) & (dense_last != 0))
        selected = tl.where(dense, causal, selected)

        out = row * num_chunks
        tl.store(MASK_OUT + out + c, selected.to(tl.int8), mask=in_range)
        selected_count = tl.sum(selected.to(tl.int32), 0)
        slot = tl.cumsum(selected.to(tl.int32), 0) - 1
        tl.store(INDEX_OUT + out + slot, c, mask=selected)
        tl.store(INDEX_OUT + out + c, tl.full([BLOCK_C], -1, tl.int32), mask=in_range & (c >= selected_count))
        tl.store(COUNT_OUT + row, selected_count)
        # token pairs the kernel computes on this row (causal_block_fraction's numerator, exact)
        q_len = tl.minimum((i + 1) * q_block, query_length) - i * q_block
        tl.store(AREA_OUT + row, tl.sum(tl.where(selected, end - start, 0), 0) * q_len)


    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit(do_not_specialize=["width", "n_rows", "num_tiles", "keep_vertical", "keep_slash"])
    def _top_lines(V, SP, SLASH, OUT_V, OUT_S, width, n_rows, num_tiles, keep_vertical, keep_slash,
                   TILE: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr, ASSEMBLE: tl.constexpr):
        """Per (routing head, kind): the prefix sums of the ``keep`` largest lines (others 0).

        kind 0: the vertical sums ``V``; kind 1: the slash sums, first assembled from the tile
        partials ``SP`` of ``routing_triton._probs_lines`` into ``SLASH``. The threshold (the
        ``keep``-th largest line) is found by a 31-step bisection on the int32 image of the fp32
        sums (>= 0, so the bit pattern is order-preserving); lines equal to it are kept in index
        order up to ``keep``. Replaces ``topk`` + scatter + ``cumsum`` of ``keep_top_lines``.
        """
        head = tl.program_id(0).to(tl.int64)
        kind = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        src = V + head * width
        out = OUT_V + head * width
        keep = keep_vertical
        if kind == 1:
            src = SLASH + head * width
            out = OUT_S + head * width
            keep = keep_slash
        if ASSEMBLE and kind == 1:  # slash sums from the tile partials (else SLASH holds them)
            first = width - n_rows
            sp = SP + head * num_tiles * (2 * TILE)
            for start in range(0, width, BLOCK):
                o = start + offs
                ok = o < width
                u = o - first + TILE
                t_hi = (2 * TILE - 1 - u) // TILE
                s_hi = u + TILE * t_hi
                hi = tl.load(sp + t_hi * (2 * TILE) + s_hi, mask=ok & (t_hi < num_tiles), other=0.0)
                lo = tl.load(sp + (t_hi - 1) * (2 * TILE) + s_hi - TILE, mask=ok & (t_hi >= 1), other=0.0)
                tl.store(src + o, lo + hi, mask=ok)
            tl.debug_barrier()
        keep = tl.minimum(keep, width)
        if SINGLE:
            key_all = tl.load(src + offs, mask=offs < width, other=0.0)
            key_all = tl.where(offs < width, (key_all + 0.0).to(tl.int32, bitcast=True), -1)
        threshold = tl.zeros([], tl.int32)
        step = tl.full([], 1073741824, tl.int32)
        for _ in range(31):
            trial = threshold + step
            if SINGLE:
                count = tl.sum((key_all >= trial).to(tl.int32), 0)
            else:
                counts = tl.zeros([BLOCK], tl.int32)
                for start in range(0, width, BLOCK):
                    o = start + offs
                    x = tl.load(src + o, mask=o < width, other=0.0)
                    key = tl.where(o < width, (x + 0.0).to(tl.int32, bitcast=True), -1)
                    counts += (key >= trial).to(tl.int32)
                count = tl.sum(counts, 0)
            threshold = tl.where(count >= keep, trial, threshold)
            step = step // 2
        if keep <= 0:
            threshold = tl.full([], 2147483647, tl.int32)
        n_above = tl.zeros([], tl.int32)
        for start in range(0, width, BLOCK):
            o = start + offs
            x = tl.load(src + o, mask=o < width, other=0.0)
            key = tl.where(o < width, (x + 0.0).to(tl.int32, bitcast=True), -1)
            n_above += tl.sum((key > threshold).to(tl.int32), 0)
        take_equal = keep - n_above
        carry = tl.zeros([], tl.float32)
        equal_seen = tl.zeros([], tl.int32)
        for start in range(0, width, BLOCK):
            o = start + offs
            ok = o < width
            x = tl.load(src + o, mask=ok, other=0.0)
            key = tl.where(ok, (x + 0.0).to(tl.int32, bitcast=True), -1)
            equal = ok & (key == threshold)
            order = tl.cumsum(equal.to(tl.int32), 0) + equal_seen
            kept = ok & ((key > threshold) | (equal & (order <= take_equal)))
            prefix = tl.cumsum(tl.where(kept, tl.maximum(x, 0.0), 0.0), 0) + carry
            tl.store(out + o, prefix, mask=kept)
            # a line not kept repeats the prefix of the last kept one bit for bit (the tree scan does
            # not: then _select_rows would see a tiny nonzero mass where no line was kept)
            last = tl.associative_scan(tl.where(kept, o, -1), 0, _max_combine)
            tl.debug_barrier()
            repeat = tl.load(out + tl.maximum(last, 0), mask=ok & ~kept & (last >= 0), other=0.0)
            tl.store(out + o, tl.where(last >= 0, repeat, carry), mask=ok & ~kept)
            last_kept = tl.max(last, 0)
            carry = tl.where(last_kept >= 0, tl.max(tl.where(o == last_kept, prefix, float("-inf")), 0), carry)
            equal_seen += tl.sum(equal.to(tl.int32), 0)


def line_sums(probs: torch.Tensor, grid: BlockGrid | None = None, blockwise: bool = False):
    """``(vertical, slash)`` ``[Hr, W]`` fp32 of ``probs [Hr, n, W]`` (see ``_line_sums``)."""
    probs = probs.contiguous()
    heads, n_rows, width = probs.shape
    vertical = torch.empty(heads, width, device=probs.device, dtype=torch.float32)
    slash = torch.empty_like(vertical)
    block = 128
    if blockwise:
        args = (grid.query_length, grid.q_offset, grid.q_block, grid.chunk_block)
    else:
        args = (1, 0, 1, 1)
    _line_sums[(heads, triton.cdiv(width, block))](
        probs, vertical, slash, n_rows, width, *args,
        MODE=MODE_BLOCKWISE if blockwise else MODE_VSLASH, ROWS=16, BLOCK=block, num_warps=4)
    return vertical, slash


def top_line_prefixes(vertical: torch.Tensor, partials: torch.Tensor, tile: int, n_rows: int,
                      keep_vertical: int, keep_slash: int):
    """``(cumsum(keep_top_lines(vertical, keep_vertical)), cumsum(keep_top_lines(slash, keep_slash)))``
    with the slash sums assembled from ``routing_triton.last_queries_line_sums``' tile partials
    (``tile`` > 0), or given as ``partials [Hr, W]`` (``tile`` = 0): one launch of ``_top_lines``
    (ties at the threshold kept in index order)."""
    heads, width = vertical.shape
    out_v = torch.empty_like(vertical)
    out_s = torch.empty_like(vertical)
    assemble = tile > 0
    slash = torch.empty_like(vertical) if assemble else partials.contiguous()
    single = width <= 65536
    block = max(16, triton.next_power_of_2(width)) if single else 16384
    warps = routing_triton._tune()["toplines_warps"]
    _top_lines[(heads, 2)](vertical.contiguous(), partials, slash, out_v, out_s, width, n_rows,
                           partials.shape[1] if assemble else 1, max(0, keep_vertical), max(0, keep_slash),
                           TILE=max(tile, 1), BLOCK=block, SINGLE=single, ASSEMBLE=assemble,
                           num_warps=warps if block >= 4096 else 4)
    return out_v, out_s


def select_rows(mode: int, a, b, fallback: torch.Tensor, grid: BlockGrid, budget: int, sink_tokens: int,
                local_tokens: int = 0, dense_first: int = 0, dense_last: bool = False):
    """``(mask [Hr, nQ, nC] bool, block_index int32 [Hr, nQ, nC], block_count int32 [Hr, nQ],
    causal_block_fraction 0-dim fp32)``."""
    heads, num_q, num_chunks = fallback.shape
    fallback = fallback.float().contiguous()
    a = fallback if a is None else a.contiguous()
    b = fallback if b is None else b.contiguous()
    device = fallback.device
    mask = torch.empty(heads, num_q, num_chunks, device=device, dtype=torch.uint8)
    index = torch.empty(heads, num_q, num_chunks, device=device, dtype=torch.int32)
    count = torch.empty(heads, num_q, device=device, dtype=torch.int32)
    area = torch.empty(heads, num_q, device=device, dtype=torch.int32)
    block_c = max(32, triton.next_power_of_2(num_chunks))
    warps = 4 if block_c <= 1024 else 8
    _select_rows[(heads * num_q,)](
        a, b, fallback, mask, index, count, area,
        num_q, num_chunks, a.shape[-1], grid.query_length, grid.q_offset, grid.q_block, grid.chunk_block,
        grid.key_length, max(1, sink_tokens), local_tokens, budget, dense_first, int(dense_last),
        MODE=mode, BLOCK_C=block_c, num_warps=warps)
    fraction = causal_fraction(area, _causal_area(grid.query_length, grid.q_offset, grid.q_block,
                                                  grid.chunk_block, grid.key_length) * heads)
    return mask.view(torch.bool), index, count, fraction


@functools.lru_cache(maxsize=256)
def _causal_area(query_length: int, q_offset: int, q_block: int, k_block: int, key_length: int) -> int:
    """Token pairs of the causal (query block, key block) area: ``(block_area() * causal()).sum()``."""
    total = 0
    for first in range(0, query_length, q_block):
        last = min(first + q_block, query_length) - 1 + q_offset
        total += (min(first + q_block, query_length) - first) * min((last // k_block + 1) * k_block, key_length)
    return total


def causal_fraction(selected_area: torch.Tensor, total: int) -> torch.Tensor:
    """``Selection.causal_block_fraction_tensor()`` from ``_select_rows``' per-row selected area
    (exact integers, summed in fp64; the torch path sums fp32 products: equal to ~1e-7)."""
    if total <= 0:
        return torch.ones((), device=selected_area.device, dtype=torch.float32)
    return selected_area.sum(dtype=torch.float64).div_(float(total)).float()


def query_parts(q: torch.Tensor, cfg, grid: BlockGrid, pattern: str):
    """What the fused routing reads of ``q [Hq, Lq, D]``: its fp32 block means ``[Hq, nQ, D]`` and,
    for ``vslash``, its last ``min(q_block, Lq)`` rows (else None). The routing graphs copy these
    into their static buffers instead of all of ``q``."""
    from ...algo.layout import segment_means

    q_means = segment_means(q, grid.q_offsets, grid.q_block)
    q_last = q[:, -min(cfg.q_block, q.shape[1]):] if pattern == "vslash" else None
    return q_means, q_last


def _block_scores(q_means: torch.Tensor, k: torch.Tensor, grid: BlockGrid, head_group: int) -> torch.Tensor:
    """``routing.block_scores(q, k, grid, head_group, length_normalized=False)`` from q's block means
    (the same ops in the same order)."""
    from ...algo import routing as R
    from ...algo.layout import segment_means

    k_means = segment_means(k, grid.chunk_offsets, grid.chunk_block)
    q_routed = R.group_mean(q_means, head_group)
    k_routed = R.expand_kv(k_means, q_routed.shape[0])
    return torch.bmm(q_routed, k_routed.transpose(1, 2)) / math.sqrt(q_means.shape[-1])


def _route(q, k, cfg, grid: BlockGrid, head_group: int, pattern: str) -> Selection:
    return route_parts(*query_parts(q, cfg, grid, pattern), k, cfg, grid, head_group, pattern)


def route_parts(q_means, q_last, k, cfg, grid: BlockGrid, head_group: int, pattern: str) -> Selection:
    """The fused routing from :func:`query_parts` (``q_last`` is used by ``vslash`` only)."""
    from ...algo import routing as R

    key_length = k.shape[1]
    budget = cfg.budget_blocks(key_length)
    if pattern in ("topk", "ashape"):
        score = _block_scores(q_means, k, grid, head_group)
        if pattern == "topk":
            mask, index, count, fraction = select_rows(MODE_SCORE, None, None, score, grid, budget, cfg.k_block)
        else:
            mask, index, count, fraction = select_rows(MODE_SCORE, None, None, score, grid, budget, cfg.sink_tokens,
                                             local_tokens=cfg.local_tokens)
    elif pattern == "vslash":
        n_last = q_last.shape[1]
        budget_tokens = cfg.budget_tokens(key_length)
        n_vertical = budget_tokens // 2
        if USE_LINE_KERNEL and USE_PROBS_LINES and routing_triton.line_kernel_supports(q_last, k, n_last):
            # v9: line sums straight from the logits, top lines + prefix sums in one kernel
            vertical, slash = top_line_prefixes(*routing_triton.last_queries_line_sums(q_last, k, head_group, n_last),
                                                n_last, n_vertical, budget_tokens - n_vertical)
        else:
            probs = R.last_queries_probabilities(q_last, k, head_group, n_last)
            if USE_LINE_KERNEL:
                vertical, slash = line_sums(probs)
            else:
                vertical, slash = probs.sum(dim=1), R.sum_along_diagonals_of_last_rows(probs)
            if USE_TOP_LINES and USE_LINE_KERNEL:
                vertical, slash = top_line_prefixes(vertical, slash, 0, n_last, n_vertical, budget_tokens - n_vertical)
            else:
                vertical = R.keep_top_lines(vertical, n_vertical).cumsum(-1)
                slash = R.keep_top_lines(slash, budget_tokens - n_vertical).cumsum(-1)
        fallback = torch.sigmoid(_block_scores(q_means, k, grid, head_group))
        first_dense = math.ceil(cfg.budget_tokens(key_length) / cfg.q_block)
        mask, index, count, fraction = select_rows(MODE_VSLASH, vertical, slash, fallback, grid, budget, cfg.k_block,
                                         dense_first=first_dense, dense_last=True)
    else:  # vslash_blockwise
        causal = grid.causal()
        score = _block_scores(q_means, k, grid, head_group)
        probs = score.masked_fill(~causal[None], -math.inf).softmax(dim=-1)
        if USE_LINE_KERNEL:
            vertical, slash = line_sums(probs, grid, blockwise=True)
        else:
            diag = torch.searchsorted(grid.chunk_offsets[1:], grid.q_last_position(), right=True)
            vertical, slash = probs.sum(dim=1), R.sum_along_diagonals(probs * causal[None], diag)
        n_vertical = budget // 2
        vertical = R.keep_top_lines(vertical, n_vertical)
        slash = R.keep_top_lines(slash, budget - n_vertical)
        first_dense = math.ceil(cfg.budget_tokens(key_length) / cfg.q_block)
        mask, index, count, fraction = select_rows(MODE_BLOCKWISE, vertical, slash, probs, grid, budget, cfg.k_block,
                                         dense_first=first_dense, dense_last=True)
    width = max(1, grid.num_chunks)
    return Selection(grid, mask, head_group, {("block_index", width): (index, count),
                                              "causal_block_fraction": fraction})


def try_route(q, k, cfg, grid: BlockGrid, head_group: int, pattern: str) -> Selection | None:
    """The fused routing's :class:`Selection` (mask + precomputed block indices), or None where it
    does not apply or failed (then the torch path runs; a failure is warned once)."""
    if not supports(q, grid, pattern):
        return None
    try:
        return _route(q, k, cfg, grid, head_group, pattern)
    except Exception as exc:  # noqa: BLE001 - fall back to torch, say so once
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise  # inside a graph capture: let the capture fail (the graph cache stays eager)
        _FAILED.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"DHSA fused routing kernels failed ({_FAILED[0][:300]}); routing uses torch",
                      RuntimeWarning, stacklevel=2)
        return None
