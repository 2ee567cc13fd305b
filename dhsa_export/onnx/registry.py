"""The dhsa custom-op registry: the one definition every other component reads.

The exporter (attribute names and defaults), the rewriter, ONNX shape inference, the ONNX Runtime
CPU library (its registration is checked against :func:`contract_json`), the TensorRT plugin
fields and the reference implementations used by tests and Polygraphy all come from here. A test
asserts they agree.

Contract (domain ``dhsa``, version 1):

``Route(query [B,Hq,Lq,D], key [B,Hkv,Lk,D] [, key_chunk_offsets int32 [B,nC+1]])
-> (block_index int32 [B,Hr,nQ,nC], block_count int32 [B,Hr,nQ])``
    Selected chunk indices per routing head and query block, ascending, padded with -1; ``Hr =
    Hq / head_group``. The width is the chunk count, so dense rows fit. ``dynamic`` ranks chunks by
    ``chunk_score``: ``mass`` = ``log mean_{j in c} exp(mean(q of block) . k_j / sqrt(D))`` (the
    default, as DHSAConfig) or ``mean`` = ``mean(q of block) . mean(k of c) x sqrt(len c) / sqrt(D)``.

``BlockSparseAttention(query, key, value [B,Hkv,Lk,Dv], block_index, block_count
[, key_chunk_offsets]) -> output [B,Hq,Lq,Dv]``
    Exact softmax attention of query head ``h`` (routing head ``h / head_group``, KV head
    ``h / (Hq / Hkv)``) over the listed chunks; query ``t`` sits at key position ``Lk - Lq + t``
    and, with ``causal``, sees no later key. Entries past ``block_count`` are ignored; an entry
    outside ``[0, nC)`` or a count outside ``[0, K]`` is an error. Rows with no key give zeros.
    Without ``key_chunk_offsets`` chunk ``c`` is keys ``[c k_block, min((c+1) k_block, Lk))``.

``ChunkOffsets(key [B,Hkv,L,D] [, boundary_probs [B,L]]) -> key_chunk_offsets int32 [B,nC+1]``
    The ``dynamic`` pattern's key chunks from the layer-0 key states, computed once per graph and
    fed to every layer's Route and BlockSparseAttention. Without ``boundary_probs`` the
    training-free similarity rule runs on ``key``; with them (the learned predictor's sigmoid
    outputs, computed by standard ONNX ops in the same graph) candidate ``c`` is proposed when its
    probability is ``>= threshold``. Either way ``enforce_chunk_limits`` keeps chunk lengths in
    ``[min_chunk, max_chunk]`` (forced cuts at the highest score). ``nC`` is data dependent and
    differs per sequence: rows are padded to the longest with ``L`` (empty trailing chunks, which
    are never causal for any query, so routing and attention ignore them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from ..config import BOUNDARY_WINDOW, DHSAConfig

DOMAIN = "dhsa"
VERSION = 1


@dataclass(frozen=True)
class Attribute:
    name: str
    kind: str  # "int" | "float" | "string"
    default: int | float | str
    doc: str


@dataclass(frozen=True)
class Port:
    name: str
    dtypes: tuple[str, ...]
    rank: int
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    attributes: tuple[Attribute, ...]
    doc: str
    domain: str = DOMAIN
    version: int = VERSION
    infer_shapes: Callable | None = field(default=None, compare=False, repr=False)

    @property
    def qualified_name(self) -> str:
        return f"{self.domain}::{self.name}"

    def attribute(self, name: str) -> Attribute:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise KeyError(f"{self.name} has no attribute {name!r}")

    def defaults(self) -> dict:
        return {a.name: a.default for a in self.attributes}

    def output_shapes(self, attrs: dict, *input_shapes) -> tuple:
        """Output shapes from input shapes and attributes (dims: int, symbolic or None)."""
        return self.infer_shapes(attrs, *input_shapes)


# ------------------------------------------------------------------------------- shape inference
# Dims are ints, symbolic sizes (torch SymInt while exporting) or None (unknown to the rewriter);
# the exporter, the rewriter's value_info and the native kernels' output shapes all follow these.


def _ceil_div(size, block: int):
    return None if size is None else (size + block - 1) // block


def _route_shapes(attrs: dict, query: tuple, key: tuple, key_chunk_offsets: tuple | None = None) -> tuple:
    """block_index [B, Hr, nQ, nC] and block_count [B, Hr, nQ]; nC = offsets width - 1 with variable
    chunks, else ceil(Lk / k_block)."""
    values = {**{a.name: a.default for a in ROUTE_ATTRIBUTES}, **attrs}
    batch, heads, q_len, _ = query
    routing_heads = None if heads is None else heads // int(values["head_group"])
    q_blocks = _ceil_div(q_len, int(values["q_block"]))
    if key_chunk_offsets is not None:
        chunks = _chunk_count(key_chunk_offsets)
    else:
        chunks = _ceil_div(key[2], int(values["k_block"]))
    return (batch, routing_heads, q_blocks, chunks), (batch, routing_heads, q_blocks)


def _chunk_count(key_chunk_offsets: tuple):
    """nC from the offsets' shape: width - 1, or None where the width is not a number."""
    width = key_chunk_offsets[1]
    return width - 1 if isinstance(width, int) or hasattr(width, "node") else None


