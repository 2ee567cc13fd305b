"""Triton kernels for the one large step of ``vslash`` routing on CUDA.

``vslash`` needs the exact causal softmax of the last ``n`` (= ``q_block``) queries of every query
head over all ``L`` keys, averaged over the heads of a routing group (``[Hr, n, L]``). In plain
torch that is an fp32 GEMM writing ``[Hq, n, L]`` logits (512 MB at 32K tokens for LLaMA-3.1-8B),
then a scale, a softmax and a group mean: six passes over that tensor, ~1.3 ms at 32K on an H200.
Here it is two kernels that never write the logits:

1. ``_row_stats``: per (query head, key split), the log-sum-exp of the scaled, causally masked
   logits (running max and sum, flash-attention style); ``torch.logsumexp`` merges the splits.
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
    def _row_stats(Q, K, LSE_OUT,
                   stride_qh, stride_qn, stride_kh, stride_kl,
                   n_rows, key_length, first_position, split_length, scale, group_size,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Log-sum-exp over one key split for BLOCK_M rows of one query head (-inf: no visible key)."""
        head = tl.program_id(0)
        row_block = tl.program_id(1)
        split = tl.program_id(2)
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qn + dims[None, :],
                    mask=rows[:, None] < n_rows, other=0.0)
        kv_head = head // group_size
        m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_run = tl.zeros([BLOCK_M], tl.float32)
        start = split * split_length
        end = tl.minimum(start + split_length, key_length)
        for tile in range(0, split_length // BLOCK_N):  # split_length is a multiple of BLOCK_N
            cols = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            k = tl.load(K + kv_head * stride_kh + cols[:, None] * stride_kl + dims[None, :],
                        mask=cols[:, None] < end, other=0.0)
            logits = tl.dot(q, tl.trans(k)) * scale
            visible = (cols[None, :] < end) & (cols[None, :] <= first_position + rows[:, None])
            logits = tl.where(visible, logits, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(logits, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), 1)
            m_run = m_new
        out = (head * tl.num_programs(2) + split) * n_rows + rows
        tl.store(LSE_OUT + out, m_run + tl.log(s_run), mask=rows < n_rows)

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


def _row_log_sum_exp(q_last, k, scale, group_size):
    """Log-sum-exp of every row's scaled causal logits: ``[Hq, n]`` (key splits merged here)."""
    hq, n, d = q_last.shape
    key_length = k.shape[1]
    block_m, block_n = _blocks(n), 64
    split_length = max(block_n, triton.cdiv(triton.cdiv(key_length, 32), block_n) * block_n)
    splits = triton.cdiv(key_length, split_length)
    parts = torch.empty(hq, splits, n, device=q_last.device, dtype=torch.float32)
    grid = (hq, triton.cdiv(n, block_m), splits)
    _row_stats[grid](q_last, k, parts, q_last.stride(0), q_last.stride(1), k.stride(0), k.stride(1),
                     n, key_length, key_length - n, split_length, scale, group_size,
                     BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, num_warps=4)
    return torch.logsumexp(parts, dim=1)  # finite: split 0 holds key 0, which every row sees


def last_queries_probabilities(q: torch.Tensor, k: torch.Tensor, head_group: int, n_last: int,
                               scale: float | None = None) -> torch.Tensor:
    """``[Hr, n_last, Lk]`` fp32: causal softmax of the last ``n_last`` queries of ``q [Hq, Lq, D]``
    over ``k [Hkv, Lk, D]``, averaged over groups of ``head_group`` query heads.

    The queries sit at key positions ``Lk - n_last .. Lk - 1`` (queries at the end of the keys).
    """
    hq, _, d = q.shape
    hkv, key_length, _ = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_last = q[:, -n_last:]
    if q_last.stride(-1) != 1:
        q_last = q_last.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    group_size = hq // hkv
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
