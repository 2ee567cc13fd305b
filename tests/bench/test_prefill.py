"""The prefill benchmark's CPU-side pieces: model construction from a recipe (no tokenizer) and
the last-position forward. The timing itself needs CUDA (tools/gpu/run_bench.sh)."""

from __future__ import annotations

import pytest
import torch

from dhsa_export import DHSAError
from dhsa_export.bench.prefill import bench_prefill, build_random_model, last_position_logits, main


def test_random_model_from_recipe_needs_no_tokenizer(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing may be read from it
    model = build_random_model("smollm2-135m:random", layers=1, dtype=torch.float32, device="cpu")
    assert model.config.num_hidden_layers == 1
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        last = last_position_logits(model, ids)
        full = model(ids, use_cache=False).logits
    assert last.shape == (1, 1, model.config.vocab_size)
    assert torch.allclose(last, full[:, -1:], atol=1e-5)


def test_unknown_model_and_layers_are_refused():
    with pytest.raises(DHSAError, match="unknown model"):
        build_random_model("nope:random", 1, torch.float32, "cpu")
    with pytest.raises(DHSAError, match="outside"):
        build_random_model("smollm2-135m:random", 0, torch.float32, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_needs_cuda(capsys):
    with pytest.raises(DHSAError, match="CUDA"):
        bench_prefill(tokens=[256])
    assert main(["--tokens", "256"]) == 2
    assert "CUDA" in capsys.readouterr().err
