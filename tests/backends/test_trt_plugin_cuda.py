"""The TensorRT plugins' enqueue on a GPU, driven without TensorRT (none is installable on the GPU
machine): tests/backends/trt_plugin_harness.cpp creates each plugin from ONNX-typed fields, configures
it, recreates it from its serialized fields (as an engine does) and enqueues it on torch buffers.
Outputs are compared with the C ABI calls the PyTorch backend makes (same kernels: bit-identical) and
with the references. What TensorRT itself adds (shape expressions, the size tensor of ChunkOffsets'
width) is covered by the engine builds of tests/backends/test_trt_plugin.py.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dhsa_export.config import DHSAConfig
from dhsa_export.onnx import registry

gpu = pytest.mark.gpu
HARNESS = Path(__file__).with_name("trt_plugin_harness.cpp")
TRT_TYPES = {torch.float32: 0, torch.float16: 1, torch.int32: 3, torch.bfloat16: 7, torch.int64: 8}
KINDS = {"int": 0, "float": 1, "string": 2}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dhsa_export.backends.torch_cuda import build as kernel_build
    from dhsa_export.backends.trt import build_plugin, fetch_headers

    nvcc = kernel_build.find_nvcc()
    kernels = os.environ.get("DHSA_KERNEL_LIBRARY") or kernel_build.build_library()
    plugin = build_plugin(kernels)
    out = tmp_path_factory.mktemp("harness") / "libharness.so"
    cmd = [nvcc, "-std=c++17", "-O1", "-shared", "-Xcompiler", "-fPIC", "-isystem", str(fetch_headers()),
           str(HARNESS), "-o", str(out), "-ldl"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lib = ctypes.CDLL(str(out))
    lib.harness_run.restype = ctypes.c_int
    return lib, plugin


def run_plugin(harness, op: str, attrs: dict, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> str:
    """Enqueue plugin ``op`` with ``attrs`` (registry names) on ``inputs`` into ``outputs``."""
    lib, plugin = harness
    spec = registry.OPS[op]
    names = [a.name for a in spec.attributes if a.name in attrs]
    kinds = [KINDS[spec.attribute(n).kind] for n in names]
    numbers = [float(attrs[n]) if spec.attribute(n).kind != "string" else 0.0 for n in names]
    texts = [str(attrs[n]).encode() if spec.attribute(n).kind == "string" else b"" for n in names]

    def arrays(tensors):
        dims = (ctypes.c_int64 * (8 * len(tensors)))()
        for i, t in enumerate(tensors):
            for j, size in enumerate(t.shape):
                dims[8 * i + j] = size
        ranks = (ctypes.c_int * len(tensors))(*[t.dim() for t in tensors])
        types = (ctypes.c_int * len(tensors))(*[TRT_TYPES[t.dtype] for t in tensors])
        pointers = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
        return pointers, dims, ranks, types

    in_ptr, in_dims, in_ranks, in_types = arrays(inputs)
    out_ptr, out_dims, out_ranks, out_types = arrays(outputs)
    error = ctypes.create_string_buffer(4096)
    status = lib.harness_run(
        str(plugin).encode(), op.encode(), len(names), (ctypes.c_char_p * len(names))(*[n.encode() for n in names]),
        (ctypes.c_int * len(names))(*kinds), (ctypes.c_double * len(names))(*numbers),
        (ctypes.c_char_p * len(names))(*texts), len(inputs), in_ptr, in_dims, in_ranks, in_types,
        len(outputs), out_ptr, out_dims, out_ranks, out_types,
        ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), error, len(error))
    message = error.value.decode()
    if status != 0:
        raise RuntimeError(message)
    return message


def qkv(seed, heads, kv_heads, length, d, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, h, length, d, generator=gen, device="cuda", dtype=dtype) for h in (heads, kv_heads, kv_heads)]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, d, length", [(8, 2, 64, 1000), (32, 8, 128, 2048), (4, 4, 128, 129)])
@pytest.mark.parametrize("pattern", ["vslash", "topk"])
def test_route_and_attention_plugins_match_the_c_abi(harness, dtype, heads, kv_heads, d, length, pattern):
    from dhsa_export.backends.torch_cuda import block_sparse_attention_cuda, route_cuda
    from dhsa_export.check.references import reference_block_sparse_attention

    cfg = DHSAConfig(pattern=pattern, q_block=64, k_block=32, head_routing="group")
    q, k, v = qkv(0, heads, kv_heads, length, d, dtype)
    route_attrs = registry.route_attributes(cfg, heads, kv_heads)
    want_index, want_count = route_cuda(q, k, route_attrs)
    index, count = torch.full_like(want_index, -7), torch.full_like(want_count, -7)
    run_plugin(harness, "Route", route_attrs, [q, k], [index, count])
    assert torch.equal(index, want_index) and torch.equal(count, want_count)

    attention_attrs = registry.attention_attributes(cfg, d ** -0.5)
    want = block_sparse_attention_cuda(q, k, v, index, count, q_block=64, k_block=32, scale=d ** -0.5)
    out = torch.full_like(q, float("nan"))
    run_plugin(harness, "BlockSparseAttention", attention_attrs, [q, k, v, index, count], [out])
    assert torch.equal(out, want)
    ref = reference_block_sparse_attention(*(t.float().cpu().numpy() for t in (q, k, v)), index.cpu().numpy(),
                                           count.cpu().numpy(), **attention_attrs)
    err = np.abs(out.float().cpu().numpy() - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= 1e-2, err


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dynamic_pipeline_of_the_three_plugins(harness, dtype):
    """ChunkOffsets (packed to the longest row, its width as an int64) -> Route -> BlockSparseAttention."""
    from dhsa_export.backends.torch_cuda import block_sparse_attention_cuda, chunk_offsets_cuda, route_cuda

    heads, kv_heads, d, length = 8, 2, 64, 1500
    cfg = DHSAConfig(pattern="dynamic", q_block=64, k_block=32, head_routing="group")
    qs, ks, vs = zip(*(qkv(seed, heads, kv_heads, length, d, dtype) for seed in (1, 2)))
    q, k, v = (torch.cat(t) for t in (qs, ks, vs))  # batch 2: two rows of different chunk counts
    chunk_attrs = registry.chunk_offsets_attributes(cfg)
    want_offsets = chunk_offsets_cuda(k, **chunk_attrs)
    packed = torch.full((2, length + 1), -7, dtype=torch.int32, device="cuda")
    width = torch.zeros((), dtype=torch.int64, device="cuda")
    run_plugin(harness, "ChunkOffsets", chunk_attrs, [k], [packed, width])
    w = int(width)
    assert w == want_offsets.shape[1]
    offsets = packed.flatten()[: 2 * w].view(2, w)
    assert torch.equal(offsets, want_offsets)

    route_attrs = registry.route_attributes(cfg, heads, kv_heads)
    want_index, want_count = route_cuda(q, k, route_attrs, offsets)
    index, count = torch.full_like(want_index, -7), torch.full_like(want_count, -7)
    run_plugin(harness, "Route", route_attrs, [q, k, offsets], [index, count])
    assert torch.equal(index, want_index) and torch.equal(count, want_count)

    attention_attrs = registry.attention_attributes(cfg, d ** -0.5)
    want = block_sparse_attention_cuda(q, k, v, index, count, offsets, q_block=64, k_block=32, scale=d ** -0.5)
    out = torch.full_like(q, float("nan"))
    run_plugin(harness, "BlockSparseAttention", attention_attrs, [q, k, v, index, count, offsets], [out])
    assert torch.equal(out, want)


@gpu
def test_bad_fields_and_shapes_are_errors_that_name_them(harness):
    q, k, v = qkv(0, 8, 2, 256, 64, torch.float16)
    index = torch.zeros(1, 2, 4, 8, dtype=torch.int32, device="cuda")
    count = torch.zeros(1, 2, 4, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="pattern 'diagonal' is not one of"):
        run_plugin(harness, "Route", {"pattern": "diagonal"}, [q, k], [index, count])
    out = torch.empty_like(q)
    v96 = torch.zeros(1, 2, 256, 96, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="Dv=96"):
        run_plugin(harness, "BlockSparseAttention", {"q_block": 64}, [q, k, v96, index, count], [out])
    with pytest.raises(RuntimeError, match="supportsFormatCombination refused position 2"):
        run_plugin(harness, "BlockSparseAttention", {}, [q, k, v.float(), index, count], [out])
