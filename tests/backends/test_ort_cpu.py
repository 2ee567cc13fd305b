"""The native ONNX Runtime CPU library (plugins/ort_cpu) against the reference implementations.

Single-node ONNX models (opset 21 + ("dhsa", 1)) run in onnxruntime with the library registered and
are compared with ``dhsa_export.check.references.REFERENCES``:

- ``dhsa::Route``: index and count must be *equal* to the reference for every pattern;
- ``dhsa::BlockSparseAttention``: max abs error <= 2e-5 in fp32 (fp16/bf16: the reference on the
  rounded inputs, with the output's rounding as tolerance);
- bad indices, counts, offsets, shapes and attributes: an onnxruntime exception whose message names
  the bad value, never a crash (the same tests run under ASan+UBSan through
  tools/test_ort_sanitized.sh, which sets DHSA_ORT_SANITIZE=1);
- the library's registration agrees with ``dhsa_export.onnx.registry``.

Float attributes are stored as float32 in ONNX, so the reference is called with the float32 value
of ``density`` (what a node actually carries).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from dhsa_export.backends.ort_cpu import (  # noqa: E402
    kernel_isa, library_path, make_session, registered_contract, sanitize_requested,
)
from dhsa_export.check.references import REFERENCES  # noqa: E402
from dhsa_export.onnx import registry  # noqa: E402

ROUTE = registry.ROUTE.qualified_name
BSA = registry.BLOCK_SPARSE_ATTENTION.qualified_name
PATTERNS = ("topk", "ashape", "vslash", "vslash_blockwise", "dynamic")
ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
ORT_ERRORS = (
    ort.capi.onnxruntime_pybind11_state.Fail,
    ort.capi.onnxruntime_pybind11_state.InvalidArgument,
    ort.capi.onnxruntime_pybind11_state.RuntimeException,
    ort.capi.onnxruntime_pybind11_state.InvalidGraph,
    ort.capi.onnxruntime_pybind11_state.NotImplemented,
)
ATOL = 2e-5
HYPOTHESIS = settings(max_examples=int(os.environ.get("DHSA_ORT_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_reference():
    """The torch reference on tiny problems is fastest (and immune to a busy machine) on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def library():
    """Built once per session (cached by source hash across sessions); DHSA_ORT_SANITIZE=1 selects the
    ASan+UBSan build, DHSA_ORT_LIBRARY a prebuilt library."""
    return library_path(sanitize_requested())


# --------------------------------------------------------------------------------------- helpers

_SESSIONS: dict = {}


def op_model(op: str, attrs: dict, dtype=np.float32, offsets: bool = False) -> onnx.ModelProto:
    """A one-node model; tensor names are the registry's port names, shapes left unknown."""
    spec = registry.OPS[op.split("::")[1]]
    ports = [p for p in spec.inputs if not p.optional or offsets]
    elem = lambda port: ELEM[dtype] if "float32" in port.dtypes else TensorProto.INT32  # noqa: E731
    inputs = [helper.make_tensor_value_info(p.name, elem(p), None) for p in ports]
    outputs = [helper.make_tensor_value_info(p.name, elem(p), None) for p in spec.outputs]
    node = helper.make_node(spec.name, [p.name for p in ports], [p.name for p in spec.outputs],
                            domain=registry.DOMAIN, **attrs)
    graph = helper.make_graph([node], f"dhsa_{spec.name}", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid(registry.DOMAIN, registry.VERSION)],
                             ir_version=10)


def session(library, op: str, attrs: dict, dtype=np.float32, offsets: bool = False):
    key = (str(library), op, tuple(sorted(attrs.items())), str(dtype), offsets, os.environ.get("DHSA_ORT_ISA"))
    if key not in _SESSIONS:
        _SESSIONS[key] = make_session(op_model(op, attrs, dtype, offsets), threads=2, library=library)
    return _SESSIONS[key]


def as_reference_attrs(attrs: dict) -> dict:
    """What the node carries: ONNX float attributes are float32."""
    return {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in attrs.items()}


def run_route(library, q, k, offsets=None, **attrs):
    feeds = {"query": q, "key": k}
    if offsets is not None:
        feeds["key_chunk_offsets"] = np.asarray(offsets, dtype=np.int32)
    return session(library, ROUTE, attrs, q.dtype.type, offsets is not None).run(None, feeds)


def run_attention(library, q, k, v, index, count, offsets=None, **attrs):
    feeds = {"query": q, "key": k, "value": v, "block_index": np.asarray(index, np.int32),
             "block_count": np.asarray(count, np.int32)}
    if offsets is not None:
        feeds["key_chunk_offsets"] = np.asarray(offsets, dtype=np.int32)
    return session(library, BSA, attrs, q.dtype.type, offsets is not None).run(None, feeds)[0]


def qkv(b, hq, hkv, lq, lk, d, dv=None, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, hq, lq, d), dtype=np.float32),
            rng.standard_normal((b, hkv, lk, d), dtype=np.float32),
            rng.standard_normal((b, hkv, lk, dv or d), dtype=np.float32))


