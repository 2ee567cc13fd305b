"""GPU: fused fixed-block routing (``dhsa_export.backends.torch_cuda.routing_fused``) vs the torch path.

- With the torch line sums (``USE_LINE_KERNEL = False``) the fused selection kernel must give the
  torch path's mask, block indices and counts bit for bit (same fp32 operations, exact selection
  rule with stable ties), on random shapes and edge cases: Lq < Lk, L not a multiple of the block,
  one block, budget >= every block, head and group routing, GQA 1/4/8, D 64/128, fp32/bf16/fp16,
  exact ties.
- With the line-sum kernel (the default) the line sums agree with torch's within 1e-5 relative and
  selections differ only on near-tie entries (<= 1e-3 of the mask), and the attention output stays
  within the kernel tests' tolerance of the reference computed on the torch selection.
"""

from __future__ import annotations

import pytest
import torch

from dhsa_export import DHSAConfig
from dhsa_export.algo import block_sparse_attention, route
from dhsa_export.algo import routing as R
from dhsa_export.algo.layout import Selection

pytestmark = pytest.mark.gpu

PATTERNS = ["topk", "ashape", "vslash", "vslash_blockwise"]
# hq, hkv, lq, lk, d, q_block, k_block, density
SHAPES = [
    (32, 8, 2048, 2048, 128, 128, 32, 0.125),   # LLaMA heads, GQA 4
    (8, 8, 700, 737, 64, 128, 32, 0.125),       # GQA 1, Lq < Lk, lengths not multiples of the blocks
    (16, 2, 1000, 1000, 64, 64, 16, 0.2),       # GQA 8
    (8, 2, 100, 100, 128, 128, 128, 0.5),       # one query block, one key block
    (8, 2, 600, 600, 64, 64, 32, 1.0),          # budget >= every block: dense
    (4, 1, 1, 333, 64, 64, 32, 0.2),            # a single query at the end of the keys
    (8, 2, 3001, 3001, 64, 128, 32, 0.07),      # odd length, small budget
]


def _fused():
    from dhsa_export.backends.torch_cuda import routing_fused

    return routing_fused


def _qk(shape, dtype, seed, ties=False):
    hq, hkv, lq, lk, d = shape[:5]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if ties:  # integer-valued inputs: many exactly equal scores
        q = torch.randint(-1, 2, (hq, lq, d), device="cuda", generator=gen).to(dtype)
        k = torch.randint(-1, 2, (hkv, lk, d), device="cuda", generator=gen).to(dtype)
        return q, k
    q = (torch.randn(hq, lq, d, device="cuda", generator=gen) * 1.5).to(dtype)
    k = (torch.randn(hkv, lk, d, device="cuda", generator=gen) + 0.3).to(dtype)
    return q, k


def _cfg(shape, pattern, routing):
    q_block, k_block, density = shape[5:]
    return DHSAConfig(pattern=pattern, head_routing=routing, q_block=q_block, k_block=k_block,
                      density=density, vslash_blockwise_above=0)


def _torch_route(q, k, cfg, monkeypatch):
    fused = _fused()
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    try:
        sel = route(q, k, cfg)
    finally:
        monkeypatch.delenv(fused.ENV_SWITCH)
    assert not sel.precomputed  # the torch path
    return sel


