"""Reference attention: exact softmax over the selected chunks, causal inside the diagonal.

This is the implementation every backend is checked against, so it favours obviousness over speed:
one query block at a time, the selection expanded to a token mask over the keys that block can
see, then PyTorch's SDPA. It never builds an Lq x Lk matrix for the whole sequence at once.

:func:`dhsa_attention` is the batch entry point used by the transformers integration: it
routes each sequence on its real tokens only (padding is cut away first, so a left-padded
sequence gets the same routing as the same sequence alone) and keeps decode dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import ATTENTION_BACKENDS, DHSAConfig
from ..errors import DHSAError
from .layout import Selection, chunk_id_per_token
from .routing import expand_kv, route

# Implementations of the sparse attention given a selection: the obvious reference below (any
# device), the exact gathered form of it (:func:`gathered_sparse_attention`, the CPU default: it
# computes only the selected keys) and the CUDA block-sparse kernel
# (dhsa_export.backends.torch_cuda, CUDA fp16/bf16).
BACKENDS = ATTENTION_BACKENDS


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    scale: float | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention of one sequence restricted to ``selection``: ``[Hq, Lq, Dv]``.

    Args:
        q: ``[Hq, Lq, D]``; k: ``[Hkv, Lk, D]``; v: ``[Hkv, Lk, Dv]``.
        selection: chunks per routing head and query block (see :mod:`.routing`).
        scale: softmax scale, ``1/sqrt(D)`` by default.
        extra_mask: optional ``[Lq, Lk]`` boolean mask ANDed in (e.g. a sliding window).
    """
    grid = selection.grid
    num_heads = q.shape[0]
    keys, values = expand_kv(k, num_heads), expand_kv(v, num_heads)
    key_chunk = chunk_id_per_token(grid.chunk_offsets, k.shape[1])
    out = q.new_zeros(num_heads, q.shape[1], v.shape[-1])
    for block in range(grid.num_q_blocks):
        start, end = int(grid.q_offsets[block]), int(grid.q_offsets[block + 1])
        visible = end + grid.q_offset  # keys [0, visible) may be seen by this block
        routed = selection.mask[:, block, key_chunk[:visible]]
        routed = routed.repeat_interleave(selection.head_group, dim=0)[:, None, :]
        rows = torch.arange(start, end, device=q.device)[:, None] + grid.q_offset
        causal = torch.arange(visible, device=q.device)[None, :] <= rows
        mask = routed & causal[None]
        if extra_mask is not None:
            mask = mask & extra_mask[start:end, :visible][None]
        has_key = mask.any(-1, keepdim=True)
        block_out = F.scaled_dot_product_attention(
            q[:, start:end], keys[:, :visible], values[:, :visible],
            attn_mask=mask | ~has_key, scale=scale,
        )
        out[:, start:end] = torch.where(has_key, block_out, torch.zeros_like(block_out))
    return out


