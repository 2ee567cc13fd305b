"""Selections of the current routing against a frozen copy of an earlier one, on random inputs.

    python tools/gpu/compare_routing.py --baseline .baseline/algo_head [--device cuda] [--trials 40]

The baseline folder holds ``layout.py`` and ``routing.py`` of the earlier version (imports of
``..config`` rewritten to ``dhsa_export.config``), e.g. made with
``git show REV:dhsa_export/algo/routing.py``. Prints the number of mask entries that differ per
case and exits 1 if any differ (on the CPU the routing is meant to be bit-for-bit unchanged).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dhsa_export import DHSAConfig  # noqa: E402
from dhsa_export.algo import route  # noqa: E402
from dhsa_export.algo.boundaries import make_chunker  # noqa: E402


def load_baseline(folder: Path):
    """Import ``folder`` as a package named ``dhsa_baseline_algo`` and return its routing module."""
    spec = importlib.util.spec_from_file_location(
        "dhsa_baseline_algo", folder / "__init__.py", submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["dhsa_baseline_algo"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("dhsa_baseline_algo.routing")


def cases(trials: int, seed: int, max_len: int):
    gen = torch.Generator().manual_seed(seed)
    patterns = ["topk", "ashape", "vslash", "vslash_blockwise", "dynamic"]
    for trial, (pattern, routing) in enumerate(itertools.product(patterns, ["group", "head"])):
        for rep in range(max(1, trials // 10)):
            lq = int(torch.randint(40, max_len, (1,), generator=gen))
            extra = int([0, 0, 0, 29, 130][int(torch.randint(0, 5, (1,), generator=gen))])
            hkv = int([1, 2][int(torch.randint(0, 2, (1,), generator=gen))])
            ratio = int([1, 2, 4][int(torch.randint(0, 3, (1,), generator=gen))])
            d = int([16, 32][int(torch.randint(0, 2, (1,), generator=gen))])
            cfg = DHSAConfig(density=float([0.1, 0.125, 0.3][int(torch.randint(0, 3, (1,), generator=gen))]),
                             q_block=int([32, 64, 128][int(torch.randint(0, 3, (1,), generator=gen))]),
                             k_block=int([8, 16, 32][int(torch.randint(0, 3, (1,), generator=gen))]),
                             pattern=pattern, head_routing=routing, sink_tokens=16, local_tokens=32,
                             instruction_tokens=48, min_chunk=4, max_chunk=40)
            dtype = [torch.float32, torch.bfloat16][rep % 2]
            yield cfg, hkv * ratio, hkv, lq, lq + extra, d, dtype, gen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default=".baseline/algo_head")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=900)
    args = parser.parse_args(argv)
    base = load_baseline(Path(args.baseline))
    differing = total = 0
    for cfg, hq, hkv, lq, lk, d, dtype, gen in cases(args.trials, args.seed, args.max_len):
        q = (torch.randn(hq, lq, d, generator=gen) + 0.3 * torch.randn(1, 1, d, generator=gen)).to(args.device, dtype)
        k = (torch.randn(hkv, lk, d, generator=gen) + torch.randn(1, 1, d, generator=gen)).to(args.device, dtype)
        offsets = make_chunker(cfg)(k.float().cpu()).to(args.device) if cfg.pattern == "dynamic" else None
        new = route(q, k, cfg, offsets).mask
        old = base.route(q, k, cfg, offsets).mask
        diff = int((new != old).sum())
        differing += diff
        total += new.numel()
        if diff:
            print(f"DIFF {diff}/{new.numel()} {cfg.pattern} {cfg.head_routing} hq={hq} hkv={hkv} lq={lq} "
                  f"lk={lk} d={d} {dtype} q_block={cfg.q_block} k_block={cfg.k_block} density={cfg.density}")
    print(f"mask entries differing: {differing} of {total}")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