def _indices(sel: Selection):
    width = max(1, sel.grid.num_chunks)
    return sel.to_block_index(width)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("routing", ["group", "head"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_selection_kernel_is_bit_identical_to_torch(pattern, routing, shape, dtype, monkeypatch):
    fused = _fused()
    monkeypatch.setattr(fused, "USE_LINE_KERNEL", False)
    q, k = _qk(shape, dtype, seed=sum(shape[:5]))
    cfg = _cfg(shape, pattern, routing)
    got = route(q, k, cfg)
    assert ("block_index", max(1, got.grid.num_chunks)) in got.precomputed  # the fused path ran
    want = _torch_route(q, k, cfg, monkeypatch)
    assert torch.equal(got.mask, want.mask), int((got.mask != want.mask).sum())
    for a, b in zip(_indices(got), _indices(want)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_exact_ties_and_other_dtypes_bit_identical(pattern, dtype, monkeypatch):
    fused = _fused()
    monkeypatch.setattr(fused, "USE_LINE_KERNEL", False)
    shape = (8, 2, 1000, 1000, 64, 64, 16, 0.15)
    for ties in (True, False):
        q, k = _qk(shape, dtype, seed=3, ties=ties)
        cfg = _cfg(shape, pattern, "head")
        got, want = route(q, k, cfg), _torch_route(q, k, cfg, monkeypatch)
        assert torch.equal(got.mask, want.mask), (ties, int((got.mask != want.mask).sum()))
        for a, b in zip(_indices(got), _indices(want)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(32, 8, 128, 8192), (8, 2, 100, 3001), (4, 4, 64, 777)])
def test_line_sums_match_torch(shape):
    fused = _fused()
    heads, n, width = shape[1], shape[2], shape[3]
    gen = torch.Generator(device="cuda").manual_seed(width)
    probs = torch.rand(heads, n, width, device="cuda", generator=gen).softmax(-1)
    vertical, slash = fused.line_sums(probs)
    torch.testing.assert_close(vertical, probs.sum(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(slash, R.sum_along_diagonals_of_last_rows(probs), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("routing", ["group", "head"])
@pytest.mark.parametrize("length", [8192, 3001])
def test_fused_default_agrees_with_torch(pattern, routing, length, monkeypatch):
    shape = (32, 8, length, length, 128, 128, 32, 0.125)
    q, k = _qk(shape, torch.bfloat16, seed=length)
    cfg = _cfg(shape, pattern, routing)
    got, want = route(q, k, cfg), _torch_route(q, k, cfg, monkeypatch)
    differing = int((got.mask != want.mask).sum())
    assert differing <= 1e-3 * want.mask.numel(), f"{differing} of {want.mask.numel()}"
    index, count = _indices(got)
    assert torch.equal(count, got.mask.sum(-1).to(torch.int32))
    assert torch.equal((index, count)[0], Selection(got.grid, got.mask, got.head_group).to_block_index(
        max(1, got.grid.num_chunks))[0])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("routing", ["group", "head"])
def test_attention_with_fused_routing_within_tolerance(pattern, routing, monkeypatch):
    from dhsa_export.backends import torch_cuda

    gen = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(1, 8, 1500, 64, device="cuda", generator=gen).bfloat16()
    k = torch.randn(1, 2, 1500, 64, device="cuda", generator=gen).bfloat16()
    v = torch.randn(1, 2, 1500, 64, device="cuda", generator=gen).bfloat16()
    cfg = DHSAConfig(pattern=pattern, head_routing=routing, density=0.2, q_block=64, k_block=32,
                     vslash_blockwise_above=0)
    out = torch_cuda.dhsa_attention_cuda(q, k, v, cfg, graphs=False)
    want = _torch_route(q[0], k[0], cfg, monkeypatch)
    ref = block_sparse_attention(q[0].float(), k[0].float(), v[0].float(), want)
    err = float((out[0].float() - ref).norm() / ref.norm())
    assert not torch.isnan(out).any() and err <= 1e-2, err


def test_switch_graphs_and_fallback(monkeypatch):
    from dhsa_export.backends.torch_cuda.routing_graph import RoutingGraphCache

    fused = _fused()
    shape = (32, 8, 4096, 4096, 128, 128, 32, 0.125)
    q, k = _qk(shape, torch.bfloat16, seed=5)
    cfg = _cfg(shape, "vslash", "group")
    cache = RoutingGraphCache()
    eager = route(q, k, cfg)
    for _ in range(3):  # eager, capture, replay: the graph runs the same kernels
        got = cache.route(q, k, cfg)
        assert torch.equal(got.mask, eager.mask)
        for a, b in zip(_indices(got), _indices(eager)):
            assert torch.equal(a, b)
    assert cache.counts["replays"] >= 1, cache.info()
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    assert not fused.enabled() and not route(q, k, cfg).precomputed
    monkeypatch.delenv(fused.ENV_SWITCH)
    too_long = (1, 1, 1, 70000, 16, 128, 8, 0.1)  # 8750 blocks > MAX_CHUNKS: the torch path
    grid = R.fixed_grid(1, 70000, _cfg(too_long, "topk", "head"), "cuda")
    assert not fused.supports(q, grid, "topk")
