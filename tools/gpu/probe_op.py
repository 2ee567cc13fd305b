"""Why can routing + kernel timed as one region take longer than the two parts timed alone?

Interleaves, per repeat, the routing alone, the kernel alone (on that routing's indices), the op
(routing then kernel) and the op with a device synchronization between the parts, all CUDA-event
timed (LLaMA-3.1-8B heads, bf16, density 0.125, the backend's routing incl. its CUDA graphs), and
prints the GPU kernels of one op call from torch.profiler (name, count, total ms).

    python3 tools/gpu/probe_op.py --tokens 131072 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def main(argv=None) -> int:
    from dhsa_export.backends.torch_cuda import launch, route_batch, selections_to_indices
    from dhsa_export.backends.torch_cuda.routing_graph import RoutingGraphCache
    from dhsa_export.bench.attention import random_qkv
    from dhsa_export.bench.timing import cuda_kernel_times, time_call_ms
    from dhsa_export.config import DHSAConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="131072")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cfg = DHSAConfig(density=0.125)
    rows = []
    for length in (int(t) for t in args.tokens.split(",")):
        q, k, v = random_qkv(length, seed=length)
        graphs = RoutingGraphCache()

        def routing():
            sels, variable = route_batch(q, k, cfg, graphs=graphs)
            return selections_to_indices(sels, variable)

        index, count, offsets = routing()

        def kernel():
            return launch(q, k, v, index, count, offsets, cfg.q_block, cfg.k_block)

        def op():
            i, c, o = routing()
            return launch(q, k, v, i, c, o, cfg.q_block, cfg.k_block)

        def op_sync():
            i, c, o = routing()
            torch.cuda.synchronize()
            return launch(q, k, v, i, c, o, cfg.q_block, cfg.k_block)

        parts = {"routing": routing, "kernel": kernel, "op": op, "op_sync": op_sync}
        for fn in parts.values():  # warm-up (graph capture on the second routing call)
            fn()
            fn()
        times = {name: [] for name in parts}
        for _ in range(args.repeats):
            for name, fn in parts.items():
                times[name].append(time_call_ms(fn, "cuda")[1])
        row = {"tokens": length, **{f"{n}_ms": statistics.median(t) for n, t in times.items()},
               "samples": times}
        row["op_kernels"] = [[name[:80], calls, round(ms, 4)] for name, calls, ms in cuda_kernel_times(op)]
        row["op_gpu_ms"] = sum(x[2] for x in row["op_kernels"])
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if k not in ("samples", "op_kernels")}), flush=True)
        for name, c, ms in row["op_kernels"][:12]:
            print(f"   {ms:9.3f} ms  x{c:<4} {name}")
        del q, k, v, graphs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
