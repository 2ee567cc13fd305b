"""Rule ``matmul_softmax``: attention spelled out as ``MatMul -> (scale) -> mask -> Softmax -> MatMul``,
as torch.onnx exports transformers' eager attention (and ``scaled_dot_product_attention`` below
opset 23).

Pattern, anchored on each ``Softmax`` over the last axis::

    scores = MatMul(Q [* s_q], K^T [* s_k]) [* s | / s]
    masked = Add(scores, mask) | Where(allowed, scores, -inf)      (then optionally * s)
    probs  = Softmax(masked) [-> Where(IsNaN(probs), 0, probs)] [-> Cast]
    output = MatMul(probs, V)

``K^T`` is recognized as ``Transpose(K, [0, 1, 3, 2])`` or the ``Reshape/Transpose/Reshape`` chain of
the decomposed SDPA; any other 4D ``K^T`` gets a Transpose back. Scales are scalar constants and
multiply together. Keys and values expanded by ``repeat_kv`` are taken from before the expansion.

Check: Q is 4D ``[B, H, L, D]``, the mask evaluates to the causal triangle for an unpadded prompt,
the scores and probabilities feed nothing else. Rewrite: ``dhsa::Route`` + ``dhsa::BlockSparseAttention``
writing the output of the last MatMul.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ...config import DHSAConfig
from .common import MASKED, Rule, attribute, check_causal_mask, check_heads, emit_dhsa_attention
from .common import peel_scale, unexpanded_kv
from .graph import Graph, NoMatch


@dataclass
class Plan:
    output_node: onnx.NodeProto
    query: str
    key: str
    key_transposed: bool  # key is K^T [B, H, D, L] and needs a Transpose back
    value: str
    query_heads: int
    kv_heads: int
    scale: float


class MatMulSoftmaxRule(Rule):
    name = "matmul_softmax"
    pattern = "MatMul/(scale)/causal mask (Add or Where)/Softmax/MatMul"
    anchor = ("Softmax", "")


    def check(self, graph: Graph, node: onnx.NodeProto, cfg: DHSAConfig) -> Plan:
        where = f"Softmax {node.name!r}"
        rank = graph.rank(node.input[0])
        if rank != 4:
            raise NoMatch(f"{where}: input rank {rank} is not 4 ([B, H, Lq, Lk] scores)")
        axis = int(attribute(node, "axis", -1 if graph.opset() >= 13 else 1))
        if axis % rank != rank - 1:
            raise NoMatch(f"{where}: axis {axis} is not the last axis")
        output_node = self._probabilities_consumer(graph, node, where)
        masked, factor = peel_scale(graph, node.input[0])
        scores = self._unmask(graph, masked, where)
        scores, score_factor = peel_scale(graph, scores)
        matmul = graph.producer(scores, "MatMul")
        if matmul is None:
            raise NoMatch(f"{where}: the masked scores do not come from a MatMul")
        if len(graph.users(matmul.output[0])) != 1 or graph.is_graph_output(matmul.output[0]):
            raise NoMatch(f"{where}: the attention scores are used elsewhere")
        query, query_factor = peel_scale(graph, matmul.input[0])
        key_t, key_factor = peel_scale(graph, matmul.input[1])
        if graph.rank(query) != 4 or graph.rank(key_t) != 4:
            raise NoMatch(f"{where}: Q and K^T of the score MatMul are not 4D [B, H, L, D]")
        key, transposed = key_from_transposed(graph, key_t)
        value = output_node.input[1]
        if not transposed:
            key, value = unexpanded_kv(graph, key), unexpanded_kv(graph, value)
        kv_heads = graph.static_dim(key_t if transposed else key, 1)
        if graph.static_dim(value, 1) != kv_heads:
            raise NoMatch(f"{where}: key and value have different head counts")
        query_heads, kv_heads = check_heads(graph.static_dim(query, 1), kv_heads, where)
        scale = factor * score_factor * query_factor * key_factor
        if scale <= 0:
            raise NoMatch(f"{where}: softmax scale {scale} is not positive")
        return Plan(output_node, query, key, transposed, value, query_heads, kv_heads, scale)

    @staticmethod
    def _probabilities_consumer(graph: Graph, node: onnx.NodeProto, where: str) -> onnx.NodeProto:
        """The ``MatMul(probs, V)`` after the Softmax (through a NaN guard and a Cast)."""
        probs = node.output[0]
        users = graph.users(probs)
        kinds = sorted(u.op_type for u in users)
        if kinds == ["IsNaN", "Where"]:
            guard = next(u for u in users if u.op_type == "Where")
            isnan = next(u for u in users if u.op_type == "IsNaN")
            if list(guard.input[::2]) != [isnan.output[0], probs] or len(graph.users(isnan.output[0])) != 1:
                raise NoMatch(f"{where}: the NaN guard after the Softmax has an unexpected form")
            probs, users = guard.output[0], graph.users(guard.output[0])
        if len(users) == 1 and users[0].op_type == "Cast":
            probs, users = users[0].output[0], graph.users(users[0].output[0])
        if graph.is_graph_output(probs) or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != probs:
            raise NoMatch(f"{where}: the probabilities do not feed exactly one MatMul with V")
        return users[0]

    @staticmethod
    def _unmask(graph: Graph, masked: str, where: str) -> str:
        """The scores under the mask, after checking the mask is causal."""
        node = graph.producer(masked)
        if node is not None and node.op_type == "Add":
            sides = [peel_scale(graph, name) for name in node.input]
            from_matmul = [graph.producer(source, "MatMul") is not None for source, _ in sides]
            if from_matmul.count(True) != 1:
                raise NoMatch(f"{where}: cannot tell the scores from the mask in Add {node.name!r}")
            index = from_matmul.index(True)
            check_causal_mask(graph, node.input[1 - index], exact=True)
            return node.input[index]
        if node is not None and node.op_type == "Where":
            fill = graph.scalar(node.input[2])
            if fill is None or fill > MASKED:
                raise NoMatch(f"{where}: Where {node.name!r} does not fill blocked scores with -inf")
            check_causal_mask(graph, node.input[0], exact=True)
            return node.input[1]
        raise NoMatch(f"{where}: no causal mask on the scores (bidirectional attention is not rewritten)")

    def rewrite(self, graph: Graph, plan: Plan, cfg: DHSAConfig) -> None:
        prefix = f"{plan.output_node.name or 'attention'}/dhsa"
        output = plan.output_node.output[0]
        graph.remove(plan.output_node)
        key = plan.key
        if plan.key_transposed:
            (key,) = graph.add_node("Transpose", [key], name=f"{prefix}/key", perm=[0, 1, 3, 2])
        emit_dhsa_attention(graph, plan.query, key, plan.value, output, cfg, plan.query_heads, plan.kv_heads,
                            plan.scale, graph.elem_type(plan.query), prefix)


def key_from_transposed(graph: Graph, key_t: str) -> tuple[str, bool]:
    """(K, False) when ``key_t`` is recognizably K transposed on its last two axes, else (key_t, True)."""
    transpose = graph.producer(key_t, "Transpose")
    if transpose is not None and list(attribute(transpose, "perm", [])) == [0, 1, 3, 2]:
        return transpose.input[0], False
    outer = graph.producer(key_t, "Reshape")
    inner_t = outer and graph.producer(outer.input[0], "Transpose")
    inner = inner_t and graph.producer(inner_t.input[0], "Reshape")
    if inner and list(attribute(inner_t, "perm", [])) == [0, 2, 1]:
        source, merged = graph.info(inner.input[0]), graph.info(inner.output[0])
        target = graph.info(key_t)
        if (source and merged and target and source.rank == 4 and merged.rank == 3
                and merged.dims[1:] == source.dims[2:] and None not in merged.dims[1:]
                and target.dims[:2] == source.dims[:2] and None not in target.dims[:2]):
            return inner.input[0], False
    return key_t, True
