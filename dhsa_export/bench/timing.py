"""Shared GPU timing and result output for the benchmarks (one way to time, one way to report)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Callable

import torch


def event_times_ms(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Device-event times of ``repeats`` calls (at least one) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, repeats)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_call_ms(fn: Callable[[], object], device) -> tuple[object, float]:
    """``(fn(), milliseconds)`` of one call: CUDA events on a CUDA device, the host clock otherwise."""
    if torch.device(device).type != "cuda":
        start = time.perf_counter()
        result = fn()
        return result, (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    end.synchronize()
    return result, start.elapsed_time(end)


def cuda_kernel_times(fn: Callable[[], object]) -> list[tuple[str, int, float]]:
    """GPU kernels of one call of ``fn`` from torch.profiler: ``(name, calls, total ms)``, slowest first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.count, e.device_time_total / 1e3) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(kernels, key=lambda item: -item[2])


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    return statistics.median(event_times_ms(fn, warmup, repeats))


def emit_result(result: dict, json_path: str | None, markdown_table: Callable[[list[dict]], str]) -> None:
    """With a path: write the JSON there and print machine + table; otherwise print the JSON."""
    text = json.dumps(result, indent=2)
    if json_path:
        with open(json_path, "w") as handle:
            handle.write(text + "\n")
        print(json.dumps(result["machine"]))
        print(markdown_table(result["rows"]))
    else:
        print(text)


def run_and_emit(compute: Callable[[], dict], json_path: str | None,
                 markdown_table: Callable[[list[dict]], str]) -> int:
    """A benchmark's command-line end: run ``compute``, emit its result; a :class:`DHSAError` is one
    ``error:`` line on stderr and exit status 2."""
    from ..errors import DHSAError

    try:
        result = compute()
    except DHSAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    emit_result(result, json_path, markdown_table)
    return 0
