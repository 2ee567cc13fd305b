"""``dhsa::ChunkOffsets`` in CUDA C++ (``plugins/trt/kernels/chunk_offsets_kernels.cuh``) against the
reference :func:`dhsa_export.check.references.reference_chunk_offsets` (torch on the CPU, fp32 on
the upcast keys). The chunk walk is integer logic and the scores differ only in the order of double
sums, so outputs are compared exactly. The registry / C-parameter agreement and the host validation
run without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from dhsa_export import DHSAError
from dhsa_export.backends.torch_cuda import library
from dhsa_export.check.references import reference_chunk_offsets
from dhsa_export.onnx.registry import CHUNK_OFFSETS

from .test_route_cuda import _loadable_library, assert_params_mirror

gpu = pytest.mark.gpu


def test_chunk_offsets_params_mirror_the_registry_and_the_header():
    assert_params_mirror(library.DhsaChunkOffsetsParams, CHUNK_OFFSETS)


def test_chunk_offsets_cuda_rejects_cpu_tensors_before_loading():
    from dhsa_export.backends.torch_cuda import chunk_offsets_cuda

    with pytest.raises(DHSAError, match="key is on cpu; chunk_offsets_cuda needs CUDA tensors"):
        chunk_offsets_cuda(torch.zeros(1, 2, 64, 64))


def _host_params(**changes):
    """Parameters with fake (never dereferenced) pointers: host validation only."""
    values = CHUNK_OFFSETS.defaults()
    fields = dict(key=16, boundary_probs=None, offsets=16, counts=16, batch=1, num_kv_heads=2, length=256,
                  head_dim=64, dtype=library.DTYPE_BF16, **{a.name: values[a.name] for a in CHUNK_OFFSETS.attributes})
    fields.update(changes)
    return library.DhsaChunkOffsetsParams(**fields)


@pytest.mark.parametrize("changes, message", [
    (dict(min_chunk=0), "min_chunk = 0 must be in"),
    (dict(min_chunk=16, max_chunk=8), "max_chunk = 8 must be >= min_chunk = 16"),
    (dict(window=0), "window = 0 must be >= 1"),
    (dict(threshold=float("nan")), "threshold = nan must be finite"),
    (dict(dtype=7), "dtype 7 is not supported"),
    (dict(length=0), "bad sizes batch=1 Hkv=2 L=0"),
])
def test_chunk_offsets_host_validation_names_the_value(changes, message):
    lib = _loadable_library()
    with pytest.raises(DHSAError, match=message):
        library.chunk_offsets_workspace_size(lib, _host_params(**changes))


def test_chunk_offsets_forward_checks_buffers():
    lib = _loadable_library()
    with pytest.raises(DHSAError, match="must not be NULL"):
        library.chunk_offsets_forward(lib, _host_params(offsets=None), 16, 1 << 20, 0)
    with pytest.raises(DHSAError, match="workspace"):
        library.chunk_offsets_forward(lib, _host_params(), 16, 4, 0)


def _cuda_offsets(key, probs=None, **attrs):
    from dhsa_export.backends.torch_cuda import chunk_offsets_cuda

    return chunk_offsets_cuda(key, probs, **attrs).cpu().numpy()


def _reference(key, probs=None, **attrs):
    return reference_chunk_offsets(key.float().cpu().numpy(), None if probs is None else probs.float().cpu().numpy(),
                                   **attrs)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("length, heads, d", [(700, 2, 64), (1500, 3, 128), (33, 1, 64)])
@pytest.mark.parametrize("limits", [dict(min_chunk=8, max_chunk=32), dict(min_chunk=1, max_chunk=4),
                                    dict(min_chunk=16, max_chunk=16, window=2)])
def test_similarity_rule_matches_reference(dtype, length, heads, d, limits):
    gen = torch.Generator().manual_seed(length * 7 + heads + d)
    key = torch.randn(2, heads, length, d, generator=gen)
    key[1, :, length // 3: length // 2] += 3.0  # a topic change: proposals cluster there
    key = key.to("cuda", dtype)
    got, want = _cuda_offsets(key, **limits), _reference(key, **limits)
    assert got.shape == want.shape and (got == want).all(), (got[:, :12], want[:, :12])


@gpu
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("length", [1, 2, 9, 400, 4097])
def test_predictor_probabilities_match_reference(threshold, length):
    gen = torch.Generator().manual_seed(length + int(threshold * 10))
    key = torch.randn(3, 2, length, 64, generator=gen).to("cuda", torch.bfloat16)
    probs = torch.rand(3, length, generator=gen)
    if length > 4:
        probs[1, 3] = float("nan")  # never proposed, never the best forced cut
        probs[2, : length // 2] = 0.0  # a long stretch without proposals: forced cuts
    probs = probs.cuda()
    for limits in (dict(min_chunk=8, max_chunk=32), dict(min_chunk=2, max_chunk=5)):
        got = _cuda_offsets(key, probs, threshold=threshold, **limits)
        want = _reference(key, probs, threshold=threshold, **limits)
        assert got.shape == want.shape and (got == want).all(), (got[:, :12], want[:, :12])


@gpu
def test_rows_are_padded_with_the_length_and_chunks_respect_the_limits():
    gen = torch.Generator().manual_seed(5)
    key = torch.randn(4, 2, 999, 64, generator=gen).to("cuda", torch.bfloat16)
    out = _cuda_offsets(key, min_chunk=8, max_chunk=32)
    assert out.shape == _reference(key, min_chunk=8, max_chunk=32).shape
    for row in out:
        ends = row[row < 999].tolist() + [999]
        assert ends[0] == 0 and all(8 <= b - a <= 32 for a, b in zip(ends, ends[1:-1]))
        assert (row[len(ends):] == 999).all()


@gpu
def test_window_longer_than_the_sequence_gives_forced_cuts_only():
    key = torch.randn(1, 1, 20, 64).to("cuda", torch.float32)
    got = _cuda_offsets(key, min_chunk=4, max_chunk=6, window=16)
    assert (got == _reference(key, min_chunk=4, max_chunk=6, window=16)).all()
