"""TensorRT C++ headers to compile the plugin against.

A user builds against the TensorRT they deploy with: ``$TENSORRT_ROOT/include`` (or
``$DHSA_TRT_HEADERS``, a folder holding ``NvInfer.h``). Without either, the pinned headers of
TensorRT 10.14 that the ``kernel-lens`` wheel carries (MIT-licensed package; NVIDIA's headers,
Apache-2.0) are fetched once with ``pip download --no-deps``, checked against their sha256 and
unpacked into the cache; the package itself is never installed (it would pull torch and triton).
Only the headers are used: the plugin links no TensorRT library. Built against them it loads into
TensorRT-RTX 1.7 (tested here); TensorRT 10.x/11.x share the IPluginV3 interfaces, but no full
TensorRT could be installed here to try it (docs/TENSORRT.md).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ...errors import DHSAError
from ...paths import filled_cache_folder
from ...paths import native_cache_root as cache_root

HEADERS_PACKAGE = "kernel-lens"
HEADERS_VERSION = "2.0.1"
HEADERS_WHEEL = "kernel_lens-2.0.1-py3-none-any.whl"
HEADERS_SHA256 = "07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
HEADERS_PREFIX = "kernel_lens/include/tensorrt/"
REQUIRED_HEADERS = ("NvInfer.h", "NvInferRuntime.h", "NvInferPluginBase.h", "NvInferRuntimePlugin.h")


def _has_headers(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_HEADERS)


def fetch_headers(dest: str | Path | None = None) -> Path:
    """Folder holding ``NvInfer.h`` and the plugin interface headers, fetching the pinned ones once."""
    for variable, suffix in (("DHSA_TRT_HEADERS", ""), ("TENSORRT_ROOT", "include")):
        value = os.environ.get(variable)
        if not value:
            continue
        folder = Path(value).expanduser() / suffix
        if not _has_headers(folder):
            raise DHSAError(
                f"{variable}={value!r}: {folder} lacks {', '.join(REQUIRED_HEADERS)}; point it at a TensorRT "
                "installation (its include folder) or unset it to use the pinned headers"
            )
        return folder
    target = Path(dest) if dest is not None else cache_root() / "trt-headers" / f"{HEADERS_PACKAGE}-{HEADERS_VERSION}"
    if _has_headers(target):
        return target
    with tempfile.TemporaryDirectory(prefix="dhsa-trt-headers-") as download, \
            filled_cache_folder(target, _has_headers) as staging:
        _extract_headers(_download_wheel(Path(download)), staging)
    return target


def _download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           "-d", str(folder), f"{HEADERS_PACKAGE}=={HEADERS_VERSION}"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = folder / HEADERS_WHEEL
    if result.returncode != 0 or not wheel.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DHSAError(
            f"downloading the pinned TensorRT headers ({HEADERS_PACKAGE}=={HEADERS_VERSION}) failed: "
            f"{' | '.join(tail) or 'no wheel'}; set TENSORRT_ROOT to a TensorRT installation instead"
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != HEADERS_SHA256:
        raise DHSAError(
            f"{HEADERS_WHEEL} has sha256 {digest}, expected {HEADERS_SHA256}; refusing it (set TENSORRT_ROOT "
            "to a TensorRT installation instead)"
        )
    return wheel


def _extract_headers(wheel: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith(HEADERS_PREFIX) and name.endswith(".h") and "/" not in name[len(HEADERS_PREFIX):]:
                (folder / name[len(HEADERS_PREFIX):]).write_bytes(archive.read(name))
    if not _has_headers(folder):
        raise DHSAError(f"{HEADERS_WHEEL} held no {', '.join(REQUIRED_HEADERS)} under {HEADERS_PREFIX}")
