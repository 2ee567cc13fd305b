"""Rule onnx_attention: torch.onnx's opset-23 export of SDPA attention (the ONNX ``Attention`` op)."""

from __future__ import annotations

import onnx
import pytest

from dhsa_export import DHSAConfig

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


def test_3d_causal_attention_without_mask(tmp_path):
    """``Attention`` on [B, L, H*D] inputs with ``is_causal=1`` and q/kv head attributes (GQA 4/2)."""
    import numpy as np
    import torch
    from onnx import TensorProto, helper

    from dhsa_export import DHSAConfig
    from dhsa_export.algo.attention import dhsa_attention
    from dhsa_export.onnx.rewrite import rewrite_model

    from .conftest import counts, max_error, run_ort

    heads, kv_heads, dim, length = 4, 2, 8, 48
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1, q_num_heads=heads,
                            kv_num_heads=kv_heads, scale=0.3)
    ports = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "L", h * dim])
             for n, h in (("q", heads), ("k", kv_heads), ("v", kv_heads))]
    graph = helper.make_graph([node], "attention3d", ports,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "L", heads * dim])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10),
              str(tmp_path / "dense.onnx"))
    cfg = DHSAConfig(q_block=8, k_block=4, density=0.25, sink_tokens=4, pattern="ashape", local_tokens=8)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, length, h * dim)).astype(np.float32)
             for n, h in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
    sparse = rewrite_model(tmp_path / "dense.onnx", tmp_path / "dhsa.onnx", cfg)
    assert sparse.counts() == counts(onnx_attention=1)
    split = {n: torch.from_numpy(a).reshape(1, length, -1, dim).transpose(1, 2) for n, a in feeds.items()}
    want = dhsa_attention(split["q"], split["k"], split["v"], cfg, 0.3).transpose(1, 2).reshape(1, length, -1)
    got = run_ort(tmp_path / "dhsa.onnx", None, feeds)["y"]
    dense = run_ort(tmp_path / "dense.onnx", None, feeds)["y"]
    assert max_error(got, want.numpy()) < 1e-5 and max_error(got, dense) > 1e-3
    full = rewrite_model(tmp_path / "dense.onnx", tmp_path / "full.onnx", cfg.replace(density=1.0))
    assert max_error(run_ort(full.output, None, feeds)["y"], dense) < 1e-5


@pytest.mark.parametrize("rule", ["similarity", "predictor"])
def test_dynamic_rewrite_matches_pytorch_dhsa(sdpa_export, tiny_dir, tmp_path, input_ids, rule):
    """``--pattern dynamic``: one ChunkOffsets node on layer 0's keys feeds both layers' pairs, and the
    logits equal the PyTorch DHSA integration's (chunks from layer 0's keys, shared by all layers)."""
    import torch

    from dhsa_export.hf.attention import enable_dhsa
    from dhsa_export.onnx.rewrite import rewrite_model
    from tests.onnx.test_export import DYNAMIC, tiny_predictor

    from .conftest import dhsa_node_counts, load_tiny, max_error, run_ort

    predictor = str(tiny_predictor(tmp_path / "p.safetensors", 32)) if rule == "predictor" else ""
    cfg = DHSAConfig(**DYNAMIC, boundary_predictor=predictor)
    report = rewrite_model(sdpa_export, tmp_path / "dhsa.onnx", cfg)
    assert report.total == 2 and report.chunked_layers == 2
    assert dhsa_node_counts(tmp_path / "dhsa.onnx") == {"Route": 2, "BlockSparseAttention": 2, "ChunkOffsets": 1}
    graph = onnx.load(str(tmp_path / "dhsa.onnx")).graph
    (chunks,) = [n for n in graph.node if n.op_type == "ChunkOffsets"]
    assert len(chunks.input) == (2 if predictor else 1)
    model = load_tiny(tiny_dir)
    runtime = enable_dhsa(model, cfg, backend="reference")
    with torch.no_grad():
        want = model(torch.from_numpy(input_ids)).logits.numpy()
    assert runtime.stats.causal_block_fraction < 1.0
    assert max_error(run_ort(tmp_path / "dhsa.onnx", input_ids)["logits"], want) < 1e-4
