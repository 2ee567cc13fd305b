"""Rule ``group_query_attention``: ONNX Runtime's ``com.microsoft.GroupQueryAttention``, as the
onnxruntime-genai model builder emits it.

Pattern: ``GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k,
total_sequence_length [, cos_cache, sin_cache [, position_ids]]) -> (output, present_key,
present_value)`` with packed QKV (``key``/``value`` empty, ``query`` ``[B, S, (N + 2 Nkv) H]``) or
separate Q/K/V ``[B, S, N H]`` / ``[B, S, Nkv H]``, and rotary embedding inside (``do_rotary=1``,
``rotary_interleaved`` 0 or 1, full or partial rotary dimension) or applied before the op.

Check: ``softcap`` 0, ``local_window_size`` -1, no ``smooth_softmax``, no attention bias or head
sink input, the QK output unused, static ``num_heads`` / ``kv_num_heads``.

Rewrite (a *prefill* graph: one unpadded prompt, no past): the past inputs are ignored (and drop
out of the graph once no layer reads them; so do ``seqlens_k`` / ``total_sequence_length`` and the
``attention_mask`` input they are computed from); Q/K/V are split into heads; with ``do_rotary=1``
the rotary embedding is applied with explicit standard ops from the op's cos/sin caches at
``position_ids`` (or positions 0..S-1 when the op has none, which is what GroupQueryAttention uses
for a first prompt); then ``dhsa::Route`` + ``dhsa::BlockSparseAttention``. ``present_key`` /
``present_value`` keep their names and carry the rotated K and V in BNSH ``[B, Nkv, S, H]``, so a
dense decode graph can continue from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ...config import DHSAConfig
from .common import Rule, attribute, check_heads, emit_dhsa_attention, merge_heads, refuse_unknown_attributes
from .common import split, to_bnsh, unsqueeze
from .graph import Graph, NoMatch

DOMAIN = "com.microsoft"
KNOWN_ATTRIBUTES = {"num_heads", "kv_num_heads", "scale", "softcap", "local_window_size", "do_rotary",
                    "rotary_interleaved", "smooth_softmax", "qk_output"}


@dataclass
class Plan:
    node: onnx.NodeProto
    query: str
    key: str  # "" when packed
    value: str
    query_heads: int
    kv_heads: int
    scale: float
    rotary: bool
    interleaved: bool
    cos_cache: str
    sin_cache: str
    position_ids: str
    rotary_dim: int
    head_size: int | None


class GroupQueryAttentionRule(Rule):
    name = "group_query_attention"
    pattern = "com.microsoft.GroupQueryAttention (packed or separate QKV, rotary inside or outside)"
    anchor = ("GroupQueryAttention", DOMAIN)


    def check(self, graph: Graph, node: onnx.NodeProto, cfg: DHSAConfig) -> Plan:
        where = f"GroupQueryAttention {node.name!r}"
        refuse_unknown_attributes(node, KNOWN_ATTRIBUTES, where)
        softcap = float(attribute(node, "softcap", 0.0))
        if softcap != 0.0:
            raise NoMatch(f"{where}: softcap {softcap} is not supported (the sparse kernel has none)")
        window = int(attribute(node, "local_window_size", -1))
        if window != -1:
            raise NoMatch(f"{where}: local_window_size {window} (sliding-window attention) is not supported")
        if int(attribute(node, "smooth_softmax", 0)):
            raise NoMatch(f"{where}: smooth_softmax is not supported")
        inputs = list(node.input) + [""] * (12 - len(node.input))
        query, key, value = inputs[:3]
        cos_cache, sin_cache, position_ids, bias, sink = inputs[7:12]
        if bias or sink:
            raise NoMatch(f"{where}: attention_bias / head_sink inputs are not supported")
        if bool(key) != bool(value):
            raise NoMatch(f"{where}: has only one of key and value")
        if len(node.output) > 3 and node.output[3] and (graph.users(node.output[3]) or graph.is_graph_output(node.output[3])):
            raise NoMatch(f"{where}: its QK output is used")
        query_heads, kv_heads = check_heads(attribute(node, "num_heads"), attribute(node, "kv_num_heads"), where)
        width = graph.static_dim(query, -1)
        packed_heads = query_heads if key else query_heads + 2 * kv_heads
        head_size = width // packed_heads if width and width % packed_heads == 0 else None
        rotary = int(attribute(node, "do_rotary", 0)) == 1
        rotary_dim = 0
        if rotary:
            if not (cos_cache and sin_cache):
                raise NoMatch(f"{where}: do_rotary=1 without cos_cache/sin_cache")
            half = graph.static_dim(cos_cache, -1)
            if not half or graph.static_dim(sin_cache, -1) != half:
                raise NoMatch(f"{where}: the rotary dimension of cos_cache/sin_cache is not static")
            rotary_dim = 2 * half
            if head_size is None and rotary_dim:
                raise NoMatch(f"{where}: the head size is not static (needed for the rotary embedding)")
            if rotary_dim > head_size:
                raise NoMatch(f"{where}: rotary dimension {rotary_dim} exceeds head size {head_size}")
        return Plan(node, query, key, value, query_heads, kv_heads, float(attribute(node, "scale", 0.0)), rotary,
                    int(attribute(node, "rotary_interleaved", 0)) == 1, cos_cache, sin_cache, position_ids,
                    rotary_dim, head_size)

    def rewrite(self, graph: Graph, plan: Plan, cfg: DHSAConfig) -> None:
        node = plan.node
        prefix = f"{node.name or 'GroupQueryAttention'}/dhsa"
        outputs = list(node.output) + [""] * (3 - len(node.output))
        graph.remove(node)
        q, k, v = self._heads(graph, plan, prefix)  # BSNH
        if plan.rotary:
            cos, sin = self._rotary_tables(graph, plan, q, prefix)
            q = rotate(graph, q, cos, sin, plan, f"{prefix}/rotary_q")
            k = rotate(graph, k, cos, sin, plan, f"{prefix}/rotary_k")
        query = to_bnsh(graph, q, f"{prefix}/query")
        key_name = outputs[1] or graph.fresh(f"{prefix}/key_bnsh")
        value_name = outputs[2] or graph.fresh(f"{prefix}/value_bnsh")
        graph.add_node("Transpose", [k], [key_name], name=f"{prefix}/key/Transpose", perm=[0, 2, 1, 3])
        graph.add_node("Transpose", [v], [value_name], name=f"{prefix}/value/Transpose", perm=[0, 2, 1, 3])
        attended = graph.fresh(f"{prefix}/output_bnsh")
        emit_dhsa_attention(graph, query, key_name, value_name, attended, cfg, plan.query_heads, plan.kv_heads,
                            plan.scale, graph.elem_type(plan.query), prefix)
        merge_heads(graph, attended, outputs[0], f"{prefix}/output")

    @staticmethod
    def _heads(graph: Graph, plan: Plan, prefix: str) -> tuple[str, str, str]:
        """Q, K, V as ``[B, S, heads, H]``."""
        def reshape(tensor: str, heads: int, name: str) -> str:
            (out,) = graph.add_node("Reshape", [tensor, graph.add_constant([0, 0, heads, -1])], name=name)
            return out

        if plan.key:
            return (reshape(plan.query, plan.query_heads, f"{prefix}/query/Reshape"),
                    reshape(plan.key, plan.kv_heads, f"{prefix}/key/Reshape"),
                    reshape(plan.value, plan.kv_heads, f"{prefix}/value/Reshape"))
        packed = reshape(plan.query, plan.query_heads + 2 * plan.kv_heads, f"{prefix}/qkv/Reshape")
        q, k, v = split(graph, packed, 2, [plan.query_heads, plan.kv_heads, plan.kv_heads], f"{prefix}/qkv/Split")
        return q, k, v

    @staticmethod
    def _rotary_tables(graph: Graph, plan: Plan, query: str, prefix: str) -> tuple[str, str]:
        """cos/sin rows at the positions, shaped ``[B or 1, S, 1, R/2]`` (BSNH broadcast)."""
        positions = plan.position_ids
        if not positions:
            (shape,) = graph.add_node("Shape", [query], name=f"{prefix}/positions/Shape")
            (length,) = graph.add_node("Gather", [shape, graph.add_constant(1)], name=f"{prefix}/positions/Gather",
                                       axis=0)
            (steps,) = graph.add_node("Range", [graph.add_constant(0), length, graph.add_constant(1)],
                                      name=f"{prefix}/positions/Range")
            positions = unsqueeze(graph, steps, [0], f"{prefix}/positions/Unsqueeze")
        tables = []
        dtype = graph.elem_type(plan.query)
        for cache, label in ((plan.cos_cache, "cos"), (plan.sin_cache, "sin")):
            (rows,) = graph.add_node("Gather", [cache, positions], name=f"{prefix}/{label}/Gather", axis=0)
            if dtype is not None and graph.elem_type(cache) not in (None, dtype):
                (rows,) = graph.add_node("Cast", [rows], name=f"{prefix}/{label}/Cast", to=dtype)
            tables.append(unsqueeze(graph, rows, [2], f"{prefix}/{label}/Unsqueeze"))
        return tables[0], tables[1]


def rotate(graph: Graph, x: str, cos: str, sin: str, plan: Plan, prefix: str) -> str:
    """Rotary embedding of ``x`` ``[B, S, N, H]`` on its first ``rotary_dim`` channels.

    Half layout (``rotary_interleaved=0``): channel ``i`` pairs with ``i + R/2``; interleaved:
    channel ``2i`` pairs with ``2i + 1``. Pair ``(a, b)`` at angle ``i`` becomes
    ``(a cos - b sin, b cos + a sin)``.
    """
    rest = None
    if plan.rotary_dim < plan.head_size:
        x, rest = split(graph, x, 3, [plan.rotary_dim, plan.head_size - plan.rotary_dim], f"{prefix}/Split")
    half = plan.rotary_dim // 2
    if plan.interleaved:
        (pairs,) = graph.add_node("Reshape", [x, graph.add_constant([0, 0, 0, half, 2])], name=f"{prefix}/pairs")
        first, second = split(graph, pairs, 4, [1, 1], f"{prefix}/SplitPairs")
        cos, sin = unsqueeze(graph, cos, [4], f"{prefix}/cos"), unsqueeze(graph, sin, [4], f"{prefix}/sin")
        axis = 4
    else:
        first, second = split(graph, x, 3, [half, half], f"{prefix}/SplitHalves")
        axis = 3

    def combine(a: str, b: str, op: str, label: str) -> str:
        (a_cos,) = graph.add_node("Mul", [a, cos], name=f"{prefix}/{label}/MulCos")
        (b_sin,) = graph.add_node("Mul", [b, sin], name=f"{prefix}/{label}/MulSin")
        (out,) = graph.add_node(op, [a_cos, b_sin], name=f"{prefix}/{label}/{op}")
        return out

    (rotated,) = graph.add_node("Concat", [combine(first, second, "Sub", "first"),
                                           combine(second, first, "Add", "second")],
                                name=f"{prefix}/Concat", axis=axis)
    if plan.interleaved:
        (rotated,) = graph.add_node("Reshape", [rotated, graph.add_constant([0, 0, 0, -1])], name=f"{prefix}/merge")
    if rest is not None:
        (rotated,) = graph.add_node("Concat", [rotated, rest], name=f"{prefix}/ConcatRest", axis=3)
    return rotated
