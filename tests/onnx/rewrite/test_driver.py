"""rewrite_model and ``dhsa-export rewrite``: zero matches, bad input, reasons, atomic output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dhsa_export import DHSAConfig, DHSAError
from dhsa_export.algo.attention import dhsa_attention
from dhsa_export.cli import main
from dhsa_export.onnx.rewrite import RULES, rewrite_model

from .conftest import CFG, counts, dhsa_node_counts, max_error, run_ort

RULE_NAMES = [rule.name for rule in RULES]


def matmul_model() -> onnx.ModelProto:
    """x @ W: nothing to rewrite."""
    weight = numpy_helper.from_array(np.ones((8, 8), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def attention_model(causal: bool, heads: int = 2, dim: int = 8) -> onnx.ModelProto:
    """softmax(q k^T / sqrt(d) + mask) v on [1, H, L, D] inputs; the mask is built from L (Trilu)."""
    c = lambda name, value, dtype=np.int64: numpy_helper.from_array(np.asarray(value, dtype), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["q"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["length"], axis=0),
        helper.make_node("Concat", ["length", "length"], ["square"], axis=0),
        helper.make_node("ConstantOfShape", ["square"], ["ones"],
                         value=helper.make_tensor("one", TensorProto.INT64, [1], [1])),
        (helper.make_node("Trilu", ["ones"], ["allowed_int"], upper=0) if causal
         else helper.make_node("Identity", ["ones"], ["allowed_int"])),
        helper.make_node("Cast", ["allowed_int"], ["allowed"], to=TensorProto.BOOL),
        helper.make_node("Where", ["allowed", "zero", "minus_inf"], ["mask"]),
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
        helper.make_node("Div", ["scores", "sqrt_d"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["out"]),
    ]
    ports = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, heads, "L", dim]) for n in "qkv"]
    graph = helper.make_graph(
        nodes, "attention", ports, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, heads, "L", dim])],
        [c("two", [2]), c("zero", 0.0, np.float32), c("minus_inf", -np.inf, np.float32),
         c("sqrt_d", np.sqrt(dim), np.float32)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_zero_matches_names_every_pattern_tried(tmp_path):
    with pytest.raises(DHSAError) as error:
        rewrite_model(matmul_model(), tmp_path / "out.onnx", CFG)
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in RULE_NAMES)
    assert message.count("no candidate node") == len(RULES)
    assert not list(tmp_path.iterdir())


def test_bidirectional_attention_is_left_alone_with_the_reason(tmp_path):
    with pytest.raises(DHSAError, match="matmul_softmax .*is not causal"):
        rewrite_model(attention_model(causal=False), tmp_path / "out.onnx", CFG)
    assert not list(tmp_path.iterdir())


SMALL = DHSAConfig(q_block=4, k_block=4, density=0.25, sink_tokens=4, pattern="topk")


def test_causal_hand_written_attention_is_rewritten(tmp_path):
    report = rewrite_model(attention_model(causal=True), tmp_path / "out.onnx", SMALL)
    assert report.counts() == counts(matmul_softmax=1) and report.validated
    assert not report.external_data and sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert dhsa_node_counts(report.output) == {"Route": 1, "BlockSparseAttention": 1}
    bsa = next(n for n in onnx.load(str(report.output)).graph.node if n.op_type == "BlockSparseAttention")
    scale = next(helper.get_attribute_value(a) for a in bsa.attribute if a.name == "scale")
    assert scale == pytest.approx(1 / np.sqrt(8))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 40, 8)).astype(np.float32) for _ in range(3))
    dense = run_ort(onnx_path(tmp_path, attention_model(causal=True)), None, {"q": q, "k": k, "v": v})
    sparse = run_ort(report.output, None, {"q": q, "k": k, "v": v})
    with pytest.raises(DHSAError, match="already holds 1 dhsa::BlockSparseAttention"):
        rewrite_model(report.output, tmp_path / "again.onnx", SMALL)
    assert max_error(dense["out"], sparse["out"]) > 1e-3  # density 0.25 is really sparse
    want = dhsa_attention(*(torch.from_numpy(t) for t in (q, k, v)), SMALL, 1 / np.sqrt(8)).numpy()
    assert max_error(sparse["out"], want) < 1e-5
    full = rewrite_model(attention_model(causal=True), None, SMALL.replace(density=1.0))
    assert max_error(run_ort(onnx_path(tmp_path, full.model, "full.onnx"), None,
                             {"q": q, "k": k, "v": v})["out"], dense["out"]) < 1e-5


def onnx_path(folder, model, name="dense.onnx"):
    path = folder / name
    onnx.save(model, str(path))
    return path


def test_boundary_predictor_problems_are_refused_before_any_work(tmp_path):
    with pytest.raises(DHSAError, match="used by --pattern dynamic only"):
        rewrite_model(attention_model(causal=True), tmp_path / "out.onnx",
                      DHSAConfig(boundary_predictor=str(tmp_path / "p.safetensors")))
    with pytest.raises(DHSAError, match="does not exist"):
        rewrite_model(attention_model(causal=True), tmp_path / "out.onnx",
                      DHSAConfig(pattern="dynamic", boundary_predictor=str(tmp_path / "p.safetensors")))
    assert not (tmp_path / "out.onnx").exists()


def invoke(*args):
    result = CliRunner().invoke(main, ["rewrite", *map(str, args)])
    return result.exit_code, result.output, result.stderr


def test_cli_zero_matches_exits_2_with_one_line(tmp_path):
    onnx.save(matmul_model(), str(tmp_path / "plain.onnx"))
    code, _, err = invoke(tmp_path / "plain.onnx", tmp_path / "out.onnx")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dhsa-export: error: no attention to rewrite")
    assert all(name in err for name in RULE_NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx"]


@pytest.mark.parametrize("case", ["missing", "not-onnx", "bad-density", "no-output-folder"])
def test_cli_bad_input(tmp_path, case):
    source = tmp_path / "in.onnx"
    onnx.save(attention_model(causal=True), str(source))
    args, expected = [source, tmp_path / "out.onnx"], ""
    if case == "missing":
        args[0], expected = tmp_path / "nope.onnx", "does not exist"
    elif case == "not-onnx":
        (tmp_path / "junk.onnx").write_bytes(b"\xff\x00 definitely not protobuf" * 10)
        args[0], expected = tmp_path / "junk.onnx", "is not an ONNX model"
    elif case == "bad-density":
        args, expected = [*args, "--density", "2"], "density"
    else:
        args[1], expected = tmp_path / "missing-dir" / "out.onnx", "output folder"
    code, _, err = invoke(*args)
    assert code == 2 and err.count("\n") == 1 and expected in err
    assert not (tmp_path / "out.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_prints_per_rule_counts(tmp_path):
    onnx.save(attention_model(causal=True), str(tmp_path / "in.onnx"))
    code, out, _ = invoke(tmp_path / "in.onnx", tmp_path / "out.onnx", "--q-block", "4", "--k-block", "4",
                          "--density", "0.5", "--verbose")
    assert code == 0, out
    lines = out.splitlines()
    for name in RULE_NAMES:
        changed = 1 if name == "matmul_softmax" else 0
        assert any(line.startswith(f"{name}: {changed} changed") for line in lines)
    assert lines[-1].startswith("wrote ") and (tmp_path / "out.onnx").is_file()