def _attention_shapes(attrs: dict, query: tuple, key: tuple, value: tuple, *index_count_offsets) -> tuple:
    """output [B, Hq, Lq, Dv]."""
    return ((query[0], query[1], query[2], value[3]),)


# The data-dependent width of ChunkOffsets' output (nC + 1): a named dim in the ONNX graph.
CHUNK_OFFSETS_DIM = "key_chunks_plus_1"
CHUNKS_DIM = "key_chunks"


def _chunk_offsets_shapes(attrs: dict, key: tuple, boundary_probs: tuple | None = None) -> tuple:
    """key_chunk_offsets [B, nC + 1]; nC + 1 is data dependent (``CHUNK_OFFSETS_DIM``), at most L + 1."""
    return ((key[0], CHUNK_OFFSETS_DIM),)


FLOAT_TYPES = ("float32", "float16", "bfloat16")
_DEFAULT = DHSAConfig()

BLOCK_ATTRIBUTES = (
    Attribute("q_block", "int", _DEFAULT.q_block, "query block size in tokens"),
    Attribute("k_block", "int", _DEFAULT.k_block, "key block size (fixed chunks) in tokens"),
)

ROUTE_ATTRIBUTES = BLOCK_ATTRIBUTES + (
    Attribute("pattern", "string", _DEFAULT.pattern, "topk | ashape | vslash | vslash_blockwise | dynamic"),
    Attribute("density", "float", _DEFAULT.density, "budget as a fraction of the full key range"),
    Attribute("head_group", "int", 1, "query heads per routing head (1 = per head)"),
    Attribute("sink_tokens", "int", _DEFAULT.sink_tokens, "keys always attended at the start"),
    Attribute("local_tokens", "int", _DEFAULT.local_tokens, "local window (ashape, dynamic)"),
    Attribute("instruction_tokens", "int", _DEFAULT.instruction_tokens, "last queries dense (dynamic)"),
    Attribute("vslash_blockwise_above", "int", _DEFAULT.vslash_blockwise_above,
              "key length from which vslash uses the blockwise estimate"),
    Attribute("chunk_score", "string", _DEFAULT.chunk_score,
              "dynamic chunk ranking: mass (log mean_j exp(q_mean . k_j / sqrt(D))) | mean (mean key x sqrt(len))"),
)

ROUTE = OpSpec(
    name="Route",
    inputs=(
        Port("query", FLOAT_TYPES, 4, "[B, Hq, Lq, D]"),
        Port("key", FLOAT_TYPES, 4, "[B, Hkv, Lk, D]"),
        Port("key_chunk_offsets", ("int32",), 2, "[B, nC + 1] variable chunks (dynamic)", optional=True),
    ),
    outputs=(
        Port("block_index", ("int32",), 4, "[B, Hr, nQ, nC] ascending, -1 padded"),
        Port("block_count", ("int32",), 3, "[B, Hr, nQ]"),
    ),
    attributes=ROUTE_ATTRIBUTES,
    infer_shapes=_route_shapes,
    doc="Chunk selection per routing head and query block.",
)

BLOCK_SPARSE_ATTENTION = OpSpec(
    name="BlockSparseAttention",
    inputs=(
        Port("query", FLOAT_TYPES, 4, "[B, Hq, Lq, D]"),
        Port("key", FLOAT_TYPES, 4, "[B, Hkv, Lk, D]"),
        Port("value", FLOAT_TYPES, 4, "[B, Hkv, Lk, Dv]"),
        Port("block_index", ("int32",), 4, "[B, Hr, nQ, K]"),
        Port("block_count", ("int32",), 3, "[B, Hr, nQ]"),
        Port("key_chunk_offsets", ("int32",), 2, "[B, nC + 1]", optional=True),
    ),
    outputs=(Port("output", FLOAT_TYPES, 4, "[B, Hq, Lq, Dv]"),),
    attributes=BLOCK_ATTRIBUTES + (
        Attribute("scale", "float", 0.0, "softmax scale; 0 means 1/sqrt(D)"),
        Attribute("causal", "int", 1, "mask keys after each query's position"),
    ),
    doc="Exact attention restricted to the selected chunks.",
    infer_shapes=_attention_shapes,
)

