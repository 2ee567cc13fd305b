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
