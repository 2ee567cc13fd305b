"""The CLI end to end on the real default model, and its bad-input behaviour."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dhsa_export.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.model
@pytest.mark.parametrize("attention", ["dhsa", "dense"])
def test_generate_answers_paris(default_model, attention):
    result = run("generate", "--attention", attention, "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "16")
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", "--prompt", "hi", "--density", "0"], "density 0.0"),
        (["generate", "--prompt", "hi", "--density", "1.5"], "density 1.5"),
        (["generate", "--prompt", "hi", "--q-block", "0"], "q_block 0"),
        (["generate", "--prompt", "hi", "--k-block", "-4"], "k_block -4"),
        (["generate", "--prompt", "hi", "--model", "no-such-model"], "no-such-model"),
        (["eval", "niah", "--out", "x", "--context-lengths", "2k"], "context lengths '2k'"),
        (["eval", "niah", "--out", "x", "--depths", "150"], "depths '150'"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, fragment):
    result = run(*args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dhsa-export: error:") and fragment in lines[0]


@pytest.mark.model
def test_prompt_over_context_is_rejected(default_model):
    result = run("generate", "--raw", "--prompt", "word " * 9000)
    assert result.exit_code == 2
    assert "exceeds the 8192-token context" in result.output


@pytest.mark.parametrize("command", ["attention", "prefill"])
def test_bench_without_gpu_says_so(command):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run("bench", command, "--tokens", "1024")
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.output


def test_setup_builds_the_native_library():
    from pathlib import Path

    result = run("setup")
    assert result.exit_code == 0, result.output
    path = Path(result.output.split("library: ", 1)[1].split(" (kernels", 1)[0])
    assert path.is_file() and path.name == "libdhsa_ort_cpu.so"
    assert "kernels: " in result.output
