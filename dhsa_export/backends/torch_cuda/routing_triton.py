"""Triton kernels for the one large step of ``vslash`` routing on CUDA.

``vslash`` needs the exact causal softmax of the last ``n`` (= ``q_block``) queries of every query
head over all ``L`` keys, averaged over the heads of a routing group (``[Hr, n, L]``). In plain
torch that is an fp32 GEMM writing ``[Hq, n, L]`` logits (512 MB at 32K tokens for LLaMA-3.1-8B),
then a scale, a softmax and a group mean: six passes over that tensor, ~1.3 ms at 32K on an H200.
Here it is two kernels that never write the logits:

1. ``_row_stats2``: per (query head, key split), the running max and sum of the scaled, causally
   masked logits (flash-attention style, base-2 exponentials, the mask only on the edge tiles);
   ``_merge_lse`` merges the splits into the rows' log-sum-exp (v9; v4-v8 used ``_row_stats`` +
   ``torch.logsumexp``, 0.20 ms at 32K against 0.095 ms).
2. ``_group_probs``: per (routing head, key tile), the logits are computed again from the bf16
   operands (tensor cores, fp32 accumulation), turned into probabilities with the rows'
   log-sum-exp (``exp(logit - lse)``), averaged over the routing group and written once
   (``[Hr, n, L]`` fp32).

Same function as :func:`dhsa_export.algo.routing.last_queries_probabilities` (fp32 accumulation of
the same bf16 products; only the summation order differs). Used only on CUDA; the CPU path and
any input these kernels do not take (head dim not a power of two, fp32 inputs) stay in torch.
"""

from __future__ import annotations

import math
import os

import torch

try:  # Triton is optional: without it routing stays in torch
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - ImportError, or a broken install
    triton = None
    tl = None

ENV_SWITCH = "DHSA_ROUTING_TRITON"  # "0" turns the kernels off (A/B timing, debugging)
_FAILED: list[str] = []  # first failure message; after a failure the torch path is used


def enabled() -> bool:
    return triton is not None and os.environ.get(ENV_SWITCH, "1") != "0" and not _FAILED


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Inputs the kernels take: CUDA (or the Triton interpreter), bf16/fp16, head dim a power of two >= 16."""
    d = q.shape[-1]
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (enabled() and on_device and q.dtype == k.dtype and q.dtype in (torch.bfloat16, torch.float16)
            and d >= 16 and d & (d - 1) == 0 and q.shape[-2] >= 1)


if triton is not None:

    @triton.jit
    def _group_probs(Q, K, ROW_LSE, P_OUT,
                     stride_qh, stride_qn, stride_kh, stride_kl,
                     n_rows, key_length, first_position, scale, group_size, head_group,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Probabilities of one key tile, averaged over the query heads of one routing head."""
        route_head = tl.program_id(0)
        tile = tl.program_id(1)
        row_block = tl.program_id(2)
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        visible = (cols[None, :] < key_length) & (cols[None, :] <= first_position + rows[:, None])
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for j in range(0, head_group):
            head = route_head * head_group + j
            kv_head = head // group_size
            q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qn + dims[None, :],
                        mask=rows[:, None] < n_rows, other=0.0)
            k = tl.load(K + kv_head * stride_kh + cols[:, None] * stride_kl + dims[None, :],
                        mask=cols[:, None] < key_length, other=0.0)
            logits = tl.dot(q, tl.trans(k)) * scale
            row_lse = tl.load(ROW_LSE + head * n_rows + rows, mask=rows < n_rows, other=0.0)
            acc += tl.where(visible, tl.exp(logits - row_lse[:, None]), 0.0)
        acc = acc / head_group
        out = P_OUT + (route_head * n_rows + rows[:, None]) * key_length + cols[None, :]
        tl.store(out, acc, mask=(rows[:, None] < n_rows) & (cols[None, :] < key_length))


def _blocks(n_rows: int) -> int:
    return 64 if n_rows <= 64 else 128


