"""Quick check of kernel variants against m128w4 and the fp32 reference at the LLaMA head shape
(32 q / 8 kv heads, D 128 and 64, bf16, causal, random 128 x 32 selection): relative error, NaN, and a
rough time per call. Prints one line per (variant, D)."""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    from dhsa_export.algo import BlockGrid, Selection, block_sparse_attention, fixed_offsets
    from dhsa_export.backends.torch_cuda import launch, raise_on_error_flag, selections_to_indices
    from dhsa_export.backends.torch_cuda.library import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="wgmma,wgmma_serial,wgmma_s2")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    length = args.tokens
    status = 0
    for d in (128, 64):
        q = torch.randn(1, 32, length, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, 8, length, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, 8, length, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        grid = BlockGrid.build(length, fixed_offsets(length, 32).to("cuda"), 128)
        mask = (torch.rand(8, grid.num_q_blocks, grid.num_chunks, device="cuda", generator=gen) < 0.25)
        sel = Selection(grid, mask | grid.diagonal()[None], 4)
        index, count, offsets = selections_to_indices([sel], False)
        ref = block_sparse_attention(q[0].float(), k[0].float(), v[0].float(), sel)
        for name in ["m128w4", *args.variants.split(",")]:
            try:
                out, ws = launch(q, k, v, index, count, offsets, 128, 32, variant=VARIANTS[name],
                                 out=torch.full_like(q, float("nan")))
                raise_on_error_flag(ws)
                err = float((out[0].float() - ref).norm() / ref.norm())
                nan = bool(torch.isnan(out).any())
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    launch(q, k, v, index, count, offsets, 128, 32, variant=VARIANTS[name])
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / 10 * 1e3
                ok = err <= 1e-2 and not nan
                status |= not ok
                print(f"smoke d={d} {name:<13} rel_err={err:.2e} nan={nan} ms={ms:.3f} {'ok' if ok else 'FAIL'}",
                      flush=True)
            except Exception as exc:  # noqa: BLE001 - report every variant
                status = 1
                print(f"smoke d={d} {name:<13} ERROR {type(exc).__name__}: {exc}"[:400], flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
