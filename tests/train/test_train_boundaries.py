"""Boundary-predictor training: helpers (fast) and a tiny end-to-end run on the default model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dhsa_export import DHSAConfig, DHSAError
from dhsa_export.algo.boundaries import load_predictor, make_chunker, read_predictor_metadata
from dhsa_export.train.boundaries import best_threshold, focal_loss, train_boundaries

HAYSTACK = Path("/work/shared/data/haystack")


def test_best_threshold_maximizes_f1():
    probs = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.05])
    labels = torch.tensor([1, 1, 0, 1, 0, 0])
    threshold, precision, recall, f1 = best_threshold(probs, labels)
    assert threshold == pytest.approx(0.6)
    assert (precision, recall) == (pytest.approx(0.75), pytest.approx(1.0))
    assert f1 == pytest.approx(2 * 0.75 / 1.75)
    assert best_threshold(probs, torch.zeros(6))[3] == 0.0


def test_focal_loss_down_weights_easy_examples():
    targets = torch.tensor([1.0, 0.0])
    easy = focal_loss(torch.tensor([6.0, -6.0]), targets, alpha=0.5)
    hard = focal_loss(torch.tensor([-1.0, 1.0]), targets, alpha=0.5)
    assert 0 <= easy < hard
    plain = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([0.3]), torch.tensor([1.0]))
    assert focal_loss(torch.tensor([0.3]), torch.tensor([1.0]), alpha=1.0, gamma=0.0) == pytest.approx(float(plain))


def test_train_rejects_folder_without_text(tmp_path):
    with pytest.raises(DHSAError, match="no non-empty"):
        train_boundaries(None, str(tmp_path), str(tmp_path / "p.safetensors"), progress=False)
    with pytest.raises(DHSAError, match="does not exist"):
        train_boundaries(None, str(tmp_path / "nope"), str(tmp_path / "p.safetensors"), progress=False)
    with pytest.raises(DHSAError, match="seq_len"):
        train_boundaries(None, str(tmp_path), str(tmp_path / "p.safetensors"), seq_len=8, progress=False)


@pytest.mark.model
def test_train_boundaries_end_to_end(tmp_path, default_model):
    if not HAYSTACK.is_dir():
        pytest.skip(f"{HAYSTACK} (the haystack text used for training) is not present on this machine")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("apple.txt", "gba.txt"):
        shutil.copy(HAYSTACK / name, data / name)
    out = tmp_path / "pred" / "smollm2.safetensors"
    metrics = train_boundaries(None, str(data), str(out), max_tokens=2048, seq_len=512, epochs=1,
                               progress=False)
    assert out.is_file() and metrics["out"] == str(out)
    assert metrics["split"] == "document"
    assert metrics["train_windows"] >= 1 and metrics["val_windows"] >= 1
    assert metrics["train_documents"] == 1 and metrics["val_documents"] == 1
    assert metrics["tokens"] <= 2048 + 512
    assert 0.0 < metrics["train_positive_rate"] < 0.5
    for key in ("val_f1", "val_precision", "val_recall", "threshold"):
        assert 0.0 <= metrics[key] <= 1.0
    meta = read_predictor_metadata(out)
    assert meta["model"] == "smollm2-135m" and meta["label_ratio"] == 2.0 and meta["label_window"] == 4
    assert meta["train_samples"] == metrics["train_samples"] and meta["input_features"] == 3 * 64

    predictor = load_predictor(out)
    assert predictor.threshold == pytest.approx(metrics["threshold"])
    cfg = DHSAConfig(pattern="dynamic", boundary_predictor=str(out))
    chunker = make_chunker(cfg)
    for length in (1, 7, 200, 1500):
        offsets = chunker(torch.randn(3, length, 64))
        assert int(offsets[0]) == 0 and int(offsets[-1]) == length
        lengths = offsets[1:] - offsets[:-1]
        assert bool((lengths > 0).all()) and bool((lengths <= cfg.max_chunk).all())
        if length >= cfg.min_chunk:
            assert bool((lengths >= cfg.min_chunk).all())

    # the model uses it: dynamic DHSA at density 1.0 reproduces dense logits
    from dhsa_export.hf.generate import set_attention

    loaded = default_model
    ids = loaded.tokenizer((HAYSTACK / "apple.txt").read_text()[:1500], return_tensors="pt").input_ids[:, :300]
    try:
        with torch.inference_mode():
            set_attention(loaded, "dense")
            dense = loaded.model(ids).logits
            runtime = set_attention(loaded, "dhsa", cfg.replace(density=1.0))
            sparse = loaded.model(ids).logits
    finally:
        set_attention(loaded, "dense")
    offsets = runtime.chunk_offsets[0]
    assert int(offsets[0]) == 0 and int(offsets[-1]) == ids.shape[1] and len(offsets) > 2
    torch.testing.assert_close(sparse, dense, atol=2e-3, rtol=1e-3)
