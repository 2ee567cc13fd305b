"""Artifact folders: manifest.json with versions, DHSA config and the sha256 of every file.

``run`` and ``check`` verify the manifest before they load anything (above all the native
custom-op library: a library whose hash differs from the manifest is never loaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import DHSAError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions(names: tuple[str, ...] = ("torch", "transformers", "onnx", "onnxruntime")) -> dict:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(folder: Path, info: dict) -> dict:
    """Hash every file of ``folder`` (recursively) and write ``manifest.json`` beside them."""
    files = {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST
    }
    manifest = {
        "format": MANIFEST_FORMAT, "tool": "dhsa-export", "tool_version": __version__,
        "versions": package_versions(), **info, "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(folder: Path, verify: bool = True) -> dict:
    """Load ``manifest.json``; with ``verify`` every listed file must exist with its hash."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise DHSAError(f"artifact folder {str(folder)!r} does not exist; build one with 'dhsa-export build -o DIR'")
    if not path.is_file():
        raise DHSAError(f"{str(folder)!r} has no {MANIFEST}; it is not a dhsa-export artifact (rebuild it)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DHSAError(f"{path} is corrupt ({exc.msg if hasattr(exc, 'msg') else exc}); rebuild the artifact") from None
    if manifest.get("format") != MANIFEST_FORMAT or "files" not in manifest:
        raise DHSAError(f"{path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}; rebuild the artifact")
    if verify:
        for name, expected in manifest["files"].items():
            file = folder / name
            if not file.is_file():
                raise DHSAError(f"artifact file {name!r} is missing from {str(folder)!r}; rebuild the artifact")
            actual = sha256_file(file)
            if actual != expected:
                raise DHSAError(
                    f"artifact file {name!r} has sha256 {actual[:16]}..., the manifest says {expected[:16]}...; "
                    "the artifact was modified or truncated: rebuild it"
                )
    return manifest


@contextmanager
def staged_folder(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``target``; rename it into place only on success.

    A failed or interrupted build removes the staging folder, so no half-written artifact
    ever appears under ``target``'s name.
    """
    target = Path(target).resolve()
    if target.exists() and any(target.iterdir()) and not force:
        raise DHSAError(f"output folder {str(target)!r} exists and is not empty; pass --force or another -o")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
    staging.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
    try:
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "artifact")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def require_ort_cpu(folder: Path, manifest: dict, command: str) -> None:
    """``run`` and ``check`` drive ONNX Runtime artifacts; any other backend is one clear error."""
    backend = manifest.get("backend")
    if backend == "ort-cpu":
        return
    if backend == "trt":
        raise DHSAError(
            f"artifact {str(folder)!r} holds TensorRT engines (backend trt); '{command}' drives ONNX Runtime "
            "artifacts in this version (running the engines needs TensorRT on a GPU it supports: "
            "docs/TENSORRT.md); build with --backend ort-cpu to use it here"
        )
    raise DHSAError(f"artifact {str(folder)!r} is for backend {backend!r}; '{command}' needs an ort-cpu artifact")
