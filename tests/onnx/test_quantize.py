"""INT4 weight-only quantization in both forms: ONNX Runtime's MatMulNBits and TensorRT's block-wise
DequantizeLinear (QDQ). Each test counts the quantized MatMuls and compares ONNX Runtime outputs before
and after: the two forms hold the same 4-bit weights, so their logits agree closely, and both stay
near the unquantized graph."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dhsa_export import DHSAConfig, DHSAError
from dhsa_export.onnx.export import export_decode
from dhsa_export.onnx.quantize import quantize_int4

LAYERS = 2
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down; the untied lm_head stays unquantized


@pytest.fixture(scope="module")
def decode_graph(tmp_path_factory):
    config = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("quantize")
    return export_decode(model, DHSAConfig(), folder / "decode.onnx")


def copy_graph(path, folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(path), load_external_data=True)
    onnx.save(model, str(folder / name), save_as_external_data=True, location=name + ".data")
    return folder / name


def logits(path, feeds):
    # no graph optimizations: ORT would fuse DequantizeLinear + MatMul into MatMulNBits with int8
    # activations, and this test compares the weights, not ORT's kernels
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


def decode_feeds(path, seed=0):
    rng = np.random.default_rng(seed)
    graph = onnx.load(str(path), load_external_data=False)
    feeds = {"input_ids": np.array([[7]], dtype=np.int64)}
    for value in graph.graph.input[1:]:
        dims = [d.dim_value or 30 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


@pytest.mark.parametrize("block_size", [32, 64])
def test_qdq_and_matmulnbits_hold_the_same_weights(decode_graph, tmp_path, block_size):
    nbits = copy_graph(decode_graph, tmp_path / "nbits", "decode.onnx")
    qdq = copy_graph(decode_graph, tmp_path / "qdq", "decode.onnx")
    # accuracy_level 1: fp32 activations, so both forms compute dequantized weights x fp32 inputs
    assert quantize_int4(nbits, block_size, accuracy_level=1) == LAYERS * LINEARS_PER_LAYER
    assert quantize_int4(qdq, block_size, form="qdq") == LAYERS * LINEARS_PER_LAYER

    graph = onnx.load(str(qdq), load_external_data=False)
    ops = collections.Counter((n.domain, n.op_type) for n in graph.graph.node)
    assert ops[("", "DequantizeLinear")] == LAYERS * LINEARS_PER_LAYER and ops[("com.microsoft", "MatMulNBits")] == 0
    initializers = {i.name: i for i in graph.graph.initializer}
    for node in (n for n in graph.graph.node if n.op_type == "DequantizeLinear"):
        assert len(node.input) == 2  # no zero point: TensorRT rejects them
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["block_size"] == block_size and attrs["axis"] == 0
        assert initializers[node.input[0]].data_type == onnx.TensorProto.INT4

    feeds = decode_feeds(decode_graph)
    dense, a, b = logits(decode_graph, feeds), logits(nbits, feeds), logits(qdq, feeds)
    scale = np.abs(dense).max()
    assert np.abs(a - b).max() <= 1e-4 * scale, np.abs(a - b).max() / scale
    assert 0 < np.abs(a - dense).max() <= 0.1 * scale  # 4-bit rounding shows, and stays small


def test_unknown_form_is_refused(decode_graph, tmp_path):
    with pytest.raises(DHSAError, match="int4 form 'gptq' is not one of matmulnbits, qdq"):
        quantize_int4(shutil.copy(decode_graph, tmp_path / "x.onnx"), 32, form="gptq")
