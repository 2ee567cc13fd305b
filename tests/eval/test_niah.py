"""Needle-in-a-haystack: prompt construction, task/haystack validation and a tiny real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dhsa_export.config import DHSAConfig
from dhsa_export.errors import DHSAError
from dhsa_export.eval import (
    PAPER_NEEDLE,
    NeedleTask,
    build_prompt,
    default_haystack_text,
    load_haystack_text,
    magic_number_task,
    run_niah,
    score_response,
)
from dhsa_export.eval.plot import plot_niah_heatmap

SHARED_HAYSTACK = Path(__file__).resolve().parents[3] / "shared" / "data" / "haystack"


@pytest.fixture(scope="module")
def loaded():
    from dhsa_export.hf.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def haystack() -> str:
    """The paper's essays when the shared data is there, else the generated filler."""
    if SHARED_HAYSTACK.is_dir():
        return load_haystack_text(SHARED_HAYSTACK)
    return default_haystack_text()


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- tasks, scoring, haystack files


def test_magic_number_task_is_deterministic_and_scored_on_the_number():
    task = magic_number_task(3)
    assert task == magic_number_task(3)
    assert task != magic_number_task(4)
    number = task.answer_keywords[0]
    assert len(number) == 7 and number.isdigit() and number in task.needle
    assert task.needle.startswith("The special magic number for ")
    assert task.question.startswith("What is the special magic number for ")
    assert score_response(task, f" {number}.") == 1.0
    assert score_response(task, " 1234567.") == 0.0


def test_score_is_keyword_fraction_case_insensitive():
    assert score_response(PAPER_NEEDLE, " to eat a Sandwich and sit in DOLORES  park.") == pytest.approx(2 / 3)
    assert score_response(PAPER_NEEDLE, " eat a sandwich and sit in Dolores Park on a sunny day.") == 1.0
    assert score_response(PAPER_NEEDLE, " go to the beach.") == 0.0


def test_needle_task_rejects_keywords_outside_the_needle():
    with pytest.raises(DHSAError, match="'pizza'"):
        NeedleTask("The answer is 42.", "What is the answer?", ["pizza"], "The answer is")
    with pytest.raises(DHSAError, match="assistant prefix"):
        NeedleTask("The answer is 42.", "What is the answer?", ["answer"], "The answer is")


def test_missing_haystack_folder_is_an_error(tmp_path):
    with pytest.raises(DHSAError, match="does not exist"):
        load_haystack_text(tmp_path / "nowhere")
    with pytest.raises(DHSAError, match="no .txt files"):
        load_haystack_text(tmp_path)


def test_haystack_files_are_concatenated_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.")
    (tmp_path / "a.txt").write_text("First file.")
    (tmp_path / "c.md").write_text("Not a haystack file.")
    text = load_haystack_text(tmp_path)
    assert text.index("First") < text.index("Second") and "Not a haystack" not in text


def test_default_haystack_is_deterministic_filler():
    text = default_haystack_text()
    assert text == default_haystack_text() and text.startswith("The grass is green.")


# ---------------------------------------------------------------- prompts (real tokenizer)


@pytest.mark.model
@pytest.mark.parametrize("task", [PAPER_NEEDLE, magic_number_task(0)], ids=["paper", "magic"])
@pytest.mark.parametrize("context_length", [300, 1000, 4096])
def test_prompt_hits_the_length_and_places_the_needle(loaded, haystack, task, context_length):
    tokenizer = loaded.tokenizer
    for depth in (0, 25, 50, 100):
        text, info = build_prompt(tokenizer, haystack, task, context_length, depth)
        total = _tokens(tokenizer, text)
        assert total == info["prompt_tokens"]
        assert context_length - 4 <= total <= context_length, (depth, total)
        assert text.count(task.needle) == 1
        # template and BOS first, question and answer prefix last: nothing of them was cut
        assert text.startswith(tokenizer.bos_token)
        assert text.endswith(task.assistant_prefix)
        assert task.question in text[text.index(task.needle):]
        # needle at roughly `depth` percent of the context (the sentence boundary moves it a little)
        user = text.split(task.question)[0]
        context_start = user.index("<|im_start|>user\n") + len("<|im_start|>user\n")
        context = user[context_start:]
        where = 100 * context.index(task.needle) / max(1, len(context) - len(task.needle))
        assert abs(where - depth) < 12, (depth, where)
        assert abs(info["actual_depth"] - depth) < 12
        if depth == 100:
            assert context.rstrip().endswith(task.needle)
        if depth == 0:
            assert context.startswith(task.needle)