def gathered_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    scale: float | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`block_sparse_attention` computed on the selected keys only (same contract, exact).

    Per query block, the key positions every routing head selected are compacted (a prefix count
    of the token mask, no sort), gathered from K/V once per routing head and attended by the
    head's queries with the causal (and ``extra_mask``) rule applied on the gathered positions.
    The softmax runs over exactly the keys of the reference, so the outputs agree to float
    rounding (1e-5 in fp32, tested); the work is the selected area instead of the whole causal
    window, which makes CPU evaluation of sparse prefill about as fast as dense SDPA.
    Peak extra memory per query block: ``Hq x q_block x (most keys one routing head selected)``.
    """
    grid = selection.grid
    num_heads, query_length, dim = q.shape
    num_kv, key_length = k.shape[0], k.shape[1]
    group = selection.head_group
    routing = selection.mask.shape[0]
    scale = dim ** -0.5 if scale is None else scale
    kv_of_route = (torch.arange(routing, device=q.device) * group) // (num_heads // num_kv)
    row_base = (kv_of_route * key_length)[:, None]  # flat row of key 0 of each route's KV head
    k_flat, v_flat = k.reshape(num_kv * key_length, dim), v.reshape(num_kv * key_length, v.shape[-1])
    key_chunk = chunk_id_per_token(grid.chunk_offsets, key_length)
    positions = torch.arange(key_length, device=q.device)
    queries = (q * scale).reshape(routing, group, query_length, dim)
    out = q.new_zeros(num_heads, query_length, v.shape[-1])
    q_offsets = grid.q_offsets.tolist()
    for block in range(grid.num_q_blocks):
        start, end = q_offsets[block], q_offsets[block + 1]
        visible = end + grid.q_offset
        tokens = selection.mask[:, block, key_chunk[:visible]]  # [Hr, visible]
        counts = tokens.sum(-1)
        width = int(counts.max())
        if width == 0:
            continue
        slot = torch.where(tokens, tokens.cumsum(-1) - 1, width)  # unselected -> spill column
        index = torch.zeros(routing, width + 1, dtype=torch.long, device=q.device)
        index.scatter_(-1, slot, positions[:visible].expand(routing, -1))
        index = index[:, :width]  # [Hr, n] selected key positions, ascending
        valid = torch.arange(width, device=q.device)[None, :] < counts[:, None]
        flat = (row_base + index).reshape(-1)
        keys = k_flat.index_select(0, flat).view(routing, 1, width, dim)
        values = v_flat.index_select(0, flat).view(routing, 1, width, -1)
        rows = torch.arange(start, end, device=q.device) + grid.q_offset
        allowed = valid[:, None, :] & (index[:, None, :] <= rows[None, :, None])  # [Hr, qb, n]
        if extra_mask is not None:
            allowed = allowed & extra_mask[start:end][:, index].permute(1, 0, 2)
        logits = torch.matmul(queries[:, :, start:end], keys.transpose(-1, -2)).float()
        logits.masked_fill_(~allowed[:, None], float("-inf"))
        probs = logits.softmax(dim=-1).nan_to_num_(0.0)  # rows without a key -> zeros
        block_out = torch.matmul(probs.to(values.dtype), values)  # [Hr, g, qb, Dv]
        out[:, start:end] = block_out.reshape(num_heads, end - start, -1)
    return out


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense causal SDPA with GQA: ``q [..., Hq, Lq, D]`` against ``k/v [..., Hkv, Lk, D]``.

    With ``attention_mask`` (boolean, True = attend) the mask replaces the causal rule; rows with
    no key give zeros instead of NaN.
    """
    num_heads, num_kv = q.shape[-3], k.shape[-3]
    if attention_mask is None and q.shape[-2] == 1:
        # decode: the one query sees every key, so no mask and no K/V repeat (at 100K cached
        # tokens the repeat alone would write 1.6 GB per layer and token)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=num_heads != num_kv)
    keys = k.repeat_interleave(num_heads // num_kv, dim=-3)
    values = v.repeat_interleave(num_heads // num_kv, dim=-3)
    if attention_mask is None:
        offset = k.shape[-2] - q.shape[-2]
        rows = torch.arange(q.shape[-2], device=q.device)[:, None] + offset
        attention_mask = torch.arange(k.shape[-2], device=q.device)[None, :] <= rows
    has_key = attention_mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attention_mask | ~has_key, scale=scale)
    return torch.where(has_key, out, torch.zeros_like(out))


@dataclass
class RoutingStats:
    """Running account of what the sparse prefill computed (for reports).

    Fractions are kept as device tensors and read back in bulk (when read, or every
    ``SETTLE_EVERY`` calls), so recording them does not stall a GPU stream on every layer.
    """

    SETTLE_EVERY = 256

    calls: int = 0
    patterns: set = field(default_factory=set)
    _settled_sum: float = field(default=0.0, repr=False)
    _pending: list = field(default_factory=list, repr=False)

    def add(self, selection: Selection, pattern: str) -> None:
        self.calls += 1
        self._pending.append(selection.causal_block_fraction_tensor())
        self.patterns.add(pattern)
        if len(self._pending) >= self.SETTLE_EVERY:
            self._settle()

    def _settle(self) -> None:
        for fraction in self._pending:  # in call order: the same float sum as adding one by one
            self._settled_sum += float(fraction)
        self._pending.clear()

    @property
    def causal_block_fraction_sum(self) -> float:
        self._settle()
        return self._settled_sum

    @property
    def causal_block_fraction(self) -> float:
        return self.causal_block_fraction_sum / self.calls if self.calls else 1.0


def sparse_attention_function(backend: str):
    """The per-sequence sparse attention of ``backend``, with the signature of
    :func:`block_sparse_attention` (``q, k, v, selection, scale, extra_mask``)."""
    if backend == "reference":
        return block_sparse_attention
    if backend == "torch-gather":
        return gathered_sparse_attention
    if backend == "torch-cuda":
        from ..backends.torch_cuda.ops import selection_attention_cuda

        return selection_attention_cuda
    raise DHSAError(f"unknown DHSA attention backend {backend!r}; use one of {', '.join(BACKENDS)}")


def routing_function(backend: str, routing_graphs=None):
    """The per-sequence router of ``backend`` (signature of :func:`route`): eager ``route`` for
    "reference"; for "torch-cuda", fixed-block routing replayed from CUDA graphs through
    ``routing_graphs`` (a ``RoutingGraphCache``, None = the shared default, False = eager)."""
    if backend != "torch-cuda":
        return route
    from ..backends.torch_cuda.ops import routing_function as cuda_routing_function

    return cuda_routing_function(routing_graphs)


def dhsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: DHSAConfig,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_offsets: list[torch.Tensor | None] | None = None,
    stats: RoutingStats | None = None,
    backend: str = "reference",
    routing_graphs=None,
) -> torch.Tensor:
    """DHSA for a batch: ``q [B, Hq, Lq, D]``, ``k/v [B, Hkv, Lk, D]`` -> ``[B, Hq, Lq, Dv]``.

    Args:
        attention_mask: optional boolean ``[B, 1 or Hq, Lq, Lk]`` (True = attend), as built by
            transformers for padded batches; ``None`` means plain causal with the queries at the end.
        chunk_offsets: per batch item, variable key chunks over that item's *real* keys (for
            ``dynamic``), or ``None`` for fixed blocks.
        stats: collects the achieved causal-block fraction.
        backend: ``"reference"`` (any device), ``"torch-gather"`` (any device, the same result
            computed on the selected keys only) or ``"torch-cuda"`` (the CUDA kernel for the
            sparse attention; routing is the same torch code on the same device either way).
        routing_graphs: "torch-cuda" only: where the unpadded sequences' fixed-block routing is
            replayed from CUDA graphs (see :func:`routing_function`); the same selections.

    A single query (decode) is dense. Otherwise every sequence is routed on its real tokens:
    padded positions are dropped, the sparse attention runs, results are scattered back and
    padded query rows are zero.
    """
    if q.shape[-2] == 1:
        mask = None if attention_mask is None else attention_mask.bool()
        return dense_attention(q, k, v, scale, mask)
    attend = sparse_attention_function(backend)
    router = routing_function(backend, routing_graphs)
    outputs = []
    for b in range(q.shape[0]):
        offsets = chunk_offsets[b] if chunk_offsets is not None else None
        mask_b = None if attention_mask is None else attention_mask[b].bool().any(dim=0)
        outputs.append(_sequence_attention(q[b], k[b], v[b], cfg, scale, mask_b, offsets, stats, attend,
                                           router))
    return outputs[0][None] if len(outputs) == 1 else torch.stack(outputs)


