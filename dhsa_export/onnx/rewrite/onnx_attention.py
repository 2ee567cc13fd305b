"""Rule ``onnx_attention``: the ONNX-standard ``Attention`` op (opset 23+), as torch.onnx exports
``scaled_dot_product_attention`` at opset 23.

Pattern: ``Attention(Q, K, V [, attn_mask]) -> Y`` with 4D ``[B, H, L, D]`` or 3D ``[B, L, H*D]``
inputs (3D needs the ``q_num_heads`` / ``kv_num_heads`` attributes).

Check: causal (``is_causal=1``, or a mask that evaluates to the causal triangle for an unpadded
prompt; with both, the mask must not block any causal key), no KV cache inputs, no
``nonpad_kv_seqlen``, ``softcap`` 0, no consumer of the optional outputs. Keys and values expanded
to the query heads by ``repeat_kv`` (Unsqueeze/Expand/Reshape) are taken from before the expansion,
so routing sees the real KV heads (``head_routing="group"`` groups as in PyTorch).

Rewrite: ``dhsa::Route`` + ``dhsa::BlockSparseAttention`` with the op's ``scale`` (0 = 1/sqrt(D)),
writing the attention output tensor; the now dead mask and expansion nodes are removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ...config import DHSAConfig
from .common import Rule, attribute, check_causal_mask, check_heads, emit_dhsa_attention, merge_heads
from .common import refuse_unknown_attributes
from .common import split_heads, unexpanded_kv
from .graph import Graph, NoMatch

KNOWN_ATTRIBUTES = {"is_causal", "kv_num_heads", "q_num_heads", "qk_matmul_output_mode", "scale", "softcap",
                    "softmax_precision"}


@dataclass
class Plan:
    node: onnx.NodeProto
    query: str
    key: str
    value: str
    query_heads: int
    kv_heads: int
    scale: float
    packed: bool  # 3D [B, L, H*D] inputs


class OnnxAttentionRule(Rule):
    name = "onnx_attention"
    pattern = "ONNX Attention (opset 23+), causal, no KV cache"
    anchor = ("Attention", "")


    def check(self, graph: Graph, node: onnx.NodeProto, cfg: DHSAConfig) -> Plan:
        where = f"Attention {node.name!r}"
        inputs = list(node.input) + [""] * (7 - len(node.input))
        query, key, value, mask, past_key, past_value, nonpad = inputs[:7]
        refuse_unknown_attributes(node, KNOWN_ATTRIBUTES, where)
        if past_key or past_value:
            raise NoMatch(f"{where}: has KV cache inputs (past_key/past_value); rewrite a graph without past")
        if nonpad:
            raise NoMatch(f"{where}: has nonpad_kv_seqlen (padded keys are not supported)")
        if float(attribute(node, "softcap", 0.0)) != 0.0:
            raise NoMatch(f"{where}: softcap {attribute(node, 'softcap')} is not supported (the sparse kernel has none)")
        for output in node.output[1:]:
            if output and (graph.users(output) or graph.is_graph_output(output)):
                raise NoMatch(f"{where}: its optional output {output!r} is used")
        causal = int(attribute(node, "is_causal", 0)) == 1
        if not causal and not mask:
            raise NoMatch(f"{where}: is_causal=0 and no mask (bidirectional attention is not rewritten)")
        if mask:
            check_causal_mask(graph, mask, exact=not causal)
        rank = graph.rank(query)
        if rank == 4:
            key, value = unexpanded_kv(graph, key), unexpanded_kv(graph, value)
            query_heads, kv_heads = graph.static_dim(query, 1), graph.static_dim(key, 1)
            if graph.static_dim(value, 1) != kv_heads:
                key, value = inputs[1], inputs[2]  # only one of them was expanded: use both as given
                kv_heads = graph.static_dim(key, 1)
        elif rank == 3:
            query_heads, kv_heads = attribute(node, "q_num_heads"), attribute(node, "kv_num_heads")
        else:
            raise NoMatch(f"{where}: query rank {rank} is not 3 or 4")
        query_heads, kv_heads = check_heads(query_heads, kv_heads, where)
        return Plan(node, query, key, value, query_heads, kv_heads, float(attribute(node, "scale", 0.0)), rank == 3)

    def rewrite(self, graph: Graph, plan: Plan, cfg: DHSAConfig) -> None:
        prefix = f"{plan.node.name or 'Attention'}/dhsa"
        output = plan.node.output[0]
        graph.remove(plan.node)
        query, key, value = plan.query, plan.key, plan.value
        dtype = graph.elem_type(query)
        if plan.packed:
            query = split_heads(graph, query, plan.query_heads, f"{prefix}/query")
            key = split_heads(graph, key, plan.kv_heads, f"{prefix}/key")
            value = split_heads(graph, value, plan.kv_heads, f"{prefix}/value")
            attended = graph.fresh(f"{prefix}/output_bnsh")
            emit_dhsa_attention(graph, query, key, value, attended, cfg, plan.query_heads, plan.kv_heads,
                                plan.scale, dtype, prefix)
            merge_heads(graph, attended, output, f"{prefix}/output")
        else:
            emit_dhsa_attention(graph, query, key, value, output, cfg, plan.query_heads, plan.kv_heads,
                                plan.scale, dtype, prefix)
