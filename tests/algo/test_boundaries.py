"""Dynamic chunk boundaries: rule, chunk limits, labels, predictor files, dynamic routing."""

from __future__ import annotations

import math

import pytest
import torch

from dhsa_export import DHSAConfig, DHSAError
from dhsa_export.algo import block_sparse_attention, dense_attention, fixed_offsets, route
from dhsa_export.algo.boundaries import (
    BoundaryPredictor,
    accumulate_label_masses,
    boundary_labels,
    cached_predictor,
    enforce_chunk_limits,
    label_candidates,
    load_predictor,
    make_chunker,
    masses_from_probs,
    read_predictor_metadata,
    save_predictor,
    similarity_boundaries,
    similarity_proposals,
)


def assert_valid_offsets(offsets: torch.Tensor, length: int, min_chunk: int, max_chunk: int) -> None:
    assert offsets.dtype == torch.long and offsets.ndim == 1
    assert int(offsets[0]) == 0 and int(offsets[-1]) == length
    lengths = offsets[1:] - offsets[:-1]
    assert bool((lengths > 0).all()), offsets.tolist()
    assert bool((lengths <= max_chunk).all()), offsets.tolist()
    if length < min_chunk:
        assert offsets.tolist() == [0, length]
    else:
        assert bool((lengths[:-1] >= min_chunk).all()), offsets.tolist()
        if max_chunk >= 2 * min_chunk - 1:  # a legal split always exists
            assert int(lengths[-1]) >= min_chunk, offsets.tolist()


# --------------------------------------------------------------------------- rule and limits


@pytest.mark.parametrize("length", [1, 2, 5, 7, 8, 9, 15, 17, 64, 129, 300, 1000, 4099])
@pytest.mark.parametrize("limits", [(8, 128), (4, 16), (8, 10), (1, 1), (3, 5)])
def test_similarity_rule_offsets_valid(length, limits):
    torch.manual_seed(length)
    keys = torch.randn(3, length, 16)
    offsets = similarity_boundaries(keys, *limits)
    assert_valid_offsets(offsets, length, *limits)


def test_similarity_rule_finds_key_shifts():
    torch.manual_seed(0)
    segments = [40, 70, 90]
    keys = torch.cat([torch.randn(2, 1, 8).expand(2, n, 8) for n in segments], dim=1)
    keys = keys + 0.01 * torch.randn_like(keys)
    offsets = similarity_boundaries(keys, min_chunk=8, max_chunk=128)
    assert offsets.tolist() == [0, 40, 110, 200]
    peaks, d = similarity_proposals(keys)
    assert set(peaks.nonzero().squeeze(1).tolist()) == {39, 109}
    assert d.shape == (200,)


def test_enforce_chunk_limits_uses_proposals_then_scores():
    assert enforce_chunk_limits([10, 12, 30], 50, 8, 20).tolist() == [0, 10, 30, 50]
    # no proposal: a forced cut goes to the best-scoring start within [start+min, start+max]
    scores = torch.zeros(50)
    scores[14] = 1.0  # candidate 14 -> chunk start 15
    assert enforce_chunk_limits([], 50, 8, 20, scores).tolist()[:2] == [0, 15]
    # without scores a forced cut is at start + max_chunk
    assert enforce_chunk_limits([], 50, 8, 20).tolist() == [0, 20, 40, 50]
    # a proposal that would leave a too short last chunk is skipped
    assert enforce_chunk_limits([45], 50, 8, 64).tolist() == [0, 50]
    assert enforce_chunk_limits([], 0, 8, 20).tolist() == [0]


def test_rule_is_fast_and_valid_on_long_input():
    keys = torch.randn(2, 32768, 32)
    offsets = similarity_boundaries(keys, 8, 128)
    assert_valid_offsets(offsets, 32768, 8, 128)


# --------------------------------------------------------------------------- labels


def causal_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    keys = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    logits = q @ keys.transpose(1, 2) / math.sqrt(q.shape[-1])
    length = q.shape[1]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    return logits.masked_fill(future, -math.inf).softmax(-1)