@pytest.mark.model
def test_prompt_inserts_after_a_sentence_end(loaded, haystack):
    text, _ = build_prompt(loaded.tokenizer, haystack, PAPER_NEEDLE, 2000, 50)
    before = text[: text.index(PAPER_NEEDLE.needle)].rstrip()
    assert before.endswith(".")


@pytest.mark.model
def test_short_haystack_is_repeated(loaded):
    text, info = build_prompt(loaded.tokenizer, "Tiny haystack. Only two sentences.", PAPER_NEEDLE, 600, 50)
    assert 596 <= _tokens(loaded.tokenizer, text) <= 600 and text.count(PAPER_NEEDLE.needle) == 1


@pytest.mark.model
def test_too_small_context_is_an_error(loaded, haystack):
    with pytest.raises(DHSAError, match="context length 40 is too small"):
        build_prompt(loaded.tokenizer, haystack, PAPER_NEEDLE, 40, 50)


@pytest.mark.model
@pytest.mark.parametrize("depth", [-1, 100.5, float("nan")])
def test_depth_outside_percent_range_is_an_error(loaded, haystack, depth):
    with pytest.raises(DHSAError, match="depth"):
        build_prompt(loaded.tokenizer, haystack, PAPER_NEEDLE, 512, depth)


# ---------------------------------------------------------------- run_niah


@pytest.mark.model
def test_run_niah_checks_before_it_works(loaded, tmp_path):
    common = dict(dhsa_config=None, haystack_dir=None, depths=[0], task=PAPER_NEEDLE, progress=False)
    with pytest.raises(DHSAError, match="unknown attention 'flash'"):
        run_niah(loaded, attention="flash", context_lengths=[512], out_dir=str(tmp_path / "a"), **common)
    with pytest.raises(DHSAError, match="exceeds the 8192-token context"):
        run_niah(loaded, attention="dense", context_lengths=[8192], out_dir=str(tmp_path / "b"), **common)
    with pytest.raises(DHSAError, match="does not exist"):
        run_niah(loaded, attention="dense", context_lengths=[512], out_dir=str(tmp_path / "c"),
                 **{**common, "haystack_dir": str(tmp_path / "missing")})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.model
@pytest.mark.parametrize("attention", ["dense", "dhsa"])
def test_run_niah_small_real_run(loaded, haystack, tmp_path, attention):
    cfg = DHSAConfig(q_block=64, k_block=16)
    haystack_dir = str(SHARED_HAYSTACK) if SHARED_HAYSTACK.is_dir() else None
    results = run_niah(
        loaded, attention=attention, dhsa_config=cfg, haystack_dir=haystack_dir,
        context_lengths=[512], depths=[0, 100], task=PAPER_NEEDLE, out_dir=str(tmp_path),
        max_new_tokens=8, progress=False,
    )
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == results
    assert written["model"] == loaded.name and written["attention"] == attention
    assert written["task"]["needle"] == PAPER_NEEDLE.needle
    assert [(c["context_length"], c["depth"]) for c in written["cells"]] == [(512, 0), (512, 100)]
    for cell in written["cells"]:
        assert set(cell) >= {"context_length", "depth", "score", "response", "prompt_tokens",
                             "causal_block_fraction"}
        assert 0.0 <= cell["score"] <= 1.0
        assert 508 <= cell["prompt_tokens"] <= 512
        assert isinstance(cell["response"], str)
    assert written["mean_score"] == pytest.approx(sum(c["score"] for c in written["cells"]) / 2)
    if attention == "dense":
        assert written["dhsa_config"] is None and written["causal_block_fraction"] is None
        assert all(c["causal_block_fraction"] is None for c in written["cells"])
    else:
        assert written["dhsa_config"] == cfg.to_dict()
        # 512 keys, 16-token blocks, density 0.125: a real fraction of the causal blocks, not all
        assert 0.0 < written["causal_block_fraction"] < 1.0
        assert all(0.0 < c["causal_block_fraction"] < 1.0 for c in written["cells"])
    heatmap = tmp_path / "heatmap.png"
    assert heatmap.is_file() and heatmap.stat().st_size > 1000
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries


def test_heatmap_of_partial_results(tmp_path):
    results = {
        "model": "m", "attention": "dhsa", "mean_score": 0.5, "causal_block_fraction": 0.3,
        "dhsa_config": {"pattern": "vslash", "density": 0.125, "head_routing": "group"},
        "cells": [{"context_length": 1024, "depth": 0, "score": 1.0},
                  {"context_length": 2048, "depth": 50, "score": 0.0}],
    }
    path = plot_niah_heatmap(results, tmp_path / "sub" / "map.png")
    assert path.is_file() and path.stat().st_size > 1000
