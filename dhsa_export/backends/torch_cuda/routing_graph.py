"""Fixed-block routing replayed from CUDA graphs.

Routing one sequence (:func:`dhsa_export.algo.routing.route`) is about 110 small torch ops for
``vslash``; below ~64K tokens the host needs longer to issue them than an H200 needs to run them
(docs/GPU_NOTES.md, v4). A :class:`RoutingGraphCache` captures, per input layout and config, the
routing of one sequence together with the kernel's block indices and the causal-block fraction in
one ``torch.cuda.CUDAGraph``, and replays it: two copies into static input buffers, one replay,
four clones out (the clones keep every returned selection valid after later replays). Where the
fused routing (:mod:`.routing_fused`) runs, the graph's inputs are what it reads of ``q``: the block
means (computed before the replay by the same code as eager routing) and, for ``vslash``, the last
``q_block`` rows, instead of a copy of all of ``q`` (v9: ~0.13 ms at 32K).

The graph runs the same kernels on the same data layout as the eager call (the static buffers get
the input's strides), so the selection is the same bit for bit (tested on the GPU). Eager routing
runs instead, with the same result:

- for the ``dynamic`` pattern (variable chunks: the grid is read back from the GPU), for tensors
  not on CUDA, for inputs whose layout is not dense or not 16-byte aligned;
- while the stream is already being captured or torch.compile is tracing;
- the first time a key (shapes, strides, dtypes, device, config) is seen: graphs are captured on
  the second call, so a shape routed once costs no capture (a model's layers share one key);
- above ``DHSA_ROUTING_GRAPH_MAX_TOKENS`` keys (default 32768; 0 = no limit): from 64K on routing
  is GPU-bound and the graph's extra work (copying ``q`` and ``k`` into the static buffers, ~0.3 ms
  at 64K) made it slower on an H200, while the static buffers and the graph's memory pool hold
  1.0-1.4 GiB at 64K and 2.6-3.2 GiB at 128K (docs/GPU_NOTES.md, v6);
- when ``DHSA_ROUTING_GRAPH=0``, or the capture failed for that key (warned once per cache), or
  the graph alone is over the memory budget.

Bounds per cache (least recently used entries are dropped): ``DHSA_ROUTING_GRAPH_CACHE`` entries
(default 4) and ``DHSA_ROUTING_GRAPH_MAX_MB`` megabytes (default 2048) of static buffers and graph
pool. A dropped graph's pool goes back to PyTorch's allocator. The transformers integration keeps
one cache per model (:class:`dhsa_export.hf.attention.DHSARuntime`), so graphs go with the model;
other callers share :func:`default_cache` (:func:`clear` empties it).

Use from one stream: a replay reads the static inputs, so two streams routing the same key at
once would race.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from ...algo.layout import BlockGrid, Selection
from ...algo.routing import fixed_grid, route, routing_heads
from ...config import DHSAConfig
from . import routing_fused, routing_triton

ENV_SWITCH = "DHSA_ROUTING_GRAPH"  # "0": always eager
ENV_MAX_TOKENS = "DHSA_ROUTING_GRAPH_MAX_TOKENS"
ENV_MAX_ENTRIES = "DHSA_ROUTING_GRAPH_CACHE"
ENV_MAX_MB = "DHSA_ROUTING_GRAPH_MAX_MB"
DEFAULT_MAX_TOKENS = 32768
DEFAULT_MAX_ENTRIES = 4
DEFAULT_MAX_MB = 2048
GRAPH_PATTERNS = ("topk", "ashape", "vslash", "vslash_blockwise")
ADMIT_AFTER = 2  # calls of a key before its graph is captured
_REMEMBERED_KEYS = 64  # bound of the per-key call counts and refusals


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        warnings.warn(f"{name}={value!r} is not an integer; using {default}", RuntimeWarning, stacklevel=3)
        return default


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def dense_layout(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory exactly once (a permuted contiguous layout), so a
    buffer made with ``empty_strided(t.shape, t.stride())`` can take a copy of it."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _capturing_or_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_CAPTURE_STREAMS: dict = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture (cuBLAS keeps a workspace per stream)."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


def cuda_graph_recorder(body: Callable[[], tuple], device: torch.device):
    """Capture ``body`` in a CUDA graph; returns ``(replay, outputs, pool_bytes)``.

    ``body`` runs once eagerly on the capture stream first (cuBLAS handles, Triton compilation),
    then is captured into a private memory pool. ``outputs`` are the tensors ``body`` returned
    during the capture: each replay rewrites them. As in torch.compile's CUDA graphs, cuBLAS
    workspaces are dropped before and after the capture, so the one the graph uses is allocated
    in (and freed with) its pool instead of staying behind for the capture stream.
    """
    stream = _capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    _clear_cublas_workspaces()
    torch.cuda.empty_cache()  # torch.cuda.graph does this too; here so the pool can be measured
    before = torch.cuda.memory_reserved(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            outputs = body()
    finally:
        _clear_cublas_workspaces()
    return graph.replay, outputs, max(0, torch.cuda.memory_reserved(device) - before)


def _clear_cublas_workspaces() -> None:
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


@dataclass
class _Entry:
    replay: Callable[[], None]
    static_q: torch.Tensor  # all of q, or (fused routing) q's block means
    static_k: torch.Tensor
    outputs: tuple  # mask, block_index, block_count, causal_block_fraction
    grid: BlockGrid
    head_group: int
    width: int
    nbytes: int
    tokens: int
    pattern: str
    replays: int = 0
    static_q_last: torch.Tensor | None = None  # fused vslash: q's last q_block rows
    parts: bool = False  # the static inputs are routing_fused.query_parts(q), not q


class RoutingGraphCache:
    """Captured routing graphs keyed by input layout and config (see the module docstring).

    ``recorder`` and ``device_types`` exist for tests: a recorder with the signature of
    :func:`cuda_graph_recorder` that re-runs the body instead of a graph lets the caching logic
    run on the CPU.
    """

    def __init__(self, max_entries: int | None = None, max_mb: int | None = None,
                 recorder=cuda_graph_recorder, device_types: tuple[str, ...] = ("cuda",)):
        self._max_entries = max_entries
        self._max_mb = max_mb
        self.recorder = recorder
        self.device_types = device_types
        self._entries: OrderedDict = OrderedDict()
        self._calls: OrderedDict = OrderedDict()
        self._refused: OrderedDict = OrderedDict()
        self.counts = {"replays": 0, "eager": 0, "captures": 0, "evictions": 0, "failures": 0}

    # -- limits ---------------------------------------------------------------------------------
    @property
    def max_entries(self) -> int:
        return self._max_entries if self._max_entries is not None else _env_int(ENV_MAX_ENTRIES, DEFAULT_MAX_ENTRIES)

    @property
    def max_bytes(self) -> int:
        mb = self._max_mb if self._max_mb is not None else _env_int(ENV_MAX_MB, DEFAULT_MAX_MB)
        return mb * 2**20

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    # -- routing --------------------------------------------------------------------------------
    def route(self, q: torch.Tensor, k: torch.Tensor, cfg: DHSAConfig,
              chunk_offsets: torch.Tensor | None = None) -> Selection:
        """:func:`dhsa_export.algo.routing.route`, replayed from a graph where possible."""
        key = self.key(q, k, cfg)
        entry = self._entries.get(key) if key is not None else None
        if entry is None and key is not None and self._admit(key):
            entry = self._capture(key, q, k, cfg)
        if entry is None:
            self.counts["eager"] += 1
            return route(q, k, cfg, chunk_offsets)
        self._entries.move_to_end(key)
        return self._replay(entry, q, k, cfg)

    def key(self, q: torch.Tensor, k: torch.Tensor, cfg: DHSAConfig):
        """The cache key of a call, or None where routing must run eagerly."""
        if not enabled() or q.device.type not in self.device_types or q.dim() != 3 or k.dim() != 3:
            return None
        if cfg.effective_pattern(k.shape[1]) not in GRAPH_PATTERNS:
            return None
        limit = _env_int(ENV_MAX_TOKENS, DEFAULT_MAX_TOKENS)
        if limit and k.shape[1] > limit:
            return None
        if not (dense_layout(q) and dense_layout(k)) or q.data_ptr() % 16 or k.data_ptr() % 16:
            return None
        if q.device.type == "cuda" and _capturing_or_compiling():
            return None
        return (q.device, q.dtype, tuple(q.shape), q.stride(), k.dtype, tuple(k.shape), k.stride(), cfg,
                routing_triton.enabled(), routing_fused.enabled())

    def _admit(self, key) -> bool:
        if key in self._refused:
            return False
        calls = self._calls.pop(key, 0) + 1
        self._calls[key] = calls
        while len(self._calls) > _REMEMBERED_KEYS:
            self._calls.popitem(last=False)
        return calls >= ADMIT_AFTER

    def _refuse(self, key, reason: str) -> None:
        self._refused[key] = reason
        while len(self._refused) > _REMEMBERED_KEYS:
            self._refused.popitem(last=False)

    def _capture(self, key, q, k, cfg) -> _Entry | None:
        device = q.device
        pattern = cfg.effective_pattern(k.shape[1])
        with torch.inference_mode(False), torch.no_grad():
            grid = fixed_grid(q.shape[1], k.shape[1], cfg, device)
            width = max(1, grid.num_chunks)  # what the kernel wrappers ask for (no readback)
            head_group = routing_heads(q.shape[0], k.shape[0], cfg)
            # fused routing reads only q's block means and (vslash) its last q_block rows: the graph
            # takes those (computed outside it, by the same code as eager routing) instead of all of q
            parts = q.device.type == "cuda" and routing_fused.supports(q, grid, pattern)
            static_q_last = None
            if parts:
                q_means, q_last = routing_fused.query_parts(q, cfg, grid, pattern)
                static_q = q_means.clone()
                if q_last is not None:  # q's layout where the rows are dense (transformers' [L, H, D])
                    static_q_last = torch.empty_like(q_last)
                    static_q_last.copy_(q_last)
            else:
                static_q = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=device)
                static_q.copy_(q)
            static_k = torch.empty_strided(k.shape, k.stride(), dtype=k.dtype, device=device)
            static_k.copy_(k)

            def body():
                if parts:
                    selection = routing_fused.route_parts(static_q, static_q_last, static_k, cfg, grid,
                                                          head_group, pattern)
                else:
                    selection = route(static_q, static_k, cfg)
                index, count = selection.to_block_index(width)
                return selection.mask, index, count, selection.causal_block_fraction_tensor()

            try:
                replay, outputs, pool = self.recorder(body, device)
            except Exception as exc:  # noqa: BLE001 - routing stays eager for this key, said once
                self.counts["failures"] += 1
                reason = f"{type(exc).__name__}: {exc}"[:300]
                if self.counts["failures"] == 1:
                    warnings.warn(f"DHSA routing graph capture failed ({reason}); routing runs eagerly "
                                  f"for that shape", RuntimeWarning, stacklevel=3)
                self._refuse(key, reason)
                return None
        static_bytes = sum(t.numel() * t.element_size() for t in (static_q, static_k, static_q_last)
                           if t is not None)
        entry = _Entry(replay, static_q, static_k, tuple(outputs), grid, head_group,
                       width, static_bytes + pool, k.shape[1], pattern, static_q_last=static_q_last, parts=parts)
        self.counts["captures"] += 1
        if entry.nbytes > self.max_bytes:
            self._refuse(key, f"graph needs {entry.nbytes / 2**20:.0f} MiB > {ENV_MAX_MB} budget "
                              f"{self.max_bytes / 2**20:.0f} MiB")
            return None
        self._entries[key] = entry
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or self.nbytes > self.max_bytes):
            self._entries.popitem(last=False)
            self.counts["evictions"] += 1
        return entry

    def _replay(self, entry: _Entry, q: torch.Tensor, k: torch.Tensor, cfg: DHSAConfig) -> Selection:
        with torch.no_grad():
            if entry.parts:
                q_means, q_last = routing_fused.query_parts(q, cfg, entry.grid, entry.pattern)
                entry.static_q.copy_(q_means)
                if entry.static_q_last is not None:
                    entry.static_q_last.copy_(q_last)
            else:
                entry.static_q.copy_(q)
            entry.static_k.copy_(k)
            entry.replay()
            mask, index, count, fraction = (t.clone() for t in entry.outputs)
        entry.replays += 1
        self.counts["replays"] += 1
        precomputed = {("block_index", entry.width): (index, count), "causal_block_fraction": fraction}
        return Selection(entry.grid, mask, entry.head_group, precomputed)

    # -- housekeeping ---------------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every graph (their memory pools go back to PyTorch's allocator) and what was counted."""
        self._entries.clear()
        self._calls.clear()
        self._refused.clear()

    def info(self) -> dict:
        """What the cache holds and did (for benchmarks and tests)."""
        return {
            "entries": [{"tokens": e.tokens, "pattern": e.pattern, "mb": round(e.nbytes / 2**20, 1),
                         "replays": e.replays} for e in self._entries.values()],
            "mb": round(self.nbytes / 2**20, 1),
            "refused": list(self._refused.values()),
            **self.counts,
        }

    def __len__(self) -> int:
        return len(self._entries)


_DEFAULT: RoutingGraphCache | None = None


def default_cache() -> RoutingGraphCache:
    """The cache shared by callers that bring none (``route_batch``, ``dhsa_attention``)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = RoutingGraphCache()
    return _DEFAULT


def clear() -> None:
    """Empty :func:`default_cache`."""
    if _DEFAULT is not None:
        _DEFAULT.clear()


def graph_route(q: torch.Tensor, k: torch.Tensor, cfg: DHSAConfig, chunk_offsets: torch.Tensor | None = None,
                cache: RoutingGraphCache | None = None) -> Selection:
    """:func:`dhsa_export.algo.routing.route` through ``cache`` (default: :func:`default_cache`)."""
    return (cache if cache is not None else default_cache()).route(q, k, cfg, chunk_offsets)

