"""The op registry is the one definition of the dhsa ops: every consumer is checked against it.

The native library's registration is compared with ``contract_json`` in tests/backends; here the
registry's shape inference is compared with what the native kernels and the reference
implementations really return, and the nodes the exporter and the rewriter emit are compared with
the registry's names, domain, version, attribute names and attribute types.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import AttributeProto

from dhsa_export.check.references import REFERENCES
from dhsa_export.onnx.registry import (
    BLOCK_SPARSE_ATTENTION, CHUNK_OFFSETS, CHUNK_OFFSETS_DIM, DOMAIN, OPS, ROUTE, VERSION,
)
from tests.backends.test_ort_cpu import library, qkv, run_attention, run_route, variable_offsets  # noqa: F401
from tests.onnx.test_export import exported, tiny  # noqa: F401

KINDS = {"int": AttributeProto.INT, "float": AttributeProto.FLOAT, "string": AttributeProto.STRING}


def test_every_op_has_a_reference_and_shape_inference():
    assert set(REFERENCES) == {op.qualified_name for op in OPS.values()}
    assert all(op.infer_shapes is not None for op in OPS.values())


# batch, query heads, kv heads, Lq, Lk, D, Dv, attributes, variable chunks
SHAPES = [
    (1, 4, 4, 100, 100, 16, 16, {"q_block": 32, "k_block": 8}, False),
    (2, 8, 2, 37, 37, 16, 8, {"q_block": 16, "k_block": 16, "head_group": 4}, False),
    (1, 8, 1, 20, 70, 8, 8, {"q_block": 8, "k_block": 32, "pattern": "topk"}, False),  # Lq < Lk (suffix queries)
    (1, 4, 2, 60, 60, 16, 16, {"q_block": 16, "k_block": 8, "pattern": "dynamic"}, True),
]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,dv,attrs,variable", SHAPES)
def test_shape_inference_matches_kernels_and_references(library, b, hq, hkv, lq, lk, d, dv, attrs, variable):  # noqa: F811
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv, seed=lq)
    offsets = variable_offsets(lk, b, seed=3) if variable else None
    offsets_shape = None if offsets is None else offsets.shape
    want_index, want_count = ROUTE.output_shapes(attrs, q.shape, k.shape, offsets_shape)

    index, count = run_route(library, q, k, offsets, **attrs)
    ref_index, ref_count = REFERENCES[ROUTE.qualified_name](q, k, offsets, **attrs)
    assert index.shape == ref_index.shape == tuple(want_index)
    assert count.shape == ref_count.shape == tuple(want_count)

    attention_attrs = {name: attrs[name] for name in ("q_block", "k_block")}
    (want_output,) = BLOCK_SPARSE_ATTENTION.output_shapes(attention_attrs, q.shape, k.shape, v.shape)
    output = run_attention(library, q, k, v, index, count, offsets, **attention_attrs)
    reference = REFERENCES[BLOCK_SPARSE_ATTENTION.qualified_name](q, k, v, index, count, offsets, **attention_attrs)
    assert output.shape == np.asarray(reference).shape == tuple(want_output)


@pytest.mark.parametrize("predictor", [False, True])
def test_chunk_offsets_shape_inference_matches_kernel_and_reference(library, predictor):  # noqa: F811
    from tests.backends.test_ort_cpu import run_chunk_offsets, smooth_keys

    key = smooth_keys(2, 3, 150, 8, seed=5)
    probs = np.random.default_rng(0).random((2, 150)).astype(np.float32) if predictor else None
    (want,) = CHUNK_OFFSETS.output_shapes({}, key.shape, None if probs is None else probs.shape)
    assert want == (2, CHUNK_OFFSETS_DIM)  # the width is data dependent
    got = run_chunk_offsets(library, key, probs)
    ref = REFERENCES[CHUNK_OFFSETS.qualified_name](key, probs)
    assert got.shape == ref.shape and got.shape[0] == want[0]
    index, count = ROUTE.output_shapes({"pattern": "dynamic"}, (2, 4, 150, 8), key.shape, want)
    assert index == (2, 4, 2, None) and count == (2, 4, 2)  # nC unknown until the offsets exist
    assert ROUTE.output_shapes({}, (2, 4, 150, 8), key.shape, got.shape)[0][-1] == got.shape[1] - 1


def test_unknown_dims_stay_unknown():
    index, count = ROUTE.output_shapes({"head_group": 4}, (None, 32, None, None), (None, 8, None, None))
    assert index == (None, 8, None, None) and count == (None, 8, None)


def dhsa_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.domain == DOMAIN]


def assert_nodes_follow_registry(model: onnx.ModelProto, expected_pairs: int, chunk_offsets: int = 0) -> None:
    nodes = dhsa_nodes(model)
    expected = ["Route", "BlockSparseAttention"] * expected_pairs + ["ChunkOffsets"] * chunk_offsets
    assert sorted(node.op_type for node in nodes) == sorted(expected)
    assert (DOMAIN, VERSION) in [(o.domain, o.version) for o in model.opset_import]
    for node in nodes:
        spec = OPS[node.op_type]
        required = sum(not port.optional for port in spec.inputs)
        assert required <= len(node.input) <= len(spec.inputs), node.name
        assert len(node.output) == len(spec.outputs), node.name
        for attribute in node.attribute:
            assert attribute.type == KINDS[spec.attribute(attribute.name).kind], (node.name, attribute.name)
        assert {a.name for a in node.attribute} == {a.name for a in spec.attributes}, node.name


def test_exported_prefill_nodes_follow_the_registry(exported):  # noqa: F811
    folder, _, _ = exported
    model = onnx.load(str(folder / "prefill.onnx"), load_external_data=False)
    assert_nodes_follow_registry(model, expected_pairs=2)


def test_rewritten_nodes_follow_the_registry(tmp_path):
    from tests.onnx.rewrite.conftest import CFG, LAYERS, export_dense

    from dhsa_export.onnx.rewrite import rewrite_model
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=2048)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    dense = export_dense(tmp_path / "hf", tmp_path / "dense.onnx", "sdpa", opset=23)
    report = rewrite_model(dense, None, CFG)
    assert report.total == LAYERS
    assert_nodes_follow_registry(report.model, expected_pairs=LAYERS)
