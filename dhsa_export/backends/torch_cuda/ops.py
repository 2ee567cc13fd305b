"""PyTorch front of the CUDA kernels: the ``dhsa::block_sparse_attention`` custom op,
:func:`route_cuda` (``dhsa::Route`` in CUDA C++, the kernels a TensorRT plugin runs) and
:func:`dhsa_attention_cuda` (routing with :mod:`dhsa_export.algo.routing` on the GPU + the kernel).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ...algo.layout import Selection
from ...algo.routing import route
from ...config import DHSAConfig
from ...errors import DHSAError
from . import library

_DTYPES = {torch.float16: library.DTYPE_FP16, torch.bfloat16: library.DTYPE_BF16}
_ROUTE_DTYPES = {**_DTYPES, torch.float32: library.DTYPE_FP32}


def _variant() -> int:
    name = os.environ.get("DHSA_CUDA_VARIANT", "auto").lower()
    if name not in library.VARIANTS:
        raise DHSAError(f"DHSA_CUDA_VARIANT={name!r} unknown; use one of {', '.join(library.VARIANTS)}")
    return library.VARIANTS[name]


def _check_4d_cuda(tensors, dtypes, who: str, dtype_names: str) -> None:
    """Every ``(name, tensor)`` a 4-D CUDA tensor of one of ``dtypes`` (messages name ``who``)."""
    for name, t in tensors:
        if not t.is_cuda:
            raise DHSAError(f"{name} is on {t.device}; {who} needs CUDA tensors")
        if t.dim() != 4:
            raise DHSAError(f"{name} has shape {tuple(t.shape)}; expected [B, H, L, D]")
        if t.dtype not in dtypes:
            raise DHSAError(f"{name} has dtype {t.dtype}; {who} takes {dtype_names}")


def _check_inputs(q, k, v, block_index, block_count, key_chunk_offsets, q_block, k_block):
    _check_4d_cuda((("q", q), ("k", k), ("v", v)), _DTYPES, "the CUDA kernel", "float16 or bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise DHSAError(f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if not (q.device == k.device == v.device == block_index.device == block_count.device):
        raise DHSAError("q, k, v, block_index and block_count must be on the same CUDA device")
    b, hq, lq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise DHSAError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if block_index.dim() != 4 or block_index.dtype != torch.int32:
        raise DHSAError(f"block_index must be int32 [B, Hr, nQ, K], got {block_index.dtype} {tuple(block_index.shape)}")
    n_q = math.ceil(lq / q_block)
    if block_index.shape[0] != b or block_index.shape[2] != n_q:
        raise DHSAError(
            f"block_index {tuple(block_index.shape)} does not match B={b}, nQ=ceil({lq}/{q_block})={n_q}"
        )
    if block_count.dtype != torch.int32 or tuple(block_count.shape) != tuple(block_index.shape[:3]):
        raise DHSAError(
            f"block_count must be int32 {tuple(block_index.shape[:3])}, got {block_count.dtype} "
            f"{tuple(block_count.shape)}"
        )
    if key_chunk_offsets is not None:
        if key_chunk_offsets.dtype != torch.int32 or key_chunk_offsets.dim() != 2 or key_chunk_offsets.shape[0] != b:
            raise DHSAError(
                f"key_chunk_offsets must be int32 [B, nC + 1], got {key_chunk_offsets.dtype} "
                f"{tuple(key_chunk_offsets.shape)}"
            )
        if key_chunk_offsets.device != q.device:
            raise DHSAError("key_chunk_offsets must be on the same CUDA device as q")


def launch(q, k, v, block_index, block_count, key_chunk_offsets=None, q_block=128, k_block=32,
           scale=None, causal=True, variant=None, out=None):
    """Run the kernel (asynchronously, on the current stream). Returns ``(out, workspace)``.

    The workspace's first int32 is the device error flag; :func:`raise_on_error_flag` reads it.
    ``out`` (optional, contiguous, like ``q``) receives the result; tests pass a poisoned one.
    """
    _check_inputs(q, k, v, block_index, block_count, key_chunk_offsets, q_block, k_block)
    lib = library.load_library()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    block_index, block_count = block_index.contiguous(), block_count.contiguous()
    if key_chunk_offsets is not None:
        key_chunk_offsets = key_chunk_offsets.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise DHSAError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    b, hq, lq, d = q.shape
    params = library.DhsaBsaParams(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
        block_index=block_index.data_ptr(), block_count=block_count.data_ptr(),
        key_chunk_offsets=key_chunk_offsets.data_ptr() if key_chunk_offsets is not None else None,
        batch=b, num_q_heads=hq, num_kv_heads=k.shape[1], num_route_heads=block_index.shape[1],
        q_len=lq, k_len=k.shape[2], head_dim=d, index_width=block_index.shape[3],
        num_chunks=(key_chunk_offsets.shape[1] - 1) if key_chunk_offsets is not None else 0,
        q_block=q_block, k_block=k_block,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(d),
        causal=int(bool(causal)), dtype=_DTYPES[q.dtype],
        variant=_variant() if variant is None else int(variant),
    )
    nbytes = library.workspace_size(lib, params)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        library.forward(lib, params, workspace.data_ptr(), nbytes, stream)
    return out, workspace


def raise_on_error_flag(workspace: torch.Tensor) -> None:
    """Synchronize the current stream and raise :class:`DHSAError` if the kernel flagged bad indices."""
    lib = library.load_library()
    with torch.cuda.device(workspace.device):
        library.read_error_flag(lib, workspace.data_ptr(), torch.cuda.current_stream(workspace.device).cuda_stream)


@torch.library.custom_op("dhsa::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    key_chunk_offsets: Optional[torch.Tensor] = None,
    q_block: int = 128,
    k_block: int = 32,
    scale: float = 0.0,
    causal: bool = True,
    check: bool = True,
) -> torch.Tensor:
    """``dhsa::BlockSparseAttention`` on CUDA. ``scale`` 0 means ``1/sqrt(D)``; with ``check`` the
    call synchronizes and raises on bad indices (without it, bad rows silently give zeros)."""
    out, workspace = launch(q, k, v, block_index, block_count, key_chunk_offsets, q_block, k_block,
                            scale if scale > 0 else None, causal)
    if check:
        raise_on_error_flag(workspace)
    return out


@block_sparse_attention_op.register_fake
def _(q, k, v, block_index, block_count, key_chunk_offsets=None, q_block=128, k_block=32, scale=0.0,
      causal=True, check=True):
    return torch.empty_like(q)


def block_sparse_attention_cuda(q, k, v, block_index, block_count, key_chunk_offsets=None, *,
                                q_block=128, k_block=32, scale=None, causal=True, check=True):
    """``q [B, Hq, Lq, D]``, ``k/v [B, Hkv, Lk, D]`` + the op contract's indices -> ``[B, Hq, Lq, D]``."""
    return torch.ops.dhsa.block_sparse_attention(
        q, k, v, block_index, block_count, key_chunk_offsets, q_block, k_block,
        float(scale) if scale is not None else 0.0, causal, check,
    )


