"""Forced decoding of the dense answer in NIAH cells: a fast accuracy proxy for DHSA variants.

For every cell the dense model's greedy answer (``--answer-tokens`` tokens, cached in
``--dense-cache``) is scored after the length-exact NIAH prompt under
each attention variant (sparse prefill of the prompt, then dense decoding of the forced answer,
as generation does): the log-probability and rank of the first answer token (where the 135M
model's failures happen), how many answer tokens stay the argmax (all of them: greedy decoding
would reproduce the dense answer; PASS when the tokens up to the last answer keyword are), and the cosine of the final hidden state at the last prompt
position to dense; plus the greedy answer from the same prefill and its NIAH score (the PASS
criterion is stricter: a greedy answer that deviates from dense can still hold the keywords).
One prefill per cell and variant.

    PYTHONPATH=. python tools/niah_forced.py --haystack-dir ../shared/data/haystack \\
        --cells paper:4096:0,magic-number:4096:50 \\
        --variant vslash:pattern=vslash --variant dyn:pattern=dynamic,local_tokens=256 --out forced.json

A variant is ``NAME:key=value,...`` over :class:`dhsa_export.DHSAConfig` fields (``dense`` alone
is dense attention). Results are printed as a table and written to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import fields
from pathlib import Path

import torch

from dhsa_export import DHSAConfig
from dhsa_export.eval.haystack import build_prompt, load_haystack_text, score_response
from dhsa_export.eval import PAPER_NEEDLE, magic_number_task
from dhsa_export.hf.generate import encode, generate, set_attention
from dhsa_export.hf.models import load_model

TASKS = {"paper": lambda: PAPER_NEEDLE, "magic-number": lambda: magic_number_task(seed=0)}


def parse_variant(text: str) -> tuple[str, DHSAConfig | None]:
    name, _, spec = text.partition(":")
    if name == "dense" and not spec:
        return name, None
    types = {f.name: f.type for f in fields(DHSAConfig)}
    changes = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        kind = types[key]
        changes[key] = float(value) if kind in ("float", float) else int(value) if kind in ("int", int) else value
    return name, DHSAConfig(**changes)


@torch.inference_mode()
def score(loaded, prompt_ids: torch.Tensor, answer: list[int], task, max_new_tokens: int = 32) -> dict:
    """Prefill the prompt (sparse under DHSA, exactly as generation does), then decode the forced
    answer token by token (dense over the KV cache, as generation does): log-probs and ranks of
    the answer tokens and the final hidden state at the last prompt position; and, from a copy
    of the same prefill cache, the greedy answer and its NIAH score (what ``eval niah`` scores)."""
    base, head, tokenizer = loaded.model.model, loaded.model.lm_head, loaded.tokenizer
    out = base(input_ids=prompt_ids, use_cache=True)
    last = out.last_hidden_state[0, -1]
    prefill_cache = copy.deepcopy(out.past_key_values)
    states, cache = [last], out.past_key_values
    for token in answer[:-1]:
        out = base(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        states.append(out.last_hidden_state[0, -1])
        cache = out.past_key_values
    logits = head(torch.stack(states)).float().log_softmax(-1)
    target = torch.tensor(answer)
    logp = logits.gather(-1, target[:, None])[:, 0]
    ranks = (logits > logp[:, None]).sum(-1)
    greedy, cache, state = [], prefill_cache, last
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for _ in range(max_new_tokens):
        token = int(head(state).argmax())
        if token in stop:
            break
        greedy.append(token)
        out = base(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        state, cache = out.last_hidden_state[0, -1], out.past_key_values
    text = tokenizer.decode(greedy, skip_special_tokens=True)
    return {"logp": logp.tolist(), "ranks": ranks.tolist(), "hidden": last.clone(),
            "greedy": text, "niah_score": score_response(task, text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--haystack-dir", required=True)
    parser.add_argument("--cells", required=True, help="task:length:depth,... (task paper|magic-number)")
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,... or dense")
    parser.add_argument("--answer-tokens", type=int, default=14)
    parser.add_argument("--dense-cache", default=None, help="JSON cache of dense answers and hidden cosines")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    loaded = load_model(args.model)
    haystack = load_haystack_text(args.haystack_dir)
    cache_path = Path(args.dense_cache) if args.dense_cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    variants = [parse_variant(v) for v in args.variant]
    rows = []
    for cell in args.cells.split(","):
        task_name, length, depth = cell.split(":")
        task = TASKS[task_name]()
        prompt, _ = build_prompt(loaded.tokenizer, haystack, task, int(length), float(depth))
        prompt_ids = encode(loaded.tokenizer, [prompt])["input_ids"]
        key = f"{loaded.name}|{cell}|{args.answer_tokens}"
        if key not in cache:
            set_attention(loaded, "dense")
            answer = generate(loaded, [prompt], max_new_tokens=args.answer_tokens, raw=True)[0].new_tokens
            cache[key] = {"answer": answer}
            if cache_path:
                cache_path.write_text(json.dumps(cache, indent=1))
        answer = cache[key]["answer"]
        needed = next((n for n in range(1, len(answer) + 1)
                       if score_response(task, loaded.tokenizer.decode(answer[:n])) == 1.0), None)
        set_attention(loaded, "dense")
        dense = score(loaded, prompt_ids, answer, task)
        for name, cfg in variants:
            started = time.perf_counter()
            runtime = set_attention(loaded, "dhsa" if cfg else "dense", cfg)
            got = dense if cfg is None else score(loaded, prompt_ids, answer, task)
            cos = torch.nn.functional.cosine_similarity(got["hidden"], dense["hidden"], dim=0).item()
            kept = next((i for i, r in enumerate(got["ranks"]) if r != 0), len(answer))
            row = {
                "cell": cell, "variant": name, "first_logp": round(got["logp"][0], 3),
                "first_rank": got["ranks"][0], "dense_first_logp": round(dense["logp"][0], 3),
                "argmax_prefix": kept, "answer_tokens": len(answer), "needed_tokens": needed,
                "passes": needed is not None and kept >= needed,
                "answer_logp": round(sum(got["logp"]), 3), "cos_last_hidden": round(cos, 4),
                "causal_block_fraction": runtime.stats.causal_block_fraction if runtime else 1.0,
                "seconds": round(time.perf_counter() - started, 1),
                "answer": loaded.tokenizer.decode(answer), "greedy": got["greedy"],
                "niah_score": got["niah_score"], "dense_niah_score": dense["niah_score"],
            }
            rows.append(row)
            print(f"{cell:22s} {name:18s} niah {row['niah_score']:.2f} {'PASS' if row['passes'] else 'fail'} first {row['first_logp']:7.3f} (rank {row['first_rank']:2d}, "
                  f"dense {row['dense_first_logp']:6.3f})  argmax {kept:2d}/{len(answer)}  "
                  f"sum {row['answer_logp']:8.3f}  cos {cos:.4f}  frac {row['causal_block_fraction']:.3f}  "
                  f"{row['seconds']:.0f}s", flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
    for name, _ in variants:
        mine = [r for r in rows if r["variant"] == name]
        passed = sum(r["passes"] for r in mine)
        niah = sum(r["niah_score"] for r in mine) / len(mine)
        print(f"{name:18s} NIAH mean {niah:.3f}; cells reproducing dense up to the last keyword {passed}/{len(mine)}, mean first log-prob "
              f"{sum(r['first_logp'] for r in mine) / len(mine):.3f}, "
              f"min cos {min(r['cos_last_hidden'] for r in mine):.4f}", flush=True)


if __name__ == "__main__":
    main()
