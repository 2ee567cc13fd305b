"""Batch entry point: padding, decode, single block, Lq < Lk."""

from __future__ import annotations

import pytest
import torch

from dhsa_export import DHSAConfig
from dhsa_export.algo import RoutingStats, dense_attention, dhsa_attention


def batch(b, hq, hkv, l, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, l, d, generator=gen) for h in (hq, hkv, hkv))


@pytest.mark.parametrize("pattern", ["topk", "vslash", "ashape"])
def test_left_padding_matches_unpadded(pattern):
    cfg = DHSAConfig(pattern=pattern, q_block=32, k_block=8, density=0.2)
    q, k, v = batch(1, 6, 2, 200, 64, seed=1)
    alone = dhsa_attention(q, k, v, cfg)
    pad = 37
    qp, kp, vp = (torch.cat([torch.randn(1, t.shape[1], pad, 64), t], dim=2) for t in (q, k, v))
    length = 200 + pad
    causal = torch.arange(length)[None, :] <= torch.arange(length)[:, None]
    real = torch.arange(length) >= pad
    mask = (causal & real[None, :] & real[:, None])[None, None]
    padded = dhsa_attention(qp, kp, vp, cfg, attention_mask=mask)
    assert torch.allclose(padded[:, :, pad:], alone, atol=1e-5)
    assert (padded[:, :, :pad] == 0).all()


def test_decode_is_dense():
    q, k, v = batch(2, 8, 2, 300, 64, seed=2)
    q1 = q[:, :, -1:]
    out = dhsa_attention(q1, k, v, DHSAConfig(density=0.01))
    assert torch.allclose(out, dense_attention(q1, k, v), atol=1e-6)


def test_single_block_and_chunked_prefill():
    cfg = DHSAConfig(density=0.1)
    q, k, v = batch(1, 4, 4, 50, 128, seed=3)  # one query block
    assert torch.allclose(dhsa_attention(q, k, v, cfg), dense_attention(q, k, v), atol=1e-5)
    q, k, v = batch(1, 4, 2, 600, 64, seed=4)
    stats = RoutingStats()
    tail = dhsa_attention(q[:, :, -200:], k, v, cfg.replace(density=1.0), stats=stats)
    assert torch.allclose(tail, dense_attention(q, k, v)[:, :, -200:], atol=1e-5)
    assert stats.calls == 1 and stats.causal_block_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("pattern", ["topk", "ashape", "vslash", "vslash_blockwise", "dynamic"])
@pytest.mark.parametrize("head_routing", ["head", "group"])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2)])
def test_gathered_attention_equals_reference(pattern, head_routing, heads):
    """The CPU default backend ("torch-gather") computes the reference's attention exactly."""
    from dhsa_export.algo.attention import block_sparse_attention, gathered_sparse_attention
    from dhsa_export.algo.boundaries import similarity_boundaries
    from dhsa_export.algo.routing import route

    hq, hkv = heads
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(h, 333, 64, generator=gen) for h in (hq, hkv, hkv))
    cfg = DHSAConfig(pattern=pattern, head_routing=head_routing, q_block=32, k_block=8, density=0.2)
    offsets = similarity_boundaries(k, 4, 40) if pattern == "dynamic" else None
    selection = route(q, k, cfg, offsets)
    want = block_sparse_attention(q, k, v, selection, scale=0.1)
    got = gathered_sparse_attention(q, k, v, selection, scale=0.1)
    assert (got - want).abs().max().item() <= 1e-5
    tail = route(q[:, -70:], k, cfg, offsets)  # queries at the end of a longer key range
    window = torch.rand(70, 333, generator=gen) > 0.3  # any extra mask, rows without keys included
    window[5] = False
    want = block_sparse_attention(q[:, -70:], k, v, tail, extra_mask=window)
    got = gathered_sparse_attention(q[:, -70:], k, v, tail, extra_mask=window)
    assert (got - want).abs().max().item() <= 1e-5
    assert (got[:, 5] == 0).all()


def test_padded_batch_same_with_gathered_backend():
    cfg = DHSAConfig(pattern="vslash", q_block=32, k_block=8, density=0.2)
    q, k, v = batch(2, 6, 2, 150, 32, seed=9)
    mask = torch.ones(2, 1, 150, 150, dtype=torch.bool).tril()
    mask[1, :, :, :20] = False  # item 1 left-padded by 20
    mask[1, :, :20] = False
    want = dhsa_attention(q, k, v, cfg, attention_mask=mask, backend="reference")
    got = dhsa_attention(q, k, v, cfg, attention_mask=mask, backend="torch-gather")
    assert (got - want).abs().max().item() <= 1e-5
