"""Pieces every rewrite rule shares: the rule protocol, the emitted DHSA pair, layout helpers,
recognizers for the GQA key/value expansion and scalar scales, and the causal-mask check.

The ``dhsa::Route`` + ``dhsa::BlockSparseAttention`` pair is built in exactly one place
(:func:`emit_dhsa_attention`) from the op registry, with the attributes our own exporter emits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ...config import DHSAConfig
from ..registry import BLOCK_SPARSE_ATTENTION, ROUTE, attention_attributes, route_attributes
from .graph import Graph, NoMatch

MASKED = -1.0e4  # additive mask entries at or below this count as "blocked"


@dataclass
class RuleResult:
    """What one rule did: how many places it changed and why each other candidate was left alone."""

    rule: str
    pattern: str
    changed: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)

    @property
    def candidates(self) -> int:
        return self.changed + len(self.rejected)


class Rule:
    """One rewrite rule: ``anchors`` finds candidate nodes, ``check`` returns a plan or raises
    :class:`NoMatch` with the reason, ``rewrite`` applies a plan. ``run`` does all three."""

    name = ""
    pattern = ""  # one line naming the foreign pattern, used in reports and errors
    anchor: tuple[str, str] = ("", "")  # (op_type, domain) of the node each candidate match starts from

    def anchors(self, graph: Graph) -> list[onnx.NodeProto]:
        return graph.find(*self.anchor)

    def check(self, graph: Graph, node: onnx.NodeProto, cfg: DHSAConfig):
        raise NotImplementedError

    def rewrite(self, graph: Graph, plan, cfg: DHSAConfig) -> None:
        raise NotImplementedError

    def run(self, graph: Graph, cfg: DHSAConfig) -> RuleResult:
        result = RuleResult(self.name, self.pattern)
        for node in self.anchors(graph):
            try:
                plan = self.check(graph, node, cfg)
            except NoMatch as reason:
                result.rejected.append((node.name or node.op_type, str(reason)))
                continue
            self.rewrite(graph, plan, cfg)
            result.changed += 1
        return result


# ---------------------------------------------------------------------------- the DHSA pair


def emit_dhsa_attention(graph: Graph, query: str, key: str, value: str, output: str, cfg: DHSAConfig,
                        query_heads: int, kv_heads: int, scale: float, dtype: int | None, prefix: str) -> None:
    """``Route(query, key)`` then ``BlockSparseAttention(query, key, value, index, count) -> output``.

    query ``[B, Hq, L, D]``, key/value ``[B, Hkv, L, D]`` of element type ``dtype``; ``scale`` 0
    means 1/sqrt(D). The outputs get value_info (types and the dims the registry's shape inference knows),
    so ONNX shape inference can continue through the custom nodes.
    """
    graph.ensure_opset(ROUTE.domain, ROUTE.version)
    attrs = route_attributes(cfg, query_heads, kv_heads)
    index, count = graph.add_node(
        ROUTE.name, [query, key], [graph.fresh(f"{prefix}/block_index"), graph.fresh(f"{prefix}/block_count")],
        domain=ROUTE.domain, name=f"{prefix}/Route", **attrs)
    graph.add_node(BLOCK_SPARSE_ATTENTION.name, [query, key, value, index, count], [output],
                   domain=BLOCK_SPARSE_ATTENTION.domain, name=f"{prefix}/BlockSparseAttention",
                   **attention_attributes(cfg, scale))
    query_shape, key_shape = (None, query_heads, None, None), (None, kv_heads, None, None)
    index_shape, count_shape = ROUTE.output_shapes(attrs, query_shape, key_shape)
    graph.declare(index, TensorProto.INT32, list(index_shape))
    graph.declare(count, TensorProto.INT32, list(count_shape))
    if dtype is not None:
        (output_shape,) = BLOCK_SPARSE_ATTENTION.output_shapes({}, query_shape, key_shape, key_shape)
        graph.declare(output, dtype, list(output_shape))


def check_heads(query_heads, kv_heads, where: str) -> tuple[int, int]:
    if not isinstance(query_heads, int) or not isinstance(kv_heads, int):
        raise NoMatch(f"{where}: head counts are not static (query {query_heads}, key/value {kv_heads})")
    if query_heads <= 0 or kv_heads <= 0 or query_heads % kv_heads:
        raise NoMatch(f"{where}: {query_heads} query heads are not a multiple of {kv_heads} key/value heads")
    return query_heads, kv_heads


# ---------------------------------------------------------------------------- layouts


def split_heads(graph: Graph, tensor: str, heads: int, prefix: str) -> str:
    """``[B, S, heads * D] -> [B, heads, S, D]``."""
    shape = graph.add_constant([0, 0, heads, -1])
    (reshaped,) = graph.add_node("Reshape", [tensor, shape], name=f"{prefix}/Reshape")
    (moved,) = graph.add_node("Transpose", [reshaped], name=f"{prefix}/Transpose", perm=[0, 2, 1, 3])
    return moved


def merge_heads(graph: Graph, tensor: str, output: str, prefix: str) -> None:
    """``[B, H, S, D] -> [B, S, H * D]`` written to ``output``."""
    (moved,) = graph.add_node("Transpose", [tensor], name=f"{prefix}/Transpose", perm=[0, 2, 1, 3])
    graph.add_node("Reshape", [moved, graph.add_constant([0, 0, -1])], [output], name=f"{prefix}/Reshape")


def to_bnsh(graph: Graph, tensor: str, prefix: str) -> str:
    """``[B, S, N, H] -> [B, N, S, H]``."""
    (moved,) = graph.add_node("Transpose", [tensor], name=f"{prefix}/Transpose", perm=[0, 2, 1, 3])
    return moved


def unexpanded_kv(graph: Graph, tensor: str) -> str:
    """The ``[B, Hkv, L, D]`` tensor behind a GQA expansion ``Reshape(Expand(Unsqueeze(x, 2)))``
    (transformers' ``repeat_kv`` as torch.onnx exports it), else ``tensor`` itself."""
    reshape = graph.producer(tensor, "Reshape")
    expand = reshape and graph.producer(reshape.input[0], "Expand")
    unsqueeze = expand and graph.producer(expand.input[0], "Unsqueeze")
    if not unsqueeze:
        return tensor
    source = unsqueeze.input[0]
    axes = graph.constant(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else attribute(unsqueeze, "axes")
    if axes is None or [int(a) for a in np.ravel(axes)] not in ([2], [-3]):
        return tensor
    heads, expanded = graph.static_dim(source, 1), graph.static_dim(tensor, 1)
    if graph.rank(source) != 4 or graph.rank(tensor) != 4 or not heads or not expanded or expanded % heads:
        return tensor
    return source


def refuse_unknown_attributes(node: onnx.NodeProto, known: set[str], where: str) -> None:
    """A foreign op may grow attributes that change its meaning: refuse any the rule does not know."""
    unknown = sorted({a.name for a in node.attribute} - known)
    if unknown:
        raise NoMatch(f"{where}: unknown attributes {unknown}")


def attribute(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's value (strings decoded), or ``default``."""
    for item in node.attribute:
        if item.name == name:
            value = helper.get_attribute_value(item)
            return value.decode() if isinstance(value, bytes) else value
    return default


def peel_scale(graph: Graph, tensor: str) -> tuple[str, float]:
    """Walk back through ``Mul``/``Div`` by scalar constants; returns (source, accumulated factor)."""
    factor = 1.0
    while True:
        node = graph.producer(tensor)
        if node is None or node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx"):
            return tensor, factor
        constants = [graph.scalar(name) for name in node.input]
        if node.op_type == "Mul" and constants[1] is not None:
            factor, tensor = factor * constants[1], node.input[0]
        elif node.op_type == "Mul" and constants[0] is not None:
            factor, tensor = factor * constants[0], node.input[1]
        elif node.op_type == "Div" and constants[1] not in (None, 0.0):
            factor, tensor = factor / constants[1], node.input[0]
        else:
            return tensor, factor


# ---------------------------------------------------------------------------- causal masks


def check_causal_mask(graph: Graph, mask: str, *, exact: bool = True, lengths=(7, 12)) -> None:
    """Raise :class:`NoMatch` unless ``mask`` is a causal mask for an unpadded prompt.

    The mask's subgraph is cut out and run in ONNX Runtime for prompts of ``lengths`` tokens
    (integer inputs: ids 0, attention masks 1, position ids 0..L-1; float inputs random, twice with
    different values: a mask that depends on them is refused). A boolean mask allows where
    True; an additive mask allows where 0 and blocks at or below -1e4 (any other value is a bias
    the sparse kernel cannot add). ``exact``: the allowed set must be the causal triangle; else it
    must contain it (a mask combined with the op's own causal flag).
    """
    cache = graph.__dict__.setdefault("_mask_checks", {})
    key = (mask, exact)
    if key not in cache:
        try:
            _check_causal(graph, mask, exact, lengths)
            cache[key] = None
        except NoMatch as reason:
            cache[key] = str(reason)
    if cache[key] is not None:
        raise NoMatch(cache[key])


def _check_causal(graph: Graph, mask: str, exact: bool, lengths) -> None:
    for length in lengths:
        value = evaluate(graph, mask, length)
        if length == lengths[0] and not np.array_equal(value, evaluate(graph, mask, length, seed=1)):
            raise NoMatch(f"mask {mask!r} depends on the values of a float graph input")
        if value.ndim < 2 or value.shape[-1] != value.shape[-2]:
            raise NoMatch(f"mask {mask!r} has shape {list(value.shape)} for a prompt of {length} tokens, not "
                          "[..., L, L] (a graph with past keys is not a prefill graph)")
        size = value.shape[-1]
        flat = value.reshape(-1, size, size)
        if value.dtype == np.bool_:
            allowed = flat
        else:
            blocked = flat <= MASKED
            if np.any(np.abs(np.where(blocked, 0, flat)) > 1e-6):
                raise NoMatch(f"mask {mask!r} adds a bias to the scores (not a pure causal mask)")
            allowed = ~blocked
        if np.any(allowed != allowed[:1]):
            raise NoMatch(f"mask {mask!r} differs between batch items or heads")
        causal = np.tril(np.ones((size, size), dtype=bool))
        if exact and not np.array_equal(allowed[0], causal):
            raise NoMatch(f"mask {mask!r} is not causal (prompt of {length} tokens)")
        if not exact and np.any(causal & ~allowed[0]):
            raise NoMatch(f"mask {mask!r} blocks keys inside the causal window (prompt of {length} tokens)")


def evaluate(graph: Graph, tensor: str, length: int, seed: int = 0) -> np.ndarray:
    """Run the subgraph that computes ``tensor`` from the graph inputs for a prompt of ``length``."""
    from ...backends.ort_cpu.session import run_standard_ops

    needed, inputs, stack = set(), [], [tensor]
    graph_inputs = {i.name: i for i in graph.graph.input}
    while stack:
        name = stack.pop()
        if name in needed or not name:
            continue
        needed.add(name)
        node = graph.producer(name)
        if node is not None:
            stack.extend(node.input)
        elif name in graph_inputs and name not in graph.initializers:
            inputs.append(graph_inputs[name])
    nodes = [n for n in graph.nodes() if any(o in needed for o in n.output)]
    initializers = [graph.initializers[n] for n in sorted(needed) if n in graph.initializers]
    info = graph.info(tensor)
    if info is None:
        raise NoMatch(f"the type of mask {tensor!r} is unknown")
    output = helper.make_tensor_value_info(tensor, info.elem_type, None)
    model = helper.make_model(helper.make_graph(nodes, "mask", list(inputs), [output], initializers),
                              opset_imports=list(graph.model.opset_import), ir_version=graph.model.ir_version)
    rng = np.random.default_rng(seed)
    feeds = {i.name: _sample_input(i, length, rng) for i in inputs}
    try:
        return np.asarray(run_standard_ops(model, [tensor], feeds)[0])
    except Exception as exc:  # noqa: BLE001 - any failure means the mask cannot be verified
        raise NoMatch(f"mask {tensor!r} could not be evaluated to verify it is causal: "
                      f"{str(exc).splitlines()[0][:200]}") from None


_INT_TYPES = {TensorProto.INT64: np.int64, TensorProto.INT32: np.int32}
_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


def _sample_input(value_info, length: int, rng: np.random.Generator) -> np.ndarray:
    tensor_type = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (1 if axis == 0 else length)
            for axis, d in enumerate(tensor_type.shape.dim)]
    name = value_info.name.lower()
    if tensor_type.elem_type == TensorProto.BOOL:
        return np.ones(dims, dtype=bool)
    if tensor_type.elem_type in _FLOAT_TYPES:
        return rng.standard_normal(dims).astype(_FLOAT_TYPES[tensor_type.elem_type])
    if tensor_type.elem_type not in _INT_TYPES:
        raise NoMatch(f"the mask depends on graph input {value_info.name!r} of an unsupported type")
    dtype = _INT_TYPES[tensor_type.elem_type]
    if "position" in name:
        return np.broadcast_to(np.arange(dims[-1], dtype=dtype), dims).copy()
    if "mask" in name:
        return np.ones(dims, dtype=dtype)
    return np.zeros(dims, dtype=dtype)


# ---------------------------------------------------------------------------- opset-aware ops


def split(graph: Graph, tensor: str, axis: int, sizes: list[int], prefix: str) -> list[str]:
    if graph.opset() >= 13:
        return graph.add_node("Split", [tensor, graph.add_constant(sizes)], len(sizes), name=prefix, axis=axis)
    return graph.add_node("Split", [tensor], len(sizes), name=prefix, axis=axis, split=sizes)


def unsqueeze(graph: Graph, tensor: str, axes: list[int], prefix: str) -> str:
    if graph.opset() >= 13:
        (out,) = graph.add_node("Unsqueeze", [tensor, graph.add_constant(axes)], name=prefix)
    else:
        (out,) = graph.add_node("Unsqueeze", [tensor], name=prefix, axes=axes)
    return out
