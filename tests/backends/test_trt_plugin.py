"""The TensorRT plugin library (plugins/trt/plugin) built against the pinned TensorRT headers:

- its creators and contract agree with the op registry (read through ctypes: no TensorRT needed);
- TensorRT-RTX, which builds engines on a machine without a GPU, parses ONNX graphs with dhsa nodes,
  resolves every node to the plugin, checks shapes and types through it and serializes the engine
  (skipped where no TensorRT module is installed; the test extra installs TensorRT-RTX);
- bad attributes and unsupported graphs fail the build with a message that names them.

No engine runs here (no GPU; TensorRT-RTX's runtime does not support the H200's compute capability
9.0 either): tests/backends/test_trt_plugin_cuda.py runs the plugins' enqueue on a GPU without
TensorRT.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dhsa_export.config import DHSAConfig
from dhsa_export.errors import DHSAError
from dhsa_export.onnx import registry

TYPE_CODES = {"int": 5, "float": 1, "string": 6}  # TensorRT PluginFieldType kINT32 / kFLOAT32 / kCHAR


@pytest.fixture(scope="module")
def plugin() -> Path:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    from dhsa_export.backends.trt import build_plugin
    from dhsa_export.backends.torch_cuda.build import build_library

    # a prebuilt kernel library where one is given (the GPU machine), else the cheapest target
    return build_plugin(os.environ.get("DHSA_KERNEL_LIBRARY") or build_library(("80",)))


def test_plugin_contract_is_the_registry(plugin):
    from dhsa_export.backends.trt import plugin_contract

    assert plugin_contract(plugin) == json.loads(registry.contract_json())


def test_creators_mirror_the_registry(plugin):
    from dhsa_export.backends.trt import plugin_creators

    creators = {c["name"]: c for c in plugin_creators(plugin)}
    assert sorted(creators) == sorted(registry.OPS)
    for name, op in registry.OPS.items():
        creator = creators[name]
        assert (creator["namespace"], creator["version"]) == (op.domain, str(op.version))
        assert list(creator["fields"]) == [a.name for a in op.attributes]
        assert list(creator["fields"].values()) == [TYPE_CODES[a.kind] for a in op.attributes]


def test_plugin_links_no_tensorrt_library(plugin):
    """One build loads into TensorRT or TensorRT-RTX: the plugin needs only the kernels beside it."""
    import subprocess

    needed = subprocess.run(["readelf", "-d", str(plugin)], capture_output=True, text=True).stdout
    libraries = [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line]
    assert "libdhsa_kernels.so" in libraries
    assert not [lib for lib in libraries if "nvinfer" in lib or "tensorrt" in lib], libraries
    assert (plugin.parent / "libdhsa_kernels.so").is_file()


# ------------------------------------------------------------------------------------------------
# Engine builds with TensorRT-RTX (CPU)
# ------------------------------------------------------------------------------------------------

def tensorrt_or_skip():
    from dhsa_export.backends.trt import import_tensorrt

    try:
        return import_tensorrt()
    except DHSAError as exc:
        pytest.skip(str(exc))


def attention_graph(path: Path, dtype: str = "float16", pattern: str = "vslash", heads: int = 8,
                    kv_heads: int = 2, head_dim: int = 64, chunked: bool = False, route_overrides=None) -> Path:
    """query/key/value [1, H, L, D] (L dynamic) -> [ChunkOffsets ->] Route -> BlockSparseAttention."""
    import onnx
    from onnx import TensorProto, helper

    elem = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16, "float32": TensorProto.FLOAT}[dtype]
    cfg = DHSAConfig(pattern=pattern, q_block=64, k_block=16)
    route_attrs = {**registry.route_attributes(cfg, heads, kv_heads), **(route_overrides or {})}
    attention_attrs = registry.attention_attributes(cfg, head_dim ** -0.5)
    nodes, offsets = [], []
    if chunked:
        nodes.append(helper.make_node("ChunkOffsets", ["key"], ["key_chunk_offsets"], domain="dhsa",
                                      **registry.chunk_offsets_attributes(cfg)))
        offsets = ["key_chunk_offsets"]
    nodes.append(helper.make_node("Route", ["query", "key", *offsets], ["block_index", "block_count"],
                                  domain="dhsa", **route_attrs))
    nodes.append(helper.make_node("BlockSparseAttention", ["query", "key", "value", "block_index", "block_count",
                                                           *offsets], ["output"], domain="dhsa", **attention_attrs))
    inputs = [helper.make_tensor_value_info(name, elem, [1, h, "L", head_dim])
              for name, h in (("query", heads), ("key", kv_heads), ("value", kv_heads))]
    output = helper.make_tensor_value_info("output", elem, [1, heads, "L", head_dim])
    graph = helper.make_graph(nodes, "dhsa_layer", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("dhsa", 1)])
    onnx.save(model, str(path))
    return path


def shape_ranges(heads: int = 8, kv_heads: int = 2, head_dim: int = 64, max_len: int = 4096):
    from dhsa_export.backends.trt import ShapeRange

    return {name: ShapeRange((1, h, 1, head_dim), (1, h, max_len // 2, head_dim), (1, h, max_len, head_dim))
            for name, h in (("query", heads), ("key", kv_heads), ("value", kv_heads))}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("pattern", ["vslash", "topk"])
def test_engine_builds_with_the_plugins(plugin, tmp_path, dtype, pattern):
    tensorrt_or_skip()
    from dhsa_export.backends.trt import engine_from_onnx

    graph = attention_graph(tmp_path / "layer.onnx", dtype, pattern)
    engine = engine_from_onnx(graph, plugin, tmp_path / "layer.engine", shape_ranges())
    assert engine.stat().st_size > 1000
    assert not list(tmp_path.glob(".layer.engine.*"))  # written atomically


def test_engine_builds_with_variable_chunks(plugin, tmp_path):
    """ChunkOffsets' data-dependent width (a size tensor) feeds Route and BlockSparseAttention."""
    tensorrt_or_skip()
    from dhsa_export.backends.trt import engine_from_onnx

    graph = attention_graph(tmp_path / "dynamic.onnx", pattern="dynamic", chunked=True)
    engine = engine_from_onnx(graph, plugin, tmp_path / "dynamic.engine", shape_ranges())
    assert engine.stat().st_size > 1000


