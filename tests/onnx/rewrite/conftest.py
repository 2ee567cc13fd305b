"""Foreign dense decoders of one tiny random Llama, and its PyTorch DHSA reference.

The model (2 layers, hidden 64, 4 query / 2 KV heads, vocab 256) is saved with ``save_pretrained``
beside a small word-level tokenizer, so the onnxruntime-genai model builder can read the folder
offline. Blocks are small (q 16, k 8) and the prompt is 100 tokens at density 0.25, so sparsity
changes the logits (tests assert it does) and the dense graph cannot pass for the DHSA one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dhsa_export import DHSAConfig

LAYERS = 2
LENGTH = 100
CFG = DHSAConfig(q_block=16, k_block=8, density=0.25, sink_tokens=8)
DENSE_CFG = CFG.replace(density=1.0)
ATOL = 1e-4


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t1", eos_token="t2", unk_token="t0").save_pretrained(folder)
    return folder


def load_tiny(folder: Path, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation).eval()


@pytest.fixture(scope="session")
def input_ids() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (1, LENGTH), dtype=np.int64)


@pytest.fixture(scope="session")
def reference(tiny_dir, input_ids) -> dict:
    """PyTorch logits (dense and DHSA) and the DHSA run's key/value cache per layer."""
    from dhsa_export.hf.attention import enable_dhsa

    model = load_tiny(tiny_dir)
    ids = torch.from_numpy(input_ids)
    with torch.no_grad():
        dense = model(ids).logits.numpy()
        enable_dhsa(model, CFG, backend="reference")
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    kv = {}
    for layer in range(LAYERS):
        kv[f"present.{layer}.key"] = cache.layers[layer].keys.numpy()
        kv[f"present.{layer}.value"] = cache.layers[layer].values.numpy()
    return {"dense": dense, "dhsa": out.logits.numpy(), "kv": kv}


def export_dense(folder: Path, path: Path, attn_implementation: str, opset: int) -> Path:
    """torch.onnx (dynamo) export of the dense model, as a user would run it."""
    from dhsa_export.onnx.export import quiet_exporter

    model = load_tiny(folder, attn_implementation)
    ids = torch.zeros(1, 40, dtype=torch.long)
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(model, (ids,), dynamo=True, opset_version=opset, kwargs={"use_cache": False},
                                    dynamic_shapes={"input_ids": {1: "sequence"}, "use_cache": None},
                                    input_names=["input_ids"], output_names=["logits"], verbose=False)
    program.save(str(path))
    return path


def build_genai(hf_dir: Path, out_dir: Path, *, fuse_qkv: bool = True, rotary_in_attention: bool = True) -> Path:
    """The onnxruntime-genai model builder (fp32, CPU), run in-process as its command line runs it.

    ``rotary_in_attention=False`` gives the builder's own separate-RotaryEmbedding layout (the one it
    emits for execution providers without fused rotary) by answering its capability query.
    """
    from onnxruntime_genai.models import builder

    options = [] if fuse_qkv else ["fuse_qkv=false"]
    model_class = sys.modules["builders.base"].Model
    original = model_class.is_fused_rope_supported
    if not rotary_in_attention:
        model_class.is_fused_rope_supported = lambda self: False
    try:
        extra = builder.parse_extra_options(None, str(hf_dir), str(out_dir), "fp32", "cpu",
                                            str(out_dir / "cache"), options)
        builder.create_model(None, str(hf_dir), str(out_dir), "fp32", "cpu", str(out_dir / "cache"), **extra)
    finally:
        model_class.is_fused_rope_supported = original
    return out_dir / "model.onnx"


def run_ort(path, input_ids: np.ndarray | None = None, extra_feeds: dict | None = None) -> dict[str, np.ndarray]:
    """All outputs of ``path`` in ONNX Runtime with the dhsa library. A decoder's other inputs are fed
    for an unpadded prompt of ``input_ids`` (position ids 0..L-1, attention mask ones, empty past);
    ``extra_feeds`` are fed as given."""
    from dhsa_export.backends.ort_cpu import make_session

    session = make_session(str(path), threads=2)
    length = 0 if input_ids is None else input_ids.shape[1]
    feeds = {}
    for port in session.get_inputs():
        if port.name == "input_ids":
            feeds[port.name] = input_ids
        elif port.name == "position_ids":
            feeds[port.name] = np.arange(length, dtype=np.int64)[None]
        elif port.name == "attention_mask":
            feeds[port.name] = np.ones((1, length), dtype=np.int64)
        elif port.name.startswith("past_key_values"):
            feeds[port.name] = np.zeros((1, 2, 0, 16), dtype=np.float32)
    feeds.update(extra_feeds or {})
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def max_error(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def dhsa_node_counts(model_path) -> dict[str, int]:
    import collections

    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node if n.domain == "dhsa"))


def counts(**changed) -> dict[str, int]:
    """Expected per-rule change counts: the named rules, 0 for every other rule."""
    from dhsa_export.onnx.rewrite import RULES

    return {rule.name: changed.get(rule.name, 0) for rule in RULES}


def check_torch_form(source: Path, folder: Path, rule: str, input_ids, reference) -> dict:
    """Rewrite a torch.onnx dense export at density 0.25 and 1.0 and compare with the references.

    Returns the measured errors (the tests print them with ``-s``)."""
    from dhsa_export.onnx.registry import route_attributes
    from dhsa_export.onnx.rewrite import rewrite_model

    sparse = rewrite_model(source, folder / "dhsa.onnx", CFG)
    assert sparse.counts() == counts(**{rule: LAYERS})
    assert dhsa_node_counts(sparse.output) == {"Route": LAYERS, "BlockSparseAttention": LAYERS}
    import onnx

    graph = onnx.load(str(sparse.output), load_external_data=False).graph
    route = next(n for n in graph.node if n.op_type == "Route")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in route.attribute}
    assert attrs["head_group"] == route_attributes(CFG, 4, 2)["head_group"] == 2  # routed on the 2 real KV heads
    dense_graph = run_ort(source, input_ids)["logits"]
    dhsa_graph = run_ort(sparse.output, input_ids)["logits"]
    errors = {"dense graph vs torch dense": max_error(dense_graph, reference["dense"]),
              "rewritten vs torch DHSA": max_error(dhsa_graph, reference["dhsa"]),
              "dense graph vs torch DHSA": max_error(dense_graph, reference["dhsa"])}
    assert errors["dense graph vs torch dense"] < ATOL
    assert errors["rewritten vs torch DHSA"] < ATOL
    assert errors["dense graph vs torch DHSA"] > 100 * ATOL  # sparsity really changes the result
    full = rewrite_model(source, folder / "dhsa-full.onnx", DENSE_CFG)
    assert full.counts() == sparse.counts()
    errors["density 1.0 vs dense graph"] = max_error(run_ort(full.output, input_ids)["logits"], dense_graph)
    assert errors["density 1.0 vs dense graph"] < ATOL
    print(source.name, rule, sparse.counts(), errors)
    return errors
