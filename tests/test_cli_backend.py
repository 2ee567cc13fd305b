"""``--backend`` / ``--device`` / ``--dtype`` of ``generate`` and ``eval niah``, on a tiny local model
folder (random weights, byte tokenizer): the option reaches the attention, every backend gives the
reference's tokens, and a placement that cannot run is one error line before any loading."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dhsa_export.cli import main
from tests.hf.tiny import save_tiny_model_folder

# Small blocks so a few hundred byte tokens are routed sparsely.
SPARSE = ["--q-block", "16", "--k-block", "8", "--density", "0.25"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    # head_dim 64: a size the CUDA kernels support (the tiny default, 16, is refused there); the
    # vocabulary is exactly the byte tokenizer's, so every generated token prints something; weights
    # ten times the default scale, so attention (sparse or dense) changes the greedy tokens.
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-llama"), head_dim=64, vocab_size=257,
                                  initializer_range=0.2)


def generated(folder: str, *options: str) -> str:
    result = run("generate", "--model", folder, "--raw", "--prompt", PROMPT, "--max-new-tokens", "8",
                 *SPARSE, *options)
    assert result.exit_code == 0, result.output
    return result.output


def test_cpu_backends_give_the_reference_tokens(tiny_folder):
    reference = generated(tiny_folder, "--backend", "reference")
    assert generated(tiny_folder, "--backend", "torch-gather") == reference
    assert generated(tiny_folder) == reference  # auto = torch-gather on the CPU
    # The sparse prefill matters: the dense model continues differently on this prompt, so equal
    # tokens above are not equal by construction.
    assert generated(tiny_folder, "--attention", "dense") != reference


def niah_results(folder: str, out, backend: str, lengths: str, depths: str) -> dict:
    """``eval niah`` with a custom needle on ``folder``; its results.json."""
    result = run("eval", "niah", "--model", folder, "--backend", backend, "--context-lengths", lengths,
                 "--depths", depths, "--needle", "The code is 4321.", "--question", "What is the code?",
                 "--max-new-tokens", "4", "--out", str(out), *SPARSE)
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())


def test_eval_niah_records_the_backend_that_ran(tiny_folder, tmp_path):
    results = niah_results(tiny_folder, tmp_path / "niah", "torch-gather", "256", "50")
    assert (results["backend"], results["device"], results["dtype"]) == ("torch-gather", "cpu", "float32")
    assert len(results["cells"]) == 1 and results["cells"][0]["causal_block_fraction"] < 1.0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--backend", "torch-cuda", "--device", "cpu"], "backend 'torch-cuda' runs on a CUDA device, not 'cpu'"),
        pytest.param(["--backend", "torch-cuda"], "device 'cuda' needs a CUDA GPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
        pytest.param(["--device", "cuda"], "device 'cuda' needs a CUDA GPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    ],
)
@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["eval", "niah", "--out", "unused"]])
def test_impossible_placement_is_one_line_before_loading(command, args, fragment):
    result = run(*command, "--model", "no-such-model-is-never-loaded", *args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.output


@pytest.mark.gpu
def test_torch_cuda_backend_runs_the_kernels_from_the_cli(tiny_folder, tmp_path):
    generated(tiny_folder, "--backend", "torch-cuda")  # exit 0; random weights give arbitrary tokens
    results = niah_results(tiny_folder, tmp_path / "niah", "torch-cuda", "512", "0,100")
    assert (results["backend"], results["device"], results["dtype"]) == ("torch-cuda", "cuda:0", "bfloat16")
    assert all(cell["causal_block_fraction"] < 1.0 for cell in results["cells"])
