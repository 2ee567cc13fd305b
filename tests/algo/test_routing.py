"""Routing patterns: exactness at density 1, causality, forced blocks, budgets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dhsa_export import DHSAConfig
from dhsa_export.algo import block_sparse_attention, dense_attention, fixed_offsets, route
from dhsa_export.algo.routing import local_window
from dhsa_export.config import PATTERNS

GQA = [(4, 4), (9, 3), (8, 2), (16, 2)]  # ratios 1, 3, 4, 8


def qkv(hq, hkv, lq, lk, d, seed=0, dv=None):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(hq, lq, d, generator=gen),
        torch.randn(hkv, lk, d, generator=gen),
        torch.randn(hkv, lk, dv or d, generator=gen),
    )


def variable_offsets(length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(1, max(2, length), (length // 10 + 1,), generator=gen).tolist()))
    cuts = [c for c in cuts if 0 < c < length]
    return torch.tensor([0, *cuts, length])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("head_routing", ["head", "group"])
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_density_one_equals_dense(pattern, head_routing, heads, head_dim):
    hq, hkv = heads
    q, k, v = qkv(hq, hkv, 300, 300, head_dim)
    cfg = DHSAConfig(density=1.0, pattern=pattern, head_routing=head_routing, q_block=64, k_block=16)
    offsets = variable_offsets(300, 1) if pattern == "dynamic" else None
    selection = route(q, k, cfg, offsets)
    out = block_sparse_attention(q, k, v, selection)
    assert (out - dense_attention(q, k, v)).abs().max().item() <= 1e-5
    assert selection.causal_block_fraction() == pytest.approx(1.0)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparse_equals_dense_under_token_mask(pattern):
    q, k, v = qkv(8, 2, 517, 517, 64, seed=3)
    cfg = DHSAConfig(pattern=pattern, q_block=64, k_block=16, density=0.2)
    offsets = variable_offsets(517, 2) if pattern == "dynamic" else None
    selection = route(q, k, cfg, offsets)
    out = block_sparse_attention(q, k, v, selection)
    reference = dense_attention(q, k, v, attention_mask=selection.token_mask(8))
    assert (out - reference).abs().max().item() <= 1e-5
    assert 0 < selection.causal_block_fraction() < 1


@pytest.mark.parametrize("pattern", PATTERNS)
def test_future_keys_do_not_matter(pattern):
    """With a fixed selection, perturbing keys/values after position t changes no row <= t."""
    q, k, v = qkv(4, 2, 260, 260, 64, seed=5)
    cfg = DHSAConfig(pattern=pattern, q_block=32, k_block=8, density=0.25)
    t = 150
    selection = route(q, k, cfg)
    out = block_sparse_attention(q, k, v, selection)
    k2, v2 = k.clone(), v.clone()
    k2[:, t + 1:] += 5 * torch.randn_like(k2[:, t + 1:])
    v2[:, t + 1:] += 5 * torch.randn_like(v2[:, t + 1:])
    out2 = block_sparse_attention(q, k2, v2, selection)
    assert torch.allclose(out[:, : t + 1], out2[:, : t + 1], atol=1e-6)


@pytest.mark.parametrize("pattern", ["topk", "ashape", "dynamic"])
def test_local_patterns_route_without_looking_ahead(pattern):
    """topk/ashape/dynamic route a query block from its own queries and earlier keys only, so
    complete query blocks before t are unchanged by anything after t. (vslash predicts from the
    last queries of the prompt by design: its selection depends on the whole prompt, never its
    attention.)"""
    q, k, v = qkv(4, 2, 260, 260, 64, seed=5)
    cfg = DHSAConfig(pattern=pattern, q_block=32, k_block=8, density=0.25)
    t = 150
    offsets = torch.arange(0, 261, 10) if pattern == "dynamic" else None
    out = block_sparse_attention(q, k, v, route(q, k, cfg, offsets))
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for tensor in (q2, k2, v2):
        tensor[:, t + 1:] += 5 * torch.randn_like(tensor[:, t + 1:])
    out2 = block_sparse_attention(q2, k2, v2, route(q2, k2, cfg, offsets))
    complete = (t + 1) // 32 * 32
    assert torch.allclose(out[:, :complete], out2[:, :complete], atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    lq=st.integers(1, 400),
    extra_keys=st.integers(0, 50),
    q_block=st.sampled_from([16, 32, 64]),
    k_block=st.sampled_from([4, 8, 16, 32]),
    density=st.floats(0.01, 1.0),
    group=st.sampled_from([1, 3, 4]),
    head_routing=st.sampled_from(["head", "group"]),
    seed=st.integers(0, 1000),
)
def test_every_row_sees_sink_and_itself_and_nothing_later(
    pattern, lq, extra_keys, q_block, k_block, density, group, head_routing, seed
):
    lk = lq + extra_keys
    q, k, _ = qkv(2 * group, 2, lq, lk, 16, seed=seed)
    cfg = DHSAConfig(pattern=pattern, q_block=q_block, k_block=k_block, density=density,
                     head_routing=head_routing)
    offsets = variable_offsets(lk, seed) if pattern == "dynamic" else None
    selection = route(q, k, cfg, offsets)
    mask = selection.token_mask(2 * group)  # [Hq, Lq, Lk]
    positions = torch.arange(lq) + extra_keys
    assert mask[:, :, 0].all(), "a row lost the sink"
    assert mask[:, torch.arange(lq), positions].all(), "a row lost its own key"
    future = torch.arange(lk)[None, :] > positions[:, None]
    assert not (mask & future[None]).any(), "a row attends to the future"


def test_budget_is_respected_by_sparse_rows():
    q, k, _ = qkv(8, 2, 2048, 2048, 64, seed=7)
    cfg = DHSAConfig(pattern="topk", density=0.125)
    selection = route(q, k, cfg)
    budget = cfg.budget_blocks(2048)
    assert budget == math.floor(0.125 * 2048 / 32)
    counts = selection.mask.sum(-1)
    causal_counts = selection.grid.causal().sum(-1)
    # dense rows are those whose whole causal window fits; others use exactly the budget
    sparse = causal_counts > budget
    assert (counts[:, sparse] == budget).all()
    assert (counts[:, ~sparse] == causal_counts[~sparse]).all()


def test_vslash_dense_rows_and_switch_to_blockwise():
    cfg = DHSAConfig(vslash_blockwise_above=1024)
    assert cfg.effective_pattern(1024) == "vslash"
    assert cfg.effective_pattern(1025) == "vslash_blockwise"
    q, k, _ = qkv(4, 2, 1024, 1024, 64, seed=8)
    selection = route(q, k, DHSAConfig(density=0.125))
    causal = selection.grid.causal()
    dense_rows = math.ceil(DHSAConfig().budget_tokens(1024) / 128)
    assert (selection.mask[:, :dense_rows] == causal[:dense_rows]).all()
    assert (selection.mask[:, -1] == causal[-1]).all()
    assert selection.causal_block_fraction() < 0.8


def test_blockwise_counts_forced_blocks_once():
    """Sparse rows spend exactly the budget: forced sink/diagonal blocks are counted once."""
    q, k, _ = qkv(4, 2, 4096, 4096, 64, seed=9)
    cfg = DHSAConfig(pattern="vslash_blockwise", density=0.125)
    selection = route(q, k, cfg)
    counts = selection.mask.sum(-1)
    dense_rows = math.ceil(cfg.budget_tokens(4096) / cfg.q_block)
    assert (counts[:, dense_rows:-1] == cfg.budget_blocks(4096)).all()
    assert (counts[:, -1] == selection.grid.causal()[-1].sum()).all()


def test_dynamic_budget_in_tokens():
    q, k, _ = qkv(4, 2, 2048, 2048, 64, seed=10)
    offsets = variable_offsets(2048, 4)
    cfg = DHSAConfig(pattern="dynamic", density=0.125, instruction_tokens=0)
    selection = route(q, k, cfg, offsets)
    lengths = (offsets[1:] - offsets[:-1]).float()
    spent = (selection.mask.float() * lengths).sum(-1)
    forced = selection.grid.sink(cfg.sink_tokens) | local_window(selection.grid, cfg.local_tokens)
    forced_tokens = (forced.float() * lengths).sum(-1)
    assert (spent <= torch.maximum(forced_tokens, torch.tensor(float(cfg.budget_tokens(2048))))[None] + 1e-6).all()


def test_block_index_round_trip():
    q, k, _ = qkv(4, 2, 700, 700, 32, seed=11)
    selection = route(q, k, DHSAConfig(pattern="topk", q_block=64, k_block=16, density=0.3))
    index, count = selection.to_block_index()
    assert index.dtype == torch.int32 and count.dtype == torch.int32
    rebuilt = torch.zeros_like(selection.mask)
    for h in range(index.shape[0]):
        for i in range(index.shape[1]):
            chosen = index[h, i, : count[h, i]].long()
            assert (chosen >= 0).all() and (chosen.diff() > 0).all()
            rebuilt[h, i, chosen] = True
            assert (index[h, i, count[h, i]:] == -1).all()
    assert torch.equal(rebuilt, selection.mask)


def test_fixed_offsets_short_last_block():
    assert fixed_offsets(70, 32).tolist() == [0, 32, 64, 70]
    assert fixed_offsets(64, 32).tolist() == [0, 32, 64]


@pytest.mark.parametrize("head_routing", ["head", "group"])
def test_chunk_mass_scores_are_logsumexp_per_chunk(head_routing):
    """The dynamic pattern's default chunk score: log mean exp of the block-mean query's token logits."""
    from dhsa_export.algo.layout import BlockGrid, segment_means
    from dhsa_export.algo.routing import chunk_mass_scores, group_mean, routing_heads

    q, k, _ = qkv(8, 2, 300, 300, 32, seed=12)
    k = k * 4  # spread the logits so that the per-chunk maximum matters
    offsets = variable_offsets(300, 5)
    grid = BlockGrid.build(300, offsets, 64)
    group = routing_heads(8, 2, DHSAConfig(head_routing=head_routing))
    scores = chunk_mass_scores(q, k, grid, group)
    slabs = chunk_mass_scores(q, k, grid, group, max_elements=700)  # a few query blocks at a time
    assert (scores - slabs).abs().max().item() <= 1e-5
    q_means = group_mean(segment_means(q, grid.q_offsets), group)
    keys = k.repeat_interleave(q_means.shape[0] // 2, dim=0)
    logits = q_means @ keys.transpose(1, 2) / math.sqrt(32)
    bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    want = torch.stack([logits[..., a:b].logsumexp(-1) - math.log(b - a) for a, b in bounds], dim=-1)
    assert (scores - want).abs().max().item() <= 1e-4


def test_dynamic_mass_score_finds_a_heavy_hitter_the_mean_misses():
    """One strongly attended key in an otherwise unrelated chunk: the mass score selects its chunk,
    the mean-key score (the paper's) averages it away."""
    gen = torch.Generator().manual_seed(13)
    length, dim = 1024, 64
    q = torch.randn(1, length, dim, generator=gen) * 0.1
    k = torch.randn(1, length, dim, generator=gen)
    direction = torch.randn(dim, generator=gen)
    q[0, -128:] += direction  # the last query block looks for `direction`
    heavy = 300
    k[0, heavy] = 6 * direction / direction.norm()  # one key in chunk 300 // 32 matches it strongly
    k[0, heavy - 16: heavy] -= 2 * direction / direction.norm()  # its neighbours point away
    cfg = DHSAConfig(pattern="dynamic", density=0.25, instruction_tokens=0, local_tokens=0, sink_tokens=32)
    offsets = fixed_offsets(length, 32)
    mass = route(q, k, cfg, offsets).mask[0, -1]
    mean = route(q, k, cfg.replace(chunk_score="mean"), offsets).mask[0, -1]
    assert bool(mass[heavy // 32]) and not bool(mean[heavy // 32])
