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


# --- v9: vslash line sums from the logits (no probabilities matrix), top lines in one kernel -------

def _torch_probs(q, k, head_group, n_last):
    import math

    hq, d = q.shape[0], q.shape[-1]
    logits = (q[:, -n_last:].float() @ k.float().repeat_interleave(hq // k.shape[0], 0).transpose(1, 2))
    logits /= math.sqrt(d)
    tail = torch.arange(n_last, device=q.device)
    logits[..., k.shape[1] - n_last:].masked_fill_((tail[None, :] > tail[:, None])[None], -math.inf)
    return R.group_mean(logits.softmax(-1), head_group)


@pytest.mark.parametrize("shape", [(32, 8, 128, 8192, 128, 4), (32, 8, 128, 8192, 128, 1), (8, 2, 100, 3001, 64, 4),
                                   (4, 4, 64, 777, 64, 1), (8, 2, 37, 130, 128, 2), (4, 1, 1, 333, 64, 4)])
def test_probs_line_sums_match_torch(shape):
    from dhsa_export.backends.torch_cuda import routing_triton as T

    hq, hkv, n, length, d, group = shape
    gen = torch.Generator(device="cuda").manual_seed(length)
    q = (torch.randn(hq, length, d, device="cuda", generator=gen) * 1.5).bfloat16()
    k = (torch.randn(hkv, length, d, device="cuda", generator=gen) + 0.3).bfloat16()
    vertical, partials, block = T.last_queries_line_sums(q, k, group, n)
    probs = _torch_probs(q, k, group, n)
    torch.testing.assert_close(vertical, probs.sum(1), rtol=1e-4, atol=1e-6)
    slash = T.slash_from_partials(partials, length, n, block)
    torch.testing.assert_close(slash, R.sum_along_diagonals_of_last_rows(probs), rtol=1e-4, atol=1e-6)
    # the kernel's own assembly of the slash sums (inside _top_lines) equals the torch one
    keep = max(1, length // 16)
    prefix_v, prefix_s = _fused().top_line_prefixes(vertical, partials, block, n, keep, keep)
    torch.testing.assert_close(prefix_v, R.keep_top_lines(vertical, keep).cumsum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefix_s, R.keep_top_lines(slash, keep).cumsum(-1), rtol=1e-5, atol=1e-5)


def _stable_top_lines(lines: torch.Tensor, keep: int) -> torch.Tensor:
    """keep_top_lines with ties at the threshold taken in index order (what _top_lines does)."""
    order = torch.sort(lines.double(), dim=-1, descending=True, stable=True).indices[:, :keep]
    kept = torch.zeros_like(lines)
    kept.scatter_(-1, order, lines.gather(-1, order).clamp(min=0))
    return kept


@pytest.mark.parametrize("width,keep", [(1, 1), (5, 9), (333, 0), (777, 40), (8192, 512), (40000, 2500), (70000, 4000)])
@pytest.mark.parametrize("ties", [False, True])
def test_top_lines_kernel_exact_ties(width, keep, ties):
    fused = _fused()
    heads, tile, n_rows = 3, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(width + keep)
    if ties:  # few distinct values, zeros included: the threshold has many equal lines
        vertical = torch.randint(0, 4, (heads, width), device="cuda", generator=gen).float() / 4
    else:
        vertical = torch.rand(heads, width, device="cuda", generator=gen)
    num_tiles = (width + tile - 1) // tile
    partials = torch.zeros(heads, num_tiles, 2 * tile, device="cuda")  # slash sums of zero
    prefix_v, prefix_s = fused.top_line_prefixes(vertical, partials, tile, min(n_rows, width), keep, keep)
    want = _stable_top_lines(vertical, keep).cumsum(-1)
    torch.testing.assert_close(prefix_v, want, rtol=1e-5, atol=1e-4)
    kept = torch.diff(prefix_v, dim=-1, prepend=torch.zeros(heads, 1, device="cuda")) > 0
    assert torch.equal(kept, _stable_top_lines(vertical, keep) > 0)
    assert torch.equal(prefix_s, torch.zeros_like(prefix_s))


@pytest.mark.parametrize("routing", ["group", "head"])
@pytest.mark.parametrize("shape", SHAPES + [(32, 8, 8192, 8192, 128, 128, 32, 0.125)],
                         ids=[f"s{i}" for i in range(len(SHAPES) + 1)])
def test_v9_vslash_agrees_with_v8_line_sums(routing, shape, monkeypatch):
    """The experimental line sums from the logits (``DHSA_ROUTING_PROBS_LINES=1``), the default
    (v9 pass 1 + v8 probabilities and _line_sums + _top_lines) and v8's (+ topk, cumsum) agree with
    the torch path up to near-tie flips."""
    fused = _fused()
    q, k = _qk(shape, torch.bfloat16, seed=17)
    cfg = _cfg(shape, "vslash", routing)
    default = route(q, k, cfg)
    monkeypatch.setattr(fused, "USE_PROBS_LINES", True)
    got = route(q, k, cfg)
    monkeypatch.setattr(fused, "USE_PROBS_LINES", False)
    monkeypatch.setattr(fused, "USE_TOP_LINES", False)
    v8 = route(q, k, cfg)
    want = _torch_route(q, k, cfg, monkeypatch)
    for a, b in ((got, default), (got, v8), (got, want), (default, want), (default, v8)):
        differing = int((a.mask != b.mask).sum())
        assert differing <= max(2, 1e-3 * b.mask.numel()), f"{differing} of {b.mask.numel()}"
    for sel in (got, default):
        index, count = _indices(sel)
        assert torch.equal(count, sel.mask.sum(-1).to(torch.int32))
        assert torch.equal(index, Selection(sel.grid, sel.mask, sel.head_group).to_block_index(
            max(1, sel.grid.num_chunks))[0])


@pytest.mark.parametrize("shape", [(32, 8, 128, 8192, 128, 4), (8, 2, 100, 3001, 64, 1), (4, 1, 1, 333, 64, 4),
                                   (8, 2, 200, 1000, 64, 4)])
def test_probabilities_with_v9_pass1_match_torch(shape):
    """v9's pass 1 (_row_stats2 + _merge_lse, row blocks for n > 128) feeding _group_probs."""
    from dhsa_export.backends.torch_cuda import routing_triton as T

    hq, hkv, n, length, d, group = shape
    gen = torch.Generator(device="cuda").manual_seed(length + 1)
    q = (torch.randn(hq, length, d, device="cuda", generator=gen) * 1.5).bfloat16()
    k = (torch.randn(hkv, length, d, device="cuda", generator=gen) + 0.3).bfloat16()
    torch.testing.assert_close(T.last_queries_probabilities(q, k, group, n), _torch_probs(q, k, group, n),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_graph_from_query_parts_is_bit_identical(pattern):
    """The routing graph takes q's block means and last rows (not q): the same selection as eager."""
    from dhsa_export.backends.torch_cuda.routing_graph import RoutingGraphCache

    shape = (32, 8, 3000, 3000, 128, 128, 32, 0.125)
    cfg = _cfg(shape, pattern, "group")
    cache = RoutingGraphCache()
    for seed in range(4):
        q, k = _qk(shape, torch.bfloat16, seed=seed)
        q_hf = q.transpose(0, 1).contiguous().transpose(0, 1)  # the transformers layout
        got, eager = cache.route(q_hf, k, cfg), route(q_hf, k, cfg)
        assert torch.equal(got.mask, eager.mask)
        for a, b in zip(_indices(got), _indices(eager)):
            assert torch.equal(a, b)
        assert torch.equal(got.causal_block_fraction_tensor(), eager.causal_block_fraction_tensor())
    # four calls of one key: the first eager, the second captures (and replays), two more replays
    counts = cache.counts
    assert (counts["eager"], counts["captures"], counts["replays"]) == (1, 1, 3), cache.info()
    assert next(iter(cache._entries.values())).parts, cache.info()
