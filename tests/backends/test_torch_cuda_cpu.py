"""CPU-side checks of the CUDA backend: the ctypes mirror of the C ABI and the benchmark's
FlexAttention conversions (run without a GPU)."""

from __future__ import annotations

import ctypes
import re

import pytest
import torch

from dhsa_export import DHSAConfig
from dhsa_export.algo import block_sparse_attention, route
from dhsa_export.backends.torch_cuda import build, library


def _header() -> str:
    return (build.kernel_source_dir() / "dhsa_kernels.h").read_text()


def test_ctypes_struct_matches_header():
    body = re.search(r"typedef struct DhsaBsaParams \{(.*?)\} DhsaBsaParams;", _header(), re.S).group(1)
    fields = re.findall(r"^\s*(?:const\s+)?(\w+)(\s*\*)?\s*(\w+);", body, re.M)
    assert [name for _, _, name in fields] == [name for name, _ in library.DhsaBsaParams._fields_]
    ctypes_of = {"int32_t": ctypes.c_int32, "float": ctypes.c_float}
    for (ctype, pointer, name), (_, field) in zip(fields, library.DhsaBsaParams._fields_):
        assert field is (ctypes.c_void_p if pointer else ctypes_of[ctype]), name


def test_constants_match_header():
    header = _header()

    def define(name):
        return int(re.search(rf"#define {name} (\d+)", header).group(1))

    assert define("DHSA_ABI_VERSION") == library.ABI_VERSION
    assert define("DHSA_STATUS_INDEX_ERROR") == library.STATUS_INDEX_ERROR
    assert define("DHSA_DTYPE_BF16") == library.DTYPE_BF16
    for name, value in library.VARIANTS.items():
        assert define(f"DHSA_VARIANT_{name.upper().replace('W4', '_W4')}") == value


def test_build_key_tracks_sources(tmp_path, monkeypatch):
    nvcc = pytest.importorskip("shutil").which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    for name in build.SOURCE_FILES:
        (tmp_path / name).write_text((build.kernel_source_dir() / name).read_text())
    key = build.build_key(("90",), nvcc, tmp_path)
    assert key == build.build_key(("90",), nvcc, tmp_path)
    assert key != build.build_key(("80",), nvcc, tmp_path)
    (tmp_path / "dhsa_kernels.cu").write_text("// edited\n")
    assert key != build.build_key(("90",), nvcc, tmp_path)


@pytest.mark.parametrize("routing", ["group", "head"])
def test_flex_conversions_compute_the_selection(routing):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from dhsa_export.bench.attention import selection_to_block_mask, selection_to_block_mask_exact

    gen = torch.Generator().manual_seed(0)
    length, hq, hkv, d = 520, 4, 2, 32
    q, k, v = (torch.randn(1, h, length, d, generator=gen) for h in (hq, hkv, hkv))
    sel = route(q[0], k[0], DHSAConfig(density=0.3, head_routing=routing))
    ref = block_sparse_attention(q[0], k[0], v[0], sel)
    for mask in (selection_to_block_mask(sel, hq, length, length)[0],
                 selection_to_block_mask_exact(sel, hq, length, length)):
        out = flex.flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        assert torch.allclose(out[0], ref, atol=1e-5)
