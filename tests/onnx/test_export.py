"""Export: custom nodes in the prefill graph, dense decode graph, one shared weights file."""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dhsa_export import DHSAConfig
from dhsa_export.onnx.export import (
    DecodeGraph, PrefillGraph, export_decode, export_prefill, install_export_attention, share_weights,
)
from dhsa_export.onnx.registry import DOMAIN, VERSION

LAYERS = 2


@pytest.fixture(scope="module")
def tiny():
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=2048)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    cfg = DHSAConfig(q_block=32, k_block=8)
    prefill = export_prefill(tiny, cfg, folder / "prefill.onnx", sample_length=100)
    decode = export_decode(tiny, cfg, folder / "decode.onnx")
    shared = share_weights(prefill, decode)
    return folder, cfg, shared


def test_prefill_has_one_route_and_attention_node_per_layer(exported):
    folder, _, _ = exported
    graph = onnx.load(str(folder / "prefill.onnx"), load_external_data=False)
    counts = collections.Counter(node.op_type for node in graph.graph.node if node.domain == DOMAIN)
    assert counts == {"Route": LAYERS, "BlockSparseAttention": LAYERS}
    assert (DOMAIN, VERSION) in [(o.domain, o.version) for o in graph.opset_import]
    assert max(o.version for o in graph.opset_import if o.domain == "") >= 21
    assert [o.name for o in graph.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]


def test_graphs_share_one_weights_file(exported):
    folder, _, shared = exported
    assert shared > 0
    files = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    assert files == ["decode.onnx", "prefill.onnx", "weights.bin"]
    locations = set()
    for name in ("prefill.onnx", "decode.onnx"):
        graph = onnx.load(str(folder / name), load_external_data=False)
        for tensor in graph.graph.initializer:
            locations |= {e.value for e in tensor.external_data if e.key == "location"}
    assert locations == {"weights.bin"}


def test_decode_graph_matches_torch(tiny, exported):
    folder, cfg, _ = exported
    session = ort.InferenceSession(str(folder / "decode.onnx"))
    wrapper = DecodeGraph(tiny, install_export_attention(tiny, cfg))
    past = [torch.randn(1, 2, 23, 16) for _ in range(2 * LAYERS)]
    ids = torch.tensor([[7, 9]])
    with torch.no_grad():
        reference = wrapper(ids, tuple(past))
    feeds = {"input_ids": ids.numpy()}
    feeds.update({port.name: tensor.numpy() for port, tensor in zip(session.get_inputs()[1:], past)})
    outputs = session.run(None, feeds)
    for got, want in zip(outputs, reference):
        assert np.abs(got - want.numpy()).max() < 1e-4
    assert outputs[1].shape == (1, 2, 25, 16)


def test_prefill_wrapper_runs_reference_outside_export(tiny):
    cfg = DHSAConfig(q_block=32, k_block=8, density=1.0)
    wrapper = PrefillGraph(tiny, install_export_attention(tiny, cfg))
    ids = torch.randint(0, 256, (1, 90))
    with torch.no_grad():
        logits, *present = wrapper(ids)
        full = tiny(ids, use_cache=False)  # export attention at density 1 equals dense
    assert logits.shape == (1, 1, 256) and len(present) == 2 * LAYERS
    tiny.set_attn_implementation("sdpa")
    with torch.no_grad():
        dense = tiny(ids).logits[:, -1:]
    assert torch.allclose(logits, dense, atol=1e-4)
    assert torch.allclose(full.logits[:, -1:], dense, atol=1e-4)
