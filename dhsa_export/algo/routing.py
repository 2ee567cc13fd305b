"""Routing patterns: which key chunks every query block attends to.

Input is one sequence (``q [Hq, Lq, D]``, ``k [Hkv, Lk, D]``), output a :class:`Selection`.
All patterns share one selection rule (:func:`select_under_budget`): forced chunks (sink, diagonal,
local window) are taken first and counted once, then the remaining budget is filled in score order
among the causal chunks only. So no row is ever empty, no future chunk is ever picked, and a row
whose causal window fits the budget is dense (density 1.0 is exactly dense attention).
"""

from __future__ import annotations

import math

import torch

from ..config import DHSAConfig
from .layout import BlockGrid, Selection, chunk_id_per_token, chunk_lengths, fixed_offsets, segment_means


def routing_heads(num_query_heads: int, num_kv_heads: int, cfg: DHSAConfig) -> int:
    """Query heads per routing head: 1 per head, or the GQA group size per KV group."""
    if num_query_heads % num_kv_heads:
        raise ValueError(f"query heads {num_query_heads} not a multiple of KV heads {num_kv_heads}")
    return 1 if cfg.head_routing == "head" else num_query_heads // num_kv_heads


def group_mean(x: torch.Tensor, head_group: int) -> torch.Tensor:
    """Average consecutive groups of ``head_group`` heads along dim 0."""
    if head_group == 1:
        return x
    return x.reshape(x.shape[0] // head_group, head_group, *x.shape[1:]).mean(dim=1)


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat KV heads ``[Hkv, ...]`` to ``num_heads`` heads (GQA)."""
    if x.shape[0] == num_heads:
        return x
    return x.repeat_interleave(num_heads // x.shape[0], dim=0)


def select_under_budget(
    score: torch.Tensor,
    causal: torch.Tensor,
    forced: torch.Tensor,
    weights: torch.Tensor | None,
    budget: float,
    dense_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick chunks per row: forced ones, then by descending score while the budget lasts.

    Args:
        score: ``[Hr, nQ, nC]`` ranking score (only its order among causal chunks matters).
        causal: ``[nQ, nC]`` chunks a row may see.
        forced: ``[Hr or 1, nQ, nC]`` chunks a row always attends (restricted to causal ones).
        weights: ``[nC]`` cost of each chunk in budget units (tokens per chunk), or None for
            1 per chunk (fixed blocks; saves a gather over the sorted order).
        budget: cost a row may spend, forced chunks included (forced ones are always taken).
        dense_rows: ``[nQ]`` rows that attend to every causal chunk.

    Ties in score keep chunk order (stable sort), so every device picks the same chunks.
    """
    forced = (forced & causal).expand_as(score)
    spent = (forced.float() if weights is None else forced.float() * weights).sum(-1, keepdim=True)
    candidates = causal & ~forced
    ranked = score.float().masked_fill(~candidates, -math.inf)
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    candidate_sorted = candidates.gather(-1, order)
    sorted_weights = candidate_sorted.float()
    if weights is not None:
        sorted_weights = weights.float()[order] * sorted_weights
    fits_sorted = (spent + sorted_weights.cumsum(-1) <= budget + 1e-6) & candidate_sorted
    chosen = torch.zeros_like(candidates).scatter(-1, order, fits_sorted)
    mask = forced | chosen
    if dense_rows is not None:
        mask = torch.where(dense_rows[None, :, None], causal.expand_as(mask), mask)
    return mask


def block_scores(q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, head_group: int,
                 length_normalized: bool) -> torch.Tensor:
    """Chunk-level scores ``S[h, i, c] = mean(q of block i) . rep(k of chunk c)`` in fp32.

    With ``length_normalized`` the key representation is mean x sqrt(chunk length), the
    paper's correction for variable chunk sizes (a plain mean favours short chunks).
    """
    q_means = segment_means(q, grid.q_offsets, grid.q_block)
    k_means = segment_means(k, grid.chunk_offsets, grid.chunk_block)
    if length_normalized:
        k_means = k_means * chunk_lengths(grid.chunk_offsets).float().sqrt()[None, :, None]
    q_routed = group_mean(q_means, head_group)
    k_routed = expand_kv(k_means, q_routed.shape[0])
    return torch.bmm(q_routed, k_routed.transpose(1, 2)) / math.sqrt(q.shape[-1])


def route_topk(q, k, cfg: DHSAConfig, grid: BlockGrid, head_group: int) -> torch.Tensor:
    """Top-k chunks by block-mean score, sink and diagonal forced (causality respected)."""
    score = block_scores(q, k, grid, head_group, length_normalized=False)
    forced = (grid.sink(cfg.k_block) | grid.diagonal())[None]
    weights = None  # one budget unit per fixed block
    return select_under_budget(score, grid.causal(), forced, weights, cfg.budget_blocks(k.shape[1]))


def local_window(grid: BlockGrid, local_tokens: int) -> torch.Tensor:
    """``[nQ, nC]`` chunks covering the ``local_tokens`` keys before each query block and the block."""
    first = (grid.q_first_position() - local_tokens).clamp(min=0)
    return grid.covering(first, grid.q_last_position())


def route_ashape(q, k, cfg: DHSAConfig, grid: BlockGrid, head_group: int) -> torch.Tensor:
    """A-shape: sink + local window forced; the middle filled by top-k; short rows dense."""
    score = block_scores(q, k, grid, head_group, length_normalized=False)
    forced = (grid.sink(cfg.sink_tokens) | local_window(grid, cfg.local_tokens))[None]
    weights = None  # one budget unit per fixed block
    return select_under_budget(score, grid.causal(), forced, weights, cfg.budget_blocks(k.shape[1]))


def vslash_dense_rows(grid: BlockGrid, cfg: DHSAConfig, key_length: int) -> torch.Tensor:
    """First ceil(budget_tokens / q_block) query blocks and the last query block are dense."""
    first = math.ceil(cfg.budget_tokens(key_length) / cfg.q_block)

    def make():  # comparisons, not item assignment: a Python value assigned would be a host copy
        blocks = torch.arange(grid.num_q_blocks, device=grid.q_offsets.device)
        return (blocks < first) | (blocks == grid.num_q_blocks - 1)

    return grid.memo(("vslash_dense_rows", first), make)


def gqa_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """fp32 ``q [Hq, n, D] @ k [Hkv, L, D]^T -> [Hq, n, L]``, query head ``h`` on KV head ``h // g``.

    One batched GEMM per KV head over the rows of its ``g`` query heads, so K is never repeated
    (the repeat costs ``g`` fp32 copies of K). On CUDA, bf16/fp16 operands go through the tensor
    cores with an fp32 result (their products are exact in fp32; only the summation order differs
    from an fp32 GEMM); elsewhere an fp32 GEMM, as in the reference.
    """
    hq, n, d = q.shape
    hkv = k.shape[0]
    rows = q.reshape(hkv, (hq // hkv) * n, d)
    if q.is_cuda and q.dtype == k.dtype and q.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.bmm(rows, k.transpose(1, 2), out_dtype=torch.float32).view(hq, n, -1)
        except (TypeError, RuntimeError):  # torch without the fp32-output GEMM: fp32 operands
            pass
    return torch.bmm(rows.float(), k.float().transpose(1, 2)).view(hq, n, -1)


def _fused_last_queries_probabilities(q: torch.Tensor, k: torch.Tensor, head_group: int,
                                      n_last: int) -> torch.Tensor | None:
    """On CUDA, the torch-cuda backend's Triton kernels compute the same probabilities without
    writing the ``[Hq, n_last, Lk]`` logits (the largest cost of ``vslash`` routing); None where
    they do not apply (CPU, fp32 inputs, no Triton), and the torch code below runs."""
    if not q.is_cuda:
        return None
    try:
        from ..backends.torch_cuda import routing_triton
    except ImportError:
        return None
    return routing_triton.try_last_queries_probabilities(q, k, head_group, n_last)


def last_queries_probabilities(q: torch.Tensor, k: torch.Tensor, head_group: int, n_last: int) -> torch.Tensor:
    """Exact causal softmax of the last ``n_last`` queries over all keys, per routing head.

    Returns probabilities ``[Hr, n_last, Lk]`` (group routing averages the heads' probabilities).
    The queries sit at the last ``n_last`` key positions (``Lk - n_last + i``), so only the last
    ``n_last`` key columns can lie in a query's future; only they are masked (in place).
    """
    fused = _fused_last_queries_probabilities(q, k, head_group, n_last)
    if fused is not None:
        return fused
    logits = gqa_scores(q[:, -n_last:], k).div_(math.sqrt(q.shape[-1]))
    key_length = k.shape[1]
    tail = torch.arange(n_last, device=q.device)
    logits[..., key_length - n_last:].masked_fill_((tail[None, :] > tail[:, None])[None], -math.inf)
    return group_mean(logits.softmax(dim=-1), head_group)


def sum_along_diagonals(probs: torch.Tensor, row_positions: torch.Tensor) -> torch.Tensor:
    """``out[h, o] = sum_i probs[h, i, row_positions[i] - o]`` (terms with a negative column are 0).

    A gather along diagonals, the same size as ``probs``: no scatter with atomics, so it is
    deterministic and fast on GPUs.
    """
    width = probs.shape[-1]
    columns = row_positions[:, None] - torch.arange(width, device=probs.device)[None, :]
    valid = (columns >= 0) & (columns < width)
    index = columns.clamp(0, width - 1).expand(probs.shape[0], -1, -1)
    return (probs.gather(-1, index) * valid[None]).sum(dim=1)


def sum_along_diagonals_of_last_rows(probs: torch.Tensor) -> torch.Tensor:
    """``out[h, o] = sum_i probs[h, i, W - n + i - o]`` for ``probs [H, n, W]`` whose rows are the
    last ``n`` positions of the ``W`` columns (terms with a negative column are 0).

    :func:`sum_along_diagonals` for consecutive rows without an index tensor: with the columns
    reversed and ``n - 1`` zeros appended to every row, diagonal ``o`` is the line
    ``flat[i * (row - 1) + n - 1 + o]`` of the row-major buffer, so one strided view and one
    reduction give every diagonal sum (in the same order as the gather: identical fp32 sums).
    """
    heads, n, width = probs.shape
    padded = torch.nn.functional.pad(probs.flip(-1), (0, n - 1))  # [H, n, W + n - 1]
    row = width + n - 1
    diagonals = padded.as_strided((heads, n, width), (n * row, row - 1, 1), padded.storage_offset() + n - 1)
    return diagonals.sum(dim=1)


def keep_top_lines(scores: torch.Tensor, count: int) -> torch.Tensor:
    """``scores [H, n]`` (line masses, >= 0) with all but the ``count`` largest per row set to 0
    (a selected line of zero mass stays 0, i.e. unselected)."""
    count = max(0, min(count, scores.shape[-1]))
    kept = torch.zeros_like(scores)
    if count:
        top = scores.topk(count, dim=-1)
        kept.scatter_(-1, top.indices, top.values.clamp(min=0))
    return kept


def scatter_lines_to_blocks(vertical: torch.Tensor, slash: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Block score = selected vertical mass in the chunk + selected slash mass crossing the block.

    ``vertical [Hr, Lk]`` is indexed by key position, ``slash [Hr, Lk]`` by offset
    ``query position - key position``; both already zero outside the selected lines.
    Prefix sums make this O(nQ x nC) without building any token-level matrix.
    """
    starts, ends = grid.chunk_offsets[:-1], grid.chunk_offsets[1:]
    v_prefix = torch.nn.functional.pad(vertical.cumsum(-1), (1, 0))
    v_block = (v_prefix[:, ends] - v_prefix[:, starts])[:, None, :]  # [Hr, 1, nC]
    s_prefix = torch.nn.functional.pad(slash.cumsum(-1), (1, 0))
    upper, lower, empty = slash_offset_ranges(grid, slash.shape[-1])
    return v_block + (s_prefix[:, upper] - s_prefix[:, lower]).masked_fill_(empty[None], 0.0)


def slash_offset_ranges(grid: BlockGrid, num_offsets: int):
    """Prefix-sum bounds of the offsets ``query - key`` that cross each (query block, chunk) cell.

    Returns ``upper, lower [nQ, nC]`` (slash mass of a cell = ``prefix[upper] - prefix[lower]``)
    and ``empty [nQ, nC]`` (no offset crosses the cell). Geometry only, so computed once per grid.
    """
    def make():
        starts, ends = grid.chunk_offsets[:-1], grid.chunk_offsets[1:]
        max_offset = num_offsets - 1
        o_min = (grid.q_first_position()[:, None] - (ends[None, :] - 1)).clamp(0, max_offset + 1)
        o_max = (grid.q_last_position()[:, None] - starts[None, :]).clamp(-1, max_offset)
        return (o_max + 1).clamp(min=0), o_min.clamp(max=max_offset + 1), o_max < o_min

    return grid.memo(("slash_offset_ranges", num_offsets), make)


def line_rank(line_score: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Blocks hit by a selected line rank first (by mass); the others by the fallback in [0, 1).

    This is the fix for the published blockwise code, which compared raw (possibly negative)
    scores with the zeros of unselected blocks.
    """
    return torch.where(line_score > 0, 1.0 + line_score, fallback.clamp(0, 0.999))


def route_vslash(q, k, cfg: DHSAConfig, grid: BlockGrid, head_group: int) -> torch.Tensor:
    """Vertical-slash: lines predicted from the exact attention of the last q_block queries."""
    key_length = k.shape[1]
    n_last = min(cfg.q_block, q.shape[1])
    probs = last_queries_probabilities(q, k, head_group, n_last)
    vertical = probs.sum(dim=1)  # [Hr, Lk]
    slash = sum_along_diagonals_of_last_rows(probs)  # probs rows sit at the last key positions
    budget_tokens = cfg.budget_tokens(key_length)
    n_vertical = budget_tokens // 2
    vertical = keep_top_lines(vertical, n_vertical)
    slash = keep_top_lines(slash, budget_tokens - n_vertical)
    lines = scatter_lines_to_blocks(vertical, slash, grid)
    fallback = torch.sigmoid(block_scores(q, k, grid, head_group, length_normalized=False))
    forced = (grid.sink(cfg.k_block) | grid.diagonal())[None]
    weights = None  # one budget unit per fixed block
    return select_under_budget(
        line_rank(lines, fallback), grid.causal(), forced, weights,
        cfg.budget_blocks(key_length), vslash_dense_rows(grid, cfg, key_length),
    )


def route_vslash_blockwise(q, k, cfg: DHSAConfig, grid: BlockGrid, head_group: int) -> torch.Tensor:
    """Vertical-slash predicted from block means only (no L x q_block probabilities).

    Block-level probabilities ``softmax_c(S[i, c])`` over causal chunks give vertical mass per
    chunk and slash mass per block diagonal ``d = diag(i) - c``; the top lines (half the block
    budget each) are scattered back; forced sink/diagonal blocks are counted once.
    """
    key_length = k.shape[1]
    causal = grid.causal()
    score = block_scores(q, k, grid, head_group, length_normalized=False)
    probs = score.masked_fill(~causal[None], -math.inf).softmax(dim=-1)  # [Hr, nQ, nC]
    diag = torch.searchsorted(grid.chunk_offsets[1:], grid.q_last_position(), right=True)
    block_offset = diag[:, None] - torch.arange(grid.num_chunks, device=q.device)[None, :]
    vertical = probs.sum(dim=1)  # [Hr, nC]
    slash = sum_along_diagonals(probs * causal[None], diag)
    budget = cfg.budget_blocks(key_length)
    n_vertical = budget // 2
    vertical = keep_top_lines(vertical, n_vertical)
    slash = keep_top_lines(slash, budget - n_vertical)
    lines = vertical[:, None, :] + slash.gather(
        1, block_offset.clamp(min=0).reshape(-1).expand(probs.shape[0], -1)
    ).reshape_as(probs) * causal[None]
    forced = (grid.sink(cfg.k_block) | grid.diagonal())[None]
    weights = None  # one budget unit per fixed block
    return select_under_budget(
        line_rank(lines, probs), causal, forced, weights, budget,
        vslash_dense_rows(grid, cfg, key_length),
    )


def chunk_mass_scores(q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, head_group: int,
                      max_elements: int | None = None) -> torch.Tensor:
    """``S[h, i, c] = log mean_{j in chunk c} exp(mean(q of block i) . k_j / sqrt(D))`` in fp32.

    The log of the mean attention weight (up to the row's normalizer) that the block's mean
    query gives the chunk's tokens: token logits of the block-mean query, aggregated per chunk
    in the softmax domain (a logsumexp over the chunk, minus log length). Unlike ``mean(k)``, this
    keeps a chunk that holds one strongly attended token (a heavy hitter) visible. Ranking chunks
    by it and filling a token budget is the top-k over tokens of the chunk score upsampled to the
    chunk's tokens, i.e. the chunks estimated to carry the most attention mass per budget token.

    The keys are gathered once into a padded ``[Hkv, nC, W, D]`` layout (``W`` = longest chunk,
    at most ``max_chunk`` for predicted chunks), so the per-chunk logsumexp is a plain reduction
    (no scatter). Cost: ``nQ x nC x W x D`` multiply-adds per routing head (about one row per
    query block, 1/q_block of the dense QK^T; the order of ``vslash``'s last-q_block probe),
    computed ``max_elements`` logits at a time (2^24 on the CPU, 2^26 on a GPU). On CUDA with
    bf16/fp16 keys the query means are rounded to the keys' dtype so the GEMM runs on the tensor
    cores (fp32 result).
    """
    q_means = group_mean(segment_means(q, grid.q_offsets, grid.q_block), head_group)  # [Hr, nQ, D]
    if max_elements is None:
        max_elements = 1 << (26 if k.is_cuda else 24)
    half_keys = k.is_cuda and k.dtype in (torch.bfloat16, torch.float16)
    probe = q_means.to(k.dtype) if half_keys else q_means
    routes, num_q, dim = q_means.shape
    lengths = chunk_lengths(grid.chunk_offsets)
    width = max(1, grid.chunk_block or int(lengths.max()))
    slots = torch.arange(width, device=k.device)
    positions = grid.chunk_offsets[:-1, None] + slots[None, :]  # [nC, W]
    padding = slots[None, :] >= lengths[:, None]
    keys = k[:, positions.clamp(max=k.shape[1] - 1).reshape(-1)]  # [Hkv, nC * W, D]
    log_lengths = lengths.clamp(min=1).float().log()
    scores = q_means.new_empty(routes, num_q, grid.num_chunks)
    rows = max(1, max_elements // max(1, routes * keys.shape[1]))
    for first in range(0, num_q, rows):
        last = min(num_q, first + rows)
        logits = gqa_scores(probe[:, first:last].contiguous(), keys).div_(math.sqrt(dim))
        logits = logits.view(routes, last - first, grid.num_chunks, width).masked_fill_(padding, -math.inf)
        scores[:, first:last] = logits.logsumexp(dim=-1) - log_lengths
    return scores


def route_dynamic(q, k, cfg: DHSAConfig, grid: BlockGrid, head_group: int) -> torch.Tensor:
    """Hierarchical DHSA over variable chunks: chunk scores, token budget.

    Chunks are ranked by ``cfg.chunk_score``: the estimated attention mass per token
    (:func:`chunk_mass_scores`, default) or the paper's length-normalized mean-key score.
    Selecting chunks in score order under a token budget is the top-k over chunk scores
    upsampled to tokens (every token of a chunk has the chunk's score); a chunk that does not fit
    whole is skipped. Sink tokens and the local window are forced; the query blocks holding the
    last ``instruction_tokens`` queries are dense.
    """
    key_length = k.shape[1]
    if cfg.chunk_score == "mass":
        score = chunk_mass_scores(q, k, grid, head_group)
    else:
        score = block_scores(q, k, grid, head_group, length_normalized=True)
    forced = (grid.sink(cfg.sink_tokens) | local_window(grid, cfg.local_tokens))[None]
    weights = chunk_lengths(grid.chunk_offsets).float()
    last_queries = grid.q_offsets[1:] > q.shape[1] - cfg.instruction_tokens
    return select_under_budget(
        score, grid.causal(), forced, weights, cfg.budget_tokens(key_length), last_queries
    )


PATTERN_FUNCTIONS = {
    "topk": route_topk,
    "ashape": route_ashape,
    "vslash": route_vslash,
    "vslash_blockwise": route_vslash_blockwise,
    "dynamic": route_dynamic,
}


def fixed_grid(query_length: int, key_length: int, cfg: DHSAConfig, device) -> BlockGrid:
    """The grid of every pattern but ``dynamic``: fixed ``k_block`` key blocks (no host sync)."""
    chunk_offsets = fixed_offsets(key_length, cfg.k_block, device)
    return BlockGrid.build(query_length, chunk_offsets, cfg.q_block, key_length, cfg.k_block)


def route(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: DHSAConfig,
    chunk_offsets: torch.Tensor | None = None,
) -> Selection:
    """Route one sequence: ``q [Hq, Lq, D]``, ``k [Hkv, Lk, D]`` -> :class:`Selection`.

    ``chunk_offsets`` (``[nC + 1]``, from the boundary predictor or rule) is used by ``dynamic``;
    the other patterns cut the keys into fixed ``k_block`` blocks.
    """
    pattern = cfg.effective_pattern(k.shape[1])
    if pattern != "dynamic" or chunk_offsets is None:
        grid = fixed_grid(q.shape[1], k.shape[1], cfg, q.device)
    else:
        grid = BlockGrid.build(q.shape[1], chunk_offsets.to(q.device), cfg.q_block)
    head_group = routing_heads(q.shape[0], k.shape[0], cfg)
    fused = _fused_route(q, k, cfg, grid, head_group, pattern)
    if fused is not None:
        return fused
    mask = PATTERN_FUNCTIONS[pattern](q, k, cfg, grid, head_group)
    return Selection(grid, mask, head_group)


def _fused_route(q, k, cfg: DHSAConfig, grid: BlockGrid, head_group: int, pattern: str) -> Selection | None:
    """On CUDA, the torch-cuda backend's fused Triton routing (fixed-block patterns: the steps
    after the scores in two kernels, with the kernel's block indices precomputed); None where it
    does not apply (CPU, ``dynamic``, no Triton, ``DHSA_ROUTING_FUSED=0``): the code above runs."""
    if not q.is_cuda or pattern == "dynamic":
        return None
    try:
        from ..backends.torch_cuda import routing_fused
    except ImportError:
        return None
    return routing_fused.try_route(q, k, cfg, grid, head_group, pattern)