def route_params(q: torch.Tensor, k: torch.Tensor, attrs: dict,
                 key_chunk_offsets: torch.Tensor | None = None) -> "library.DhsaRouteParams":
    """``DhsaRouteParams`` for ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` and Route node attributes
    (registry names, e.g. :func:`dhsa_export.onnx.registry.route_attributes`); output pointers unset."""
    from ...onnx.registry import ROUTE

    values = library.route_attribute_fields({**ROUTE.defaults(), **attrs})
    b, hq, lq, d = q.shape
    return library.DhsaRouteParams(
        q=q.data_ptr(), k=k.data_ptr(),
        key_chunk_offsets=key_chunk_offsets.data_ptr() if key_chunk_offsets is not None else None,
        block_index=None, block_count=None, batch=b, num_q_heads=hq, num_kv_heads=k.shape[1], q_len=lq,
        k_len=k.shape[2], head_dim=d,
        offsets_width=key_chunk_offsets.shape[1] if key_chunk_offsets is not None else 0,
        dtype=_ROUTE_DTYPES[q.dtype], **{name: values[name] for name in (a.name for a in ROUTE.attributes)},
    )


def route_cuda(q: torch.Tensor, k: torch.Tensor, cfg: DHSAConfig | dict,
               chunk_offsets: torch.Tensor | None = None, check: bool = True):
    """``dhsa::Route`` with the CUDA C++ kernels (``plugins/trt/kernels/route_kernels.cuh``).

    ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` (CUDA, fp16 / bf16 / fp32, same dtype), ``cfg`` a
    :class:`DHSAConfig` or Route node attributes; ``chunk_offsets`` ``[B, nC + 1]`` (or ``[nC + 1]``)
    variable chunks for ``dynamic``. Returns ``(block_index int32 [B, Hr, nQ, nC], block_count int32
    [B, Hr, nQ])``, as :func:`dhsa_export.algo.routing.route` + ``to_block_index(nC)`` per sequence.
    With ``check`` the call synchronizes and raises on offsets the device rejected.
    """
    from ...onnx.registry import route_attributes

    _check_4d_cuda((("q", q), ("k", k)), _ROUTE_DTYPES, "route_cuda", "float16, bfloat16 or float32")
    if q.dtype != k.dtype:
        raise DHSAError(f"q and k dtypes differ ({q.dtype}, {k.dtype}); cast them to one")
    if q.device != k.device:
        raise DHSAError(f"q is on {q.device}, k on {k.device}; put them on one CUDA device")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise DHSAError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch and head_dim must agree)")
    attrs = route_attributes(cfg, q.shape[1], k.shape[1]) if isinstance(cfg, DHSAConfig) else dict(cfg)
    if chunk_offsets is not None:
        if chunk_offsets.dim() == 1:
            chunk_offsets = chunk_offsets[None].expand(q.shape[0], -1)
        if chunk_offsets.dim() != 2 or chunk_offsets.shape[0] != q.shape[0]:
            raise DHSAError(f"chunk_offsets has shape {tuple(chunk_offsets.shape)}; expected [B={q.shape[0]}, nC + 1]")
        chunk_offsets = chunk_offsets.to(device=q.device, dtype=torch.int32).contiguous()
    q, k = q.contiguous(), k.contiguous()
    lib = library.load_library()
    params = route_params(q, k, attrs, chunk_offsets)
    hr, nq, nc = library.route_output_shape(lib, params)
    block_index = torch.empty(q.shape[0], hr, nq, nc, dtype=torch.int32, device=q.device)
    block_count = torch.empty(q.shape[0], hr, nq, dtype=torch.int32, device=q.device)
    params.block_index, params.block_count = block_index.data_ptr(), block_count.data_ptr()
    nbytes = library.route_workspace_size(lib, params)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        library.route_forward(lib, params, workspace.data_ptr(), nbytes, stream)
        if check:
            library.route_read_error_flag(lib, workspace.data_ptr(), stream)
    return block_index, block_count


