"""The memory benchmark's CPU-side pieces: estimates, config parsing, the prefill + decode loop on a
small random model (no budget on the CPU), the torch int4 op inventory and the no-GPU messages.
The budgeted 100K-token run needs CUDA (tools/gpu/run_bench.sh)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from dhsa_export import DHSAError
from dhsa_export.bench.memory import (
    CONFIGS,
    bench_memory,
    estimate,
    main,
    markdown_table,
    parse_configs,
    probe_torch_int4,
    recipe_config,
    resolve_configs,
)
from dhsa_export.cli import main as cli


def test_estimates_for_llama_8b_at_100k_tokens():
    config = recipe_config("llama3.1-8b:random", None)
    assert config.num_hidden_layers == 32
    int4 = estimate(config, 100_000, int4=True, block_size=32)
    bf16 = estimate(config, 100_000, int4=False)
    assert int4["kv_cache_bytes"] == 100_000 * 32 * 2 * 8 * 128 * 2 == 13_107_200_000
    assert int4["linear_params"] == 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336)
    assert int4["embedding_params"] == 2 * 128256 * 4096
    assert bf16["weights_bytes"] == 2 * (int4["linear_params"] + int4["embedding_params"])
    assert 4.2 < int4["weights_bytes"] / 2**30 < 4.3  # 0.5625 bytes per weight


def test_configs_are_parsed_and_resolved():
    assert parse_configs("plain-bf16, dhsa-chunked-int4") == ["plain-bf16", "dhsa-chunked-int4"]
    with pytest.raises(DHSAError, match="unknown memory-benchmark configs"):
        parse_configs("dhsa,plain")
    names = [name for name, _ in resolve_configs(CONFIGS, int4=False)]
    assert names == ["dhsa-chunked-bf16", "dense-chunked-bf16", "dense-bf16", "plain-bf16"]
    assert not any(setup.int4 for _, setup in resolve_configs(CONFIGS, int4=False))


def test_prefill_and_decode_loop_runs_every_config_on_cpu():
    logs = []
    result = bench_memory("smollm2-135m:random", layers=1, tokens=80, decode_tokens=3, chunk_tokens=16,
                          warmup_tokens=16, density=0.5, device="cpu", log=logs.append)
    rows = {row["config"]: row for row in result["rows"]}
    assert list(rows) == list(CONFIGS) and len(logs) == 4
    for row in rows.values():
        assert row["ok"] and row["error"] is None, row
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0
        assert len(row["new_tokens"]) == 3
        assert row["kv_cache_mb"] == pytest.approx((80 + 3 - 1) * 2 * 3 * 64 * 2 / 2**20, abs=0.01)  # bf16
    assert rows["dhsa-chunked-int4"]["causal_block_fraction"] <= 1.0
    assert rows["dense-int4"]["chunk_tokens"] is None
    assert result["config"]["layers"] == 1 and result["estimates"]["plain-bf16"]["kv_cache_bytes"] > 0
    assert "_weight_int4pack_mm" in result["torch_int4"]
    assert "dhsa-chunked-int4" in markdown_table(result["rows"])


def test_bad_sizes_are_refused_before_any_work():
    with pytest.raises(DHSAError, match="block size"):
        bench_memory("smollm2-135m:random", tokens=8, block_size=48, device="cpu")
    with pytest.raises(DHSAError, match="chunk size"):
        bench_memory("smollm2-135m:random", tokens=8, chunk_tokens=0, device="cpu")
    with pytest.raises(DHSAError, match="unknown model"):
        bench_memory("nope:random", tokens=8, device="cpu")


def test_int4_op_inventory_on_cpu():
    info = probe_torch_int4("cpu")
    assert set(info) >= {"_weight_int4pack_mm", "_convert_weight_to_int4pack"}
    assert "tinygemm_ms" not in info


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_needs_cuda(capsys):
    with pytest.raises(DHSAError, match="CUDA"):
        bench_memory(tokens=256)
    assert main(["--tokens", "256"]) == 2
    assert "CUDA" in capsys.readouterr().err
    result = CliRunner().invoke(cli, ["bench", "memory", "--tokens", "256"])
    assert result.exit_code == 2 and "CUDA" in result.output
    result = CliRunner().invoke(cli, ["bench", "memory", "--tokens", "0"])
    assert result.exit_code == 2 and "--tokens 0" in result.output
