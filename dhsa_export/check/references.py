"""Reference implementations of the dhsa ops, by qualified op name, on numpy arrays.

They wrap :mod:`dhsa_export.algo` (the PyTorch reference) with the op contract of
:mod:`dhsa_export.onnx.registry`: batch dimension, int32 index/count tensors, attributes as in the
ONNX node. Native kernels (ORT CPU, CUDA) are tested against these.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..algo.attention import block_sparse_attention, dense_attention
from ..algo.boundaries import similarity_boundaries, threshold_boundaries
from ..algo.layout import BlockGrid, Selection, fixed_offsets
from ..algo.routing import route
from ..onnx.registry import BLOCK_SPARSE_ATTENTION, CHUNK_OFFSETS, ROUTE, config_from_route_attributes


def _offsets(key_chunk_offsets, batch: int, key_length: int, k_block: int) -> torch.Tensor:
    if key_chunk_offsets is None:
        return fixed_offsets(key_length, k_block)
    return torch.as_tensor(np.asarray(key_chunk_offsets[batch]), dtype=torch.long)


def reference_route(query, key, key_chunk_offsets=None, **attrs) -> tuple[np.ndarray, np.ndarray]:
    """``dhsa::Route``: block_index ``[B, Hr, nQ, nC]`` (-1 padded) and block_count ``[B, Hr, nQ]``."""
    q = torch.as_tensor(np.asarray(query, dtype=np.float32))
    k = torch.as_tensor(np.asarray(key, dtype=np.float32))
    _check_lengths(q.shape[2], k.shape[2])
    cfg = config_from_route_attributes(attrs, q.shape[1], k.shape[1])
    indices, counts = [], []
    for b in range(q.shape[0]):
        offsets = None if key_chunk_offsets is None else _offsets(key_chunk_offsets, b, k.shape[2], cfg.k_block)
        selection = route(q[b], k[b], cfg, offsets)
        index, count = selection.to_block_index()
        width = selection.grid.num_chunks
        padded = torch.full((*index.shape[:2], width), -1, dtype=torch.int32)
        padded[..., : index.shape[-1]] = index
        indices.append(padded)
        counts.append(count)
    width = max(i.shape[-1] for i in indices)
    index = torch.full((len(indices), *indices[0].shape[:2], width), -1, dtype=torch.int32)
    for b, item in enumerate(indices):
        index[b, ..., : item.shape[-1]] = item
    return index.numpy(), torch.stack(counts).numpy()


def reference_block_sparse_attention(query, key, value, block_index, block_count,
                                     key_chunk_offsets=None, **attrs) -> np.ndarray:
    """``dhsa::BlockSparseAttention`` in fp32 (validates indices like the native kernels)."""
    values = {**BLOCK_SPARSE_ATTENTION.defaults(), **attrs}
    q = torch.as_tensor(np.asarray(query, dtype=np.float32))
    k = torch.as_tensor(np.asarray(key, dtype=np.float32))
    v = torch.as_tensor(np.asarray(value, dtype=np.float32))
    _check_lengths(q.shape[2], k.shape[2])
    index = np.asarray(block_index)
    count = np.asarray(block_count)
    scale = float(values["scale"]) or None
    causal = bool(int(values["causal"]))
    out = []
    for b in range(q.shape[0]):
        offsets = _offsets(key_chunk_offsets, b, k.shape[2], int(values["k_block"]))
        grid = BlockGrid.build(q.shape[2], offsets, int(values["q_block"]))
        mask = selection_mask(index[b], count[b], grid.num_chunks)
        if mask.shape[1] != grid.num_q_blocks:
            raise ValueError(f"block_index has {mask.shape[1]} query blocks, expected {grid.num_q_blocks}")
        selection = Selection(grid, mask, q.shape[1] // mask.shape[0])
        if causal:
            out.append(block_sparse_attention(q[b], k[b], v[b], selection, scale))
        else:
            out.append(dense_attention(q[b], k[b], v[b], scale, attention_mask=selection.token_mask(q.shape[1], causal=False)))
    return torch.stack(out).numpy()


def reference_chunk_offsets(key, boundary_probs=None, **attrs) -> np.ndarray:
    """``dhsa::ChunkOffsets``: int32 ``[B, nC + 1]``, each row padded with ``L`` to the longest."""
    values = {**CHUNK_OFFSETS.defaults(), **attrs}
    k = torch.as_tensor(np.asarray(key, dtype=np.float32))
    min_chunk, max_chunk = int(values["min_chunk"]), int(values["max_chunk"])
    if boundary_probs is not None:
        probs = torch.as_tensor(np.asarray(boundary_probs, dtype=np.float32))
        if tuple(probs.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"boundary_probs {tuple(probs.shape)} must be [batch, key length]")
    rows = []
    for b in range(k.shape[0]):
        if boundary_probs is None:
            rows.append(similarity_boundaries(k[b], min_chunk, max_chunk, int(values["window"])))
        else:
            rows.append(threshold_boundaries(probs[b], float(values["threshold"]), min_chunk, max_chunk))
    width = max([len(row) for row in rows], default=1)
    out = np.full((k.shape[0], width), k.shape[2], dtype=np.int32)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row.numpy()
    return out


def _check_lengths(query_length: int, key_length: int) -> None:
    """Queries sit at the end of the keys, so there can be no more queries than keys."""
    if query_length > key_length:
        raise ValueError(f"query length {query_length} exceeds key length {key_length}")


def selection_mask(index: np.ndarray, count: np.ndarray, num_chunks: int) -> torch.Tensor:
    """``[Hr, nQ, K]`` index + ``[Hr, nQ]`` count -> boolean ``[Hr, nQ, nC]`` (validated)."""
    if np.any(count < 0) or np.any(count > index.shape[-1]):
        raise ValueError(f"block_count outside [0, {index.shape[-1]}]")
    used = np.arange(index.shape[-1])[None, None, :] < count[..., None]
    if np.any(used & ((index < 0) | (index >= num_chunks))):
        raise ValueError(f"block_index outside [0, {num_chunks})")
    mask = np.zeros((*index.shape[:2], num_chunks), dtype=bool)
    h, i, j = np.nonzero(used)
    mask[h, i, index[h, i, j]] = True
    return torch.from_numpy(mask)


REFERENCES: dict[str, Callable] = {
    ROUTE.qualified_name: reference_route,
    BLOCK_SPARSE_ATTENTION.qualified_name: reference_block_sparse_attention,
    CHUNK_OFFSETS.qualified_name: reference_chunk_offsets,
}