def variable_offsets(lk: int, batch: int, seed: int, empty_chunks: bool = False) -> np.ndarray:
    """[B, nC + 1] variable chunks (same count per sequence), optionally with empty chunks."""
    rng = np.random.default_rng(seed)
    n_cuts = max(1, lk // 12)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, max(2, lk)), size=min(n_cuts, max(1, lk - 1)), replace=False))
        if empty_chunks and len(cuts) > 2:
            cuts[1] = cuts[0]
        rows.append(np.concatenate([[0], cuts, [lk]]))
    width = max(len(r) for r in rows)
    return np.stack([np.concatenate([r, np.full(width - len(r), lk)]) for r in rows]).astype(np.int32)


def assert_route_equal(library, q, k, offsets=None, **attrs):
    index, count = run_route(library, q, k, offsets, **attrs)
    ref_index, ref_count = REFERENCES[ROUTE](q, k, offsets, **as_reference_attrs(attrs))
    assert index.shape == ref_index.shape and count.shape == ref_count.shape
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_array_equal(index, ref_index)
    return index, count


def assert_attention_close(library, q, k, v, index, count, offsets=None, atol=ATOL, **attrs):
    out = run_attention(library, q, k, v, index, count, offsets, **attrs)
    ref = REFERENCES[BSA](q, k, v, index, count, offsets, **as_reference_attrs(attrs))
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    return out


# ------------------------------------------------------------------------------------- contract

def test_registration_agrees_with_registry(library):
    assert registered_contract(library) == json.loads(registry.contract_json())


def test_library_does_not_link_onnxruntime(library):
    if shutil.which("readelf") is None:
        pytest.skip("readelf not installed")
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "onnxruntime" not in needed
    assert "RegisterCustomOps" in subprocess.run(["readelf", "--dyn-syms", str(library)], capture_output=True,
                                                 text=True, check=True).stdout


def test_sanitized_library_when_requested(library):
    """tools/test_ort_sanitized.sh sets DHSA_ORT_SANITIZE=1: the tests must then run the ASan build."""
    if not sanitize_requested():
        pytest.skip("DHSA_ORT_SANITIZE is not set")
    assert "asan-ubsan" in str(library)
    if shutil.which("readelf"):
        symbols = subprocess.run(["readelf", "--dyn-syms", str(library)], capture_output=True, text=True).stdout
        assert "__asan" in symbols


def test_defaults_are_the_registry_defaults(library):
    """A node without attributes behaves like one with every registry default spelled out."""
    q, k, v = qkv(1, 4, 2, 300, 300, 16, seed=5)
    defaults = registry.ROUTE.defaults()
    index, count = run_route(library, q, k)
    index2, count2 = run_route(library, q, k, **defaults)
    np.testing.assert_array_equal(index, index2)
    np.testing.assert_array_equal(count, count2)
    out = run_attention(library, q, k, v, index, count)
    out2 = run_attention(library, q, k, v, index, count, **registry.BLOCK_SPARSE_ATTENTION.defaults())
    np.testing.assert_array_equal(out, out2)


# ---------------------------------------------------------------------------------------- Route

GQA = [(4, 4), (8, 2), (8, 1)]  # ratios 1, 4, 8


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("per_group", [False, True], ids=["head", "group"])
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_route_equals_reference(library, pattern, per_group, heads, head_dim):
    hq, hkv = heads
    q, k, _ = qkv(1, hq, hkv, 250, 250, head_dim, seed=head_dim + hq + hkv)
    offsets = variable_offsets(250, 1, seed=hq) if pattern == "dynamic" else None
    attrs = dict(q_block=64, k_block=16, pattern=pattern, density=0.2, head_group=hq // hkv if per_group else 1,
                 sink_tokens=16, local_tokens=48, instruction_tokens=40)
    index, count = assert_route_equal(library, q, k, offsets, **attrs)
    assert index.shape == (1, hq // attrs["head_group"], 4, offsets.shape[1] - 1 if offsets is not None else 16)
    assert (count > 0).all()


ROUTE_EDGES = {
    # name: (b, hq, hkv, lq, lk, d, attrs)
    "lq_not_multiple": (1, 4, 2, 301, 301, 32, dict(q_block=64, k_block=16, density=0.25)),
    "one_block": (1, 4, 2, 40, 40, 32, dict(q_block=64, k_block=16, density=0.5)),
    "budget_covers_all": (1, 4, 2, 200, 200, 32, dict(q_block=32, k_block=16, density=1.0)),
    "budget_of_one": (1, 4, 2, 200, 200, 32, dict(q_block=32, k_block=16, density=0.01)),
    "lq_lt_lk": (2, 4, 2, 70, 333, 32, dict(q_block=32, k_block=16, density=0.3)),
    "batch": (3, 8, 4, 150, 150, 16, dict(q_block=32, k_block=8, density=0.15)),
    "odd_blocks": (1, 6, 3, 257, 257, 24, dict(q_block=48, k_block=20, density=0.35)),
    "k_block_over_q_block": (1, 4, 4, 190, 190, 16, dict(q_block=16, k_block=64, density=0.4)),
    "no_sink_no_local": (1, 4, 2, 260, 260, 32, dict(q_block=32, k_block=16, density=0.2, sink_tokens=0,
                                                      local_tokens=0, instruction_tokens=0)),
    "long_sink_local": (1, 4, 2, 260, 260, 32, dict(q_block=32, k_block=16, density=0.3, sink_tokens=100,
                                                     local_tokens=200, instruction_tokens=300)),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("edge", sorted(ROUTE_EDGES))
def test_route_edge_cases(library, pattern, edge):
    b, hq, hkv, lq, lk, d, attrs = ROUTE_EDGES[edge]
    q, k, _ = qkv(b, hq, hkv, lq, lk, d, seed=len(edge))
    offsets = variable_offsets(lk, b, seed=b + lk) if pattern == "dynamic" else None
    for head_group in (1, hq // hkv):
        index, count = assert_route_equal(library, q, k, offsets, pattern=pattern, head_group=head_group, **attrs)
    if attrs["density"] == 1.0 and pattern != "dynamic":
        nc = index.shape[-1]
        q_last = np.minimum((np.arange(index.shape[2]) + 1) * attrs["q_block"], lq) - 1 + (lk - lq)
        causal_chunks = np.minimum(q_last // attrs["k_block"] + 1, nc)
        np.testing.assert_array_equal(count, np.broadcast_to(causal_chunks, count.shape))


def test_route_vslash_switches_to_blockwise(library):
    q, k, _ = qkv(1, 4, 2, 300, 300, 32, seed=11)
    attrs = dict(q_block=32, k_block=16, density=0.2, head_group=2)
    switched = assert_route_equal(library, q, k, pattern="vslash", vslash_blockwise_above=256, **attrs)
    blockwise = run_route(library, q, k, pattern="vslash_blockwise", **attrs)
    np.testing.assert_array_equal(switched[0], blockwise[0])
    assert_route_equal(library, q, k, pattern="vslash", vslash_blockwise_above=0, **attrs)


def test_route_dynamic_with_empty_chunks_and_fixed_fallback(library):
    q, k, _ = qkv(2, 4, 2, 200, 200, 16, seed=12)
    offsets = variable_offsets(200, 2, seed=3, empty_chunks=True)
    assert_route_equal(library, q, k, offsets, pattern="dynamic", q_block=32, k_block=16, density=0.3)
    # without offsets, dynamic routes over fixed k_block chunks (as the reference does)
    assert_route_equal(library, q, k, None, pattern="dynamic", q_block=32, k_block=16, density=0.3)


def test_route_ignores_offsets_for_fixed_patterns(library):
    q, k, _ = qkv(1, 4, 2, 200, 200, 16, seed=13)
    offsets = variable_offsets(200, 1, seed=4)
    for pattern in ("topk", "vslash"):
        index, _ = assert_route_equal(library, q, k, offsets, pattern=pattern, q_block=32, k_block=16, density=0.3)
        assert index.shape[-1] == 13  # fixed blocks, not the variable chunks


def test_route_half_inputs(library):
    q, k, _ = qkv(1, 4, 2, 200, 200, 32, seed=14)
    qh, kh = q.astype(np.float16), k.astype(np.float16)
    for pattern in PATTERNS:
        index, count = run_route(library, qh, kh, pattern=pattern, q_block=32, k_block=16, density=0.25)
        ref_index, ref_count = REFERENCES[ROUTE](qh.astype(np.float32), kh.astype(np.float32), pattern=pattern,
                                                 q_block=32, k_block=16, density=float(np.float32(0.25)))
        np.testing.assert_array_equal(index, ref_index)
        np.testing.assert_array_equal(count, ref_count)


@pytest.mark.parametrize("fill", [0.0, 1.0])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_route_all_ties(library, fill, pattern):
    """Constant inputs make every score equal: ties go to the lower chunk index, as in the reference."""
    q = np.full((1, 4, 200, 16), fill, np.float32)
    k = np.full((1, 2, 200, 16), fill, np.float32)
    for head_group in (1, 2):
        assert_route_equal(library, q, k, pattern=pattern, q_block=32, k_block=16, density=0.3, head_group=head_group)


@pytest.mark.parametrize("batch,lq,lk", [(1, 0, 0), (1, 0, 50), (0, 10, 10)])
def test_empty_inputs(library, batch, lq, lk):
    q = np.zeros((batch, 4, lq, 8), np.float32)
    k = np.zeros((batch, 2, lk, 8), np.float32)
    v = np.zeros((batch, 2, lk, 3), np.float32)
    nq, nc = -(-lq // 4), -(-lk // 4)
    for pattern in PATTERNS:
        index, count = run_route(library, q, k, pattern=pattern, q_block=4, k_block=4, head_group=2)
        assert index.shape == (batch, 2, nq, nc) and count.shape == (batch, 2, nq)
    out = run_attention(library, q, k, v, np.zeros((batch, 2, nq, 1), np.int32), np.zeros((batch, 2, nq), np.int32),
                        q_block=4, k_block=4)
    assert out.shape == (batch, 4, lq, 3)


@HYPOTHESIS
@given(data=st.data())
def test_route_property(library, data):
    hkv = data.draw(st.integers(1, 3), label="hkv")
    ratio = data.draw(st.sampled_from([1, 2, 4]), label="ratio")
    lk = data.draw(st.integers(1, 160), label="lk")
    lq = data.draw(st.integers(1, lk), label="lq")
    batch = data.draw(st.integers(1, 2), label="batch")
    d = data.draw(st.sampled_from([4, 8, 16, 32]), label="d")
    pattern = data.draw(st.sampled_from(PATTERNS), label="pattern")
    attrs = dict(
        pattern=pattern,
        q_block=data.draw(st.sampled_from([4, 8, 16, 32, 64]), label="q_block"),
        k_block=data.draw(st.sampled_from([2, 4, 8, 16, 32]), label="k_block"),
        density=data.draw(st.sampled_from([0.05, 0.1, 0.125, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]), label="density"),
        head_group=data.draw(st.sampled_from([1, ratio]), label="head_group"),
        sink_tokens=data.draw(st.integers(0, 40), label="sink"),
        local_tokens=data.draw(st.integers(0, 80), label="local"),
        instruction_tokens=data.draw(st.integers(0, 80), label="instruction"),
    )
    seed = data.draw(st.integers(0, 2**16), label="seed")
    q, k, _ = qkv(batch, hkv * ratio, hkv, lq, lk, d, seed=seed)
    offsets = variable_offsets(lk, batch, seed) if pattern == "dynamic" and data.draw(st.booleans()) else None
    assert_route_equal(library, q, k, offsets, **attrs)


# ------------------------------------------------------------------------- BlockSparseAttention

def reference_selection(q, k, offsets=None, **attrs):
    return REFERENCES[ROUTE](q, k, offsets, **as_reference_attrs(attrs))


@pytest.mark.parametrize("pattern", ["topk", "vslash", "dynamic"])
@pytest.mark.parametrize("per_group", [False, True], ids=["head", "group"])
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_equals_reference(library, pattern, per_group, heads, head_dim):
    hq, hkv = heads
    q, k, v = qkv(1, hq, hkv, 200, 200, head_dim, seed=hq * head_dim + hkv)
    offsets = variable_offsets(200, 1, seed=7) if pattern == "dynamic" else None
    route_attrs = dict(q_block=64, k_block=16, pattern=pattern, density=0.2, head_group=hq // hkv if per_group else 1)
    index, count = reference_selection(q, k, offsets, **route_attrs)
    assert_attention_close(library, q, k, v, index, count, offsets, q_block=64, k_block=16)


ATTENTION_EDGES = {
    # name: (b, hq, hkv, lq, lk, d, dv, q_block, k_block)
    "lq_not_multiple": (1, 4, 1, 201, 201, 64, 64, 64, 16),
    "one_block": (1, 4, 2, 50, 50, 64, 64, 64, 16),
    "one_row": (1, 4, 2, 1, 77, 64, 64, 64, 16),
    "lq_lt_lk": (2, 4, 2, 100, 257, 64, 64, 32, 32),
    "dv_ne_d": (1, 4, 2, 130, 130, 48, 80, 32, 16),
    "odd_dims": (1, 3, 1, 77, 77, 13, 7, 16, 5),
    "big_k_block": (1, 8, 1, 200, 200, 128, 128, 32, 96),
    "ratio_8": (2, 8, 1, 160, 160, 64, 64, 64, 32),
}


@pytest.mark.parametrize("edge", sorted(ATTENTION_EDGES))
@pytest.mark.parametrize("density", [0.15, 1.0], ids=["sparse", "budget_covers_all"])
def test_attention_edge_cases(library, edge, density):
    b, hq, hkv, lq, lk, d, dv, q_block, k_block = ATTENTION_EDGES[edge]
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dv, seed=len(edge))
    for head_group in (1, hq // hkv):
        index, count = reference_selection(q, k, q_block=q_block, k_block=k_block, pattern="topk", density=density,
                                           head_group=head_group)
        assert_attention_close(library, q, k, v, index, count, q_block=q_block, k_block=k_block)
    offsets = variable_offsets(lk, b, seed=lk, empty_chunks=True)
    index, count = reference_selection(q, k, offsets, q_block=q_block, k_block=k_block, pattern="dynamic",
                                       density=density, head_group=1)
    assert_attention_close(library, q, k, v, index, count, offsets, q_block=q_block, k_block=k_block)


def random_index(rng, b, hr, nq, nc, width, duplicates=True):
    """Unsorted, possibly duplicated indices with random counts (entries past the count are junk)."""
    index = rng.integers(-5, nc + 5, size=(b, hr, nq, width)).astype(np.int32)
    count = rng.integers(0, width + 1, size=(b, hr, nq)).astype(np.int32)
    for idx in np.ndindex(b, hr, nq):
        n = count[idx]
        index[idx][:n] = rng.integers(0, nc, size=n) if duplicates else rng.permutation(nc)[:n]
    return index, count


def test_attention_unsorted_duplicated_indices_and_empty_rows(library):
    q, k, v = qkv(2, 8, 2, 200, 200, 32, seed=21)
    rng = np.random.default_rng(0)
    index, count = random_index(rng, 2, 8, 4, 13, 9)
    count[0, 0, 1] = 0  # a row with no chunk gives zeros
    out = assert_attention_close(library, q, k, v, index, count, q_block=64, k_block=16)
    assert not out[0, 0, 64:128].any()


def test_attention_future_only_selection_gives_zeros(library):
    """Rows whose only selected chunk lies in their future see no key: zeros, not NaN."""
    q, k, v = qkv(1, 2, 1, 64, 64, 16, seed=22)
    index = np.full((1, 2, 1, 1), 3, np.int32)  # chunk 3 = keys 48..63
    count = np.ones((1, 2, 1), np.int32)
    out = assert_attention_close(library, q, k, v, index, count, q_block=64, k_block=16)
    assert not out[:, :, :48].any() and np.abs(out[:, :, 48:]).sum() > 0


def numpy_attention(q, k, v, mask, scale):
    """Dense masked softmax attention in float64 (rows with no key give zeros)."""
    ratio = q.shape[1] // k.shape[1]
    kk, vv = np.repeat(k, ratio, axis=1).astype(np.float64), np.repeat(v, ratio, axis=1).astype(np.float64)
    logits = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), kk) * scale
    logits = np.where(mask, logits, -np.inf)
    peak = np.max(np.where(mask, logits, -1e300), axis=-1, keepdims=True)
    weights = np.where(mask, np.exp(logits - peak), 0.0)
    total = weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", weights / np.where(total > 0, total, 1), vv)


def token_mask(index, count, hq, lq, lk, q_block, offsets, causal):
    b, hr, nq, _ = index.shape
    mask = np.zeros((b, hq, lq, lk), bool)
    for bb, h, i in np.ndindex(b, hq, nq):
        r = h // (hq // hr)
        for c in index[bb, r, i, : count[bb, r, i]]:
            mask[bb, h, i * q_block:(i + 1) * q_block, offsets[bb][c]:offsets[bb][c + 1]] = True
    if causal:
        mask &= (np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq))[None, None]
    return mask


@pytest.mark.parametrize("causal", [0, 1])
def test_attention_scale_and_causal_against_dense_numpy(library, causal):
    """The reference always applies causality; `causal=0` and an explicit `scale` are checked against
    a dense float64 computation under the equivalent token mask."""
    q, k, v = qkv(1, 4, 2, 90, 130, 32, seed=23)
    rng = np.random.default_rng(1)
    index, count = random_index(rng, 1, 2, 3, 9, 6, duplicates=False)
    out = run_attention(library, q, k, v, index, count, q_block=32, k_block=16, scale=0.3, causal=causal)
    offsets = [np.minimum(np.arange(10) * 16, 130)]
    expected = numpy_attention(q, k, v, token_mask(index, count, 4, 90, 130, 32, offsets, causal), 0.3)
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_attention_half_precision(library, dtype):
    q, k, v = qkv(1, 8, 2, 150, 150, 64, seed=24)
    index, count = reference_selection(q, k, q_block=32, k_block=16, pattern="vslash", density=0.3, head_group=4)
    if dtype == "bfloat16":
        # bfloat16 is fed as a float32 graph input cast to bfloat16 inside the graph
        out = _run_bf16_attention(library, q, k, v, index, count)
        rounded = [_bf16_round(x) for x in (q, k, v)]
        tol = 2e-2
    else:
        out = run_attention(library, q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), index, count,
                            q_block=32, k_block=16).astype(np.float32)
        rounded = [x.astype(np.float16).astype(np.float32) for x in (q, k, v)]
        tol = 2e-3
    ref = REFERENCES[BSA](*rounded, index, count, q_block=32, k_block=16)
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32)


def _run_bf16_attention(library, q, k, v, index, count):
    spec = registry.BLOCK_SPARSE_ATTENTION
    names = ["query", "key", "value"]
    nodes = [helper.make_node("Cast", [n + "_f32"], [n], to=TensorProto.BFLOAT16) for n in names]
    nodes.append(helper.make_node(spec.name, names + ["block_index", "block_count"], ["output_bf16"],
                                  domain=registry.DOMAIN, q_block=32, k_block=16))
    nodes.append(helper.make_node("Cast", ["output_bf16"], ["output"], to=TensorProto.FLOAT))
    inputs = [helper.make_tensor_value_info(n + "_f32", TensorProto.FLOAT, None) for n in names]
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT32, None) for n in ("block_index", "block_count")]
    graph = helper.make_graph(nodes, "bf16", inputs, [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("dhsa", 1)],
                              ir_version=10)
    sess = make_session(model, threads=2, library=library)
    return sess.run(None, {"query_f32": q, "key_f32": k, "value_f32": v, "block_index": index,
                           "block_count": count})[0]


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_instruction_sets_agree(library, isa, monkeypatch):
    """Every kernel build the CPU can run gives the same results (DHSA_ORT_ISA caps the choice)."""
    q, k, v = qkv(1, 8, 2, 170, 170, 40, seed=25)
    attrs = dict(q_block=32, k_block=16, pattern="vslash", density=0.3, head_group=1)
    index, count = reference_selection(q, k, **attrs)
    monkeypatch.setenv("DHSA_ORT_ISA", isa)
    allowed = {"generic": ["generic"], "avx2": ["generic", "avx2"], "avx512": ["generic", "avx2", "avx512"]}
    assert kernel_isa(library) in allowed[isa]
    assert_route_equal(library, q, k, **attrs)
    assert_attention_close(library, q, k, v, index, count, q_block=32, k_block=16)


