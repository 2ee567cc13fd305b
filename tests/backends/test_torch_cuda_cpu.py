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


def test_gencode_builds_sm90a_for_90():
    flags = build.gencode_flags(("80", "90"))
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    assert build.gencode_flags(("90a",)) == ["-gencode=arch=compute_90a,code=sm_90a"]
    with pytest.raises(Exception, match="not a number"):
        build.gencode_flags(("sm90",))


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


# ------------------------------------------------------------------------------------------------
# Backend choice of the transformers integration (no GPU needed)
# ------------------------------------------------------------------------------------------------

def test_select_backend_on_cpu():
    from dhsa_export import DHSAError
    from dhsa_export.hf.attention import select_backend

    assert select_backend("cpu") == "torch-gather"
    assert select_backend("cpu", "reference") == "reference"
    assert select_backend(torch.device("cpu"), "auto", torch.bfloat16) == "torch-gather"
    with pytest.raises(DHSAError, match="needs a CUDA device"):
        select_backend("cpu", "torch-cuda")
    with pytest.raises(DHSAError, match="unknown DHSA backend"):
        select_backend("cpu", "cuda")


def test_enable_dhsa_resolves_the_backend_on_cpu():
    from transformers import AutoConfig, AutoModelForCausalLM

    from dhsa_export import DHSAError
    from dhsa_export.hf.attention import enable_dhsa

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    model = AutoModelForCausalLM.from_config(config).eval()
    runtime = enable_dhsa(model, DHSAConfig(q_block=32, k_block=8))
    assert (runtime.requested_backend, runtime.backend) == ("auto", "torch-gather")
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 70)))
    assert runtime.backend == "torch-gather" and runtime.stats.calls == 1
    with pytest.raises(DHSAError, match="torch-cuda"):
        enable_dhsa(model, DHSAConfig(), backend="torch-cuda")


def test_block_index_without_sort_matches_sorted_form():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 300, 16, generator=gen), torch.randn(2, 300, 16, generator=gen)
    sel = route(q, k, DHSAConfig(density=0.2, q_block=64, k_block=16, pattern="topk"))
    index, count = sel.to_block_index()
    wide, wide_count = sel.to_block_index(sel.grid.num_chunks)
    assert torch.equal(count, wide_count) and wide.shape[-1] == sel.grid.num_chunks
    assert torch.equal(wide[..., : index.shape[-1]], index)
    assert bool((wide[..., index.shape[-1]:] == -1).all())
    chunk_ids = torch.arange(sel.grid.num_chunks)
    keyed = torch.where(sel.mask, chunk_ids, sel.grid.num_chunks + chunk_ids).sort(-1).values
    expected = torch.where(keyed < sel.grid.num_chunks, keyed, -1)[..., : index.shape[-1]]
    assert torch.equal(index.long(), expected)


def test_routing_stats_read_back_lazily():
    from dhsa_export.algo import RoutingStats

    gen = torch.Generator().manual_seed(4)
    stats, fractions = RoutingStats(), []
    for density in (0.1, 0.3, 1.0):
        q, k = torch.randn(2, 200, 16, generator=gen), torch.randn(2, 200, 16, generator=gen)
        sel = route(q, k, DHSAConfig(density=density, q_block=32, k_block=8))
        stats.add(sel, "vslash")
        fractions.append(sel.causal_block_fraction())
    assert stats.calls == 3
    assert stats.causal_block_fraction_sum == sum(fractions)
    assert stats.causal_block_fraction == sum(fractions) / 3
