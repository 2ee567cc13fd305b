"""GPU time of the ``dynamic`` pattern's chunk scores: "mass" (default) vs "mean" (the paper's).

    python3 tools/gpu/time_dynamic_score.py --tokens 8192,32768,65536,131072 [--json OUT]

LLaMA-3.1-8B head shape (32 q / 8 kv heads, D 128, bf16), chunks from the training-free similarity
rule (min 8, max 32 tokens), q_block 128; group (4 heads per routing head) and head routing.
CUDA-event median of 5 after 2 warm-ups, plus the peak extra memory of one ``chunk_mass_scores``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from dhsa_export.algo.boundaries import similarity_boundaries  # noqa: E402
from dhsa_export.algo.layout import BlockGrid  # noqa: E402
from dhsa_export.algo.routing import block_scores, chunk_mass_scores  # noqa: E402
from dhsa_export.bench.timing import median_ms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="8192,32768,65536,131072")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for length in [int(t) for t in args.tokens.split(",")]:
        q = torch.randn(32, length, 128, device="cuda").bfloat16()
        k = (torch.randn(8, length, 128, device="cuda") + torch.randn(1, 1, 128, device="cuda")).bfloat16()
        grid = BlockGrid.build(length, similarity_boundaries(k, 8, 32), 128)
        for head_group in (4, 1):
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            chunk_mass_scores(q, k, grid, head_group)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            row = {
                "tokens": length, "chunks": grid.num_chunks, "head_group": head_group,
                "mass_ms": round(median_ms(lambda: chunk_mass_scores(q, k, grid, head_group), 2, 5), 2),
                "mean_ms": round(median_ms(lambda: block_scores(q, k, grid, head_group, True), 2, 5), 2),
                "mass_peak_mib": round(peak),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
