"""Where a decode step's time goes: DHSA vs dense attention on the same INT4 + chunked model.

DHSA decode is dense attention over the KV cache, so its steps should cost what dense steps cost;
the memory benchmark's first runs showed DHSA decode steps slower. This builds the LLaMA-3.1-8B
shape with a few layers (INT4, chunked prefill), prefills ``--tokens`` and times ``--steps`` decode
steps per mode in the order given (so a first-mode effect shows), then profiles one step of each
mode with torch.profiler (top ops by CUDA time and by CPU time).

    python3 tools/gpu/profile_decode.py --layers 32 --tokens 100000 --budget-gib 24 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from dhsa_export import DHSAConfig  # noqa: E402
from dhsa_export.bench.memory import CONFIGS, build_model, set_budget  # noqa: E402
from dhsa_export.bench.timing import time_call_ms  # noqa: E402
from dhsa_export.hf.attention import disable_dhsa, enable_dhsa  # noqa: E402
from dhsa_export.hf.chunked import decode_step, enable_chunked_prefill, prefill  # noqa: E402


def steps_ms(net, ids, steps: int) -> list[float]:
    with torch.inference_mode():
        logits, cache = prefill(net, ids)
        token = logits.argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            logits, ms = time_call_ms(lambda: decode_step(net, token, cache), "cuda")
            token = logits.argmax(-1, keepdim=True)
            times.append(round(ms, 2))
    return times


def profile_step(net, ids) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        logits, cache = prefill(net, ids)
        token = logits.argmax(-1, keepdim=True)
        decode_step(net, token, cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decode_step(net, token, cache)
            torch.cuda.synchronize()
    table = prof.key_averages()
    return {"by_cuda": table.table(sort_by="cuda_time_total", row_limit=12),
            "by_cpu": table.table(sort_by="cpu_time_total", row_limit=12)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--order", default="dhsa,dense,dhsa")
    parser.add_argument("--budget-gib", type=float, default=None, help="cap the allocator as bench memory does")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_budget(int(args.budget_gib * 2**30) if args.budget_gib else None, "cuda")
    net = build_model("llama3.1-8b:random", args.layers, CONFIGS["dense-chunked-int4"], 32, 0, "cuda")
    enable_chunked_prefill(net, 8192)
    ids = torch.randint(0, net.config.vocab_size, (1, args.tokens), device="cuda")
    result = {"runs": [], "profiles": {}}
    for mode in args.order.split(","):
        runtime = enable_dhsa(net, DHSAConfig(), backend="torch-cuda") if mode == "dhsa" else disable_dhsa(net)
        times = steps_ms(net, ids, args.steps)
        result["runs"].append({"mode": mode, "steps_ms": times, "median_ms": statistics.median(times)})
        print(mode, times, flush=True)
        if mode not in result["profiles"]:
            result["profiles"][mode] = profile_step(net, ids)
            print(result["profiles"][mode]["by_cuda"], flush=True)
            print(result["profiles"][mode]["by_cpu"], flush=True)
        del runtime
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
