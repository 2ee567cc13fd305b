"""The one cache folder of the package: converted models, native libraries, fetched headers.

``$DHSA_EXPORT_CACHE`` wins, else ``$XDG_CACHE_HOME/dhsa-export`` (``~/.cache/dhsa-export``). The
compiled CUDA kernels and the TensorRT plugin also honour ``$DHSA_CACHE_DIR`` (the GPU scripts point
it at a folder carried to the GPU machine with prebuilt libraries).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("DHSA_EXPORT_CACHE"):
        return Path(os.environ["DHSA_EXPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dhsa-export"


def native_cache_root() -> Path:
    """Where compiled CUDA kernels and TensorRT plugin builds live (``$DHSA_CACHE_DIR`` first)."""
    return Path(os.environ["DHSA_CACHE_DIR"]) if os.environ.get("DHSA_CACHE_DIR") else cache_root()