def _operands(q, k, n_last, scale):
    """``(q_last, k, scale, group_size)``: the last ``n_last`` rows of ``q``, both with unit
    innermost stride (the kernels' loads), the softmax scale (default ``1 / sqrt(D)``)."""
    q_last = q[:, -n_last:]
    if q_last.stride(-1) != 1:
        q_last = q_last.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return q_last, k, scale, q.shape[0] // k.shape[0]


def _row_log_sum_exp(q_last, k, scale, group_size):
    """Log-sum-exp of every row's scaled causal logits: ``[Hq, n]`` (natural log; see ``_row_lse2``)."""
    return _row_lse2(q_last, k, scale * LOG2E, group_size, _blocks(q_last.shape[1]), q_last.shape[1], natural=True)


def last_queries_probabilities(q: torch.Tensor, k: torch.Tensor, head_group: int, n_last: int,
                               scale: float | None = None) -> torch.Tensor:
    """``[Hr, n_last, Lk]`` fp32: causal softmax of the last ``n_last`` queries of ``q [Hq, Lq, D]``
    over ``k [Hkv, Lk, D]``, averaged over groups of ``head_group`` query heads.

    The queries sit at key positions ``Lk - n_last .. Lk - 1`` (queries at the end of the keys).
    v9: the rows' log-sum-exp come from ``_row_stats2`` + ``_merge_lse`` (base-2 exponentials, the
    causal mask only on the edge tiles, the splits merged in one small kernel: 0.20 -> 0.095 ms at
    32K on an H200) instead of v4's ``_row_stats`` + ``torch.logsumexp``; the same function up to
    fp32 rounding.
    """
    q_last, k, scale, group_size = _operands(q, k, n_last, scale)
    hq, key_length, d = q.shape[0], k.shape[1], q.shape[-1]
    row_lse = _row_log_sum_exp(q_last, k, scale, group_size)
    route_heads = hq // head_group
    probs = torch.empty(route_heads, n_last, key_length, device=q.device, dtype=torch.float32)
    block_m, block_n = _blocks(n_last), 128  # wide key tiles: each program reloads its heads' queries
    grid = (route_heads, triton.cdiv(key_length, block_n), triton.cdiv(n_last, block_m))
    _group_probs[grid](q_last, k, row_lse, probs, q_last.stride(0), q_last.stride(1),
                       k.stride(0), k.stride(1), n_last, key_length, key_length - n_last, scale,
                       group_size, head_group, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
                       num_warps=8)
    return probs


def try_last_queries_probabilities(q, k, head_group, n_last):
    """The kernels' result, or None where they do not apply or failed (then torch is used).

    A failure (e.g. a Triton build error on an unusual setup) is remembered and reported once
    as a warning, and routing carries on in torch: the result is the same function.
    """
    if not supports(q, k):
        return None
    try:
        return last_queries_probabilities(q, k, head_group, n_last)
    except Exception as exc:  # noqa: BLE001 - fall back to torch, say so once
        import warnings

        _FAILED.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"DHSA Triton routing kernels failed ({_FAILED[0][:300]}); routing uses torch",
                      RuntimeWarning, stacklevel=2)
        return None


# ---------------------------------------------------------------------------------------------
# v9: the vertical / slash line sums straight from the logits (the fused ``vslash`` routing).
#
# ``routing_fused`` needs only the line sums of the group-averaged probabilities, not the
# ``[Hr, n, L]`` matrix. An experiment, off by default (``DHSA_ROUTING_PROBS_LINES=1``): on the H200
# ``_probs_lines`` took 0.51 ms at 32K where v8's ``_group_probs`` + ``_line_sums`` take 0.32 ms
# (docs/GPU_NOTES.md, v9). Three kernels, base-2 exponentials (``exp2(logit * scale * log2 e - lse2)``,
# the same function as ``exp(logit * scale - lse)`` up to fp32 rounding):
#
# 1. ``_row_stats2`` + ``_merge_lse`` (also pass 1 of ``last_queries_probabilities``): the rows'
#    base-2 log-sum-exp;
# 2. ``_probs_lines``: per (routing head, square key tile of ``B`` = 64 or 128 columns; persistent
#    programs) the logits are recomputed on the tensor cores, turned into probabilities, averaged
#    over the group; the tile's column sums are the vertical sums of its columns (complete: one
#    program holds all ``n <= B`` rows); the tile is written to a per-program scratch (L2 resident:
#    the programs are persistent, so the scratch is a few MB) and read back rotated
#    (``X[i, m] = P[i, (i - m) mod B]``), whose masked column sums are the tile's ``2B``
#    diagonal sums. A slash line (offset ``o``) crosses two neighbouring tiles; the consumer adds
#    the two partials (:func:`slash_from_partials` documents the indexing).
#
# The probabilities matrix is never written to memory.
# ---------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634
# tile / launch settings (tools/gpu/tune_routing.py sweeps them; DHSA_ROUTING_TUNE="key=value,...")
TUNE = {"stats_block_n": 64, "stats_warps": 8, "stats_stages": 3, "stats_splits": 64,
        "lines_warps": 8, "lines_stages": 2, "lines_programs_per_sm": 2, "toplines_warps": 16}


