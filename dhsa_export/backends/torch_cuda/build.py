"""Build the DHSA CUDA kernel library (``plugins/trt/kernels``) with nvcc into a cache folder.

The folder name carries a hash of everything that changes the binary (sources, nvcc version,
target architectures, flags), so an edited kernel is rebuilt and an unchanged one is loaded as is.
Builds go to a temporary folder renamed into place at the end: an interrupted build leaves nothing
half-written. The same sources build with ``plugins/trt/CMakeLists.txt``.

Architecture 90 is built as sm_90a (``-gencode=arch=compute_90a,code=sm_90a``): the Hopper wgmma
kernels exist only in that target. Command line (no GPU needed, e.g. to pre-build for a GPU machine)::

    python -m dhsa_export.backends.torch_cuda.build --arch 80,86,89,90 [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ...errors import DHSAError
from ...paths import filled_cache_folder

LIBRARY_NAME = "libdhsa_kernels.so"
SOURCE_FILES = ("dhsa_kernels.cu", "block_sparse_attention.cuh", "block_sparse_attention_sm90.cuh",
                "route_kernels.cuh", "chunk_offsets_kernels.cuh", "dhsa_kernels.h")
DEFAULT_ARCHS = ("80", "86", "89", "90")
NVCC_FLAGS = ("-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC", "-lineinfo")


def kernel_source_dir() -> Path:
    """``plugins/trt/kernels`` of this checkout, or ``$DHSA_KERNEL_SOURCES``."""
    env = os.environ.get("DHSA_KERNEL_SOURCES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "plugins" / "trt" / "kernels"


def cache_root() -> Path:
    """``kernels/`` of the native cache (``$DHSA_CACHE_DIR``, else the package cache)."""
    from ...paths import native_cache_root

    return native_cache_root() / "kernels"


def find_nvcc() -> str:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise DHSAError(
        "nvcc was not found (checked $CUDACXX, PATH, $CUDA_HOME, /usr/local/cuda); install the "
        "CUDA toolkit or set CUDACXX to the nvcc binary"
    )


def device_archs() -> tuple[str, ...]:
    """Architectures of the visible CUDA devices (e.g. ``("90",)``), or the default list."""
    try:
        import torch

        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            return tuple(sorted(f"{major}{minor}" for major, minor in caps))
    except Exception:  # noqa: BLE001 - no torch / no driver: fall back to the default list
        pass
    return DEFAULT_ARCHS


def gencode_flags(archs) -> list[str]:
    """nvcc target flags; 90 builds the arch-specific sm_90a target (its wgmma kernels run on compute
    capability 9.0 only, as sm_90 code does; other targets compile those kernels as stubs)."""
    flags = []
    for arch in archs:
        arch = str(arch)
        if not (arch.isdigit() or (arch[:-1].isdigit() and arch.endswith("a"))):
            raise DHSAError(f"CUDA architecture {arch!r} is not a number such as 90; pass e.g. 80,90")
        if arch == "90":
            arch = "90a"
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _nvcc_version(nvcc: str) -> str:
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DHSAError(f"{nvcc} --version failed: {exc}; check the CUDA toolkit installation") from exc


def build_key(archs, nvcc: str, src_dir: Path | None = None) -> str:
    src_dir = src_dir or kernel_source_dir()
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        path = src_dir / name
        if not path.is_file():
            raise DHSAError(
                f"kernel source {path} is missing; set DHSA_KERNEL_SOURCES to the plugins/trt/kernels "
                "folder of a dhsa-export checkout"
            )
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(NVCC_FLAGS).encode())
    digest.update(",".join(archs).encode())
    digest.update(_nvcc_version(nvcc).encode())
    return digest.hexdigest()[:16]


def library_path(archs=None, cache_dir: Path | None = None) -> Path:
    """Where the library for ``archs`` lives (built or not)."""
    archs = tuple(archs or device_archs())
    nvcc = find_nvcc()
    root = cache_dir or cache_root()
    return root / f"dhsa_kernels-sm{'_'.join(archs)}-{build_key(archs, nvcc)}" / LIBRARY_NAME


def build_library(archs=None, cache_dir: Path | None = None, force: bool = False,
                  verbose: bool = False) -> Path:
    """Compile the kernels for ``archs`` (default: the visible GPUs) unless cached; return the .so."""
    archs = tuple(archs or device_archs())
    nvcc = find_nvcc()
    target = library_path(archs, cache_dir)
    if target.is_file() and not force:
        return target
    src_dir = kernel_source_dir()
    with filled_cache_folder(target.parent, lambda folder: (folder / LIBRARY_NAME).is_file()) as tmp:
        cmd = [nvcc, *NVCC_FLAGS, *gencode_flags(archs), "-I", str(src_dir),
               str(src_dir / "dhsa_kernels.cu"), "-o", str(tmp / LIBRARY_NAME)]
        if verbose:
            print(" ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
            raise DHSAError(
                f"nvcc failed ({proc.returncode}) building {src_dir / 'dhsa_kernels.cu'} for sm_"
                f"{','.join(archs)}: " + " | ".join(tail)
            )
        if force:  # the old build goes only once the new one exists
            shutil.rmtree(target.parent, ignore_errors=True)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=None,
                        help="comma-separated compute capabilities (default: visible GPUs, else 80,86,89,90)")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default $DHSA_CACHE_DIR/kernels)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    archs = tuple(a.strip() for a in args.arch.split(",")) if args.arch else None
    path = build_library(archs, Path(args.cache_dir) if args.cache_dir else None, args.force, verbose=True)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
