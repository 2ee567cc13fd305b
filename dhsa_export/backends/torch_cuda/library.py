"""ctypes binding of the C ABI in ``plugins/trt/kernels/dhsa_kernels.h`` (the TensorRT plugin calls
the same functions). Raw pointers and sizes only: no torch here."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from ...errors import DHSAError
from .build import build_library

ABI_VERSION = 4

STATUS_OK = 0
STATUS_INDEX_ERROR = 5

DTYPE_FP16 = 0
DTYPE_BF16 = 1
DTYPE_FP32 = 2  # Route only

# Route's string attributes as the header's enums (DHSA_ROUTE_PATTERN_*, DHSA_ROUTE_CHUNK_SCORE_*).
ROUTE_PATTERNS = {"topk": 0, "ashape": 1, "vslash": 2, "vslash_blockwise": 3, "dynamic": 4}
ROUTE_CHUNK_SCORES = {"mass": 0, "mean": 1}

# "wgmma*": Hopper warpgroup-MMA kernels (compute capability 9.0 with an sm_90a build; "auto" picks
# "wgmma" there); the others are mma.sync kernels for every target (see dhsa_kernels.h).
VARIANTS = {"auto": 0, "m64": 1, "m128": 2, "m128w4": 3, "m256": 4, "wgmma": 5, "wgmma_serial": 6,
            "wgmma_overlap": 7, "wgmma_split": 8, "wgmma_cpasync": 9}


class DhsaBsaParams(ctypes.Structure):
    """Mirror of ``DhsaBsaParams`` (field order and types must match the header)."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("block_index", ctypes.c_void_p),
        ("block_count", ctypes.c_void_p),
        ("key_chunk_offsets", ctypes.c_void_p),
        ("batch", ctypes.c_int32),
        ("num_q_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("num_route_heads", ctypes.c_int32),
        ("q_len", ctypes.c_int32),
        ("k_len", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("index_width", ctypes.c_int32),
        ("num_chunks", ctypes.c_int32),
        ("q_block", ctypes.c_int32),
        ("k_block", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("causal", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("variant", ctypes.c_int32),
    ]


class DhsaRouteParams(ctypes.Structure):
    """Mirror of ``DhsaRouteParams``: buffers and sizes, then the registry's Route attributes in
    registry order under the same names (``pattern`` / ``chunk_score`` as their enum values)."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("key_chunk_offsets", ctypes.c_void_p),
        ("block_index", ctypes.c_void_p),
        ("block_count", ctypes.c_void_p),
        ("batch", ctypes.c_int32),
        ("num_q_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("q_len", ctypes.c_int32),
        ("k_len", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("offsets_width", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("q_block", ctypes.c_int32),
        ("k_block", ctypes.c_int32),
        ("pattern", ctypes.c_int32),
        ("density", ctypes.c_double),
        ("head_group", ctypes.c_int32),
        ("sink_tokens", ctypes.c_int32),
        ("local_tokens", ctypes.c_int32),
        ("instruction_tokens", ctypes.c_int32),
        ("vslash_blockwise_above", ctypes.c_int32),
        ("chunk_score", ctypes.c_int32),
    ]

    # Fields that are not Route attributes (buffers, sizes, element type).
    PROBLEM_FIELDS = ("q", "k", "key_chunk_offsets", "block_index", "block_count", "batch", "num_q_heads",
                      "num_kv_heads", "q_len", "k_len", "head_dim", "offsets_width", "dtype")


class DhsaChunkOffsetsParams(ctypes.Structure):
    """Mirror of ``DhsaChunkOffsetsParams``: buffers and sizes, then the registry's ChunkOffsets
    attributes in registry order under the same names."""

    _fields_ = [
        ("key", ctypes.c_void_p),
        ("boundary_probs", ctypes.c_void_p),
        ("offsets", ctypes.c_void_p),
        ("counts", ctypes.c_void_p),
        ("batch", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("length", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("min_chunk", ctypes.c_int32),
        ("max_chunk", ctypes.c_int32),
        ("window", ctypes.c_int32),
        ("threshold", ctypes.c_double),
    ]

    PROBLEM_FIELDS = ("key", "boundary_probs", "offsets", "counts", "batch", "num_kv_heads", "length",
                      "head_dim", "dtype")


def route_attribute_fields(attrs: dict) -> dict:
    """Route node attributes (registry names) -> the ``DhsaRouteParams`` attribute fields."""
    values = dict(attrs)
    pattern, score = values["pattern"], values["chunk_score"]
    if pattern not in ROUTE_PATTERNS:
        raise DHSAError(f"Route pattern {pattern!r} is unknown to the CUDA kernels; use one of {', '.join(ROUTE_PATTERNS)}")
    if score not in ROUTE_CHUNK_SCORES:
        raise DHSAError(f"Route chunk_score {score!r} is unknown to the CUDA kernels; use one of "
                        f"{', '.join(ROUTE_CHUNK_SCORES)}")
    values["pattern"] = ROUTE_PATTERNS[pattern]
    values["chunk_score"] = ROUTE_CHUNK_SCORES[score]
    values["density"] = float(values["density"])
    return values


_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Load (building on first use) the kernel library; ``$DHSA_KERNEL_LIBRARY`` overrides the path."""
    global _LIB
    with _LOCK:
        if _LIB is not None and path is None:
            return _LIB
        path = path or os.environ.get("DHSA_KERNEL_LIBRARY") or build_library()
        try:
            lib = ctypes.CDLL(str(Path(path)))
        except OSError as exc:
            raise DHSAError(f"cannot load the DHSA kernel library {path}: {exc}; delete it to rebuild") from exc
        lib.dhsa_abi_version.restype = ctypes.c_int
        lib.dhsa_status_string.restype = ctypes.c_char_p
        lib.dhsa_status_string.argtypes = [ctypes.c_int]
        lib.dhsa_last_error_message.restype = ctypes.c_char_p
        lib.dhsa_bsa_workspace_size.restype = ctypes.c_int
        lib.dhsa_bsa_workspace_size.argtypes = [ctypes.POINTER(DhsaBsaParams), ctypes.POINTER(ctypes.c_size_t)]
        lib.dhsa_bsa_forward.restype = ctypes.c_int
        lib.dhsa_bsa_forward.argtypes = [
            ctypes.POINTER(DhsaBsaParams), ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
        ]
        lib.dhsa_bsa_read_error_flag.restype = ctypes.c_int
        lib.dhsa_bsa_read_error_flag.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32)]
        version = lib.dhsa_abi_version()
        if version != ABI_VERSION:
            raise DHSAError(
                f"DHSA kernel library {path} has ABI version {version}, this package needs {ABI_VERSION}; "
                "delete the cached library to rebuild"
            )
        route_params = ctypes.POINTER(DhsaRouteParams)
        lib.dhsa_route_output_shape.restype = ctypes.c_int
        lib.dhsa_route_output_shape.argtypes = [route_params] + [ctypes.POINTER(ctypes.c_int32)] * 3
        lib.dhsa_route_workspace_size.restype = ctypes.c_int
        lib.dhsa_route_workspace_size.argtypes = [route_params, ctypes.POINTER(ctypes.c_size_t)]
        lib.dhsa_route_forward.restype = ctypes.c_int
        lib.dhsa_route_forward.argtypes = [route_params, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.dhsa_route_read_error_flag.restype = ctypes.c_int
        lib.dhsa_route_read_error_flag.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32)]
        chunk_params = ctypes.POINTER(DhsaChunkOffsetsParams)
        lib.dhsa_chunk_offsets_workspace_size.restype = ctypes.c_int
        lib.dhsa_chunk_offsets_workspace_size.argtypes = [chunk_params, ctypes.POINTER(ctypes.c_size_t)]
        lib.dhsa_chunk_offsets_forward.restype = ctypes.c_int
        lib.dhsa_chunk_offsets_forward.argtypes = [chunk_params, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _LIB = lib
        return lib


def check(lib: ctypes.CDLL, status: int, what: str) -> None:
    """Raise :class:`DHSAError` naming the call, the status and the library's message."""
    if status != STATUS_OK:
        name = lib.dhsa_status_string(status).decode()
        message = lib.dhsa_last_error_message().decode()
        raise DHSAError(f"{what} failed: {name} ({status}): {message}")


def _workspace_size(lib: ctypes.CDLL, function: str, params) -> int:
    """Bytes of workspace ``dhsa_<op>_workspace_size`` asks for (raises with the library's message)."""
    size = ctypes.c_size_t(0)
    check(lib, getattr(lib, function)(ctypes.byref(params), ctypes.byref(size)), function)
    return int(size.value)


def _forward(lib: ctypes.CDLL, function: str, params, workspace: int, workspace_bytes: int, stream: int) -> None:
    check(lib, getattr(lib, function)(ctypes.byref(params), workspace, workspace_bytes, stream), function)


def _read_error_flag(lib: ctypes.CDLL, function: str, workspace: int, stream: int, what: str) -> None:
    flag = ctypes.c_int32(0)
    check(lib, getattr(lib, function)(workspace, stream, ctypes.byref(flag)), what)


def workspace_size(lib: ctypes.CDLL, params: DhsaBsaParams) -> int:
    return _workspace_size(lib, "dhsa_bsa_workspace_size", params)


def forward(lib: ctypes.CDLL, params: DhsaBsaParams, workspace: int, workspace_bytes: int, stream: int) -> None:
    _forward(lib, "dhsa_bsa_forward", params, workspace, workspace_bytes, stream)


def read_error_flag(lib: ctypes.CDLL, workspace: int, stream: int) -> None:
    _read_error_flag(lib, "dhsa_bsa_read_error_flag", workspace, stream, "block-sparse attention")


def route_output_shape(lib: ctypes.CDLL, params: DhsaRouteParams) -> tuple[int, int, int]:
    """``(Hr, nQ, nC)`` of Route's outputs (validates the parameters)."""
    hr, nq, nc = ctypes.c_int32(0), ctypes.c_int32(0), ctypes.c_int32(0)
    check(lib, lib.dhsa_route_output_shape(ctypes.byref(params), ctypes.byref(hr), ctypes.byref(nq), ctypes.byref(nc)),
          "dhsa_route_output_shape")
    return hr.value, nq.value, nc.value


def route_workspace_size(lib: ctypes.CDLL, params: DhsaRouteParams) -> int:
    return _workspace_size(lib, "dhsa_route_workspace_size", params)


def route_forward(lib: ctypes.CDLL, params: DhsaRouteParams, workspace: int, workspace_bytes: int, stream: int) -> None:
    _forward(lib, "dhsa_route_forward", params, workspace, workspace_bytes, stream)


def route_read_error_flag(lib: ctypes.CDLL, workspace: int, stream: int) -> None:
    _read_error_flag(lib, "dhsa_route_read_error_flag", workspace, stream, "Route")


def chunk_offsets_workspace_size(lib: ctypes.CDLL, params: DhsaChunkOffsetsParams) -> int:
    return _workspace_size(lib, "dhsa_chunk_offsets_workspace_size", params)


def chunk_offsets_forward(lib: ctypes.CDLL, params: DhsaChunkOffsetsParams, workspace: int, workspace_bytes: int,
                          stream: int) -> None:
    _forward(lib, "dhsa_chunk_offsets_forward", params, workspace, workspace_bytes, stream)
