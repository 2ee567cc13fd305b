"""A small editable view of an ONNX graph for the rewrite rules (plain ``onnx`` protobuf).

:class:`Graph` indexes producers and consumers, reads constants (initializers and ``Constant``
nodes), knows the static shape of every tensor that shape inference could derive, appends new
nodes and constants under fresh names, and at the end (:meth:`Graph.finish`) removes what the
rewrites left dead, drops graph inputs that became unused, and sorts the nodes topologically, so
rules never have to care where in the node list they insert.

Shape inference runs once, on a *skeleton* of the model whose large initializers are replaced by
typed graph inputs: a model above the 2 GB protobuf limit can be inferred, and no weight is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import DHSAError

SKELETON_LIMIT = 1024  # bytes; larger initializers become typed inputs in the shape-inference skeleton


class NoMatch(Exception):
    """A candidate node is not the rule's pattern, or fails its check; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    elem_type: int
    dims: tuple  # int for static dims, str for symbolic ones, None for unknown; () for scalars

    @property
    def rank(self) -> int:
        return len(self.dims)


def _info(value_info) -> TensorInfo | None:
    tensor_type = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return TensorInfo(tensor_type.elem_type, tuple(dims))


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights: they become typed graph inputs (nothing is copied)."""
    graph = model.graph
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.graph.name = graph.name
    out.graph.node.extend(graph.node)
    out.graph.input.extend(graph.input)
    out.graph.output.extend(graph.output)
    out.graph.value_info.extend(graph.value_info)
    for tensor in graph.initializer:
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        if external or _tensor_bytes(tensor) > SKELETON_LIMIT:
            out.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            out.graph.initializer.append(tensor)
    out.functions.extend(model.functions)
    return out


def validation_error(model: onnx.ModelProto) -> str | None:
    """Why the ONNX checker or strict shape inference rejects the model, or None.

    Both run on the skeleton (weights as typed inputs), so models above 2 GB are checked too; ops of
    domains onnx does not know (``dhsa``, ``com.microsoft``) are skipped by both.
    """
    bare = skeleton(model)
    try:
        onnx.checker.check_model(bare)
        onnx.shape_inference.infer_shapes(bare, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types; the message is what matters
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def infer_tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Type and shape of every tensor shape inference can derive (large weights not copied)."""
    bare = skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot handle still gets what it carries
        inferred = bare
    infos: dict[str, TensorInfo] = {}
    for value_info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        info = _info(value_info)
        if info is not None:
            infos[value_info.name] = info
    for tensor in model.graph.initializer:
        infos[tensor.name] = TensorInfo(tensor.data_type, tuple(int(d) for d in tensor.dims))
    return infos


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * 8


