"""The one cache folder of the package: converted models, native libraries, fetched headers.

``$DHSA_EXPORT_CACHE`` wins, else ``$XDG_CACHE_HOME/dhsa-export`` (``~/.cache/dhsa-export``). The
compiled CUDA kernels and the TensorRT plugin also honour ``$DHSA_CACHE_DIR`` (the GPU scripts point
it at a folder carried to the GPU machine with prebuilt libraries).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def cache_root() -> Path:
    if os.environ.get("DHSA_EXPORT_CACHE"):
        return Path(os.environ["DHSA_EXPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dhsa-export"


def native_cache_root() -> Path:
    """Where compiled CUDA kernels and TensorRT plugin builds live (``$DHSA_CACHE_DIR`` first)."""
    return Path(os.environ["DHSA_CACHE_DIR"]) if os.environ.get("DHSA_CACHE_DIR") else cache_root()


@contextmanager
def filled_cache_folder(target: Path, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """A temporary folder beside ``target`` for the block to fill; renamed to ``target`` when the block
    succeeds. A concurrent fill that won the rename is fine as long as ``complete(target)`` holds; the
    temporary folder never stays behind (nothing half-written lands in the cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        try:
            os.replace(staging, target)
        except OSError:
            if not complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
