"""The ``dynamic`` pattern in a rewritten graph: one ``dhsa::ChunkOffsets`` node for every layer.

After the rules have replaced every attention, the first ``dhsa::Route`` in topological order is
layer 0's (every later layer's keys depend on its output). Its key input (post-RoPE, before any GQA
expansion: ``[B, Hkv, L, D]``) feeds a ``ChunkOffsets`` node whose output becomes the
``key_chunk_offsets`` input of every Route and BlockSparseAttention, as in the PyTorch integration
(chunks predicted once from layer 0's keys, shared by all layers). With a learned boundary
predictor its probabilities come from the predictor traced to standard ONNX ops at the graph's
opset (initializers ``boundary_predictor/...``).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from ...config import DHSAConfig
from ...errors import DHSAError
from ..registry import BLOCK_SPARSE_ATTENTION, CHUNK_OFFSETS, ROUTE, chunk_offsets_attributes
from .graph import Graph

PREDICTOR_PREFIX = "boundary_predictor/"
MIN_PREDICTOR_OPSET = 18  # torch.onnx (dynamo) exports from opset 18 on


def add_dynamic_chunks(graph: Graph, cfg: DHSAConfig) -> int:
    """Wire one ChunkOffsets node into every rewritten pair; returns how many Route nodes read it.

    ``graph`` must be topologically sorted (``Graph.finish``); call ``finish`` again afterwards."""
    routes = [n for n in graph.nodes() if n.domain == ROUTE.domain and n.op_type == ROUTE.name]
    attentions = [n for n in graph.nodes()
                  if n.domain == BLOCK_SPARSE_ATTENTION.domain and n.op_type == BLOCK_SPARSE_ATTENTION.name]
    if not routes:
        return 0
    key = routes[0].input[1]
    heads, dim = graph.static_dim(key, 1), graph.static_dim(key, 3)
    if graph.elem_type(key) not in (None, TensorProto.FLOAT):  # both rules read fp32 keys, as the reference
        (key,) = graph.add_node("Cast", [key], name="dhsa_rewrite/KeyToFloat", to=TensorProto.FLOAT)
    probs = None
    threshold = None
    if cfg.boundary_predictor:
        from ...algo.boundaries import cached_predictor

        predictor = cached_predictor(cfg.boundary_predictor)
        threshold = predictor.threshold
        probs = _predictor_nodes(graph, predictor, cfg.boundary_predictor, key, heads, dim)
    graph.ensure_opset(CHUNK_OFFSETS.domain, CHUNK_OFFSETS.version)
    (offsets,) = graph.add_node(CHUNK_OFFSETS.name, [key] + ([probs] if probs else []),
                                [graph.fresh("dhsa_rewrite/key_chunk_offsets")], domain=CHUNK_OFFSETS.domain,
                                name="dhsa_rewrite/ChunkOffsets", **chunk_offsets_attributes(cfg, threshold))
    (offsets_shape,) = CHUNK_OFFSETS.output_shapes({}, (None, None, None, None))
    graph.declare(offsets, TensorProto.INT32, list(offsets_shape))
    for node in routes + attentions:
        node.input.append(offsets)
    graph.reindex()
    return len(routes)


def _predictor_nodes(graph: Graph, predictor, path: str, key: str, heads: int | None, dim: int | None) -> str:
    """Append the predictor's standard ONNX ops reading the fp32 ``key`` (``heads`` x ``dim`` features
    per token); returns the probabilities' name."""
    import torch

    from ..export import quiet_exporter

    opset = graph.opset("")
    if opset < MIN_PREDICTOR_OPSET:
        raise DHSAError(f"the model imports ONNX opset {opset}; the boundary predictor's ops need opset >= "
                        f"{MIN_PREDICTOR_OPSET} (re-export the model at a newer opset, or drop --boundary-predictor "
                        "to use the similarity rule)")
    if heads is None or dim is None:
        raise DHSAError(f"layer 0's keys {key!r} have no static head count / head dim; the boundary predictor "
                        "needs them (drop --boundary-predictor to use the similarity rule)")
    from ...algo.boundaries import check_predictor_features

    check_predictor_features(predictor, heads, dim, path)

    class Probabilities(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.boundary_predictor = predictor

        def forward(self, key):
            return self.boundary_predictor.batch_probabilities(key)

    sample = torch.randn(1, heads, 40, dim)
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(Probabilities().eval(), (sample,), dynamo=True, opset_version=opset,
                                    input_names=["key"], output_names=["probs"], verbose=False,
                                    dynamic_shapes={"key": {0: "batch", 2: "length"}})
    sub = onnx.compose.add_prefix(program.model_proto, PREDICTOR_PREFIX)
    if sub.functions:
        raise DHSAError("the boundary predictor exported with ONNX functions, which the rewrite cannot merge; "
                        "please report this with your torch version")
    source, result = sub.graph.input[0].name, sub.graph.output[0].name
    for node in sub.graph.node:
        node.input[:] = [key if name == source else name for name in node.input]
        graph.add_node(node.op_type, list(node.input), list(node.output), domain=node.domain,
                       name=node.name or f"{PREDICTOR_PREFIX}node",
                       **{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
    for tensor in sub.graph.initializer:
        graph.graph.initializer.append(tensor)
        graph.initializers[tensor.name] = tensor
    return result
