"""Needle-in-a-haystack over a grid of context lengths x depths, dense or DHSA.

Every cell builds a length-exact prompt (:func:`.haystack.build_prompt`), greedy-decodes it with
:func:`dhsa_export.hf.generate.generate` (``raw=True``: the prompt is already templated, and
``generate`` adds no special tokens), and scores the fraction of answer keywords found. For DHSA
the runtime's routing statistics are reset per cell, so each cell reports the fraction of causal
blocks its prefill computed (decode is dense and not counted).

Outputs in ``out_dir``: ``results.json`` (rewritten atomically after every cell, so an interrupted
run leaves a valid partial file) and ``heatmap.png``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from ..config import DHSAConfig
from ..errors import DHSAError
from ..hf.generate import ATTENTION_MODES, check_fits, generate, set_attention
from ..hf.models import LoadedModel
from .haystack import NeedleTask, build_prompt, default_haystack_text, load_haystack_text, score_response
from .plot import plot_niah_heatmap

RESULTS_FILE = "results.json"
HEATMAP_FILE = "heatmap.png"


def run_niah(
    loaded: LoadedModel,
    *,
    attention: str,
    dhsa_config: DHSAConfig | None,
    haystack_dir: str | None,
    context_lengths: list[int],
    depths: list[float],
    task: NeedleTask,
    out_dir: str,
    max_new_tokens: int = 32,
    progress: bool = True,
    backend: str = "auto",
) -> dict:
    """Run the NIAH grid and write ``results.json`` + ``heatmap.png`` into ``out_dir``.

    Args:
        loaded: model + tokenizer (:func:`dhsa_export.hf.models.load_model`); its attention mode
            is switched with :func:`dhsa_export.hf.generate.set_attention` and left that way.
        attention: ``"dense"`` or ``"dhsa"``.
        dhsa_config: for ``"dhsa"`` (``None`` = :class:`DHSAConfig` defaults); ignored for dense.
        haystack_dir: folder of ``.txt`` files, or ``None`` for the generated default haystack.
        context_lengths: total prompt tokens per column (template and question included).
        depths: needle depths in percent (0..100).
        backend: DHSA attention implementation ("auto", "reference", "torch-gather", "torch-cuda");
            the model must already sit on the device it needs (:func:`dhsa_export.hf.models.place_model`).

    Returns the dict written to ``results.json``: ``model, attention, dhsa_config`` (null for
    dense), ``task, cells`` (each ``context_length, depth, score, response, prompt_tokens,
    causal_block_fraction, actual_depth, seconds``), ``mean_score, causal_block_fraction`` (mean
    over all DHSA prefill calls, null for dense) plus ``model_source, haystack, max_new_tokens,
    context_lengths, depths, wall_s``.
    """
    if attention not in ATTENTION_MODES:
        raise DHSAError(f"unknown attention {attention!r}; use one of {', '.join(ATTENTION_MODES)}")
    lengths = _check_lengths(context_lengths)
    depth_list = _check_depths(depths)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DHSAError(f"max_new_tokens {max_new_tokens!r} must be at least 1")
    check_fits(max(lengths), max_new_tokens, loaded)
    haystack = load_haystack_text(haystack_dir) if haystack_dir else default_haystack_text()
    cfg = (dhsa_config or DHSAConfig()) if attention == "dhsa" else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = set_attention(loaded, attention, cfg, backend=backend)
    results = {
        "model": loaded.name,
        "model_source": loaded.source,
        "attention": attention,
        "dhsa_config": cfg.to_dict() if cfg is not None else None,
        "backend": runtime.requested_backend if runtime is not None else None,
        "device": str(loaded.model.device),
        "dtype": str(loaded.model.dtype).replace("torch.", ""),
        "task": task.to_dict(),
        "haystack": str(haystack_dir) if haystack_dir else "default (generated filler)",
        "max_new_tokens": max_new_tokens,
        "context_lengths": lengths,
        "depths": depth_list,
        "cells": [],
        "mean_score": None,
        "causal_block_fraction": None,
        "wall_s": None,
    }
    calls, fraction_sum = 0, 0.0
    started = time.perf_counter()
    grid = [(length, depth) for length in lengths for depth in depth_list]
    bar = _progress(grid, progress, f"NIAH {attention}")
    try:
        for length, depth in bar:
            prompt, info = build_prompt(loaded.tokenizer, haystack, task, length, depth)
            if runtime is not None:
                runtime.reset_stats()
            cell_start = time.perf_counter()
            generation = generate(loaded, [prompt], max_new_tokens=max_new_tokens, raw=True)[0]
            seconds = time.perf_counter() - cell_start
            if runtime is not None:
                results["backend"] = runtime.backend  # what the prefill ran, "auto" resolved
            cell_fraction = None
            if runtime is not None and runtime.stats.calls:
                cell_fraction = runtime.stats.causal_block_fraction
                calls += runtime.stats.calls
                fraction_sum += runtime.stats.causal_block_fraction_sum
            score = score_response(task, generation.text)
            results["cells"].append({
                "context_length": length,
                "depth": depth,
                "score": score,
                "response": generation.text,
                "prompt_tokens": generation.prompt_tokens,
                "causal_block_fraction": cell_fraction,
                "actual_depth": round(info["actual_depth"], 2),
                "seconds": round(seconds, 3),
            })
            scores = [cell["score"] for cell in results["cells"]]
            results["mean_score"] = sum(scores) / len(scores)
            results["causal_block_fraction"] = fraction_sum / calls if calls else None
            results["wall_s"] = round(time.perf_counter() - started, 3)
            _write_json(out / RESULTS_FILE, results)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(length=length, depth=depth, score=f"{score:.2f}")
    finally:
        if hasattr(bar, "close"):
            bar.close()
    plot_niah_heatmap(results, out / HEATMAP_FILE)
    return results


def _progress(items: list, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="cell", disable=not enabled)


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2)
            stream.write("\n")
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _file_mode() -> int:
    """Mode of a newly created file under the current umask (mkstemp would leave 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _check_lengths(context_lengths) -> list[int]:
    lengths = list(context_lengths or [])
    if not lengths:
        raise DHSAError("no context lengths given; pass e.g. 2048,4096")
    for length in lengths:
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise DHSAError(f"context length {length!r} must be a positive integer such as 4096")
    return sorted(set(lengths))


def _check_depths(depths) -> list[float]:
    values = list(depths or [])
    if not values:
        raise DHSAError("no needle depths given; pass e.g. 0,50,100")
    for depth in values:
        if (
            not isinstance(depth, (int, float)) or isinstance(depth, bool) or math.isnan(depth)
            or not 0 <= depth <= 100
        ):
            raise DHSAError(f"depth {depth!r} is outside 0..100 (percent of the context); pass e.g. 50")
    return sorted(set(values))