def chunk_offsets_params(key: torch.Tensor, boundary_probs: torch.Tensor | None, attrs: dict
                         ) -> "library.DhsaChunkOffsetsParams":
    """``DhsaChunkOffsetsParams`` for ``key [B, Hkv, L, D]``, optional float32 ``boundary_probs [B, L]``
    and ChunkOffsets node attributes (registry names); output pointers unset."""
    from ...onnx.registry import CHUNK_OFFSETS

    values = {**CHUNK_OFFSETS.defaults(), **attrs}
    b, hkv, length, d = key.shape
    return library.DhsaChunkOffsetsParams(
        key=key.data_ptr(), boundary_probs=boundary_probs.data_ptr() if boundary_probs is not None else None,
        batch=b, num_kv_heads=hkv, length=length, head_dim=d, dtype=_ROUTE_DTYPES[key.dtype],
        **{a.name: values[a.name] for a in CHUNK_OFFSETS.attributes},
    )


def chunk_offsets_cuda(key: torch.Tensor, boundary_probs: torch.Tensor | None = None, **attrs) -> torch.Tensor:
    """``dhsa::ChunkOffsets`` with the CUDA C++ kernels (``plugins/trt/kernels/chunk_offsets_kernels.cuh``).

    ``key [B, Hkv, L, D]`` (CUDA, fp16 / bf16 / fp32) layer-0 key states; ``boundary_probs [B, L]`` the
    predictor's probabilities (None: the similarity rule); ``attrs`` ChunkOffsets node attributes
    (registry defaults otherwise). Returns int32 ``[B, nC + 1]``, rows padded with ``L`` to the
    longest, as :func:`dhsa_export.check.references.reference_chunk_offsets`. Synchronizes once (the
    width is data dependent).
    """
    _check_4d_cuda((("key", key),), _ROUTE_DTYPES, "chunk_offsets_cuda", "float16, bfloat16 or float32")
    b, _, length, _ = key.shape
    if boundary_probs is not None:
        if tuple(boundary_probs.shape) != (b, length):
            raise DHSAError(f"boundary_probs has shape {tuple(boundary_probs.shape)}; expected [B={b}, L={length}]")
        boundary_probs = boundary_probs.to(device=key.device, dtype=torch.float32).contiguous()
    key = key.contiguous()
    lib = library.load_library()
    params = chunk_offsets_params(key, boundary_probs, attrs)
    offsets = torch.empty(b, length + 1, dtype=torch.int32, device=key.device)
    counts = torch.empty(b, dtype=torch.int32, device=key.device)
    params.offsets, params.counts = offsets.data_ptr(), counts.data_ptr()
    nbytes = library.chunk_offsets_workspace_size(lib, params)
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=key.device)
    with torch.cuda.device(key.device):
        stream = torch.cuda.current_stream(key.device).cuda_stream
        library.chunk_offsets_forward(lib, params, workspace.data_ptr(), nbytes, stream)
    width = int(counts.max())
    return offsets[:, :width].contiguous()


