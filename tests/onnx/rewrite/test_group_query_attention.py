"""Rule group_query_attention: graphs of the onnxruntime-genai model builder (packed or separate QKV,
rotary inside or outside GroupQueryAttention), plus one-node graphs for the rotary layouts the tiny
model cannot show (interleaved; partial rotary dimension), checked against ONNX Runtime's own kernel."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dhsa_export import DHSAError
from dhsa_export.onnx.rewrite import rewrite_model

from .conftest import (
    ATOL, CFG, DENSE_CFG, LAYERS, build_genai, counts, dhsa_node_counts, max_error, run_ort,
)

pytest.importorskip("onnxruntime_genai")

VARIANTS = {
    "packed-rotary-inside": {},
    "separate-rotary-inside": {"fuse_qkv": False},
    "separate-rotary-outside": {"fuse_qkv": False, "rotary_in_attention": False},
}
PAST = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]


@pytest.fixture(scope="module")
def builds(tiny_dir, tmp_path_factory):
    """Builder graphs by variant name, each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_genai(tiny_dir, tmp_path_factory.mktemp(name), **VARIANTS[name])
        return cache[name]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def builder_graph(request, builds):
    return request.param, builds(request.param)


def gqa_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def test_builder_variant_has_the_expected_form(builder_graph):
    name, path = builder_graph
    model = onnx.load(str(path), load_external_data=False)
    nodes = gqa_nodes(model)
    assert len(nodes) == LAYERS
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert (node.input[1] == "") == name.startswith("packed")
        assert attrs["do_rotary"] == (1 if "inside" in name else 0)
    rotary_ops = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rotary_ops) == (0 if "inside" in name else 2 * LAYERS)


def test_rewrite_matches_dhsa_reference(builder_graph, tmp_path, input_ids, reference):
    name, path = builder_graph
    report = rewrite_model(path, tmp_path / "dhsa.onnx", CFG)
    assert report.counts() == counts(group_query_attention=LAYERS)
    assert dhsa_node_counts(report.output) == {"Route": LAYERS, "BlockSparseAttention": LAYERS}
    assert report.external_data and (tmp_path / "dhsa.onnx.data").is_file()
    assert sorted(report.dropped_inputs) == sorted(["attention_mask", *PAST])
    ops = [n.op_type for n in onnx.load(str(report.output), load_external_data=False).graph.node]
    assert "GroupQueryAttention" not in ops

    dense = run_ort(path, input_ids)
    sparse = run_ort(report.output, input_ids)
    errors = {"dense graph vs torch dense": max_error(dense["logits"], reference["dense"]),
              "rewritten vs torch DHSA": max_error(sparse["logits"], reference["dhsa"]),
              "dense graph vs torch DHSA": max_error(dense["logits"], reference["dhsa"])}
    errors.update({f"{kv} vs torch": max_error(sparse[kv], reference["kv"][kv]) for kv in reference["kv"]})
    print(name, report.counts(), errors)
    assert errors["dense graph vs torch dense"] < ATOL
    assert errors.pop("dense graph vs torch DHSA") > 100 * ATOL
    assert max(errors.values()) < ATOL

    full = rewrite_model(path, tmp_path / "dhsa-full.onnx", DENSE_CFG)
    same = run_ort(full.output, input_ids)
    assert max(max_error(same[k], dense[k]) for k in same) < ATOL  # density 1.0 == the dense graph


@pytest.mark.parametrize("attribute, value, reason", [("softcap", 30.0, "softcap"),
                                                      ("local_window_size", 32, "local_window_size")])
def test_refuses_softcap_and_sliding_window(builds, tmp_path, attribute, value, reason):
    model = onnx.load(str(builds("packed-rotary-inside")))
    first = gqa_nodes(model)[0]
    next(a for a in first.attribute if a.name == attribute).CopyFrom(helper.make_attribute(attribute, value))
    report = rewrite_model(model, None, CFG)
    result = next(r for r in report.results if r.rule == "group_query_attention")
    assert result.changed == LAYERS - 1 and len(result.rejected) == 1
    assert reason in result.rejected[0][1]
    for node in gqa_nodes(model)[1:]:
        next(a for a in node.attribute if a.name == attribute).CopyFrom(helper.make_attribute(attribute, value))
    with pytest.raises(DHSAError, match=reason):
        rewrite_model(model, tmp_path / "never.onnx", CFG)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ rotary layouts, one node


def single_gqa(head_size: int, rotary_dim: int, interleaved: int, heads=4, kv_heads=2, max_positions=256):
    """One packed-QKV GroupQueryAttention with rotary inside, empty past (a prompt), fp32."""
    rng = np.random.default_rng(3)
    angles = np.arange(max_positions)[:, None] / (10000 ** (np.arange(rotary_dim // 2) / (rotary_dim // 2)))
    width = (heads + 2 * kv_heads) * head_size
    node = helper.make_node(
        "GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_length",
                                "cos_cache", "sin_cache"], ["output", "present_key", "present_value"],
        domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=1,
        rotary_interleaved=interleaved, scale=0.0, softcap=0.0, local_window_size=-1)
    past = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, kv_heads, "past", head_size])
            for n in ("past_key", "past_value")]
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, "seq", width]), *past,
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
         helper.make_tensor_value_info("total_length", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, "seq", heads * head_size]),
         *[helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, kv_heads, "total", head_size])
           for n in ("present_key", "present_value")]],
        [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos_cache"),
         numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin_cache")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    qkv = rng.standard_normal((1, 70, width)).astype(np.float32)
    return model, qkv, kv_heads


@pytest.mark.parametrize("head_size, rotary_dim, interleaved",
                         [(16, 16, 1), (32, 16, 0), (32, 16, 1)], ids=["interleaved", "partial", "partial-interleaved"])
def test_rotary_layouts_match_onnxruntime(tmp_path, head_size, rotary_dim, interleaved):
    model, qkv, kv_heads = single_gqa(head_size, rotary_dim, interleaved)
    onnx.save(model, str(tmp_path / "gqa.onnx"))
    report = rewrite_model(tmp_path / "gqa.onnx", tmp_path / "dhsa.onnx", DENSE_CFG)
    assert report.counts() == counts(group_query_attention=1)
    empty = np.zeros((1, kv_heads, 0, head_size), np.float32)
    want = run_ort(tmp_path / "gqa.onnx", None, {
        "qkv": qkv, "past_key": empty, "past_value": empty,
        "seqlens_k": np.array([qkv.shape[1] - 1], np.int32), "total_length": np.array(qkv.shape[1], np.int32)})
    got = run_ort(report.output, None, {"qkv": qkv})
    assert max(max_error(got[k], want[k]) for k in want) < ATOL
