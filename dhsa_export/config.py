"""DHSAConfig: every knob of the sparse prefill, validated once at construction.

The defaults follow DESIGN.md section 2 (density 0.125, q_block 128, k_block 32, pattern
`vslash`, `vslash_blockwise` from 64K keys on). Validation happens here so that every entry point
(Python API, CLI, exporter) rejects bad values with the same message.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import DHSAError

PATTERNS = ("topk", "ashape", "vslash", "vslash_blockwise", "dynamic")
HEAD_ROUTING = ("head", "group")
BOUNDARY_RULES = ("similarity", "fixed")
CHUNK_SCORES = ("mass", "mean")
# Tokens on each side of a boundary candidate (similarity rule, labels, predictor window).
BOUNDARY_WINDOW = 4
# Implementations of the sparse attention given a selection (dhsa_export.algo.attention): the
# per-block reference, the gathered exact form (CPU default) and the CUDA kernels.
ATTENTION_BACKENDS = ("reference", "torch-gather", "torch-cuda")
# Where and in which precision the PyTorch model runs ("auto" resolved by hf.models.resolve_placement).
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DHSAConfig:
    """Configuration of DHSA sparse prefill attention.

    Attributes:
        density: fraction of the full (square) key range each query block may attend to,
            in (0, 1]. ``budget_blocks = max(1, floor(density * ceil(Lk / k_block)))``.
        q_block: query block size in tokens.
        k_block: key block size in tokens (fixed patterns) and the budget unit (all patterns).
        pattern: one of PATTERNS.
        head_routing: ``"head"`` routes every query head on its own (the paper); ``"group"``
            averages the queries of a KV group so each K/V block is loaded once per group.
        vslash_blockwise_above: key length from which ``vslash`` switches to
            ``vslash_blockwise`` (0 disables the switch).
        sink_tokens: the chunks covering the first ``sink_tokens`` keys are always attended.
        local_tokens: for ``ashape`` and ``dynamic``, the chunks covering this many keys before a
            query block are always attended (the diagonal block is always attended by every pattern).
        instruction_tokens: for ``dynamic``, query blocks holding the last ``instruction_tokens``
            queries attend densely (the question at the end of a prompt sees everything).
        boundary_predictor: path of a trained boundary predictor (safetensors) for ``dynamic``;
            when empty the training-free rule ``boundary_rule`` cuts the keys.
        boundary_rule: ``"similarity"`` (key-similarity drops) or ``"fixed"`` (k_block chunks).
        min_chunk / max_chunk: chunk length limits for the dynamic boundaries. ``max_chunk``
            defaults to the default ``k_block`` (32): dynamic chunks refine the fixed blocks
            (boundaries where the text changes) and are never coarser than them; with 128 the
            learned predictor's chunks averaged 61 tokens on the NIAH haystack and lost two
            4K NIAH cells per task (docs/BENCHMARKS.md).
        chunk_score: how ``dynamic`` ranks a chunk for a query block. ``"mass"`` (default): the
            log of the mean attention weight the block's mean query gives the chunk's tokens
            (logsumexp of the token logits minus log length), i.e. the softmax-domain
            aggregation, so a strongly attended token is not averaged away; ``"mean"``: the
            paper's length-normalized mean key, ``mean(q) . mean(k) x sqrt(length)``. The ONNX
            Route op computes either (its ``chunk_score`` attribute). See
            :func:`dhsa_export.algo.routing.chunk_mass_scores`.
    """

    density: float = 0.125
    q_block: int = 128
    k_block: int = 32
    pattern: str = "vslash"
    head_routing: str = "group"
    vslash_blockwise_above: int = 65536
    sink_tokens: int = 32
    local_tokens: int = 128
    instruction_tokens: int = 128
    boundary_predictor: str = ""
    boundary_rule: str = "similarity"
    min_chunk: int = 8
    max_chunk: int = 32
    chunk_score: str = "mass"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_density(self.density)
        for name in ("q_block", "k_block", "min_chunk", "max_chunk"):
            _check_positive_int(name, getattr(self, name))
        for name in ("sink_tokens", "local_tokens", "instruction_tokens", "vslash_blockwise_above"):
            _check_non_negative_int(name, getattr(self, name))
        if self.pattern not in PATTERNS:
            raise DHSAError(f"unknown pattern {self.pattern!r}; use one of {', '.join(PATTERNS)}")
        if self.head_routing not in HEAD_ROUTING:
            raise DHSAError(
                f"unknown head routing {self.head_routing!r}; use one of {', '.join(HEAD_ROUTING)}"
            )
        if self.boundary_rule not in BOUNDARY_RULES:
            raise DHSAError(
                f"unknown boundary rule {self.boundary_rule!r}; use one of {', '.join(BOUNDARY_RULES)}"
            )
        if self.chunk_score not in CHUNK_SCORES:
            raise DHSAError(
                f"unknown chunk score {self.chunk_score!r}; use one of {', '.join(CHUNK_SCORES)}"
            )
        if self.min_chunk > self.max_chunk:
            raise DHSAError(
                f"min_chunk {self.min_chunk} is larger than max_chunk {self.max_chunk}; "
                "pass a min_chunk <= max_chunk"
            )

    def budget_blocks(self, key_length: int) -> int:
        """Key blocks each query block may attend to, in the paper's semantics (density of the square)."""
        key_blocks = math.ceil(key_length / self.k_block)
        # The slack absorbs float32 rounding of the density attribute in ONNX nodes (0.7 -> 0.69999999).
        return max(1, math.floor(self.density * key_blocks + 1e-3))

    def budget_tokens(self, key_length: int) -> int:
        """The same budget in key tokens (the unit of the ``vslash`` lines and ``dynamic`` chunks)."""
        return self.budget_blocks(key_length) * self.k_block

    def effective_pattern(self, key_length: int) -> str:
        """``vslash`` switches to its blockwise estimate on long inputs (no L x q_block matrix)."""
        if (
            self.pattern == "vslash"
            and self.vslash_blockwise_above
            and key_length > self.vslash_blockwise_above
        ):
            return "vslash_blockwise"
        return self.pattern

    def replace(self, **changes) -> "DHSAConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict for manifests and result files."""
        data = dataclasses.asdict(self)
        data.pop("extra", None)
        return data


def _check_density(density: float) -> None:
    if not isinstance(density, (int, float)) or math.isnan(density) or not 0 < density <= 1:
        raise DHSAError(f"density {density!r} is outside (0, 1]; pass a value such as 0.125")


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DHSAError(f"{name} {value!r} must be a positive integer; pass e.g. {name}=32")


def _check_non_negative_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DHSAError(f"{name} {value!r} must be a non-negative integer")
