"""Block layouts and block selections: the data every routing pattern produces.

One sequence at a time (heads batched). Keys are cut into chunks described by ``chunk_offsets``
(``[0, e_0, e_1, ..., Lk]``): fixed ``k_block`` blocks are the special case of equal chunks, the
``dynamic`` pattern passes predicted variable chunks. Queries are cut into fixed ``q_block`` blocks.
A :class:`Selection` says, per routing head and query block, which chunks are attended; causality
inside a chunk is applied token by token by the attention, so a selection can never leak future keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def fixed_offsets(length: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Offsets ``[0, block, 2 block, ..., length]`` of fixed blocks (the last one may be short).

    Built on ``device`` from an ``arange`` (no host-to-device copy, so no stall on a GPU stream).
    """
    count = -(-length // block)
    return (torch.arange(count + 1, device=device, dtype=torch.long) * block).clamp_(max=length)


def chunk_lengths(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]


def chunk_id_per_token(offsets: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """For every key token, the index of the chunk that holds it.

    Pass ``length`` (= ``offsets[-1]``) when it is known to avoid reading it back from a GPU.
    """
    length = int(offsets[-1]) if length is None else length
    positions = torch.arange(length, device=offsets.device)
    return torch.searchsorted(offsets[1:], positions, right=True)


def equal_block(offsets: torch.Tensor) -> int | None:
    """The block size if ``offsets`` are fixed blocks (a shorter last one allowed), else None.

    Reads the offsets on the host: callers that know the answer (fixed routing) pass it instead.
    """
    lengths = chunk_lengths(offsets)
    if lengths.numel() == 0:
        return 1
    block = int(lengths[0])
    fixed = bool((lengths[:-1] == block).all()) and int(lengths[-1]) <= block
    return block if fixed and block > 0 else None


def _sum_fp32(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """fp32 sum. On CUDA the upcast happens inside the reduction (no fp32 copy of ``x``);
    on the CPU ``x.float()`` is kept, which is a no-op for the fp32 reference inputs."""
    if x.is_cuda:
        return x.sum(dim=dim, keepdim=keepdim, dtype=torch.float32)
    return x.float().sum(dim=dim, keepdim=keepdim)


def fixed_block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 mean of ``x [H, L, D]`` over blocks of ``block`` rows (the last one may be short).

    A reshape and a sum over the whole blocks, plus one sum for the short tail: no padding copy
    and no host synchronization.
    """
    heads, length, dim = x.shape
    whole = length // block
    means = []
    if whole:
        body = x[:, : whole * block].reshape(heads, whole, block, dim)
        means.append(_sum_fp32(body, dim=2) / float(block))
    if length > whole * block:
        means.append(_sum_fp32(x[:, whole * block:], dim=1, keepdim=True) / float(length - whole * block))
    if not means:
        return x.new_zeros(heads, 0, dim, dtype=torch.float32)
    return means[0] if len(means) == 1 else torch.cat(means, dim=1)


def segment_means(x: torch.Tensor, offsets: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """fp32 mean of ``x [H, L, D]`` over each segment of ``offsets``: ``[H, n, D]``.

    Equal segments (fixed blocks, a shorter last one allowed; ``block`` says so without reading
    ``offsets``) are a reshape and a sum; variable chunks use ``index_add_``. Both are one pass
    and, unlike prefix sums, keep fp32 precision at 128K tokens (LLM keys have large means, so
    prefix-sum differences lose digits).
    """
    if block is None:
        block = equal_block(offsets)
    if block is not None:
        return fixed_block_means(x, block)
    lengths = chunk_lengths(offsets)
    sums = x.new_zeros(x.shape[0], lengths.numel(), x.shape[2], dtype=torch.float32)
    sums.index_add_(1, chunk_id_per_token(offsets, x.shape[1]), x.float())
    return sums / lengths.clamp(min=1).to(sums.dtype)[None, :, None]


@dataclass(frozen=True)
class BlockGrid:
    """Geometry shared by all patterns for one sequence: query blocks, key chunks, causality.

    Query ``t`` (0-based among the ``Lq`` queries) sits at key position ``q_offset + t``; in a plain
    prefill ``q_offset == 0`` and ``Lq == Lk``.
    """

    q_offsets: torch.Tensor  # [nQ + 1]
    chunk_offsets: torch.Tensor  # [nC + 1]
    q_offset: int
    # Host copies of sizes the tensors above hold, so that no user has to read them off a GPU.
    query_length: int | None = None
    q_block: int | None = None
    chunk_block: int | None = None  # the key block size when the chunks are fixed blocks
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls, query_length: int, chunk_offsets: torch.Tensor, q_block: int,
        key_length: int | None = None, chunk_block: int | None = None,
    ) -> "BlockGrid":
        """Grid of fixed ``q_block`` query blocks over the key chunks ``chunk_offsets``.

        Fixed-block routing passes ``key_length`` and ``chunk_block`` (host values it already
        has), so building its grid never waits for the GPU; otherwise they are read off
        ``chunk_offsets``.
        """
        if key_length is None:
            key_length = int(chunk_offsets[-1])
        q_offsets = fixed_offsets(query_length, q_block, chunk_offsets.device)
        return cls(q_offsets, chunk_offsets, key_length - query_length, query_length, q_block, chunk_block)

    @property
    def key_length(self) -> int:
        return self.q_offset + self.query_length

    def memo(self, key, make: Callable[[], torch.Tensor]):
        """``make()`` computed once per grid (masks and index tensors that several routing steps
        reuse: each is a handful of small kernels, and launches dominate routing on a GPU).
        Treat the result as read-only."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def num_q_blocks(self) -> int:
        return self.q_offsets.numel() - 1

    @property
    def num_chunks(self) -> int:
        return self.chunk_offsets.numel() - 1

    def q_first_position(self) -> torch.Tensor:
        """Key position of the first query of every query block: ``[nQ]``."""
        return self.q_offsets[:-1] + self.q_offset

    def q_last_position(self) -> torch.Tensor:
        """Key position of the last query of every query block: ``[nQ]``."""
        return self.q_offsets[1:] - 1 + self.q_offset

    def causal(self) -> torch.Tensor:
        """``[nQ, nC]``: chunk holds at least one key some query of the block may see."""
        return self.memo("causal", lambda: self.chunk_offsets[:-1][None, :] <= self.q_last_position()[:, None])

    def diagonal(self) -> torch.Tensor:
        """``[nQ, nC]``: chunks that overlap the query block's own positions (its diagonal band).

        Every query's own key lies in one of them, so forcing them guarantees each row a key.
        """
        starts, ends = self.chunk_offsets[:-1][None, :], self.chunk_offsets[1:][None, :]
        return self.memo("diagonal", lambda: (ends > self.q_first_position()[:, None])
                         & (starts <= self.q_last_position()[:, None]))

    def covering(self, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """``[nQ, nC]``: chunks overlapping key range ``[first[i], last[i]]`` of every query block."""
        starts, ends = self.chunk_offsets[:-1][None, :], self.chunk_offsets[1:][None, :]
        return (ends > first[:, None]) & (starts <= last[:, None]) & self.causal()

    def sink(self, sink_tokens: int) -> torch.Tensor:
        """``[nQ, nC]``: chunks covering the first ``sink_tokens`` keys (at least chunk 0)."""
        return self.memo(("sink", sink_tokens),
                         lambda: (self.chunk_offsets[:-1] < max(1, sink_tokens))[None, :] & self.causal())

    def block_area(self) -> torch.Tensor:
        """``[nQ, nC]`` token pairs a kernel computes for a (query block, chunk) pair."""
        q_len = (self.q_offsets[1:] - self.q_offsets[:-1]).float()
        return q_len[:, None] * chunk_lengths(self.chunk_offsets).float()[None, :]


@dataclass(frozen=True)
class Selection:
    """Chunks attended per routing head and query block for one sequence.

    ``mask`` is ``[Hr, nQ, nC]``; query head ``h`` uses routing head ``h // head_group``.
    ``precomputed`` holds results computed together with the mask (a replayed routing graph,
    see :mod:`dhsa_export.backends.torch_cuda.routing_graph`): ``("block_index", width)`` ->
    ``(block_index, block_count)`` and ``"causal_block_fraction"`` -> 0-dim tensor. They are read,
    never filled, by the methods below, so an eager selection computes them as before.
    """

    grid: BlockGrid
    mask: torch.Tensor
    head_group: int
    precomputed: dict = field(default_factory=dict, compare=False, repr=False)

    def causal_block_fraction(self) -> float:
        """Share of the causal (query block, chunk) area that is computed, in [0, 1].

        This is what the kernels pay for: a selected diagonal block counts whole.
        """
        return float(self.causal_block_fraction_tensor())

    def causal_block_fraction_tensor(self) -> torch.Tensor:
        """:meth:`causal_block_fraction` as a 0-dim tensor on the mask's device (no host sync)."""
        if "causal_block_fraction" in self.precomputed:
            return self.precomputed["causal_block_fraction"]
        area = self.grid.block_area() * self.grid.causal()
        selected = (self.mask.float() * area[None]).sum()
        total = area.sum() * self.mask.shape[0]
        return torch.where(total > 0, selected / total.clamp(min=1e-30), torch.ones_like(total))

    def token_mask(self, num_query_heads: int, causal: bool = True) -> torch.Tensor:
        """Dense ``[Hq, Lq, Lk]`` boolean mask (selection, AND causal unless ``causal=False``)
        for tests, references and small inputs."""
        grid = self.grid
        key_chunk = chunk_id_per_token(grid.chunk_offsets, grid.key_length)
        q_len = grid.query_length
        q_block_of = torch.searchsorted(grid.q_offsets[1:], torch.arange(q_len), right=True)
        routed = self.mask[:, q_block_of][:, :, key_chunk]  # [Hr, Lq, Lk]
        routed = routed.repeat_interleave(self.head_group, dim=0)
        assert routed.shape[0] == num_query_heads
        if not causal:
            return routed
        key_len = grid.key_length
        visible = torch.arange(key_len)[None, :] <= (torch.arange(q_len) + grid.q_offset)[:, None]
        return routed & visible[None]

    def to_block_index(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The op contract's form: ``block_index int32 [Hr, nQ, K]`` (ascending, padded with -1)
        and ``block_count int32 [Hr, nQ]``.

        ``K`` is the largest row count (read back from the device), or ``width`` when given
        (e.g. ``grid.num_chunks``, which always suffices, to keep a GPU stream free of syncs).
        Selected chunk ids are compacted by a prefix count of the mask (no sort).
        """
        if ("block_index", width) in self.precomputed:
            return self.precomputed[("block_index", width)]
        counts = self.mask.sum(-1)
        if width is None:
            width = max(1, int(counts.max()))
        slot = torch.where(self.mask, self.mask.cumsum(-1) - 1, width)  # unselected -> spill column
        chunk_ids = torch.arange(self.grid.num_chunks, device=self.mask.device, dtype=torch.int32)
        index = torch.full((*self.mask.shape[:-1], width + 1), -1, dtype=torch.int32, device=self.mask.device)
        index.scatter_(-1, slot, chunk_ids.expand_as(slot))
        return index[..., :width], counts.to(torch.int32)
