"""CUDA backend: the kernels of ``plugins/trt/kernels`` built with nvcc on first use (cached by
source hash), loaded with ctypes and exposed as the torch custom op
``torch.ops.dhsa.block_sparse_attention``, and ``dhsa::Route`` / ``dhsa::ChunkOffsets`` in CUDA C++
(:func:`route_cuda`, :func:`chunk_offsets_cuda`).

    from dhsa_export.backends.torch_cuda import dhsa_attention_cuda
    out = dhsa_attention_cuda(q, k, v, DHSAConfig())   # q [B, Hq, L, D], k/v [B, Hkv, L, D] on CUDA

In a transformers model: ``enable_dhsa(model, cfg, backend="torch-cuda")`` (or the default
``"auto"`` on CUDA) routes in torch on the GPU and runs :func:`selection_attention_cuda`.
"""

from .build import build_library, library_path
from .ops import (
    block_sparse_attention_cuda,
    chunk_offsets_cuda,
    dhsa_attention_cuda,
    is_plain_causal,
    launch,
    raise_on_error_flag,
    route_batch,
    route_cuda,
    routing_function,
    selection_attention_cuda,
    selections_to_indices,
    unavailable_reason,
)

__all__ = [
    "block_sparse_attention_cuda", "build_library", "chunk_offsets_cuda", "dhsa_attention_cuda", "is_plain_causal", "launch",
    "library_path", "raise_on_error_flag", "route_batch", "route_cuda", "routing_function", "selection_attention_cuda",
    "selections_to_indices", "unavailable_reason",
]
