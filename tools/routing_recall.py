"""Attention mass that routing variants miss, on a real model's q/k of one NIAH prompt.

    PYTHONPATH=. python tools/routing_recall.py --haystack-dir ../shared/data/haystack \\
        --cell paper:4096:0 --layers 0,2,4,6,8,12,20 \\
        --variant vslash:pattern=vslash --variant mass:pattern=dynamic \\
        --variant oracle:pattern=dynamic,oracle=1 --out recall.json

One dense forward captures the post-RoPE queries and keys of every layer. For each variant and
layer the selection is routed from them and scored against the dense softmax: ``missed`` is the
attention probability mass outside the selection, averaged over query heads and rows (dense rows
miss 0). A variant is ``NAME:key=value,...`` over :class:`dhsa_export.DHSAConfig` fields
(``dynamic`` chunks come from its chunker on layer 0's keys, as in the model); ``oracle=1``
keeps that variant's chunks, forced chunks, budget and dense rows but ranks the chunks by their
true attention mass per token (an upper bound for any chunk score).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from niah_forced import TASKS, parse_variant  # noqa: E402

from dhsa_export.algo import routing  # noqa: E402
from dhsa_export.algo.boundaries import make_chunker  # noqa: E402
from dhsa_export.algo.layout import BlockGrid, Selection, chunk_id_per_token, chunk_lengths  # noqa: E402
from dhsa_export.eval.haystack import build_prompt, load_haystack_text  # noqa: E402
from dhsa_export.hf.generate import encode  # noqa: E402
from dhsa_export.hf.models import load_model  # noqa: E402


def capture_qk(loaded, ids: torch.Tensor) -> dict:
    """Post-RoPE ``(q [Hq, L, D], k [Hkv, L, D])`` of every layer from one dense forward."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    store = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        store[module.layer_idx] = (query[0].detach().clone(), key[0].detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("dhsa_capture", capture)
    loaded.model.set_attn_implementation("dhsa_capture")
    try:
        with torch.inference_mode():
            loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        loaded.model.set_attn_implementation("sdpa")
    return store


def block_probabilities(q: torch.Tensor, k: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Dense causal softmax of queries ``[start, end)`` over keys ``[0, end)``: ``[Hq, rows, end]``."""
    keys = routing.expand_kv(k, q.shape[0])[:, :end]
    logits = torch.matmul(q[:, start:end], keys.transpose(1, 2)) / math.sqrt(q.shape[-1])
    future = torch.arange(end)[None, :] > torch.arange(start, end)[:, None]
    return logits.masked_fill_(future, -math.inf).softmax(-1)


def oracle_selection(q, k, cfg, offsets) -> Selection:
    """The dynamic variant's chunks, forced set, budget and dense rows; chunks ranked by true mass/token."""
    length = k.shape[1]
    grid = BlockGrid.build(q.shape[1], offsets, cfg.q_block)
    group = routing.routing_heads(q.shape[0], k.shape[0], cfg)
    key_chunk = chunk_id_per_token(offsets, length)
    mass = torch.zeros(q.shape[0], grid.num_q_blocks, grid.num_chunks)
    bounds = grid.q_offsets.tolist()
    for block in range(grid.num_q_blocks):
        start, end = bounds[block], bounds[block + 1]
        mass[:, block].index_add_(1, key_chunk[:end], block_probabilities(q, k, start, end).sum(1))
    weights = chunk_lengths(offsets).float()
    score = routing.group_mean(mass, group) / weights
    forced = (grid.sink(cfg.sink_tokens) | routing.local_window(grid, cfg.local_tokens))[None]
    dense = grid.q_offsets[1:] > q.shape[1] - cfg.instruction_tokens
    mask = routing.select_under_budget(score, grid.causal(), forced, weights, cfg.budget_tokens(length), dense)
    return Selection(grid, mask, group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--haystack-dir", required=True)
    parser.add_argument("--cell", required=True, help="task:length:depth")
    parser.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    loaded = load_model(args.model)
    task, length, depth = args.cell.split(":")
    prompt, _ = build_prompt(loaded.tokenizer, load_haystack_text(args.haystack_dir), TASKS[task](),
                             int(length), float(depth))
    ids = encode(loaded.tokenizer, [prompt])["input_ids"]
    store = capture_qk(loaded, ids)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted(store)
    variants = []
    for text in args.variant:
        oracle = ",oracle=1" in text or text.endswith(":oracle=1")
        name, cfg = parse_variant(text.replace(",oracle=1", "").replace(":oracle=1", ":"))
        offsets = make_chunker(cfg)(store[0][1].float()) if cfg.pattern == "dynamic" else None
        variants.append((name, cfg, offsets, oracle))
    results = {name: {"missed": [], "fraction": []} for name, *_ in variants}
    started = time.perf_counter()
    for layer in layers:
        q, k = store[layer][0].float(), store[layer][1].float()
        selections = {}
        for name, cfg, offsets, oracle in variants:
            selections[name] = oracle_selection(q, k, cfg, offsets) if oracle else routing.route(q, k, cfg, offsets)
        missed = dict.fromkeys(selections, 0.0)
        chunk_of = {n: chunk_id_per_token(s.grid.chunk_offsets, k.shape[1]) for n, s in selections.items()}
        bounds = routing.fixed_offsets(q.shape[1], 128).tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            probs = block_probabilities(q, k, start, end)
            for name, sel in selections.items():
                block = start // sel.grid.q_block if sel.grid.q_block else start // 128
                chosen = sel.mask[:, block, chunk_of[name][:end]].repeat_interleave(sel.head_group, 0)
                missed[name] += float((probs * ~chosen[:, None, :]).sum())
        for name, sel in selections.items():
            results[name]["missed"].append(missed[name] / (q.shape[0] * q.shape[1]))
            results[name]["fraction"].append(sel.causal_block_fraction())
        print(f"layer {layer} ({time.perf_counter() - started:.0f}s)", flush=True)
    rows = []
    for name, cfg, offsets, oracle in variants:
        missed, fraction = results[name]["missed"], results[name]["fraction"]
        chunks = None if offsets is None else offsets.numel() - 1
        row = {"variant": name, "oracle": oracle, "chunks": chunks, "layers": layers,
               "missed_mean": round(sum(missed) / len(missed), 4),
               "causal_block_fraction": round(sum(fraction) / len(fraction), 3),
               "missed_per_layer": [round(x, 3) for x in missed]}
        rows.append(row)
        print(f"{name:24s} chunks {str(chunks):>5s}  missed {row['missed_mean']:.4f}  "
              f"fraction {row['causal_block_fraction']:.3f}  per layer {row['missed_per_layer']}", flush=True)
    Path(args.out).write_text(json.dumps({"cell": args.cell, "model": loaded.name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
