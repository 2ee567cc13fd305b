"""Rule matmul_softmax: torch.onnx exports of eager attention (opset 23) and of SDPA below opset 23
(decomposed, with a reshaped K^T and a NaN guard after the Softmax)."""

from __future__ import annotations

import onnx
import pytest

from .conftest import check_torch_form, export_dense

FORMS = {"eager-opset23": ("eager", 23), "sdpa-opset18": ("sdpa", 18)}


@pytest.fixture(scope="module", params=sorted(FORMS))
def dense_export(request, tiny_dir, tmp_path_factory):
    implementation, opset = FORMS[request.param]
    return export_dense(tiny_dir, tmp_path_factory.mktemp(request.param) / "dense.onnx", implementation, opset)


def test_rewrite_matches_dhsa_reference(dense_export, tmp_path, input_ids, reference):
    ops = [n.op_type for n in onnx.load(str(dense_export)).graph.node]
    assert ops.count("Softmax") == 2 and "Attention" not in ops
    check_torch_form(dense_export, tmp_path, "matmul_softmax", input_ids, reference)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "dhsa.onnx")).graph.node]
    assert "Softmax" not in ops
