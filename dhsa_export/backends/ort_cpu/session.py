"""ONNX Runtime sessions with the dhsa custom-op library, and what the library says it registers."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

from ...errors import DHSAError
from .build import library_path


def make_session(model: Any, threads: int | None = None, *, library: str | Path | None = None,
                 sanitize: bool | None = None, optimization: str = "all"):
    """An ``onnxruntime.InferenceSession`` (CPU) with ``libdhsa_ort_cpu.so`` registered.

    Args:
        model: path of an ONNX file, serialized bytes, or an ``onnx.ModelProto``.
        threads: intra-op threads of the session (the kernels parallelize on ORT's intra-op pool);
            None keeps ONNX Runtime's default (one per physical core).
        library: an already-built library; by default the cached build for the current sources
            (built on first use; ``DHSA_ORT_SANITIZE=1`` or ``sanitize=True`` picks ASan+UBSan).
        optimization: ``"all"``, ``"extended"``, ``"basic"`` or ``"disable"`` graph optimizations.
    """
    import onnxruntime as ort

    lib = Path(library) if library is not None else library_path(sanitize)
    if not lib.is_file():
        raise DHSAError(f"custom-op library {str(lib)!r} does not exist; build it with build_library()")
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(lib))
    if threads is not None:
        if threads < 1:
            raise DHSAError(f"threads={threads} must be >= 1")
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise DHSAError(f"optimization={optimization!r} is not one of {', '.join(levels)}")
    options.graph_optimization_level = levels[optimization]
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = str(model)
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def run_standard_ops(model: Any, outputs: list[str], feeds: dict) -> list:
    """Run a graph of standard (and com.microsoft) ops only, quietly, without the dhsa library.

    The rewriter evaluates foreign mask subgraphs with it; ONNX Runtime stays inside this package.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def _load(lib: Path) -> ctypes.CDLL:
    handle = ctypes.CDLL(str(lib))
    for name in ("dhsa_ort_contract_json", "dhsa_ort_kernel_isa", "dhsa_ort_version"):
        getattr(handle, name).restype = ctypes.c_char_p
        getattr(handle, name).argtypes = []
    return handle


def registered_contract(library: str | Path | None = None) -> dict:
    """The ops the library registers (domain, version, inputs, outputs, attributes with defaults),
    as returned by its exported ``dhsa_ort_contract_json()``; same layout as
    :func:`dhsa_export.onnx.registry.contract_json`."""
    lib = Path(library) if library is not None else library_path()
    return json.loads(_load(lib).dhsa_ort_contract_json().decode())


def kernel_isa(library: str | Path | None = None) -> str:
    """Instruction set of the kernels a session created now would use (``DHSA_ORT_ISA`` caps it)."""
    lib = Path(library) if library is not None else library_path()
    return _load(lib).dhsa_ort_kernel_isa().decode()
