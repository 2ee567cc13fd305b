"""The NIAH heatmap: context length x needle depth, score 0 (red) .. 1 (green), values annotated.

Drawn on a bare Agg canvas (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): no display is
needed and pyplot's global backend/state is never touched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The paper's heatmap colours: red (miss) -> yellow -> green (found).
_COLORS = ["#F0496E", "#EBB839", "#0CD79F"]


def plot_niah_heatmap(results: dict, path: str | Path) -> Path:
    """Write the heatmap of a :func:`dhsa_export.eval.niah.run_niah` results dict to ``path`` (PNG).

    Missing cells (a partial run) are grey. The file is written to a temporary name and renamed.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    cells = results.get("cells", [])
    lengths = sorted({cell["context_length"] for cell in cells})
    depths = sorted({cell["depth"] for cell in cells})
    grid = np.full((max(1, len(depths)), max(1, len(lengths))), np.nan)
    for cell in cells:
        grid[depths.index(cell["depth"]), lengths.index(cell["context_length"])] = cell["score"]

    cmap = LinearSegmentedColormap.from_list("niah", _COLORS).with_extremes(bad="#d0d0d0")
    fig = Figure(figsize=(max(4.5, 1.2 * len(lengths) + 3.0), max(3.2, 0.5 * len(depths) + 2.2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [_format_depth(depth) for depth in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    for row in range(len(depths)):
        for col in range(len(lengths)):
            value = grid[row, col]
            if not np.isnan(value):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=9, color="black")
    fig.colorbar(image, ax=ax, label="score")
    ax.set_title(_title(results), fontsize=9)
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            fig.savefig(stream, format="png", dpi=120)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _title(results: dict) -> str:
    head = f"{results.get('model', '?')} | {results.get('attention', '?')}"
    cfg = results.get("dhsa_config")
    if cfg:
        head += f" ({cfg.get('pattern')}, density {cfg.get('density')}, {cfg.get('head_routing')} routing)"
    mean = results.get("mean_score")
    tail = f"mean score {mean:.2f}" if mean is not None else "mean score n/a"
    fraction = results.get("causal_block_fraction")
    if fraction is not None:
        tail += f" | {100 * fraction:.1f}% of causal blocks"
    return f"{head}\n{tail}"


def _format_depth(depth: float) -> str:
    return f"{depth:g}"
