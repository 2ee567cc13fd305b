"""The CUDA kernels compile for an Ampere and the Hopper (sm_90a) target with the pinned nvcc, and the
Hopper kernels keep their register budget: no local-memory spills in the TMA producer kernels, whose
speed depends on it (docs/GPU_NOTES.md v9). CPU-only: nothing is run, only compiled (skipped without
nvcc)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dhsa_export.backends.torch_cuda import build

KERNELS = Path(__file__).resolve().parents[2] / "plugins" / "trt" / "kernels"


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory) -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    out = tmp_path_factory.mktemp("kernels") / "dhsa_kernels.o"
    cmd = [nvcc, "-O3", "-std=c++17", "-c", "-Xptxas", "-v", *build.gencode_flags(("80", "90")),
           "-I", str(KERNELS), str(KERNELS / "dhsa_kernels.cu"), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def kernel_reports(report: str, arch: str, pattern: str) -> dict[str, str]:
    """Mangled kernel name -> its ptxas lines, for kernels matching ``pattern`` on ``arch``."""
    found = {}
    blocks = re.split(r"ptxas info\s+: Compiling entry function '", report)
    for block in blocks[1:]:
        name, _, rest = block.partition("'")
        if f"for '{arch}'" in rest.splitlines()[0] and re.search(pattern, name):
            found[name] = rest
    return found


def test_hopper_tma_kernels_do_not_spill(ptxas_report):
    # bsa_wgmma_ws_kernel<T, D, PINGPONG, VAR=false, TMA=true>: mangled ...Lb1ELb0ELb1E...
    tma = kernel_reports(ptxas_report, "sm_90a", r"bsa_wgmma_ws_kernel.*Lb1ELb0ELb1E")
    assert len(tma) == 4, sorted(tma)  # bf16 / fp16 x D 64 / 128
    for name, lines in tma.items():
        assert "0 bytes spill stores" in lines, (name, lines[:400])


def test_ampere_build_has_the_mma_sync_kernels(ptxas_report):
    ampere = kernel_reports(ptxas_report, "sm_80", r"bsa_fwd_kernel")
    assert ampere, "no mma.sync kernels compiled for sm_80"
    assert kernel_reports(ptxas_report, "sm_80", r"bsa_wgmma_ws_kernel"), "sm_80 stubs missing"
