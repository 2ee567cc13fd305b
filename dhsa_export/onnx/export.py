"""Export a transformers causal LM to two ONNX graphs that share one weights file.

- ``prefill.onnx``: ``input_ids [1, seq]`` -> ``logits [1, 1, vocab]`` (last position only, so no
  full-length logits are materialized) and ``present.N.key/value [1, Hkv, seq, D]``. Every layer's
  attention is a ``dhsa::Route`` node feeding a ``dhsa::BlockSparseAttention`` node. With the
  ``dynamic`` pattern one ``dhsa::ChunkOffsets`` node turns layer 0's keys into the key chunks
  every layer's pair reads (the learned boundary predictor, when configured, runs before it as
  standard ONNX ops whose weights are initializers named ``boundary_predictor.*``).
- ``decode.onnx``: ``input_ids [1, n]`` plus ``past_key_values.N.key/value [1, Hkv, past, D]`` ->
  ``logits [1, n, vocab]`` and ``present.N.key/value`` (dense attention over the cache).

Both are traced with ``torch.onnx.export(dynamo=True)`` through one attention function registered
in transformers' attention registry (no module is patched). Outside an ONNX export the same
function runs the PyTorch reference, so the wrapper modules double as the reference runners that
``check`` compares ONNX Runtime against.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..algo.attention import dhsa_attention
from ..config import DHSAConfig
from .registry import (
    BLOCK_SPARSE_ATTENTION, CHUNK_OFFSETS, CHUNK_OFFSETS_DIM, CHUNKS_DIM, DOMAIN, ROUTE, attention_attributes,
    chunk_offsets_attributes, route_attributes,
)

EXPORT_ATTENTION = "dhsa_export"
OPSET = 21
WEIGHTS_FILE = "weights.bin"


@dataclass
class ExportState:
    """What the export attention function needs per forward pass.

    ``chunker`` and ``predictor`` serve the ``dynamic`` pattern: the PyTorch reference cuts the
    keys with ``chunker`` (the same one ``enable_dhsa`` uses); the export traces ``predictor``
    (None: the similarity rule) into the graph before the ``ChunkOffsets`` node. ``offsets`` holds
    the current forward's chunks (computed at layer 0, shared by every layer).
    """

    cfg: DHSAConfig
    sparse: bool = True
    past: list = field(default_factory=list)
    present: list = field(default_factory=list)
    chunker: object = None
    predictor: object = None
    offsets: object = None

    def start_forward(self, sparse: bool, num_layers: int, past: list) -> None:
        self.sparse, self.past, self.present, self.offsets = sparse, past, [None] * num_layers, None

    @property
    def variable_chunks(self) -> bool:
        return self.sparse and self.chunker is not None


def export_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for the exported graphs: custom dhsa nodes (prefill) or dense over a cache (decode).

    The transformers mask is ignored on purpose: the exported graphs take one unpadded sequence,
    and causality is part of the op (prefill) or built from the shapes (decode).
    """
    state: ExportState = module.dhsa_export_state
    layer = module.layer_idx
    if state.past:
        past_key, past_value = state.past[layer]
        key = torch.cat([past_key, key], dim=2)
        value = torch.cat([past_value, value], dim=2)
    state.present[layer] = (key, value)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if state.sparse:
        if state.variable_chunks and state.offsets is None:  # layer 0: chunks for every layer
            state.offsets = chunk_offsets_nodes(key, state)
        output = sparse_attention_nodes(query, key, value, state.cfg, scale, state.offsets)
    else:
        output = dense_cached_attention(query, key, value, scale)
    return output.transpose(1, 2).contiguous(), None


def chunk_offsets_nodes(key: torch.Tensor, state: ExportState):
    """The ``dynamic`` key chunks from layer 0's keys ``[B, Hkv, L, D]``: a ``dhsa::ChunkOffsets``
    node (after the predictor's standard ops) while exporting; the reference chunker's offsets per
    sequence otherwise."""
    if not torch.onnx.is_in_onnx_export():
        return [state.chunker(key[b]) for b in range(key.shape[0])]
    predictor = state.predictor
    key = key.float()  # both rules read fp32 keys (as the reference does); a no-op for fp32 graphs
    inputs = (key,) if predictor is None else (key, predictor.batch_probabilities(key))
    attrs = chunk_offsets_attributes(state.cfg, None if predictor is None else predictor.threshold)
    (shape,) = CHUNK_OFFSETS.output_shapes(attrs, *(tuple(t.shape) for t in inputs))
    # The registry names the data-dependent width (nC + 1); the trace carries its bound L + 1 and the
    # saved graph gets the name back (name_chunk_dims).
    traced = tuple(key.shape[2] + 1 if dim == CHUNK_OFFSETS_DIM else dim for dim in shape)
    return torch.onnx.ops.symbolic(
        CHUNK_OFFSETS.qualified_name, inputs, attrs, dtype=torch.int32, shape=traced,
        version=CHUNK_OFFSETS.version,
    )