def selections_to_indices(selections: list[Selection], variable: bool):
    """Stack per-sequence selections into the op's ``block_index [B, Hr, nQ, K]`` (padded -1),
    ``block_count [B, Hr, nQ]`` and, when ``variable``, ``key_chunk_offsets [B, nC + 1]``.

    ``K`` is the largest chunk count (always enough, and known on the host), so nothing is read
    back from the GPU: routing and attention queue up without a synchronization.
    """
    width = max(1, max(s.grid.num_chunks for s in selections))
    pairs = [s.to_block_index(width) for s in selections]  # same Lq, same width: shapes agree
    index = torch.stack([i for i, _ in pairs])
    count = torch.stack([c for _, c in pairs])
    offsets = None
    if variable:
        n_chunks = max(s.grid.num_chunks for s in selections)
        rows = []
        for s in selections:
            off = s.grid.chunk_offsets.to(torch.int32)
            rows.append(torch.cat([off, off[-1:].expand(n_chunks - s.grid.num_chunks)]))
        offsets = torch.stack(rows)
    return index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous(), offsets


def is_variable(selection: Selection) -> bool:
    """Whether the selection's key chunks are variable (``key_chunk_offsets`` must be passed)."""
    return selection.grid.chunk_block is None


def routing_function(graphs=None):
    """The per-sequence router with :func:`dhsa_export.algo.routing.route`'s signature:
    replayed from CUDA graphs through ``graphs`` (a :class:`.routing_graph.RoutingGraphCache`;
    None = the shared default cache), or plain eager ``route`` when ``graphs`` is False."""
    if graphs is False:
        return route
    from . import routing_graph

    return (graphs if graphs is not None else routing_graph.default_cache()).route


