"""Evaluation of dense vs DHSA attention: needle-in-a-haystack (the paper's protocol, RULER-style).

- :mod:`.haystack`: needle tasks, haystack text, length-exact prompt construction;
- :mod:`.niah`: :func:`run_niah` over a grid of context lengths x depths, results.json + heatmap;
- :mod:`.plot`: the heatmap (matplotlib, Agg canvas, no pyplot global state).
"""

from __future__ import annotations

from .haystack import (
    PAPER_NEEDLE,
    NeedleTask,
    build_prompt,
    default_haystack_text,
    load_haystack_text,
    magic_number_task,
    score_response,
)
from .niah import run_niah

__all__ = [
    "PAPER_NEEDLE",
    "NeedleTask",
    "build_prompt",
    "default_haystack_text",
    "load_haystack_text",
    "magic_number_task",
    "run_niah",
    "score_response",
]
