"""Pinned ONNX Runtime C/C++ API headers (the only build dependency of the ORT CPU library).

No PyPI, npm or Debian bookworm package ships them; Debian trixie's ``libonnxruntime-dev``
1.21.0+dfsg-1 (MIT) does. :func:`fetch_headers` downloads that one package with a private apt
configuration (the trixie suite of the Debian mirror already configured on the machine, private
lists and cache; the system's apt state is not touched), checks its sha256 and extracts
``usr/include/onnxruntime`` into the user cache. ``tools/fetch_ort_headers.sh`` is the same
procedure as a shell script.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import DHSAError
from ...paths import cache_root, filled_cache_folder

ORT_HEADERS_PACKAGE = "libonnxruntime-dev"
ORT_HEADERS_VERSION = "1.21.0+dfsg-1"
ORT_HEADERS_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
REQUIRED_API_VERSION = 21
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _header_dir(candidate: Path) -> Path | None:
    """``candidate`` itself or ``candidate/include/onnxruntime`` if it holds onnxruntime_c_api.h."""
    for path in (candidate, candidate / "include" / "onnxruntime", candidate / "onnxruntime"):
        if (path / "onnxruntime_c_api.h").is_file():
            return path
    return None


def api_version(header_dir: Path) -> int:
    """``ORT_API_VERSION`` declared by ``onnxruntime_c_api.h`` in ``header_dir``."""
    text = (header_dir / "onnxruntime_c_api.h").read_text(errors="replace")
    match = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    if not match:
        raise DHSAError(f"{header_dir}/onnxruntime_c_api.h declares no ORT_API_VERSION; fetch the pinned headers again")
    return int(match.group(1))


def fetch_headers(dest: str | Path | None = None) -> Path:
    """Directory holding ``onnxruntime_c_api.h`` (ORT API >= 21), fetching it once if needed.

    ``$DHSA_ORT_HEADERS`` (a directory with the headers, or a prefix with ``include/onnxruntime``)
    wins; otherwise the pinned Debian package is extracted to ``dest`` (default
    ``<cache>/ort-headers/<version>``) on first use.
    """
    override = os.environ.get("DHSA_ORT_HEADERS")
    if override:
        found = _header_dir(Path(override).expanduser())
        if found is None:
            raise DHSAError(
                f"DHSA_ORT_HEADERS={override!r} holds no onnxruntime_c_api.h; point it at the folder that "
                "has it, or unset it to fetch the pinned headers"
            )
        return _checked(found)
    target = Path(dest) if dest is not None else cache_root() / "ort-headers" / ORT_HEADERS_VERSION
    found = _header_dir(target)
    if found is not None:
        return _checked(found)
    with filled_cache_folder(target, lambda folder: _header_dir(folder) is not None) as staging:
        _download_and_extract(staging)
    found = _header_dir(target)
    if found is None:
        raise DHSAError(f"fetching the ONNX Runtime headers left no onnxruntime_c_api.h under {target}")
    return _checked(found)


def _checked(header_dir: Path) -> Path:
    version = api_version(header_dir)
    if version < REQUIRED_API_VERSION:
        raise DHSAError(
            f"ONNX Runtime headers in {header_dir} declare API {version}; the library needs >= "
            f"{REQUIRED_API_VERSION} (ONNX Runtime 1.21); fetch the pinned headers"
        )
    return header_dir


def _debian_mirror() -> str:
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(path.read_text(errors="replace"))
        except OSError:
            continue
    for line in "\n".join(texts).splitlines():
        line = line.strip()
        if "security" in line:
            continue
        if line.startswith("URIs:"):
            return line.split(":", 1)[1].split()[0]
        if line.startswith("deb "):
            parts = [p for p in line.split()[1:] if not p.startswith("[") and not p.endswith("]")]
            if parts:
                return parts[0]
    raise DHSAError(
        "no Debian mirror is configured in /etc/apt/sources.list*; fetch the ONNX Runtime headers by hand "
        "and point DHSA_ORT_HEADERS at them"
    )


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DHSAError(
            f"{cmd[0]} is not installed; the ONNX Runtime headers are fetched with apt-get and dpkg-deb "
            "(Debian/Ubuntu), or set DHSA_ORT_HEADERS to headers you have"
        ) from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DHSAError(f"{' '.join(cmd[:2])} failed while fetching the ONNX Runtime headers: {' | '.join(tail)}")


def _download_and_extract(staging: Path) -> None:
    mirror = _debian_mirror()
    work = Path(tempfile.mkdtemp(prefix="dhsa-ort-apt-"))
    try:
        for sub in ("lists/partial", "cache/archives/partial", "etc/preferences.d"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        (work / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} trixie main\n")
        options = [
            "-o", f"Dir::Etc::SourceList={work / 'sources.list'}", "-o", "Dir::Etc::SourceParts=-",
            "-o", f"Dir::State::Lists={work / 'lists'}", "-o", f"Dir::Cache={work / 'cache'}",
            "-o", f"Dir::Etc::Preferences={work / 'etc' / 'preferences'}",
            "-o", f"Dir::Etc::PreferencesParts={work / 'etc' / 'preferences.d'}",
            "-o", "APT::Architecture=amd64", "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root",
        ]
        _run(["apt-get", *options, "-qq", "update"])
        _run(["apt-get", *options, "-qq", "download", f"{ORT_HEADERS_PACKAGE}={ORT_HEADERS_VERSION}"], cwd=work)
        debs = sorted(work.glob(f"{ORT_HEADERS_PACKAGE}_*.deb"))
        if not debs:
            raise DHSAError(f"apt-get download produced no {ORT_HEADERS_PACKAGE} package")
        digest = hashlib.sha256(debs[0].read_bytes()).hexdigest()
        if digest != ORT_HEADERS_SHA256:
            raise DHSAError(
                f"{debs[0].name} has sha256 {digest}, expected {ORT_HEADERS_SHA256}; refusing to use it"
            )
        _run(["dpkg-deb", "-x", str(debs[0]), str(work / "x")])
        source = work / "x" / "usr" / "include" / "onnxruntime"
        if not (source / "onnxruntime_c_api.h").is_file():
            raise DHSAError(f"{debs[0].name} holds no usr/include/onnxruntime/onnxruntime_c_api.h")
        (staging / "include").mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, staging / "include" / "onnxruntime")
    finally:
        shutil.rmtree(work, ignore_errors=True)