def route_batch(q, k, cfg: DHSAConfig, chunk_offsets=None, graphs=None) -> tuple[list[Selection], bool]:
    """Route every sequence of ``q [B, Hq, Lq, D]`` / ``k [B, Hkv, Lk, D]`` on its own device
    (fixed-block patterns on CUDA replayed from CUDA graphs, see :func:`routing_function`).

    Returns the selections and whether their chunks are variable (known from the routing, no
    comparison of offsets on the device).
    """
    router = routing_function(graphs)
    selections = []
    for b in range(q.shape[0]):
        offsets = chunk_offsets[b] if chunk_offsets is not None else None
        selections.append(router(q[b], k[b], cfg, offsets))
    return selections, any(is_variable(s) for s in selections)


def dhsa_attention_cuda(q, k, v, cfg: DHSAConfig, scale=None, chunk_offsets=None, stats=None,
                        return_selections=False, graphs=None):
    """DHSA prefill on CUDA for ``[B, H, L, D]`` batches without padding: routing (torch, on the
    GPU; ``graphs`` as in :func:`routing_function`) + the block-sparse kernel. A single query
    (decode) is dense, as in the reference."""
    if q.shape[-2] == 1:
        from ...algo.attention import dense_attention

        out = dense_attention(q, k, v, scale)
        return (out, []) if return_selections else out
    selections, variable = route_batch(q, k, cfg, chunk_offsets, graphs)
    if stats is not None:
        for s in selections:
            stats.add(s, cfg.effective_pattern(k.shape[2]))
    index, count, offsets = selections_to_indices(selections, variable)
    out = block_sparse_attention_cuda(q, k, v, index, count, offsets, q_block=cfg.q_block,
                                      k_block=cfg.k_block, scale=scale, causal=True)
    return (out, selections) if return_selections else out


def unavailable_reason(device, dtype: torch.dtype | None = None) -> str | None:
    """Why the CUDA kernel cannot serve tensors on ``device`` of ``dtype``, or None if it can.

    Loads (building on first use, see :mod:`.build`) the kernel library; a failure to build or
    load is a reason, not an exception, so callers can fall back to the reference.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"the tensors are on {device}; the kernel needs CUDA tensors"
    if not torch.cuda.is_available():
        return "CUDA is not available to this PyTorch"
    if dtype is not None and dtype not in _DTYPES:
        return f"dtype {dtype}: the kernel takes float16 or bfloat16"
    try:
        library.load_library()
    except DHSAError as exc:
        return str(exc)
    return None


def is_plain_causal(mask: torch.Tensor) -> bool:
    """Whether a boolean ``[Lq, Lk]`` mask is exactly causal with the queries at the end of the keys."""
    lq, lk = mask.shape
    rows = torch.arange(lq, device=mask.device)[:, None] + (lk - lq)
    return bool(torch.equal(mask, torch.arange(lk, device=mask.device)[None, :] <= rows))


def selection_attention_cuda(q, k, v, selection: Selection, scale=None, extra_mask=None):
    """One sequence (``q [Hq, Lq, D]``, ``k/v [Hkv, Lk, D]``) restricted to ``selection`` with the
    CUDA kernel: the same contract as :func:`dhsa_export.algo.attention.block_sparse_attention`,
    which the transformers integration calls through ``backend="torch-cuda"``.

    ``extra_mask`` (padded batches) must be the plain causal mask of the real tokens; any other
    mask (e.g. a sliding window) goes to the reference implementation, which applies it. The
    kernel's index check is skipped (``check=False``: the indices come from routing and are
    valid by construction), so nothing synchronizes the stream.
    """
    if extra_mask is not None and not is_plain_causal(extra_mask):
        from ...algo.attention import block_sparse_attention

        return block_sparse_attention(q, k, v, selection, scale, extra_mask)
    grid = selection.grid
    index, count = selection.to_block_index(max(1, grid.num_chunks))
    offsets = grid.chunk_offsets.to(torch.int32)[None] if is_variable(selection) else None
    q_block = grid.q_block or int(grid.q_offsets[1] - grid.q_offsets[0])
    out = block_sparse_attention_cuda(
        q[None], k[None], v[None], index[None], count[None], offsets,
        q_block=q_block, k_block=grid.chunk_block or 1, scale=scale, causal=True, check=False,
    )
    return out[0]
