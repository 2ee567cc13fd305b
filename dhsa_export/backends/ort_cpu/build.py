"""Build (once) and locate the native ONNX Runtime CPU custom-op library ``libdhsa_ort_cpu.so``.

The sources live in ``plugins/ort_cpu`` (C++17, CMake). A build is keyed by a hash of those
sources, the build mode (release or ASan+UBSan) and the compiler, and cached under
``<cache>/ort-cpu/<key>/``; a build runs in a temporary folder and is renamed into place at the end,
so an interrupted build never leaves a half-written library behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import DHSAError
from .headers import cache_root, fetch_headers

LIBRARY_NAME = "libdhsa_ort_cpu.so"
SANITIZE_ENV = "DHSA_ORT_SANITIZE"
LIBRARY_ENV = "DHSA_ORT_LIBRARY"


def source_dir() -> Path:
    """``plugins/ort_cpu`` of the source tree (``$DHSA_ORT_CPU_SOURCE`` overrides)."""
    override = os.environ.get("DHSA_ORT_CPU_SOURCE")
    candidates = [Path(override)] if override else []
    candidates.append(Path(__file__).resolve().parents[3] / "plugins" / "ort_cpu")
    for candidate in candidates:
        if (candidate / "CMakeLists.txt").is_file():
            return candidate
    raise DHSAError(
        f"the ORT CPU plugin sources (plugins/ort_cpu/CMakeLists.txt) are not at {candidates[-1]}; "
        "run from a source checkout or set DHSA_ORT_CPU_SOURCE to the plugins/ort_cpu folder"
    )


def sanitize_requested() -> bool:
    """``DHSA_ORT_SANITIZE=1`` selects the ASan+UBSan build wherever no explicit choice is made."""
    return os.environ.get(SANITIZE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _compiler_id() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return compiler
    return f"{compiler}: {out.splitlines()[0] if out else '?'}"


def source_hash(sanitize: bool = False) -> str:
    """Key of a build: the plugin sources, the mode and the compiler."""
    root = source_dir()
    digest = hashlib.sha256()
    files = [root / "CMakeLists.txt", *sorted(p for p in (root / "src").rglob("*") if p.is_file()),
             *sorted(p for p in (root.parent / "common").rglob("*") if p.is_file())]
    for path in files:
        digest.update(str(path.relative_to(root.parent)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update(f"sanitize={bool(sanitize)}\0{_compiler_id()}".encode())
    return digest.hexdigest()[:16]


def _mode(sanitize: bool) -> str:
    return "asan-ubsan" if sanitize else "release"


def cached_library_path(sanitize: bool | None = None) -> Path:
    """Where the cached library for the current sources would be (it may not exist yet)."""
    sanitize = sanitize_requested() if sanitize is None else sanitize
    return cache_root() / "ort-cpu" / f"{source_hash(sanitize)}-{_mode(sanitize)}" / LIBRARY_NAME


def build_library(build_dir: str | Path | None = None, sanitize: bool = False, jobs: int | None = None,
                  verbose: bool = False) -> Path:
    """Build ``libdhsa_ort_cpu.so`` (CMake, Release or ASan+UBSan) and return its path.

    With ``build_dir`` the library is built there (``build_dir/libdhsa_ort_cpu.so``, always
    rebuilt incrementally by CMake); without it the build is cached by source hash and reused.
    """
    if build_dir is None:
        target = cached_library_path(sanitize)
        if target.is_file():
            return target
    else:
        target = Path(build_dir).resolve() / LIBRARY_NAME
    for tool in ("cmake",):
        if shutil.which(tool) is None:
            raise DHSAError(f"{tool} is not installed; install CMake >= 3.18 (apt-get install cmake or pip install cmake)")
    headers = fetch_headers()
    target.parent.mkdir(parents=True, exist_ok=True)
    if build_dir is None:
        tree = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    else:
        tree = target.parent / f"cmake-{_mode(sanitize)}"
        tree.mkdir(parents=True, exist_ok=True)
    log = tree / "build.log"
    try:
        configure = [
            "cmake", "-S", str(source_dir()), "-B", str(tree / "cmake"),
            f"-DCMAKE_BUILD_TYPE={'RelWithDebInfo' if sanitize else 'Release'}",
            f"-DORT_INCLUDE_DIR={headers}", f"-DDHSA_SANITIZE={'ON' if sanitize else 'OFF'}",
        ]
        build = ["cmake", "--build", str(tree / "cmake"), "-j", str(jobs or os.cpu_count() or 2)]
        with open(log, "w") as handle:
            for cmd in (configure, build):
                handle.write("$ " + " ".join(cmd) + "\n")
                handle.flush()
                result = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, check=False)
                if result.returncode != 0:
                    handle.close()
                    kept = target.parent / "build-failed.log"
                    shutil.copy2(log, kept)
                    tail = kept.read_text(errors="replace").strip().splitlines()[-12:]
                    raise DHSAError(
                        f"building the ORT CPU library failed ({' '.join(cmd[:2])}, exit {result.returncode}); "
                        f"log {kept}:\n" + "\n".join(tail)
                    )
        if verbose:
            print(log.read_text(errors="replace"))
        built = tree / "cmake" / LIBRARY_NAME
        if not built.is_file():
            raise DHSAError(f"CMake finished but produced no {LIBRARY_NAME} in {tree / 'cmake'}; see {log}")
        staged = target.parent / f".{LIBRARY_NAME}.{os.getpid()}.tmp"
        shutil.copy2(built, staged)
        os.replace(staged, target)
    finally:
        if build_dir is None:
            shutil.rmtree(tree, ignore_errors=True)
    return target


def library_path(sanitize: bool | None = None) -> Path:
    """The library to load: ``$DHSA_ORT_LIBRARY`` (a prebuilt one) if set, else the build for the
    current sources, built on first use (``DHSA_ORT_SANITIZE`` picks the mode when ``sanitize`` is None)."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise DHSAError(f"{LIBRARY_ENV}={override!r} is not a file; unset it to build the library from source")
        return path
    sanitize = sanitize_requested() if sanitize is None else sanitize
    return build_library(sanitize=sanitize)
