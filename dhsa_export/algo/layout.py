"""Block layouts and block selections: the data every routing pattern produces.

One sequence at a time (heads batched). Keys are cut into chunks described by ``chunk_offsets``
(``[0, e_0, e_1, ..., Lk]``): fixed ``k_block`` blocks are the special case of equal chunks, the
``dynamic`` pattern passes predicted variable chunks. Queries are cut into fixed ``q_block`` blocks.
A :class:`Selection` says, per routing head and query block, which chunks are attended; causality
inside a chunk is applied token by token by the attention, so a selection can never leak future keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def fixed_offsets(length: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Offsets ``[0, block, 2 block, ..., length]`` of fixed blocks (the last one may be short)."""
    offsets = torch.arange(0, length, block, device=device, dtype=torch.long)
    return torch.cat([offsets, torch.tensor([length], device=device, dtype=torch.long)])


def chunk_lengths(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]


def chunk_id_per_token(offsets: torch.Tensor) -> torch.Tensor:
    """For every key token, the index of the chunk that holds it."""
    length = int(offsets[-1])
    positions = torch.arange(length, device=offsets.device)
    return torch.searchsorted(offsets[1:], positions, right=True)


def segment_means(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """fp32 mean of ``x [H, L, D]`` over each segment of ``offsets``: ``[H, n, D]``.

    Equal segments (fixed blocks, a shorter last one allowed) are a reshape and a sum; variable
    chunks use ``index_add_``. Both are one pass and, unlike prefix sums, keep fp32 precision at
    128K tokens (LLM keys have large means, so prefix-sum differences lose digits).
    """
    lengths = chunk_lengths(offsets)
    heads, length, dim = x.shape
    count = lengths.numel()
    block = int(lengths[0]) if count else 1
    if count and bool((lengths[:-1] == block).all()) and int(lengths[-1]) <= block:
        padded = torch.nn.functional.pad(x.float(), (0, 0, 0, count * block - length))
        sums = padded.reshape(heads, count, block, dim).sum(dim=2)
    else:
        sums = x.new_zeros(heads, count, dim, dtype=torch.float32)
        sums.index_add_(1, chunk_id_per_token(offsets), x.float())
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

    @classmethod
    def build(
        cls, query_length: int, chunk_offsets: torch.Tensor, q_block: int
    ) -> "BlockGrid":
        key_length = int(chunk_offsets[-1])
        q_offsets = fixed_offsets(query_length, q_block, chunk_offsets.device)
        return cls(q_offsets, chunk_offsets, key_length - query_length)

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
        return self.chunk_offsets[:-1][None, :] <= self.q_last_position()[:, None]

    def diagonal(self) -> torch.Tensor:
        """``[nQ, nC]``: chunks that overlap the query block's own positions (its diagonal band).

        Every query's own key lies in one of them, so forcing them guarantees each row a key.
        """
        starts, ends = self.chunk_offsets[:-1][None, :], self.chunk_offsets[1:][None, :]
        return (ends > self.q_first_position()[:, None]) & (starts <= self.q_last_position()[:, None])

    def covering(self, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """``[nQ, nC]``: chunks overlapping key range ``[first[i], last[i]]`` of every query block."""
        starts, ends = self.chunk_offsets[:-1][None, :], self.chunk_offsets[1:][None, :]
        return (ends > first[:, None]) & (starts <= last[:, None]) & self.causal()

    def sink(self, sink_tokens: int) -> torch.Tensor:
        """``[nQ, nC]``: chunks covering the first ``sink_tokens`` keys (at least chunk 0)."""
        sink = self.chunk_offsets[:-1] < max(1, sink_tokens)
        return sink[None, :] & self.causal()

    def block_area(self) -> torch.Tensor:
        """``[nQ, nC]`` token pairs a kernel computes for a (query block, chunk) pair."""
        q_len = (self.q_offsets[1:] - self.q_offsets[:-1]).float()
        return q_len[:, None] * chunk_lengths(self.chunk_offsets).float()[None, :]


@dataclass(frozen=True)
class Selection:
    """Chunks attended per routing head and query block for one sequence.

    ``mask`` is ``[Hr, nQ, nC]``; query head ``h`` uses routing head ``h // head_group``.
    """

    grid: BlockGrid
    mask: torch.Tensor
    head_group: int

    def causal_block_fraction(self) -> float:
        """Share of the causal (query block, chunk) area that is computed, in [0, 1].

        This is what the kernels pay for: a selected diagonal block counts whole.
        """
        area = self.grid.block_area() * self.grid.causal()
        selected = (self.mask.float() * area[None]).sum()
        total = area.sum() * self.mask.shape[0]
        return float(selected / total) if total > 0 else 1.0

    def token_mask(self, num_query_heads: int) -> torch.Tensor:
        """Dense ``[Hq, Lq, Lk]`` boolean mask (selection AND causal) for tests and small inputs."""
        grid = self.grid
        key_chunk = chunk_id_per_token(grid.chunk_offsets)
        q_len = int(grid.q_offsets[-1])
        q_block_of = torch.searchsorted(grid.q_offsets[1:], torch.arange(q_len), right=True)
        routed = self.mask[:, q_block_of][:, :, key_chunk]  # [Hr, Lq, Lk]
        routed = routed.repeat_interleave(self.head_group, dim=0)
        assert routed.shape[0] == num_query_heads
        key_len = int(grid.chunk_offsets[-1])
        causal = torch.arange(key_len)[None, :] <= (torch.arange(q_len) + grid.q_offset)[:, None]
        return routed & causal[None]

    def to_block_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The op contract's form: ``block_index int32 [Hr, nQ, K]`` (ascending, padded with -1)
        and ``block_count int32 [Hr, nQ]``."""
        counts = self.mask.sum(-1)
        width = max(1, int(counts.max()))
        chunk_ids = torch.arange(self.grid.num_chunks, device=self.mask.device)
        keyed = torch.where(self.mask, chunk_ids, self.grid.num_chunks + chunk_ids)
        order = keyed.sort(dim=-1).values[..., :width]
        index = torch.where(order < self.grid.num_chunks, order, torch.full_like(order, -1))
        return index.to(torch.int32), counts.to(torch.int32)