def _sequence_attention(q, k, v, cfg, scale, mask, chunk_offsets, stats,
                        attend=block_sparse_attention, router=route) -> torch.Tensor:
    """One sequence; ``mask [Lq, Lk]`` (True = attend) or None for plain causal.

    ``router`` serves the plain causal case; padded sequences (whose real lengths differ from
    call to call, so a graph per shape would rarely be replayed) route eagerly."""
    if mask is None:
        selection = router(q, k, cfg, chunk_offsets)
        _record(stats, selection, cfg, k.shape[1])
        return attend(q, k, v, selection, scale)
    query_rows = mask.any(dim=1).nonzero().squeeze(1)
    key_cols = mask.any(dim=0).nonzero().squeeze(1)
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    if query_rows.numel() == 0:
        return out
    if query_rows.numel() > key_cols.numel():
        raise ValueError("attention mask gives more real queries than real keys")
    q_real, k_real, v_real = q[:, query_rows], k[:, key_cols], v[:, key_cols]
    sub_mask = mask[query_rows][:, key_cols]
    selection = route(q_real, k_real, cfg, chunk_offsets)
    _record(stats, selection, cfg, k_real.shape[1])
    out[:, query_rows] = attend(q_real, k_real, v_real, selection, scale, sub_mask)
    return out


def _record(stats: RoutingStats | None, selection: Selection, cfg: DHSAConfig, key_length: int) -> None:
    if stats is not None:
        stats.add(selection, cfg.effective_pattern(key_length))