CHUNK_OFFSETS = OpSpec(
    name="ChunkOffsets",
    inputs=(
        Port("key", FLOAT_TYPES, 4, "[B, Hkv, L, D] layer-0 key states (post-RoPE)"),
        Port("boundary_probs", FLOAT_TYPES, 2, "[B, L] predictor probability per candidate c "
             "(a chunk starts at c + 1); absent: the similarity rule", optional=True),
    ),
    outputs=(Port("key_chunk_offsets", ("int32",), 2, "[B, nC + 1], rows padded with L"),),
    attributes=(
        Attribute("min_chunk", "int", _DEFAULT.min_chunk, "shortest chunk in tokens"),
        Attribute("max_chunk", "int", _DEFAULT.max_chunk, "longest chunk in tokens"),
        Attribute("window", "int", BOUNDARY_WINDOW, "similarity rule: tokens per side of a candidate"),
        Attribute("threshold", "float", 0.5, "predictor: probability from which a candidate is proposed"),
    ),
    infer_shapes=_chunk_offsets_shapes,
    doc="Variable key chunks of the dynamic pattern from the layer-0 keys (similarity rule or predictor).",
)

OPS: dict[str, OpSpec] = {op.name: op for op in (ROUTE, BLOCK_SPARSE_ATTENTION, CHUNK_OFFSETS)}


def route_attributes(cfg: DHSAConfig, num_query_heads: int, num_kv_heads: int) -> dict:
    """Route node attributes for a config (the exporter and rewriter both call this)."""
    head_group = 1 if cfg.head_routing == "head" else num_query_heads // num_kv_heads
    values = {
        "q_block": cfg.q_block, "k_block": cfg.k_block, "pattern": cfg.pattern,
        "density": float(cfg.density), "head_group": head_group, "sink_tokens": cfg.sink_tokens,
        "local_tokens": cfg.local_tokens, "instruction_tokens": cfg.instruction_tokens,
        "vslash_blockwise_above": cfg.vslash_blockwise_above, "chunk_score": cfg.chunk_score,
    }
    assert set(values) == {a.name for a in ROUTE.attributes}
    return values


def attention_attributes(cfg: DHSAConfig, scale: float) -> dict:
    values = {"q_block": cfg.q_block, "k_block": cfg.k_block, "scale": float(scale), "causal": 1}
    assert set(values) == {a.name for a in BLOCK_SPARSE_ATTENTION.attributes}
    return values


def chunk_offsets_attributes(cfg: DHSAConfig, threshold: float | None = None) -> dict:
    """ChunkOffsets node attributes: ``threshold`` is the predictor's (None: the similarity rule)."""
    values = {"min_chunk": cfg.min_chunk, "max_chunk": cfg.max_chunk, "window": BOUNDARY_WINDOW,
              "threshold": float(CHUNK_OFFSETS.attribute("threshold").default if threshold is None else threshold)}
    assert set(values) == {a.name for a in CHUNK_OFFSETS.attributes}
    return values


def config_from_route_attributes(attrs: dict, num_query_heads: int, num_kv_heads: int) -> DHSAConfig:
    """Inverse of :func:`route_attributes` (reference implementations use it)."""
    values = {**ROUTE.defaults(), **attrs}
    group = int(values["head_group"])
    head_routing = "head" if group == 1 and num_query_heads != num_kv_heads else "group"
    if group not in (1, num_query_heads // num_kv_heads):
        raise ValueError(f"head_group {group} must be 1 or Hq/Hkv = {num_query_heads // num_kv_heads}")
    return DHSAConfig(
        density=float(values["density"]), q_block=int(values["q_block"]), k_block=int(values["k_block"]),
        pattern=str(values["pattern"]), head_routing=head_routing, sink_tokens=int(values["sink_tokens"]),
        local_tokens=int(values["local_tokens"]), instruction_tokens=int(values["instruction_tokens"]),
        vslash_blockwise_above=int(values["vslash_blockwise_above"]),
        chunk_score=str(values["chunk_score"]),
    )


def contract_json() -> str:
    """The registry as JSON (native libraries embed/compare it; the TRT plugin reads field names)."""
    return json.dumps({
        "domain": DOMAIN, "version": VERSION,
        "ops": [{
            "name": op.name,
            "inputs": [{"name": p.name, "dtypes": list(p.dtypes), "rank": p.rank, "optional": p.optional}
                       for p in op.inputs],
            "outputs": [{"name": p.name, "dtypes": list(p.dtypes), "rank": p.rank} for p in op.outputs],
            "attributes": [{"name": a.name, "type": a.kind, "default": a.default} for a in op.attributes],
        } for op in OPS.values()],
    }, indent=2, sort_keys=True)
