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


# ------------------------------------------------------------------------------- dynamic pattern

DYNAMIC = dict(q_block=16, k_block=8, density=0.25, pattern="dynamic", sink_tokens=8, local_tokens=16,
               instruction_tokens=16, min_chunk=4, max_chunk=12)


def tiny_predictor(path, input_features: int, seed: int = 1):
    """An untrained predictor (small, random weights) whose threshold is the median probability on
    random keys: a mix of proposed and rejected candidates, enough to test the export exactly."""
    from dhsa_export.algo.boundaries import BoundaryPredictor, save_predictor

    torch.manual_seed(seed)
    predictor = BoundaryPredictor(input_features, d_model=16, num_heads=2, hidden=32).eval()
    with torch.no_grad():
        keys = torch.randn(1, 2, 200, input_features // 2)
        probs = predictor.batch_probabilities(keys)[0]
        assert torch.equal(probs, torch.sigmoid(predictor.sequence_logits(keys[0])))  # the traced form is exact
    predictor.threshold = float(probs.median())
    return save_predictor(predictor, path)


@pytest.fixture(scope="module", params=["similarity", "predictor"])
def exported_dynamic(request, tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"dynamic-{request.param}")
    predictor = str(tiny_predictor(folder / "predictor.safetensors", 32)) if request.param == "predictor" else ""
    cfg = DHSAConfig(**DYNAMIC, boundary_predictor=predictor)
    return export_prefill(tiny, cfg, folder / "prefill.onnx", sample_length=100), cfg


def test_dynamic_prefill_has_one_chunk_offsets_node_feeding_every_layer(exported_dynamic):
    from tests.onnx.test_registry import assert_nodes_follow_registry  # (that module imports this one)

    path, cfg = exported_dynamic
    model = onnx.load(str(path), load_external_data=False)
    assert_nodes_follow_registry(model, expected_pairs=LAYERS, chunk_offsets=1)
    graph = model.graph
    nodes = [node for node in graph.node if node.domain == DOMAIN]
    assert collections.Counter(n.op_type for n in nodes) == {"ChunkOffsets": 1, "Route": LAYERS,
                                                            "BlockSparseAttention": LAYERS}
    (chunks,) = [n for n in nodes if n.op_type == "ChunkOffsets"]
    assert len(chunks.input) == (2 if cfg.boundary_predictor else 1)
    for node in nodes:
        if node.op_type != "ChunkOffsets":
            assert node.input[-1] == chunks.output[0], node.name
    route_scores = {onnx.helper.get_attribute_value(a) for n in nodes if n.op_type == "Route"
                    for a in n.attribute if a.name == "chunk_score"}
    assert route_scores == {b"mass"}
    predictor_weights = [t.name for t in graph.initializer if t.name.startswith("boundary_predictor.")]
    assert bool(predictor_weights) == bool(cfg.boundary_predictor)
    dims = {info.name: [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
            for info in graph.value_info}
    assert dims[chunks.output[0]] == [1, "key_chunks_plus_1"]
    assert {dims[n.output[0]][-1] for n in nodes if n.op_type == "Route"} == {"key_chunks"}


def ort_with_offsets_output(path):
    """The exported prefill graph with ChunkOffsets' output also exposed as a graph output."""
    from dhsa_export.backends.ort_cpu import library_path, make_session

    model = onnx.load(str(path))
    (chunks,) = [n for n in model.graph.node if n.op_type == "ChunkOffsets"]
    model.graph.output.append(onnx.helper.make_tensor_value_info(chunks.output[0], onnx.TensorProto.INT32, None))
    return make_session(model, threads=2, library=library_path())


@pytest.mark.parametrize("length", [37, 300])
def test_dynamic_prefill_matches_pytorch_dhsa(tiny, exported_dynamic, length):
    """ORT (native ChunkOffsets, Route, BlockSparseAttention) equals the PyTorch DHSA integration:
    the same chunk offsets exactly, logits within the export tolerance."""
    from dhsa_export.hf.attention import disable_dhsa, enable_dhsa

    path, cfg = exported_dynamic
    session = ort_with_offsets_output(path)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
    logits, *rest = session.run(None, {"input_ids": ids.numpy()})
    offsets = rest[-1]
    runtime = enable_dhsa(tiny, cfg)
    try:
        with torch.no_grad():
            reference = tiny(ids).logits[:, -1:].numpy()
    finally:
        disable_dhsa(tiny)
    np.testing.assert_array_equal(offsets[0], runtime.chunk_offsets[0].numpy())
    lengths = np.diff(offsets[0])
    assert lengths.min() >= cfg.min_chunk and lengths.max() <= cfg.max_chunk and len(set(lengths.tolist())) > 1
    assert runtime.stats.causal_block_fraction < 1.0 or length < 64
    assert np.abs(logits - reference).max() < 1e-4


def test_predictor_for_another_model_is_refused(tiny, tmp_path):
    from dhsa_export.errors import DHSAError

    wrong = tiny_predictor(tmp_path / "wrong.safetensors", 48)
    with pytest.raises(DHSAError, match="expects 48 key features per token but this model's layer-0 keys give 32"):
        export_prefill(tiny, DHSAConfig(**DYNAMIC, boundary_predictor=str(wrong)), tmp_path / "prefill.onnx")