def _tune() -> dict:
    conf = dict(TUNE)
    for item in os.environ.get("DHSA_ROUTING_TUNE", "").split(","):
        if "=" in item:
            key, value = item.split("=", 1)
            if key.strip() in conf:
                conf[key.strip()] = int(value)
    return conf


def line_kernel_supports(q: torch.Tensor, k: torch.Tensor, n_last: int) -> bool:
    """The line-sum kernels: the probability kernels' inputs, at most 128 last queries."""
    return supports(q, k) and 1 <= n_last <= 128


if triton is not None:

    @triton.jit
    def _row_stats2(Q, K, PARTS,
                    stride_qh, stride_qn, stride_kh, stride_kl,
                    n_rows, key_length, first_position, split_length, scale2, group_size,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Running max (``PARTS[.., 0]``) and sum (``PARTS[.., 1]``) of ``exp2`` of the scaled
        causal logits of BLOCK_M rows of one query head over one key split."""
        head = tl.program_id(0)
        split = tl.program_id(1)
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qn + dims[None, :],
                    mask=rows[:, None] < n_rows, other=0.0)
        kv_head = head // group_size
        m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_run = tl.zeros([BLOCK_M], tl.float32)
        start = split * split_length
        end = tl.minimum(start + split_length, key_length)
        for t in range(0, split_length // BLOCK_N):  # a multiple of BLOCK_N
            tile_start = start + t * BLOCK_N
            cols = tile_start + tl.arange(0, BLOCK_N)
            k = tl.load(K + kv_head * stride_kh + cols[:, None] * stride_kl + dims[None, :],
                        mask=cols[:, None] < end, other=0.0)
            logits = tl.dot(q, tl.trans(k)) * scale2
            if (tile_start + BLOCK_N > first_position) | (tile_start + BLOCK_N > end):
                visible = (cols[None, :] < end) & (cols[None, :] <= first_position + rows[:, None])
                logits = tl.where(visible, logits, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(logits, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_run = s_run * tl.exp2(m_run - m_safe) + tl.sum(tl.exp2(logits - m_safe[:, None]), 1)
            m_run = m_new
        padded = tl.num_programs(2) * BLOCK_M
        out = PARTS + ((head * tl.num_programs(1) + split) * 2) * padded + rows
        tl.store(out, m_run)
        tl.store(out + padded, s_run)

    @triton.jit
    def _merge_lse(PARTS, LSE_OUT, splits, out_rows, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                   NATURAL: tl.constexpr):
        """``lse2 = max + log2(sum)`` over the splits of one head (``-inf`` maxima weigh 0), rows
        ``< out_rows`` written with row stride ``out_rows``; NATURAL: ``lse2 * ln 2`` (the
        natural-log ``lse`` that ``_group_probs`` takes)."""
        head = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        padded = tl.num_programs(1) * BLOCK_M
        base = PARTS + ((head * splits + s[:, None]) * 2) * padded + rows[None, :]
        ok = s[:, None] < splits
        m = tl.load(base, mask=ok, other=float("-inf"))
        total = tl.load(base + padded, mask=ok, other=0.0)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_safe[None, :]))
        lse = m_safe + tl.log2(tl.sum(total * weight, 0))
        if NATURAL:
            lse = lse * 0.6931471805599453
        tl.store(LSE_OUT + head * out_rows + rows, lse, mask=rows < out_rows)

    @triton.jit
    def _probs_lines(Q, K, LSE, V_OUT, SP_OUT, SCRATCH,
                     stride_qh, stride_qn, stride_kh, stride_kl,
                     n_rows, key_length, first_position, scale2, group_size, head_group, num_tiles, total,
                     B: tl.constexpr, HEAD_DIM: tl.constexpr, SHARED_KV: tl.constexpr):
        """Vertical sums and diagonal partial sums of the group-mean probabilities, per key tile."""
        pid = tl.program_id(0)
        rows = tl.arange(0, B)
        local = tl.arange(0, B)
        dims = tl.arange(0, HEAD_DIM)
        scratch = SCRATCH + pid.to(tl.int64) * (B * B)
        for work in range(pid, total, tl.num_programs(0)):
            route_head = work // num_tiles
            tile = work % num_tiles
            cols = tile * B + local
            acc = tl.zeros([B, B], tl.float32)
            if SHARED_KV:  # the group's heads share one KV head: one key tile
                k = tl.load(K + ((route_head * head_group) // group_size) * stride_kh
                            + cols[:, None] * stride_kl + dims[None, :],
                            mask=cols[:, None] < key_length, other=0.0)
            for j in range(0, head_group):
                head = route_head * head_group + j
                q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qn + dims[None, :],
                            mask=rows[:, None] < n_rows, other=0.0)
                if not SHARED_KV:
                    k = tl.load(K + (head // group_size) * stride_kh + cols[:, None] * stride_kl
                                + dims[None, :], mask=cols[:, None] < key_length, other=0.0)
                lse = tl.load(LSE + head * B + rows)
                acc += tl.exp2(tl.dot(q, tl.trans(k)) * scale2 - lse[:, None])
            visible = ((cols[None, :] < key_length) & (cols[None, :] <= first_position + rows[:, None])
                       & (rows[:, None] < n_rows))
            acc = tl.where(visible, acc, 0.0) / head_group
            tl.store(V_OUT + route_head * key_length + cols, tl.sum(acc, 0), mask=cols < key_length)
            tl.debug_barrier()  # the previous tile's rotated reads are done
            tl.store(scratch + (rows[:, None] * B + local[None, :]), acc)
            tl.debug_barrier()
            # offsets computed here, not kept across the loop (a [B, B] pointer tensor is 2 x 64 registers)
            rot = tl.load(scratch + (rows[:, None] * B + ((rows[:, None] - local[None, :]) & (B - 1))))
            lower = rows[:, None] >= local[None, :]
            out = SP_OUT + work * (2 * B)
            tl.store(out + B + local, tl.sum(tl.where(lower, rot, 0.0), 0))  # diagonal i - j = m
            tl.store(out + local, tl.sum(tl.where(lower, 0.0, rot), 0))  # diagonal i - j = m - B


def _row_lse2(q_last, k, scale2, group_size, block, out_rows, natural):
    """Pass 1 (``_row_stats2`` per key split + ``_merge_lse``): ``[Hq, out_rows]`` fp32, base 2
    (or natural) log-sum-exp of the scaled causal logits of ``q_last``'s rows."""
    hq, n_last, d = q_last.shape
    key_length = k.shape[1]
    conf = _tune()
    block_n = conf["stats_block_n"]
    split_length = max(block_n, triton.cdiv(triton.cdiv(key_length, conf["stats_splits"]), block_n) * block_n)
    splits = triton.cdiv(key_length, split_length)
    row_blocks = triton.cdiv(n_last, block)
    parts = torch.empty(hq, splits, 2, row_blocks * block, device=q_last.device, dtype=torch.float32)
    _row_stats2[(hq, splits, row_blocks)](q_last, k, parts, q_last.stride(0), q_last.stride(1), k.stride(0), k.stride(1),
                              n_last, key_length, key_length - n_last, split_length, scale2, group_size,
                              BLOCK_M=block, BLOCK_N=block_n, HEAD_DIM=d, num_stages=conf["stats_stages"],
                              num_warps=conf["stats_warps"])
    lse = torch.empty(hq, out_rows, device=q_last.device, dtype=torch.float32)
    _merge_lse[(hq, row_blocks)](parts, lse, splits, out_rows, BLOCK_M=block,
                      BLOCK_S=max(2, triton.next_power_of_2(splits)), NATURAL=natural, num_warps=4)
    return lse


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the Triton interpreter


def last_queries_line_sums(q: torch.Tensor, k: torch.Tensor, head_group: int, n_last: int,
                           scale: float | None = None):
    """``(vertical [Hr, Lk], slash_partials [Hr, T, 2B], B)`` of the group-mean causal softmax of the
    last ``n_last`` (<= 128) rows of ``q [Hq, Lq, D]`` (or of ``q`` itself when it has ``n_last``
    rows) over ``k [Hkv, Lk, D]``; see ``_probs_lines``. ``slash[o]`` (the sum over rows ``i`` of
    ``P[i, Lk - n_last + i - o]``) is the sum of two partials: :func:`slash_from_partials`."""
    q_last, k, scale, group_size = _operands(q, k, n_last, scale)
    hq, key_length, d = q.shape[0], k.shape[1], q.shape[-1]
    conf = _tune()
    scale2 = scale * LOG2E
    block = 64 if n_last <= 64 else 128
    first = key_length - n_last
    lse = _row_lse2(q_last, k, scale2, group_size, block, block, natural=False)
    # pass 2: line sums per key tile
    route_heads = hq // head_group
    num_tiles = triton.cdiv(key_length, block)
    total = route_heads * num_tiles
    programs = max(1, min(total, conf["lines_programs_per_sm"] * _sm_count(q.device)))
    vertical = torch.empty(route_heads, key_length, device=q.device, dtype=torch.float32)
    partials = torch.empty(route_heads, num_tiles, 2 * block, device=q.device, dtype=torch.float32)
    scratch = torch.empty(programs, block, block, device=q.device, dtype=torch.float32)
    _probs_lines[(programs,)](q_last, k, lse, vertical, partials, scratch,
                              q_last.stride(0), q_last.stride(1), k.stride(0), k.stride(1),
                              n_last, key_length, first, scale2, group_size, head_group, num_tiles, total,
                              B=block, HEAD_DIM=d, SHARED_KV=group_size % head_group == 0,
                              num_warps=conf["lines_warps"],
                              num_stages=conf["lines_stages"])
    return vertical, partials, block


def slash_from_partials(partials: torch.Tensor, key_length: int, n_last: int, block: int) -> torch.Tensor:
    """``slash [Hr, Lk]`` from ``_probs_lines``' partials (torch; tests and the fallback).

    Tile ``t`` (columns ``tB .. tB + B - 1``) holds in slot ``s = i - j + B`` the sum of its entries
    on the diagonal ``i - j``; the offset of that diagonal is ``o = first - tB + i - j`` with
    ``first = Lk - n_last``. For ``u = o - first + B``: tile ``t_hi = (2B - 1 - u) // B`` at slot
    ``u + B t_hi`` (in ``[B, 2B)``) and tile ``t_hi - 1`` at slot ``u + B t_hi - B``; lower tile first.
    """
    heads, num_tiles, _ = partials.shape
    o = torch.arange(key_length, device=partials.device)
    u = o - (key_length - n_last) + block
    t_hi = torch.div(2 * block - 1 - u, block, rounding_mode="floor")
    s_hi = u + block * t_hi
    flat = partials.reshape(heads, -1)
    hi_ok = t_hi < num_tiles
    lo_ok = t_hi >= 1
    hi = torch.where(hi_ok, flat[:, (t_hi.clamp(max=num_tiles - 1) * 2 * block + s_hi).clamp(min=0)], 0.0)
    lo = torch.where(lo_ok, flat[:, ((t_hi - 1).clamp(min=0) * 2 * block + s_hi - block).clamp(min=0)], 0.0)
    return lo + hi