def test_private_threads_env(library, monkeypatch):
    """DHSA_ORT_NUM_THREADS runs the kernels on their own threads with the same result."""
    q, k, v = qkv(1, 8, 2, 200, 200, 32, seed=26)
    index, count = reference_selection(q, k, q_block=32, k_block=16, pattern="topk", density=0.3)
    base = run_attention(library, q, k, v, index, count, q_block=32, k_block=16)
    monkeypatch.setenv("DHSA_ORT_NUM_THREADS", "3")
    np.testing.assert_allclose(run_attention(library, q, k, v, index, count, q_block=32, k_block=16), base, atol=1e-6)


@HYPOTHESIS
@given(data=st.data())
def test_attention_property(library, data):
    """Random shapes, chunkings and indices (including invalid ones): the kernel matches the
    reference, or raises an onnxruntime error exactly when the reference rejects the input."""
    hkv = data.draw(st.integers(1, 3), label="hkv")
    ratio = data.draw(st.sampled_from([1, 2, 4]), label="ratio")
    hq = hkv * ratio
    hr = data.draw(st.sampled_from(sorted({1, hkv, hq})), label="hr")
    lk = data.draw(st.integers(1, 150), label="lk")
    lq = data.draw(st.integers(1, lk), label="lq")
    batch = data.draw(st.integers(1, 2), label="batch")
    d = data.draw(st.sampled_from([1, 8, 16, 33]), label="d")
    dv = data.draw(st.sampled_from([1, 8, 16, 20]), label="dv")
    q_block = data.draw(st.sampled_from([1, 8, 16, 32, 64]), label="q_block")
    k_block = data.draw(st.sampled_from([1, 4, 16, 32]), label="k_block")
    variable = data.draw(st.booleans(), label="variable")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    q, k, v = qkv(batch, hq, hkv, lq, lk, d, dv, seed=seed)
    offsets = variable_offsets(lk, batch, seed, empty_chunks=seed % 3 == 0) if variable else None
    nc = offsets.shape[1] - 1 if variable else -(-lk // k_block)
    nq = -(-lq // q_block)
    rng = np.random.default_rng(seed)
    width = data.draw(st.integers(1, nc + 2), label="width")
    index, count = random_index(rng, batch, hr, nq, nc, width)
    invalid = data.draw(st.sampled_from(["none", "none", "index", "count"]), label="invalid")
    if invalid == "index":
        row = tuple(rng.integers(0, s) for s in (batch, hr, nq))
        count[row] = max(count[row], 1)
        index[row][rng.integers(0, count[row])] = data.draw(st.sampled_from([-1, nc, nc + 7, -2**31]))
    elif invalid == "count":
        count[tuple(rng.integers(0, s) for s in (batch, hr, nq))] = data.draw(st.sampled_from([-1, width + 1]))
    try:
        ref = REFERENCES[BSA](q, k, v, index, count, offsets, q_block=q_block, k_block=k_block)
    except ValueError:
        ref = None
    if ref is None:
        with pytest.raises(ORT_ERRORS, match="block_(index|count)"):
            run_attention(library, q, k, v, index, count, offsets, q_block=q_block, k_block=k_block)
    else:
        out = run_attention(library, q, k, v, index, count, offsets, q_block=q_block, k_block=k_block)
        np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- bad input handling

def _bsa_inputs():
    q, k, v = qkv(1, 4, 2, 100, 100, 16, seed=30)
    index, count = reference_selection(q, k, q_block=32, k_block=16, pattern="topk", density=0.3)
    return q, k, v, index, count


def test_bad_block_index_is_an_error(library):
    q, k, v, index, count = _bsa_inputs()
    for bad in (7, 100, -1, np.iinfo(np.int32).max, np.iinfo(np.int32).min):
        broken = index.copy()
        broken[0, 1, 2, 0] = bad
        with pytest.raises(ORT_ERRORS, match=rf"block_index\[0, 1, 2, 0\] = {bad} is outside \[0, 7\)"):
            run_attention(library, q, k, v, broken, count, q_block=32, k_block=16)
    # entries past the count are ignored, whatever they hold
    junk = index.copy()
    junk[..., -1] = 12345
    count_short = np.minimum(count, index.shape[-1] - 1)
    run_attention(library, q, k, v, junk, count_short, q_block=32, k_block=16)


def test_bad_block_count_is_an_error(library):
    q, k, v, index, count = _bsa_inputs()
    for bad in (-1, index.shape[-1] + 1, 2**31 - 1):
        broken = count.copy()
        broken[0, 0, 3] = bad
        with pytest.raises(ORT_ERRORS, match=rf"block_count\[0, 0, 3\] = {bad} is outside \[0, {index.shape[-1]}\]"):
            run_attention(library, q, k, v, index, broken, q_block=32, k_block=16)


@pytest.mark.parametrize("case,message", [
    ("first_not_zero", r"key_chunk_offsets\[0, 0\] = 3 must be 0"),
    ("decreasing", r"key_chunk_offsets\[0, 3\] = 10 is smaller than"),
    ("short_end", r"key_chunk_offsets\[0, 7\] = 99 must equal the key length 100"),
    ("long_end", r"key_chunk_offsets\[0, 7\] = 1000 must equal the key length 100"),
    ("negative", r"key_chunk_offsets\[0, 0\] = -4 must be 0"),
])
def test_bad_offsets_are_errors(library, case, message):
    q, k, v, _, _ = _bsa_inputs()
    offsets = np.array([[0, 10, 20, 30, 45, 60, 80, 100]], np.int32)
    broken = offsets.copy()
    if case == "first_not_zero":
        broken[0, 0] = 3
    elif case == "decreasing":
        broken[0, 3] = 10
    elif case == "short_end":
        broken[0, -1] = 99
    elif case == "long_end":
        broken[0, -1] = 1000
    else:
        broken[0, 0] = -4
    index = np.zeros((1, 4, 4, 1), np.int32)
    count = np.ones((1, 4, 4), np.int32)
    with pytest.raises(ORT_ERRORS, match=message):
        run_attention(library, q, k, v, index, count, broken, q_block=32, k_block=16)
    with pytest.raises(ORT_ERRORS, match=message):
        run_route(library, q, k, broken, pattern="dynamic", q_block=32, k_block=16)


def test_bad_shapes_are_errors(library):
    q, k, v, index, count = _bsa_inputs()
    run = lambda **kw: run_attention(library, kw.get("q", q), kw.get("k", k), kw.get("v", v),  # noqa: E731
                                     kw.get("index", index), kw.get("count", count), q_block=32, k_block=16)
    cases = [
        (dict(q=q[0]), r"input query has rank 3"),
        (dict(k=k[:, :1].repeat(3, axis=1), v=v[:, :1].repeat(3, axis=1)),
         r"query heads 4 are not a multiple of key heads 3"),
        (dict(v=v[:, :, :50]), r"value \[1, 2, 50, 16\] does not match key"),
        (dict(k=k[..., :8], v=v), r"key \[1, 2, 100, 8\] does not match query"),
        (dict(index=index[:, :, :3], count=count[:, :, :3]), r"has 3 query blocks, expected ceil\(Lq / q_block\)"),
        (dict(index=np.repeat(index, 3, axis=1)[:, :3], count=np.repeat(count, 3, axis=1)[:, :3]),
         r"not a multiple of the routing heads 3"),
        (dict(count=count[:, :, :2]), r"block_count \[1, 4, 2\] must be \[1, 4, 4\]"),
        (dict(index=np.concatenate([index, index]), count=np.concatenate([count, count])),
         r"block_index \[2, 4, 4, \d+\] must have batch 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ORT_ERRORS, match=message):
            run(**kwargs)


def test_route_bad_shapes_are_errors(library):
    q, k, _ = qkv(1, 4, 2, 100, 100, 16, seed=31)
    with pytest.raises(ORT_ERRORS, match=r"query length 100 exceeds key length 50"):
        run_route(library, q, k[:, :, :50], pattern="topk")
    with pytest.raises(ORT_ERRORS, match=r"head_group = 3 must be 1 \(per head\) or Hq/Hkv = 2"):
        run_route(library, q, k, pattern="topk", head_group=3)
    with pytest.raises(ORT_ERRORS, match=r"key_chunk_offsets \[2, 3\] must have batch 1"):
        run_route(library, q, k, np.array([[0, 50, 100], [0, 50, 100]]), pattern="dynamic")


@pytest.mark.parametrize("op,attrs,message", [
    (ROUTE, dict(density=0.0), r"density = 0 is outside \(0, 1\]"),
    (ROUTE, dict(density=1.5), r"density = 1.5 is outside \(0, 1\]"),
    (ROUTE, dict(pattern="diagonal"), r"pattern = 'diagonal' is unknown"),
    (ROUTE, dict(q_block=0), r"q_block = 0 must be >= 1"),
    (ROUTE, dict(k_block=-3), r"k_block = -3 must be >= 1"),
    (ROUTE, dict(sink_tokens=-1), r"sink_tokens = -1 must be >= 0"),
    (ROUTE, dict(density=1), r"attribute density must be of type float"),
    (ROUTE, dict(pattern=3), r"attribute pattern must be of type string"),
    (BSA, dict(causal=2), r"causal = 2 must be 0 or 1"),
    (BSA, dict(q_block=0), r"q_block = 0 must be >= 1"),
    (BSA, dict(scale=float("inf")), r"scale = inf must be finite"),
    (BSA, dict(scale=1), r"attribute scale must be of type float"),
])
def test_bad_attributes_fail_session_creation(library, op, attrs, message):
    with pytest.raises(ORT_ERRORS, match=message):
        make_session(op_model(op, attrs), threads=1, library=library)


def test_mixed_float_types_are_rejected(library):
    """Query fp32 with key fp16 matches no registered kernel: ORT refuses at session creation."""
    model = op_model(ROUTE, dict(pattern="topk"))
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(ORT_ERRORS):
        make_session(model, threads=1, library=library)


# --------------------------------------------------------------------------------- ChunkOffsets

CHUNKS = registry.CHUNK_OFFSETS.qualified_name


def run_chunk_offsets(library, key, probs=None, **attrs):
    feeds = {"key": key}
    if probs is not None:
        feeds["boundary_probs"] = probs.astype(key.dtype)
    return session(library, CHUNKS, attrs, key.dtype.type, probs is not None).run(None, feeds)[0]


def assert_chunk_offsets_equal(library, key, probs=None, **attrs):
    got = run_chunk_offsets(library, key, probs, **attrs)
    want = REFERENCES[CHUNKS](key, probs, **as_reference_attrs(attrs))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    return got


def smooth_keys(b, hkv, length, d, seed):
    """Keys that drift like text (a random walk per topic plus noise, topics switching at random):
    similarity drops at the switches, so the rule has real peaks to find."""
    rng = np.random.default_rng(seed)
    switches = np.cumsum(rng.random((b, length)) < 0.06, axis=1)
    topics = rng.standard_normal((b, hkv, int(switches.max(initial=0)) + 1, d)).astype(np.float32)
    picked = np.take_along_axis(topics, switches[:, None, :, None].repeat(hkv, 1).repeat(d, 3), axis=2)
    return (picked + 0.4 * rng.standard_normal((b, hkv, length, d))).astype(np.float32)


def random_probs(rng, b, length, levels=None):
    """Boundary probabilities; with ``levels`` only that many distinct values (many exact ties)."""
    probs = rng.random((b, length)).astype(np.float32)
    return np.round(probs * levels) / levels if levels else probs ** 3


@pytest.mark.parametrize("length", [0, 1, 5, 8, 9, 17, 40, 97, 300, 1000])
@pytest.mark.parametrize("limits", [(8, 32), (1, 4), (4, 6), (16, 16)], ids=lambda m: f"{m[0]}-{m[1]}")
def test_chunk_offsets_similarity_equals_reference(library, length, limits):
    key = smooth_keys(2, 2, length, 16, seed=length)
    offsets = assert_chunk_offsets_equal(library, key, min_chunk=limits[0], max_chunk=limits[1])
    assert offsets.shape[0] == 2 and (offsets[:, 0] == 0).all() and (offsets[:, -1] == length).all()


@pytest.mark.parametrize("heads,head_dim", [(1, 64), (3, 64), (8, 128)])
@pytest.mark.parametrize("window", [1, 2, 4, 7])
def test_chunk_offsets_similarity_heads_and_windows(library, heads, head_dim, window):
    key = smooth_keys(1, heads, 400, head_dim, seed=heads + window)
    offsets = assert_chunk_offsets_equal(library, key, window=window)
    lengths = np.diff(offsets[0])
    assert lengths.min() >= 8 and lengths.max() <= 32


@pytest.mark.parametrize("length", [0, 1, 2, 9, 33, 250, 1200])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.97, 1.0])
def test_chunk_offsets_predictor_equals_reference(library, length, threshold):
    rng = np.random.default_rng(length)
    key = np.zeros((3, 2, length, 4), np.float32)  # only the probabilities are read
    for levels in (None, 4):
        probs = random_probs(rng, 3, length, levels)
        offsets = assert_chunk_offsets_equal(library, key, probs, threshold=threshold)
        assert offsets.shape[0] == 3


def test_chunk_offsets_pads_rows_with_the_length(library):
    """Sequences of one batch get different chunk counts: shorter rows end in empty chunks at L,
    and Route/BlockSparseAttention on the padded offsets equal the references."""
    rng = np.random.default_rng(3)
    probs = np.stack([np.ones(200, np.float32), np.zeros(200, np.float32), rng.random(200).astype(np.float32)])
    key = smooth_keys(3, 2, 200, 16, seed=1)
    offsets = assert_chunk_offsets_equal(library, key, probs, min_chunk=8, max_chunk=32)
    counts = [(np.diff(row) > 0).sum() for row in offsets]
    assert counts[0] == 25 and counts[1] == 7 and offsets.shape[1] == 26  # every 8th token vs forced cuts at 32
    assert (offsets[1, 8:] == 200).all()
    q = np.random.default_rng(4).standard_normal((3, 4, 200, 16)).astype(np.float32)
    v = np.random.default_rng(5).standard_normal(key.shape).astype(np.float32)
    for score in ("mass", "mean"):
        attrs = dict(pattern="dynamic", q_block=32, k_block=16, density=0.3, head_group=2, chunk_score=score)
        index, count = assert_route_equal(library, q, key, offsets, **attrs)
        out = assert_attention_close(library, q, key, v, index, count, offsets, q_block=32, k_block=16)
        for b, real in enumerate(counts):  # each sequence alone, on its unpadded chunks: the same
            alone = offsets[b : b + 1, : real + 1]
            index_b, count_b = run_route(library, q[b : b + 1], key[b : b + 1], alone, **attrs)
            np.testing.assert_array_equal(count_b, count[b : b + 1])
            np.testing.assert_array_equal(index_b, index[b : b + 1, ..., : real])
            out_b = run_attention(library, q[b : b + 1], key[b : b + 1], v[b : b + 1], index_b, count_b, alone,
                                  q_block=32, k_block=16)
            np.testing.assert_array_equal(out_b, out[b : b + 1])


def test_chunk_offsets_half_inputs(library):
    key = smooth_keys(1, 2, 300, 16, seed=8).astype(np.float16)
    got = run_chunk_offsets(library, key, min_chunk=4, max_chunk=20)
    np.testing.assert_array_equal(got, REFERENCES[CHUNKS](key.astype(np.float32), min_chunk=4, max_chunk=20))
    probs = random_probs(np.random.default_rng(2), 1, 300, 8).astype(np.float16)
    got = run_chunk_offsets(library, key, probs)
    np.testing.assert_array_equal(got, REFERENCES[CHUNKS](key.astype(np.float32), probs.astype(np.float32)))


def test_chunk_offsets_empty_batch(library):
    key = np.zeros((0, 2, 10, 4), np.float32)
    assert assert_chunk_offsets_equal(library, key).shape == (0, 1)
    assert assert_chunk_offsets_equal(library, key, np.zeros((0, 10), np.float32)).shape == (0, 1)


def test_chunk_offsets_non_finite_probabilities(library):
    """NaN/inf probabilities are never proposed and never chosen for a forced cut (as in the reference)."""
    rng = np.random.default_rng(9)
    probs = rng.random((1, 300)).astype(np.float32)
    probs[0, ::7] = np.nan
    probs[0, 3::11] = np.inf
    probs[0, 5::13] = -np.inf
    assert_chunk_offsets_equal(library, np.zeros((1, 1, 300, 2), np.float32), probs, threshold=0.9)


@HYPOTHESIS
@given(data=st.data())
def test_chunk_offsets_property(library, data):
    length = data.draw(st.integers(0, 300), label="length")
    batch = data.draw(st.integers(1, 3), label="batch")
    min_chunk = data.draw(st.integers(1, 12), label="min_chunk")
    attrs = dict(min_chunk=min_chunk, max_chunk=min_chunk + data.draw(st.integers(0, 30), label="extra"),
                 window=data.draw(st.integers(1, 6), label="window"),
                 threshold=data.draw(st.sampled_from([0.1, 0.5, 0.8]), label="threshold"))
    seed = data.draw(st.integers(0, 2**16), label="seed")
    key = smooth_keys(batch, data.draw(st.integers(1, 3), label="hkv"), length, 8, seed)
    probs = random_probs(np.random.default_rng(seed), batch, length, data.draw(st.sampled_from([None, 3])))
    use_probs = data.draw(st.booleans(), label="predictor")
    offsets = assert_chunk_offsets_equal(library, key, probs if use_probs else None, **attrs)
    for row in offsets:
        assert row[0] == 0 and row[-1] == length and (np.diff(row) >= 0).all()
        real = np.diff(row)[np.diff(row) > 0]
        assert (real <= attrs["max_chunk"]).all()


def test_chunk_offsets_bad_inputs_are_errors(library):
    key = smooth_keys(1, 2, 50, 8, seed=0)
    with pytest.raises(ORT_ERRORS, match=r"boundary_probs \[1, 49\] must be \[batch, key length\] = \[1, 50\]"):
        run_chunk_offsets(library, key, np.zeros((1, 49), np.float32))
    with pytest.raises(ORT_ERRORS, match=r"boundary_probs \[2, 50\] must be"):
        run_chunk_offsets(library, key, np.zeros((2, 50), np.float32))
    with pytest.raises(ORT_ERRORS, match=r"input key has rank 3"):
        run_chunk_offsets(library, key[0])
    with pytest.raises(ORT_ERRORS, match=r"key heads = 0"):
        run_chunk_offsets(library, key[:, :0])


@pytest.mark.parametrize("attrs,message", [
    (dict(min_chunk=0), r"min_chunk = 0 must be >= 1"),
    (dict(min_chunk=9, max_chunk=8), r"max_chunk = 8 must be >= min_chunk = 9"),
    (dict(window=0), r"window = 0 must be >= 1"),
    (dict(threshold=float("nan")), r"threshold = nan must be finite"),
    (dict(threshold=1), r"attribute threshold must be of type float"),
])
def test_chunk_offsets_bad_attributes_fail_session_creation(library, attrs, message):
    with pytest.raises(ORT_ERRORS, match=message):
        make_session(op_model(CHUNKS, attrs), threads=1, library=library)


@pytest.mark.parametrize("chunk_score", ["mass", "mean"])
@pytest.mark.parametrize("per_group", [False, True], ids=["head", "group"])
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_route_dynamic_chunk_scores_on_predicted_chunks(library, chunk_score, per_group, heads):
    """Route over ChunkOffsets' own chunks (similarity rule) with either chunk score."""
    hq, hkv = heads
    q, _, _ = qkv(1, hq, hkv, 333, 333, 64, seed=hq + hkv)
    key = smooth_keys(1, hkv, 333, 64, seed=hq)
    offsets = run_chunk_offsets(library, key)
    assert_route_equal(library, q, key, offsets, pattern="dynamic", q_block=64, k_block=16, density=0.2,
                       head_group=hq // hkv if per_group else 1, chunk_score=chunk_score, sink_tokens=16,
                       local_tokens=48, instruction_tokens=40)


def test_route_chunk_scores_differ_and_bad_score_is_an_error(library):
    """A chunk holding one strongly attended key among opposed ones ranks high by mass, low by mean."""
    q, k, _ = qkv(1, 1, 1, 256, 256, 16, seed=40)
    direction = q[0, 0, 224:].mean(0) / np.linalg.norm(q[0, 0, 224:].mean(0))  # the last block's mean query
    k[0, 0, 96:112] = -2.0 * direction  # chunk 6: mean key points away from the query ...
    k[0, 0, 100] = 16.0 * direction  # ... but holds a heavy hitter
    offsets = np.arange(0, 257, 16, dtype=np.int32)[None]
    attrs = dict(pattern="dynamic", q_block=32, k_block=16, density=0.3, sink_tokens=0, local_tokens=0,
                 instruction_tokens=0)
    mass, _ = assert_route_equal(library, q, k, offsets, chunk_score="mass", **attrs)
    mean, _ = assert_route_equal(library, q, k, offsets, chunk_score="mean", **attrs)
    assert 6 in mass[0, 0, 7] and 6 not in mean[0, 0, 7]
    with pytest.raises(ORT_ERRORS, match=r"chunk_score = 'max' is unknown"):
        make_session(op_model(ROUTE, dict(chunk_score="max")), threads=1, library=library)
