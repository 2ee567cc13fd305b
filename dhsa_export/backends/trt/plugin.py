"""Build the TensorRT plugin library ``libdhsa_trt_plugin.so`` (``plugins/trt/plugin``).

The IPluginV3 glue (a few hundred lines of host C++) is compiled with nvcc's host compiler against
the TensorRT headers (:mod:`.headers`) and linked against the CUDA kernel library that the PyTorch
CUDA backend already builds (:func:`dhsa_export.backends.torch_cuda.build.build_library`, the same
kernels, the same C ABI). Both files land in one cache folder; the plugin finds the kernels next to
itself (``RPATH $ORIGIN``), so the folder is what an artifact ships and what ``trtexec
--dynamicPlugins`` / ``IPluginRegistry::loadLibrary`` loads. No TensorRT library is linked.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ...errors import DHSAError
from ...paths import filled_cache_folder
from .headers import cache_root, fetch_headers

PLUGIN_NAME = "libdhsa_trt_plugin.so"
PLUGIN_SOURCES = ("plugin/fields.cpp", "plugin/op_calls.cpp", "plugin/dhsa_plugins.cpp", "plugin/register.cpp")
PLUGIN_HEADERS = ("plugin/fields.h", "plugin/op_calls.h", "plugin/dhsa_plugins.h", "kernels/dhsa_kernels.h")
COMMON_SOURCES = ("contract.h", "contract.cpp")
HOST_FLAGS = ("-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC,-Wall,-Wextra")


def plugin_source_dir() -> Path:
    """``plugins/trt`` of this checkout (``$DHSA_TRT_PLUGIN_SOURCES`` overrides)."""
    override = os.environ.get("DHSA_TRT_PLUGIN_SOURCES")
    root = Path(override) if override else Path(__file__).resolve().parents[3] / "plugins" / "trt"
    if not (root / PLUGIN_SOURCES[0]).is_file():
        raise DHSAError(
            f"the TensorRT plugin sources ({PLUGIN_SOURCES[0]}) are not under {root}; run from a source "
            "checkout or set DHSA_TRT_PLUGIN_SOURCES to the plugins/trt folder"
        )
    return root


def _build_key(root: Path, headers: Path, kernels: Path, nvcc: str) -> str:
    digest = hashlib.sha256()
    files = [root / name for name in PLUGIN_SOURCES + PLUGIN_HEADERS]
    files += [root.parent / "common" / name for name in COMMON_SOURCES]
    files += [headers / "NvInferVersion.h", headers / "NvInferRuntime.h"]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(str(kernels.resolve()).encode() + b"\0" + nvcc.encode() + b"\0" + " ".join(HOST_FLAGS).encode())
    return digest.hexdigest()[:16]


def build_plugin(kernels_library: str | Path | None = None, archs=None, cache_dir: str | Path | None = None,
                 verbose: bool = False) -> Path:
    """Compile (unless cached) the plugin against ``kernels_library`` (default: the kernels built for
    ``archs``); returns the plugin's path, with ``libdhsa_kernels.so`` beside it."""
    from ..torch_cuda.build import LIBRARY_NAME as KERNELS_NAME
    from ..torch_cuda.build import build_library, find_nvcc

    kernels = Path(kernels_library) if kernels_library else build_library(archs)
    if not kernels.is_file():
        raise DHSAError(f"kernel library {kernels} does not exist; build it with "
                        "python -m dhsa_export.backends.torch_cuda.build")
    root, headers, nvcc = plugin_source_dir(), fetch_headers(), find_nvcc()
    base = Path(cache_dir) if cache_dir else cache_root()
    target = base / "trt-plugin" / _build_key(root, headers, kernels, nvcc) / PLUGIN_NAME
    if target.is_file():
        return target
    with filled_cache_folder(target.parent, lambda folder: (folder / PLUGIN_NAME).is_file()) as tmp:
        shutil.copy2(kernels, tmp / KERNELS_NAME)
        cmd = [nvcc, *HOST_FLAGS, "-isystem", str(headers), "-I", str(root / "plugin"), "-I", str(root / "kernels"),
               "-I", str(root.parent / "common"), *(str(root / s) for s in PLUGIN_SOURCES),
               str(root.parent / "common" / "contract.cpp"), "-o", str(tmp / PLUGIN_NAME),
               "-L", str(tmp), f"-l:{KERNELS_NAME}", "-Xlinker", "-rpath,$ORIGIN"]
        if verbose:
            print(" ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            raise DHSAError(f"building the TensorRT plugin failed (nvcc exit {proc.returncode}): " + " | ".join(tail))
    return target


def _load(plugin: str | Path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(plugin))
    except OSError as exc:
        raise DHSAError(f"cannot load the TensorRT plugin {plugin}: {exc}; rebuild it with build_plugin()") from exc


def plugin_contract(plugin: str | Path) -> dict:
    """The op contract the plugin library implements (compare with the registry's ``contract_json``)."""
    import json

    lib = _load(plugin)
    lib.dhsa_trt_plugin_contract_json.restype = ctypes.c_char_p
    return json.loads(lib.dhsa_trt_plugin_contract_json().decode())


def plugin_creators(plugin: str | Path) -> list[dict]:
    """What the library's creators report: ``{"name", "namespace", "version", "fields": {name: type}}``
    (field types as TensorRT's PluginFieldType numbers: 1 float32, 5 int32, 6 char)."""
    lib = _load(plugin)
    lib.dhsa_trt_plugin_creators.restype = ctypes.c_char_p
    creators = []
    for line in lib.dhsa_trt_plugin_creators().decode().splitlines():
        qualified, version, *fields = line.split()
        namespace, _, name = qualified.partition("::")
        creators.append({"name": name, "namespace": namespace, "version": version,
                         "fields": {f.split(":")[0]: int(f.split(":")[1]) for f in fields}})
    return creators
