"""Model resolution: recipes, random variants, errors (the real default model is used)."""

from __future__ import annotations

import time

import pytest

from dhsa_export import DHSAError
from dhsa_export.hf.models import load_model
from dhsa_export.hf.recipes import load_recipe, recipe_names


def test_recipes_exist():
    assert {"smollm2-135m", "qwen2.5-0.5b", "llama3.1-8b"} <= set(recipe_names())
    assert load_recipe("llama3.1-8b").config["num_key_value_heads"] == 8


@pytest.mark.parametrize("spec", ["nope", "nope:random", "/no/such/file.gguf"])
def test_unknown_models(spec):
    with pytest.raises(DHSAError, match="nope|no/such"):
        load_model(spec)


def test_llama_random_has_exact_shapes():
    loaded = load_model("llama3.1-8b:random", layers=1)
    config = loaded.model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (4096, 32, 8)
    assert config.num_hidden_layers == 1 and config.vocab_size == 128256
    with pytest.raises(DHSAError, match="layer count 0"):
        load_model("llama3.1-8b:random", layers=0)


@pytest.mark.model
def test_default_model_reloads_fast(default_model):
    start = time.perf_counter()
    again = load_model()
    assert time.perf_counter() - start < 5
    assert type(again.model).__name__ == "LlamaForCausalLM"
    assert again.max_length == 8192