class Graph:
    """The main graph of a model, with the indexes the rules need."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.infos = infer_tensor_infos(model)
        self.initializers = {t.name: t for t in self.graph.initializer}
        # Node wrappers are held in a Python list: protobuf may hand out a new wrapper object on every
        # access to graph.node, so identity-based bookkeeping needs objects that stay the same.
        self._nodes: list[onnx.NodeProto] = list(self.graph.node)
        self._names = set(self.initializers) | {i.name for i in self.graph.input}
        for node in self._nodes:
            self._names.update(node.output)
            self._names.add(node.name)
        self._removed: set[int] = set()
        self._constants: dict[tuple, str] = {}
        self._used_inputs = self._consumed_names()
        self.reindex()

    # ------------------------------------------------------------------ indexes and lookups

    def reindex(self) -> None:
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes():
            for name in node.output:
                if name:
                    self.producers[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in self.graph.output}

    def nodes(self) -> list[onnx.NodeProto]:
        return [n for n in self._nodes if id(n) not in self._removed]

    def find(self, op_type: str, domain: str = "") -> list[onnx.NodeProto]:
        return [n for n in self.nodes() if n.op_type == op_type and _domain(n.domain) == _domain(domain)]

    def producer(self, name: str, op_type: str | None = None) -> onnx.NodeProto | None:
        node = self.producers.get(name)
        if node is not None and op_type is not None and node.op_type != op_type:
            return None
        return node

    def users(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def is_graph_output(self, name: str) -> bool:
        return name in self.graph_outputs

    def info(self, name: str) -> TensorInfo | None:
        return self.infos.get(name)

    def static_dim(self, name: str, axis: int) -> int | None:
        info = self.info(name)
        if info is None or not -info.rank <= axis < info.rank:
            return None
        dim = info.dims[axis]
        return dim if isinstance(dim, int) else None

    def rank(self, name: str) -> int | None:
        info = self.info(name)
        return None if info is None else info.rank

    def elem_type(self, name: str) -> int | None:
        info = self.info(name)
        return None if info is None else info.elem_type

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a ``Constant`` node output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is None or node.op_type != "Constant" or _domain(node.domain):
            return None
        for attribute in node.attribute:
            if attribute.name == "value":
                return numpy_helper.to_array(attribute.t)
            if attribute.name in ("value_float", "value_int"):
                return np.asarray(helper.get_attribute_value(attribute))
            if attribute.name in ("value_floats", "value_ints"):
                return np.asarray(helper.get_attribute_value(attribute))
        return None

    def scalar(self, name: str) -> float | None:
        value = self.constant(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(()))

    def opset(self, domain: str = "") -> int:
        for entry in self.model.opset_import:
            if _domain(entry.domain) == _domain(domain):
                return int(entry.version)
        return 0

    # ------------------------------------------------------------------ editing

    def fresh(self, hint: str) -> str:
        base = hint.replace(" ", "_")
        name, index = base, 0
        while name in self._names:
            index += 1
            name = f"{base}_{index}"
        self._names.add(name)
        return name

    def add_node(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, *, domain: str = "",
                 name: str, **attrs) -> list[str]:
        """Append a node; ``outputs`` is a count (fresh names under ``name``) or explicit names."""
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{name}/output_{i}") for i in range(outputs)]
        node = helper.make_node(op_type, inputs, outputs, name=self.fresh(name), domain=domain or None, **attrs)
        self._nodes.append(node)
        for output in outputs:
            self.producers[output] = node
        for item in inputs:
            if item:
                self.consumers.setdefault(item, []).append(node)
        return list(outputs)

    def add_constant(self, value, dtype=np.int64, hint: str = "dhsa_rewrite/const") -> str:
        """A (deduplicated) initializer holding ``value``."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh(hint)
            tensor = numpy_helper.from_array(array, name)
            self.graph.initializer.append(tensor)
            self.initializers[name] = tensor
            self.infos[name] = TensorInfo(tensor.data_type, tuple(array.shape))
            self._constants[key] = name
        return self._constants[key]

    def declare(self, name: str, elem_type: int, dims: list) -> None:
        """Record the type (and known dims) of a new tensor as graph value_info (not for graph outputs)."""
        if name in self.infos and self.infos[name].elem_type == elem_type:
            return  # the foreign graph already declared it (often with more dims known)
        self.infos[name] = TensorInfo(elem_type, tuple(dims))
        if not self.is_graph_output(name):
            self.graph.value_info.append(helper.make_tensor_value_info(name, elem_type, dims))

    def remove(self, node: onnx.NodeProto) -> None:
        """Drop ``node`` now (its outputs are about to be produced by new nodes)."""
        self._removed.add(id(node))
        for output in node.output:
            if self.producers.get(output) is node:
                del self.producers[output]
        for item in node.input:
            if item in self.consumers:
                self.consumers[item] = [n for n in self.consumers[item] if n is not node]

    def ensure_opset(self, domain: str, version: int) -> None:
        for entry in self.model.opset_import:
            if _domain(entry.domain) == _domain(domain):
                if entry.version < version:
                    raise DHSAError(f"the model imports domain {domain!r} at version {entry.version}; "
                                    f"the rewrite needs version {version}")
                return
        self.model.opset_import.append(helper.make_opsetid(domain, version))

    # ------------------------------------------------------------------ finishing

    def _consumed_names(self) -> set[str]:
        names: set[str] = set()
        for node in self.nodes():
            names.update(_node_inputs(node))
        names.update(o.name for o in self.graph.output)
        return names

    def finish(self) -> list[str]:
        """Remove dead nodes, initializers and newly unused inputs; sort; returns dropped input names."""
        live = self._live_nodes()
        kept = [n for n in self.nodes() if id(n) in live]
        ordered = _topological(kept)
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        self._nodes = list(self.graph.node)
        self._removed.clear()
        used = self._consumed_names()
        dropped = [i.name for i in self.graph.input
                   if i.name not in used and i.name in self._used_inputs and i.name not in self.initializers]
        for name in dropped:
            index = next(k for k, i in enumerate(self.graph.input) if i.name == name)
            del self.graph.input[index]
        dead_initializers = [k for k, t in enumerate(self.graph.initializer) if t.name not in used]
        for index in reversed(dead_initializers):
            self.initializers.pop(self.graph.initializer[index].name, None)
            del self.graph.initializer[index]
        produced = {name for node in ordered for name in node.output}
        stale = [k for k, v in enumerate(self.graph.value_info) if v.name not in produced]
        for index in reversed(stale):
            del self.graph.value_info[index]
        self.reindex()
        return dropped

    def _live_nodes(self) -> set[int]:
        producers = {name: node for node in self.nodes() for name in node.output if name}
        live: set[int] = set()
        stack = [o.name for o in self.graph.output]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            node = producers.get(name)
            if node is None or id(node) in live:
                continue
            live.add(id(node))
            stack.extend(_node_inputs(node))
        return live


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """Inputs of a node, including names its subgraphs read from the enclosing scope."""
    names = {n for n in node.input if n}
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                names |= _node_inputs(inner)
    return names


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes ordered so that every input is produced before use; original order kept where free."""
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 in progress, 2 done
    for start in range(len(nodes)):
        if state[start]:
            continue
        stack = [(start, False)]
        while stack:
            index, expanded = stack.pop()
            if expanded:
                state[index] = 2
                order.append(index)
                continue
            if state[index]:
                continue
            state[index] = 1
            stack.append((index, True))
            for name in _node_inputs(nodes[index]):
                dep = producer.get(name)
                if dep is None:
                    continue
                if state[dep] == 1:
                    raise DHSAError(f"the rewritten graph has a cycle through {name!r}; this is a bug in a rewrite rule")
                if state[dep] == 0:
                    stack.append((dep, False))
    return [nodes[i] for i in order]
