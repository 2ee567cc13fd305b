"""``dhsa-export build --backend trt`` end to end on the default model cut to 2 layers: fp16 ONNX
graphs with the dhsa nodes, the plugin and kernel libraries, one engine per graph built by the
installed TensorRT (TensorRT-RTX here, on the CPU), a manifest that verifies. The engines cannot run
here (no GPU; docs/TENSORRT.md); ``run`` and ``check`` say so in one line.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import onnx
import pytest
from click.testing import CliRunner

from dhsa_export.artifact import read_manifest
from dhsa_export.backends.trt.artifact import installed_tensorrt
from dhsa_export.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trt_artifact(tmp_path_factory):
    if installed_tensorrt() is None:
        pytest.skip("no TensorRT Python module installed (the test extra installs TensorRT-RTX)")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    out = tmp_path_factory.mktemp("trt") / "artifact"
    result = run_cli("build", "--backend", "trt", "--layers", "2", "--cuda-arch", "80", "--max-tokens", "4096",
                     "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_layout_and_manifest(trt_artifact):
    names = sorted(p.name for p in trt_artifact.iterdir())
    assert names == ["decode.engine", "decode.onnx", "lib", "manifest.json", "prefill.engine", "prefill.onnx",
                     "tokenizer", "weights.bin"]
    assert sorted(p.name for p in (trt_artifact / "lib").iterdir()) == ["libdhsa_kernels.so", "libdhsa_trt_plugin.so"]
    manifest = read_manifest(trt_artifact, verify=True)
    assert manifest["backend"] == "trt" and manifest["dtype"] == "float16" and manifest["cuda_archs"] == ["80"]
    engines = manifest["engines"]
    assert engines["max_tokens"] == 4096 and engines["tensorrt_module"] == installed_tensorrt()
    for name in ("prefill", "decode"):
        assert engines[name] in manifest["files"]
        assert (trt_artifact / engines[name]).stat().st_size > 10 * 2**20  # the fp16 weights are inside
    assert manifest["library"] == "lib/libdhsa_trt_plugin.so" and manifest["kernels"] in manifest["files"]


def test_graphs_are_fp16_with_the_dhsa_nodes(trt_artifact):
    prefill = onnx.load(str(trt_artifact / "prefill.onnx"), load_external_data=False)
    ops = Counter((n.domain, n.op_type) for n in prefill.graph.node)
    assert ops[("dhsa", "Route")] == 2 and ops[("dhsa", "BlockSparseAttention")] == 2
    assert prefill.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    decode = onnx.load(str(trt_artifact / "decode.onnx"), load_external_data=False)
    assert not [n for n in decode.graph.node if n.domain == "dhsa"]
    past = [i for i in decode.graph.input if i.name.startswith("past_key_values")]
    assert len(past) == 4 and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in past)


@pytest.mark.parametrize("command", [["run", "{a}", "--prompt", "hi"], ["check", "{a}"]])
def test_run_and_check_say_what_runs_a_trt_artifact(trt_artifact, command):
    result = run_cli(*[c.format(a=trt_artifact) for c in command])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds TensorRT engines (backend trt)" in lines[0]


def test_tampered_engine_is_refused(trt_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trt_artifact, copy)
    with open(copy / "prefill.engine", "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02\x03")
    result = run_cli("run", copy, "--prompt", "hi")
    assert result.exit_code == 2 and "prefill.engine" in result.output and "sha256" in result.output
    assert json.loads((copy / "manifest.json").read_text())["backend"] == "trt"


def test_int4_artifact_has_blockwise_dequantize_and_smaller_engines(trt_artifact, tmp_path):
    """--int4 for TensorRT: int4 weights + block-wise DequantizeLinear (no zero points) before each
    linear MatMul, shared by both graphs; the engines hold the 4-bit weights."""
    out = tmp_path / "int4"
    result = run_cli("build", "--backend", "trt", "--int4", "--layers", "2", "--cuda-arch", "80",
                     "--max-tokens", "4096", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out, verify=True)
    assert manifest["quantization"]["form"] == "qdq" and manifest["quantization"]["block_size"] == 32
    for name in ("prefill.onnx", "decode.onnx"):
        graph = onnx.load(str(out / name), load_external_data=False)
        ops = Counter((n.domain, n.op_type) for n in graph.graph.node)
        assert ops[("", "DequantizeLinear")] == 2 * 7 and ops[("com.microsoft", "MatMulNBits")] == 0
        assert all(len(n.input) == 2 for n in graph.graph.node if n.op_type == "DequantizeLinear")
    for file in ("weights.bin", "prefill.engine", "decode.engine"):
        assert (out / file).stat().st_size < (trt_artifact / file).stat().st_size, file


def test_dynamic_pattern_with_a_predictor_builds(trt_artifact, tmp_path):
    """The learned predictor (standard ONNX ops) and ChunkOffsets' data-dependent width in the engine."""
    from tests.onnx.test_export import tiny_predictor

    predictor = tiny_predictor(tmp_path / "predictor.safetensors", 3 * 64)  # SmolLM2: 3 KV heads x 64 dims
    out = tmp_path / "dynamic"
    result = run_cli("build", "--backend", "trt", "--pattern", "dynamic", "--boundary-predictor", predictor,
                     "--layers", "2", "--cuda-arch", "80", "--max-tokens", "4096", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out, verify=True)
    assert manifest["dhsa"]["pattern"] == "dynamic" and manifest["boundary_predictor"]["file"] in manifest["files"]
    graph = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    ops = Counter((n.domain, n.op_type) for n in graph.graph.node)
    assert ops[("dhsa", "ChunkOffsets")] == 1 and ops[("dhsa", "Route")] == 2
    assert (out / "prefill.engine").stat().st_size > 10 * 2**20