def sparse_attention_nodes(query, key, value, cfg: DHSAConfig, scale: float, offsets=None) -> torch.Tensor:
    """``dhsa::Route`` + ``dhsa::BlockSparseAttention`` while exporting; the reference otherwise.

    ``offsets``: the ``dynamic`` key chunks (a ``ChunkOffsets`` output while exporting, per-sequence
    offsets for the reference), or None for fixed ``k_block`` chunks."""
    if not torch.onnx.is_in_onnx_export():
        return dhsa_attention(query, key, value, cfg, scale, chunk_offsets=offsets)
    chunks = () if offsets is None else (offsets,)
    route_attrs = route_attributes(cfg, query.shape[1], key.shape[1])
    block_index, block_count = torch.onnx.ops.symbolic_multi_out(
        ROUTE.qualified_name, (query, key, *chunks), route_attrs,
        dtypes=(torch.int32, torch.int32),
        shapes=ROUTE.output_shapes(route_attrs, tuple(query.shape), tuple(key.shape),
                                   *(tuple(c.shape) for c in chunks)),
        version=ROUTE.version,
    )
    attention_attrs = attention_attributes(cfg, scale)
    (output_shape,) = BLOCK_SPARSE_ATTENTION.output_shapes(
        attention_attrs, tuple(query.shape), tuple(key.shape), tuple(value.shape))
    return torch.onnx.ops.symbolic(
        BLOCK_SPARSE_ATTENTION.qualified_name, (query, key, value, block_index, block_count, *chunks),
        attention_attrs, dtype=query.dtype, shape=output_shape, version=BLOCK_SPARSE_ATTENTION.version,
    )


def name_chunk_dims(model) -> int:
    """Name the data-dependent chunk dims of an exported graph (``ChunkOffsets``' output width and
    the chunk axis of the Route outputs that read it), which the trace only knew as ``L + 1``.
    Returns how many value_info entries changed."""
    offsets = {n.output[0] for n in model.graph.node if n.domain == DOMAIN and n.op_type == CHUNK_OFFSETS.name}
    chunked = {n.output[0] for n in model.graph.node
               if n.domain == DOMAIN and n.op_type == ROUTE.name and len(n.input) > 2 and n.input[2] in offsets}
    renames = {**{name: (1, CHUNK_OFFSETS_DIM) for name in offsets}, **{name: (3, CHUNKS_DIM) for name in chunked}}
    changed = 0
    for info in list(model.graph.value_info) + list(model.graph.output):
        axis, dim_name = renames.get(info.name, (None, None))
        dims = info.type.tensor_type.shape.dim
        if axis is not None and len(dims) > axis:
            dims[axis].ClearField("dim_value")
            dims[axis].dim_param = dim_name
            changed += 1
    return changed