def test_bad_attribute_fails_the_build_with_its_name(plugin, tmp_path):
    tensorrt_or_skip()
    from dhsa_export.backends.trt import engine_from_onnx

    graph = attention_graph(tmp_path / "bad.onnx", route_overrides={"pattern": "diagonal"})
    with pytest.raises(DHSAError, match="pattern 'diagonal' is not one of topk, ashape, vslash"):
        engine_from_onnx(graph, plugin, tmp_path / "bad.engine", shape_ranges())
    assert not (tmp_path / "bad.engine").exists()


def test_unsupported_head_dim_fails_the_build(plugin, tmp_path):
    tensorrt_or_skip()
    from dhsa_export.backends.trt import engine_from_onnx

    graph = attention_graph(tmp_path / "d96.onnx", head_dim=96)
    with pytest.raises(DHSAError, match="head_dim 96 is not supported; use 64 or 128"):
        engine_from_onnx(graph, plugin, tmp_path / "d96.engine", shape_ranges(head_dim=96))


def test_dynamic_input_without_a_range_is_refused(plugin, tmp_path):
    tensorrt_or_skip()
    from dhsa_export.backends.trt import engine_from_onnx

    graph = attention_graph(tmp_path / "layer.onnx")
    with pytest.raises(DHSAError, match="have no shape range"):
        engine_from_onnx(graph, plugin, tmp_path / "layer.engine", {})


def test_a_library_that_is_not_a_plugin_is_refused(plugin, tmp_path):
    tensorrt_or_skip()
    from dhsa_export.backends.trt import engine_from_onnx

    graph = attention_graph(tmp_path / "layer.onnx")
    kernels = plugin.parent / "libdhsa_kernels.so"  # a real shared library without the plugin entry points
    with pytest.raises(DHSAError, match="refused the plugin library"):
        engine_from_onnx(graph, kernels, tmp_path / "layer.engine", shape_ranges())
    with pytest.raises(DHSAError, match="ONNX graph .* does not exist"):
        engine_from_onnx(tmp_path / "missing.onnx", plugin, tmp_path / "layer.engine", shape_ranges())
    assert not (tmp_path / "layer.engine").exists()