def brute_force_masses(probs: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = probs.shape[-1]
    left, right = torch.zeros(length), torch.zeros(length)
    for c in range(window, length - window - 1):
        rows = slice(c + window + 1, length)
        left[c] = probs[:, rows, c - window + 1 : c + 1].sum()
        right[c] = probs[:, rows, c + 1 : c + window + 1].sum()
    return left, right


def test_label_candidates_range():
    valid = label_candidates(20, 4)
    assert valid.nonzero().squeeze(1).tolist() == list(range(4, 15))  # w <= c <= L - w - 2
    assert not label_candidates(9, 4).any()


def test_labels_on_synthetic_attention():
    """A salient key s gets half of every later row's mass; the rest is uniform over the causal keys.

    Windows without s get equal mass (ratio 1), a right window holding s makes the ratio < 1, so the
    boundaries are exactly the candidates whose left window holds s: c in [s, s + w - 1].
    """
    length, s, w = 32, 12, 4
    probs = torch.zeros(length, length)
    for i in range(length):
        others = [j for j in range(i + 1) if j != s]
        if i >= s:
            probs[i, s] = 0.5
            probs[i, others] = 0.5 / len(others)
        else:
            probs[i, : i + 1] = 1.0 / (i + 1)
    labels = boundary_labels(probs[None].repeat(3, 1, 1), window=w)
    assert labels.shape == (length,) and labels.dtype == torch.bool
    assert labels.nonzero().squeeze(1).tolist() == [s, s + 1, s + 2, s + 3]
    # the same from accumulated masses, and a higher ratio still holds; an absurd ratio none
    assert torch.equal(boundary_labels(masses_from_probs(probs, w), w), labels)
    assert not boundary_labels(masses_from_probs(probs, w), w, ratio=1e6).any()


def test_label_masses_match_brute_force_and_accumulate():
    torch.manual_seed(1)
    q, k = torch.randn(6, 40, 8), torch.randn(2, 40, 8)
    probs = causal_probs(q, k)
    ref_left, ref_right = brute_force_masses(probs, 4)
    left, right = masses_from_probs(probs, 4)
    torch.testing.assert_close(left, ref_left, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(right, ref_right, atol=1e-4, rtol=1e-5)
    for head_chunk in (None, 1, 4):
        acc_left, acc_right = accumulate_label_masses(q, k, window=4, head_chunk=head_chunk)
        torch.testing.assert_close(acc_left, ref_left, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(acc_right, ref_right, atol=1e-4, rtol=1e-5)
    # summing layers: labels of summed masses
    l2, r2 = accumulate_label_masses(q.flip(1), k.flip(1), window=4)
    labels = boundary_labels((left + l2, right + r2))
    expected = label_candidates(40) & (left + l2 >= 2.0 * (right + r2)) & (left + l2 > 0)
    assert torch.equal(labels, expected)


def test_accumulate_returns_attention_output():
    torch.manual_seed(2)
    q, k, v = torch.randn(4, 33, 8), torch.randn(2, 33, 8), torch.randn(2, 33, 8)
    left, right, out = accumulate_label_masses(q, k, v=v)
    torch.testing.assert_close(out, dense_attention(q, k, v), atol=1e-5, rtol=1e-5)
    mask = torch.ones(33, 33, dtype=torch.bool).tril() & ~torch.ones(33, 33, dtype=torch.bool).tril(-5)
    _, _, windowed = accumulate_label_masses(q, k, v=v, mask=mask)
    torch.testing.assert_close(windowed, dense_attention(q, k, v, attention_mask=mask), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- predictor


def small_predictor(features: int = 32, threshold: float = 0.5) -> BoundaryPredictor:
    torch.manual_seed(0)
    predictor = BoundaryPredictor(features, d_model=16, num_heads=2, hidden=32, threshold=threshold)
    predictor.set_feature_stats(torch.randn(features) * 0.1, torch.rand(features) + 0.5)
    return predictor.eval()


def test_predictor_shapes_and_sequence_scoring():
    predictor = small_predictor()
    windows = torch.randn(5, 8, 32)
    assert predictor(windows).shape == (5,)
    keys = torch.randn(2, 50, 16)  # 2 KV heads x 16 dims = 32 features
    with torch.no_grad():
        logits = predictor.sequence_logits(keys, batch=7)
        # reference: unfold raw windows padded with the feature mean (zero after standardizing)
        feats = keys.permute(1, 0, 2).reshape(50, 32)
        pad_before = predictor.feature_mean.expand(3, 32)
        pad_after = predictor.feature_mean.expand(4, 32)
        raw = torch.cat([pad_before, feats, pad_after]).unfold(0, 8, 1).transpose(1, 2)
        reference = predictor(raw)
    assert logits.shape == (50,)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    for length in (1, 5, 50, 300):
        offsets = predictor.boundaries(torch.randn(2, length, 16), 8, 32)
        assert_valid_offsets(offsets, length, 8, 32)
    with pytest.raises(ValueError):
        predictor.sequence_logits(torch.randn(3, 10, 16))


def test_predictor_save_load_round_trip(tmp_path):
    predictor = small_predictor(threshold=0.37)
    path = save_predictor(predictor, tmp_path / "sub" / "p.safetensors", {"model": "test", "val_f1": 0.5})
    loaded = load_predictor(path)
    assert loaded.threshold == pytest.approx(0.37)
    assert loaded.arch == predictor.arch
    assert loaded.metadata["model"] == "test" and loaded.metadata["val_f1"] == 0.5
    assert read_predictor_metadata(path)["input_features"] == 32
    keys = torch.randn(2, 64, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.sequence_logits(keys), predictor.sequence_logits(keys))
    assert torch.equal(loaded.boundaries(keys, 4, 16), predictor.boundaries(keys, 4, 16))
    assert not list(path.parent.glob(".*tmp"))  # no temp file left behind
    assert cached_predictor(path) is cached_predictor(str(path))


def test_load_predictor_rejects_bad_files(tmp_path):
    with pytest.raises(DHSAError, match="does not exist"):
        load_predictor(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(DHSAError, match="garbage.safetensors"):
        load_predictor(garbage)
    good = save_predictor(small_predictor(), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DHSAError, match="truncated.safetensors"):
        load_predictor(truncated)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(DHSAError, match="metadata"):
        load_predictor(foreign)
    with pytest.raises(DHSAError, match="does not exist"):
        make_chunker(DHSAConfig(pattern="dynamic", boundary_predictor=str(tmp_path / "nope.safetensors")))


def test_predictor_chunker_checks_feature_size(tmp_path):
    path = save_predictor(small_predictor(), tmp_path / "p.safetensors")
    chunker = make_chunker(DHSAConfig(pattern="dynamic", boundary_predictor=str(path), min_chunk=4, max_chunk=16))
    assert_valid_offsets(chunker(torch.randn(2, 100, 16)), 100, 4, 16)
    with pytest.raises(DHSAError, match="expects 32 key features"):
        chunker(torch.randn(4, 100, 16))


def test_fixed_rule_chunker():
    chunker = make_chunker(DHSAConfig(pattern="dynamic", boundary_rule="fixed", k_block=32))
    assert torch.equal(chunker(torch.randn(2, 100, 8)), fixed_offsets(100, 32))


# --------------------------------------------------------------------------- dynamic routing


@pytest.mark.parametrize("use_predictor", [False, True])
def test_dynamic_density_one_equals_dense(tmp_path, use_predictor):
    torch.manual_seed(3)
    q, k, v = torch.randn(4, 300, 16), torch.randn(2, 300, 16), torch.randn(2, 300, 16)
    predictor = ""
    if use_predictor:
        predictor = str(save_predictor(small_predictor(), tmp_path / "p.safetensors"))
    cfg = DHSAConfig(pattern="dynamic", density=1.0, q_block=64, min_chunk=8, max_chunk=48,
                     boundary_predictor=predictor)
    offsets = make_chunker(cfg)(k)
    assert_valid_offsets(offsets, 300, 8, 48)
    selection = route(q, k, cfg, chunk_offsets=offsets)
    assert torch.equal(selection.grid.chunk_offsets, offsets)
    out = block_sparse_attention(q, k, v, selection)
    torch.testing.assert_close(out, dense_attention(q, k, v), atol=1e-5, rtol=1e-5)
    # a sparse budget really skips chunks, and the result stays finite
    sparse_cfg = cfg.replace(density=0.2, sink_tokens=8, local_tokens=16, instruction_tokens=64)
    sparse = route(q, k, sparse_cfg, chunk_offsets=offsets)
    assert sparse.causal_block_fraction() < 1.0
    assert torch.isfinite(block_sparse_attention(q, k, v, sparse)).all()
