"""``bench_attention`` refuses to run without CUDA with a message (the timing runs on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

from dhsa_export import DHSAError
from dhsa_export.bench.attention import bench_attention, main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_needs_cuda(capsys):
    with pytest.raises(DHSAError, match="CUDA"):
        bench_attention([256])
    assert main(["--tokens", "256"]) == 2
    assert "CUDA" in capsys.readouterr().err
