"""ONNX Runtime CPU backend: the native ``dhsa`` custom-op library and sessions that use it.

- :func:`build_library` builds ``plugins/ort_cpu`` (CMake; Release or ASan+UBSan) against the pinned
  ONNX Runtime 1.21 headers (:func:`fetch_headers`), cached by source hash.
- :func:`library_path` is the cached library for the current sources (built on first use).
- :func:`make_session` opens an ``onnxruntime.InferenceSession`` with the library registered.
- :func:`registered_contract` is what the library registers, to compare with
  :func:`dhsa_export.onnx.registry.contract_json`.

Environment: ``DHSA_ORT_SANITIZE=1`` selects the ASan+UBSan build, ``DHSA_ORT_LIBRARY`` a prebuilt
library, ``DHSA_ORT_HEADERS`` headers you already have, ``DHSA_ORT_NUM_THREADS`` private kernel
threads instead of ONNX Runtime's intra-op pool, ``DHSA_ORT_ISA=generic|avx2|avx512`` caps the kernel
instruction set. onnxruntime itself is imported only inside :func:`make_session`.
"""

from __future__ import annotations

from .build import build_library, cached_library_path, library_path, sanitize_requested, source_dir, source_hash
from .headers import fetch_headers
from .session import kernel_isa, make_session, registered_contract

__all__ = [
    "build_library", "cached_library_path", "fetch_headers", "kernel_isa", "library_path", "make_session",
    "registered_contract", "sanitize_requested", "source_dir", "source_hash",
]
