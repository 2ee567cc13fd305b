"""Rule onnx_attention: torch.onnx's opset-23 export of SDPA attention (the ONNX ``Attention`` op)."""

from __future__ import annotations

import onnx
import pytest

from .conftest import check_torch_form, export_dense


@pytest.fixture(scope="module")
def sdpa_export(tiny_dir, tmp_path_factory):
    return export_dense(tiny_dir, tmp_path_factory.mktemp("sdpa23") / "dense.onnx", "sdpa", 23)


def test_sdpa_export_holds_attention_ops(sdpa_export):
    ops = [n.op_type for n in onnx.load(str(sdpa_export)).graph.node]
    assert ops.count("Attention") == 2 and "Softmax" not in ops


def test_rewrite_matches_dhsa_reference(sdpa_export, tmp_path, input_ids, reference):
    check_torch_form(sdpa_export, tmp_path, "onnx_attention", input_ids, reference)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "dhsa.onnx")).graph.node]
    assert "Attention" not in ops and "Expand" not in ops  # the GQA expansion of K/V went with it