def dense_cached_attention(query, key, value, scale: float) -> torch.Tensor:
    """Causal attention of the new queries (at the end) over cache + new keys, GQA expanded."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    q_len, k_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
    mask = torch.arange(k_len, device=query.device)[None, :] <= rows
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def install_export_attention(model, cfg: DHSAConfig) -> ExportState:
    """Register the export attention function and point every attention module at one state."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from ..hf.attention import _set_attn_implementation, attention_modules

    AttentionInterface.register(EXPORT_ATTENTION, export_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(EXPORT_ATTENTION, sdpa_mask)
    state = ExportState(cfg)
    if cfg.pattern == "dynamic" and (cfg.boundary_predictor or cfg.boundary_rule != "fixed"):
        from ..algo.boundaries import cached_predictor, check_predictor_features, make_chunker

        state.chunker = make_chunker(cfg)  # loads and validates the predictor file
        if cfg.boundary_predictor:
            state.predictor = cached_predictor(cfg.boundary_predictor)
            check_predictor_features(state.predictor, model.config.num_key_value_heads, head_dim_of(model.config),
                                     cfg.boundary_predictor)
    for module in attention_modules(model):
        module.dhsa_export_state = state
    _set_attn_implementation(model, EXPORT_ATTENTION)
    return state


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def kv_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class PrefillGraph(torch.nn.Module):
    """``input_ids -> (last logits, present.0.key, present.0.value, ...)`` with DHSA attention."""

    def __init__(self, model, state: ExportState):
        super().__init__()
        self.model, self.state = model, state
        if state.predictor is not None:  # a submodule, so its weights are named initializers
            self.boundary_predictor = state.predictor

    def forward(self, input_ids: torch.Tensor):
        self.state.start_forward(True, num_layers(self.model), [])
        hidden = self.model.model(input_ids=input_ids, use_cache=False).last_hidden_state
        logits = self.model.lm_head(hidden[:, -1:, :])
        return (logits, *[t for pair in self.state.present for t in pair])


class DecodeGraph(torch.nn.Module):
    """``(input_ids, past...) -> (logits, present...)`` with dense attention over the cache."""

    def __init__(self, model, state: ExportState):
        super().__init__()
        self.model, self.state = model, state

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]):
        self.state.start_forward(False, num_layers(self.model),
                                 [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        past_length = past[0].shape[2]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] + past_length
        hidden = self.model.model(input_ids=input_ids, position_ids=positions, use_cache=False).last_hidden_state
        logits = self.model.lm_head(hidden)
        return (logits, *[t for pair in self.state.present for t in pair])


@contextmanager
def quiet_exporter():
    """The exporter logs registry warnings (e.g. torchvision ops) and deprecations users can't act on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


def export_prefill(model, cfg: DHSAConfig, path: Path, sample_length: int = 300) -> Path:
    """Trace the DHSA prefill graph to ``path`` (external data written beside it)."""
    state = install_export_attention(model, cfg)
    wrapper = PrefillGraph(model, state).eval()
    sample = torch.randint(0, model.config.vocab_size, (1, sample_length))
    layers = num_layers(model)
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            wrapper, (sample,), dynamo=True, opset_version=OPSET, optimize=True,
            input_names=["input_ids"], output_names=["logits", *kv_names(layers, "present")],
            dynamic_shapes={"input_ids": {1: "sequence"}}, verbose=False,
        )
    program.save(str(path), external_data=True)
    if state.variable_chunks:
        import onnx

        graph = onnx.load(str(path), load_external_data=False)
        name_chunk_dims(graph)
        onnx.save(graph, str(path))
    return path


def export_decode(model, cfg: DHSAConfig, path: Path, past_length: int = 40) -> Path:
    """Trace the dense decode graph (KV cache in and out) to ``path``."""
    state = install_export_attention(model, cfg)
    wrapper = DecodeGraph(model, state).eval()
    config = model.config
    head_dim = head_dim_of(config)
    layers = num_layers(model)
    dtype = next(model.parameters()).dtype  # fp32 for ONNX Runtime, fp16 / bf16 for TensorRT
    past = [torch.randn(1, config.num_key_value_heads, past_length, head_dim, dtype=dtype) for _ in range(2 * layers)]
    ids = torch.randint(0, config.vocab_size, (1, 1))
    past_dims = {2: "past_sequence"}
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            wrapper, (ids, tuple(past)), dynamo=True, opset_version=OPSET, optimize=True,
            input_names=["input_ids", *kv_names(layers, "past_key_values")],
            output_names=["logits", *kv_names(layers, "present")],
            dynamic_shapes=({1: "new_tokens"}, tuple([past_dims] * (2 * layers))), verbose=False,
        )
    program.save(str(path), external_data=True)
    return path


INLINE_LIMIT = 1024  # bytes; smaller initializers stay inside the graph (shape inference reads them)


def share_weights(prefill_path: Path, decode_path: Path, weights_name: str = WEIGHTS_FILE) -> int:
    """Rewrite both graphs so their large initializers live in one file; returns how many are shared.

    Initializers are matched by content (dtype, shape, bytes), not by name: the exporter's
    constant folding gives the same pre-transposed weight different names in the two graphs.
    Small ones stay inline. Files are written to temporary names and renamed.
    """
    import hashlib

    import onnx

    folder = prefill_path.parent
    # Graphs only: each tensor's bytes are read on their own (two 8B-shaped graphs loaded with
    # their data would need twice the weights in memory).
    models = [onnx.load(str(path), load_external_data=False) for path in (prefill_path, decode_path)]
    tmp_weights = folder / f".{weights_name}.tmp"
    placed: dict[tuple, tuple[int, int]] = {}
    shared = 0
    with open(tmp_weights, "wb") as handle:
        for index, model in enumerate(models):
            for tensor in model.graph.initializer:
                data = _tensor_bytes(tensor, folder)
                if len(data) < INLINE_LIMIT:
                    _inline(tensor, data)
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest())
                if key in placed:
                    shared += index  # a hit inside the first graph is a duplicate, not sharing
                else:
                    placed[key] = (handle.tell(), len(data))
                    handle.write(data)
                    handle.write(b"\0" * ((-handle.tell()) % 64))
                _point(tensor, weights_name, *placed[key])
                del data
    os.replace(tmp_weights, folder / weights_name)
    for model, path in zip(models, (prefill_path, decode_path)):
        _drop_old_data_files(path)
        tmp = path.with_name(f".{path.name}.tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return shared


def _tensor_bytes(tensor, folder: Path) -> bytes:
    """Raw little-endian bytes of an initializer, read from its external file when it has one."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import ExternalDataInfo

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor).tobytes()
    info = ExternalDataInfo(tensor)
    with open(folder / info.location, "rb") as handle:
        handle.seek(int(info.offset or 0))
        return handle.read(int(info.length)) if info.length else handle.read()


def _inline(tensor, data: bytes) -> None:
    """Keep a small initializer inside the graph (shape inference reads constants)."""
    from onnx import TensorProto

    for field_name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field_name)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = data


def _point(tensor, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` refer to ``length`` bytes at ``offset`` of ``location`` (data dropped)."""
    from onnx import TensorProto

    for field_name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field_name)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def _drop_old_data_files(path: Path) -> None:
    for candidate in (path.with_name(path.name + ".data"),):
        if candidate.exists():
            candidate.unlink()
