"""The DHSA algorithm in PyTorch: routing patterns, boundaries and the reference attention."""

from .attention import RoutingStats, block_sparse_attention, dense_attention, dhsa_attention
from .layout import BlockGrid, Selection, fixed_offsets
from .routing import PATTERN_FUNCTIONS, route

__all__ = [
    "BlockGrid", "PATTERN_FUNCTIONS", "RoutingStats", "Selection", "block_sparse_attention",
    "dense_attention", "dhsa_attention", "fixed_offsets", "route",
]
