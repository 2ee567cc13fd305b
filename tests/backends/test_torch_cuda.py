"""CUDA block-sparse attention kernel against the fp32 reference (DESIGN.md section 4 edge cases).

Every kernel output is compared with ``dhsa_export.algo.block_sparse_attention`` computed in fp32 on
the upcast inputs: ||out - ref|| / ||ref|| <= 1e-2, no NaN, and every element written (the output
buffer is poisoned with NaN first).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from dhsa_export import DHSAConfig, DHSAError
from dhsa_export.algo import BlockGrid, Selection, block_sparse_attention, dense_attention, fixed_offsets
from dhsa_export.algo.layout import chunk_id_per_token

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
TOL = 1e-2


def _cuda():
    from dhsa_export.backends import torch_cuda

    return torch_cuda


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def make_qkv(b, hq, hkv, lq, lk, d, dtype, gen):
    q = torch.randn(b, hq, lq, d, generator=gen).to("cuda", dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to("cuda", dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen).to("cuda", dtype)
    return q, k, v


def random_offsets(lk, gen, max_len=40, zero_every=7):
    """Variable chunks covering [0, lk), with a few zero-length chunks."""
    offsets, pos, i = [0], 0, 0
    while pos < lk:
        i += 1
        step = 0 if i % zero_every == 0 else int(torch.randint(1, max_len + 1, (1,), generator=gen))
        pos = min(lk, pos + step)
        offsets.append(pos)
    return torch.tensor(offsets, dtype=torch.long)


def random_selection(hr, head_group, lq, offsets, q_block, p, gen, empty_row=False):
    grid = BlockGrid.build(lq, offsets.to("cuda"), q_block)
    mask = torch.rand(hr, grid.num_q_blocks, grid.num_chunks, generator=gen) < p
    mask = mask.to("cuda") | grid.diagonal()[None]
    if empty_row:
        mask[0, -1] = False
    return Selection(grid, mask, head_group)


def reference(q, k, v, selections, scale=None):
    return torch.stack([
        block_sparse_attention(q[b].float(), k[b].float(), v[b].float(), s, scale)
        for b, s in enumerate(selections)
    ])


def run_kernel(q, k, v, selections, variable, q_block, k_block, variant=None, causal=True, scale=None):
    cuda = _cuda()
    index, count, offsets = cuda.selections_to_indices(selections, variable)
    poisoned = torch.full_like(q, float("nan"))
    out, workspace = cuda.launch(q, k, v, index, count, offsets, q_block, k_block, scale, causal,
                                 variant, out=poisoned)
    cuda.raise_on_error_flag(workspace)
    assert out.data_ptr() == poisoned.data_ptr()
    return out


# library.VARIANTS of the Hopper kernels (compute capability 9.0 with an sm_90a build)
WGMMA = {"wgmma": 5, "wgmma_serial": 6, "wgmma_overlap": 7, "wgmma_split": 8, "wgmma_cpasync": 9}
ALL_VARIANTS = [1, 2, 3, 4, *WGMMA.values()]
VARIANT_IDS = ["m64", "m128", "m128w4", "m256", *WGMMA]


def wgmma_ok() -> bool:
    """The device runs the wgmma variants: compute capability 9.0 and an sm_90a library build."""
    if torch.cuda.get_device_capability() != (9, 0):
        return False
    cuda = _cuda()
    q = torch.zeros(1, 1, 16, 64, device="cuda", dtype=torch.bfloat16)
    index = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device="cuda")
    count = torch.ones(1, 1, 1, dtype=torch.int32, device="cuda")
    try:
        cuda.launch(q, q, q, index, count, None, 128, 32, variant=WGMMA["wgmma"])
    except DHSAError as exc:
        if "sm_90a" in str(exc):
            return False
        raise
    return True


def skip_without_wgmma(variant) -> None:
    if variant in WGMMA.values() and not wgmma_ok():
        pytest.skip("wgmma variants need a compute capability 9.0 GPU and an sm_90a build")


def check(out, ref):
    assert not torch.isnan(out).any(), "NaN in the output (unwritten or bad softmax)"
    err = rel_err(out, ref)
    assert err <= TOL, f"relative error {err:.2e} > {TOL}"
    return err


# ------------------------------------------------------------------------------------------------
# Random shapes: dtype x head_dim x GQA ratio x routing x kernel variant
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("routing", ["group", "head"])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_random_shapes_fixed_blocks(dtype, d, ratio, routing, variant):
    skip_without_wgmma(variant)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((str(dtype), d, ratio, routing, variant)).encode()))
    b, hkv = 2, 2
    hq = hkv * ratio
    q_block = int([64, 128][int(torch.randint(0, 2, (1,), generator=gen))])
    k_block = int([16, 32, 64][int(torch.randint(0, 3, (1,), generator=gen))])
    lq = int(torch.randint(100, 700, (1,), generator=gen))
    lk = lq + int([0, 0, 37][int(torch.randint(0, 3, (1,), generator=gen))])  # some chunked prefill
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, gen)
    head_group = ratio if routing == "group" else 1
    hr = hq // head_group
    offsets = fixed_offsets(lk, k_block)
    sels = [random_selection(hr, head_group, lq, offsets, q_block, 0.3, gen, empty_row=(i == 1))
            for i in range(b)]
    out = run_kernel(q, k, v, sels, False, q_block, k_block, variant)
    check(out, reference(q, k, v, sels))


@pytest.mark.parametrize("routing", ["group", "head"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
def test_variable_chunks(dtype, d, routing):
    gen = torch.Generator().manual_seed(11 + d)
    b, hkv, ratio, lq, q_block = 2, 2, 4, 517, 64
    hq = hkv * ratio
    q, k, v = make_qkv(b, hq, hkv, lq, lq, d, dtype, gen)
    head_group = ratio if routing == "group" else 1
    sels = [random_selection(hq // head_group, head_group, lq, random_offsets(lq, gen), q_block, 0.35, gen)
            for _ in range(b)]
    for variant in ALL_VARIANTS if wgmma_ok() else ALL_VARIANTS[:4]:
        out = run_kernel(q, k, v, sels, True, q_block, 32, variant)
        check(out, reference(q, k, v, sels))


@pytest.mark.parametrize("ratio", [3, 7])
def test_odd_group_sizes(ratio):
    """Head groups that do not divide the CTA's rows (Qwen2.5: 14/2 = 7, SmolLM2: 9/3 = 3)."""
    gen = torch.Generator().manual_seed(ratio)
    q, k, v = make_qkv(1, 2 * ratio, 2, 300, 300, 64, torch.bfloat16, gen)
    sels = [random_selection(2, ratio, 300, fixed_offsets(300, 32), 128, 0.4, gen)]
    for variant in ALL_VARIANTS if wgmma_ok() else ALL_VARIANTS[:4]:
        check(run_kernel(q, k, v, sels, False, 128, 32, variant), reference(q, k, v, sels))


# ------------------------------------------------------------------------------------------------
# Edge cases of DESIGN.md section 4
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_one_block(dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 4, 1, 20, 20, 128, dtype, gen)
    sels = [random_selection(1, 4, 20, fixed_offsets(20, 32), 128, 1.0, gen)]
    out = run_kernel(q, k, v, sels, False, 128, 32)
    check(out, dense_attention(q.float(), k.float(), v.float()))


def test_single_query_and_short_tail():
    gen = torch.Generator().manual_seed(4)
    for lq, lk in ((1, 1), (1, 300), (129, 129), (257, 300)):
        q, k, v = make_qkv(1, 8, 2, lq, lk, 64, torch.bfloat16, gen)
        sels = [random_selection(2, 4, lq, fixed_offsets(lk, 32), 128, 0.5, gen)]
        check(run_kernel(q, k, v, sels, False, 128, 32), reference(q, k, v, sels))


@pytest.mark.parametrize("d", [64, 128])
def test_budget_covers_everything_is_dense(d):
    cuda = _cuda()
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 8, 2, 700, 700, d, torch.bfloat16, gen)
    for routing in ("group", "head"):
        cfg = DHSAConfig(density=1.0, head_routing=routing)
        out = cuda.dhsa_attention_cuda(q, k, v, cfg)
        check(out, dense_attention(q.float(), k.float(), v.float()))


def test_empty_rows_give_zeros():
    cuda = _cuda()
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(1, 4, 4, 256, 256, 64, torch.float16, gen)
    index = torch.full((1, 4, 2, 3), -1, dtype=torch.int32, device="cuda")
    count = torch.zeros(1, 4, 2, dtype=torch.int32, device="cuda")
    index[0, :, 1, 0] = 7  # block 1 of the queries sees keys 224..255 only (causal inside)
    count[0, :, 1] = 1
    out, ws = cuda.launch(q, k, v, index, count, None, 128, 32, out=torch.full_like(q, float("nan")))
    cuda.raise_on_error_flag(ws)
    assert (out[:, :, :224] == 0).all()
    assert not torch.isnan(out).any()
    keys = slice(224, 256)
    rows = torch.arange(224, 256, device="cuda")
    mask = (torch.arange(224, 256, device="cuda")[None, :] <= rows[:, None])
    ref = F.scaled_dot_product_attention(q[:, :, 224:].float(), k[:, :, keys].float(), v[:, :, keys].float(),
                                         attn_mask=mask)
    assert rel_err(out[:, :, 224:], ref) <= TOL


def test_non_causal():
    gen = torch.Generator().manual_seed(7)
    lq, lk, q_block, k_block = 200, 333, 64, 32
    q, k, v = make_qkv(1, 8, 2, lq, lk, 128, torch.bfloat16, gen)
    sel = random_selection(2, 4, lq, fixed_offsets(lk, k_block), q_block, 0.3, gen)
    out = run_kernel(q, k, v, [sel], False, q_block, k_block, causal=False, scale=0.05)
    key_chunk = chunk_id_per_token(sel.grid.chunk_offsets)
    q_block_of = torch.arange(lq, device="cuda") // q_block
    routed = sel.mask[:, q_block_of][:, :, key_chunk].repeat_interleave(4, dim=0)  # [Hq, Lq, Lk]
    has = routed.any(-1, keepdim=True)
    ref = F.scaled_dot_product_attention(
        q[0].float(), k[0].float().repeat_interleave(4, 0), v[0].float().repeat_interleave(4, 0),
        attn_mask=routed | ~has, scale=0.05,
    ) * has
    check(out[0], ref)


def test_llama_shape_4k_with_routing():
    """32 q / 8 kv heads, head_dim 128, bf16, vslash routing on the GPU (the benchmark's path)."""
    cuda = _cuda()
    gen = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(1, 32, 8, 4096, 4096, 128, torch.bfloat16, gen)
    out, sels = cuda.dhsa_attention_cuda(q, k, v, DHSAConfig(), return_selections=True)
    check(out, reference(q, k, v, sels))
    assert 0 < sels[0].causal_block_fraction() < 1


# ------------------------------------------------------------------------------------------------
# Routing on the GPU + the kernel (dhsa_attention_cuda)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["topk", "ashape", "vslash", "vslash_blockwise", "dynamic"])
@pytest.mark.parametrize("routing", ["group", "head"])
def test_dhsa_attention_cuda_patterns(pattern, routing):
    cuda = _cuda()
    gen = torch.Generator().manual_seed(9)
    b, lq = 2, 900
    q, k, v = make_qkv(b, 8, 2, lq, lq, 64, torch.bfloat16, gen)
    cfg = DHSAConfig(pattern=pattern, head_routing=routing, density=0.2, q_block=64, k_block=32)
    chunk_offsets = [random_offsets(lq, gen, max_len=60) for _ in range(b)] if pattern == "dynamic" else None
    out, sels = cuda.dhsa_attention_cuda(q, k, v, cfg, chunk_offsets=chunk_offsets, return_selections=True)
    check(out, reference(q, k, v, sels))


# ------------------------------------------------------------------------------------------------
# Bad input: an error, never a crash or an out-of-bounds read
# ------------------------------------------------------------------------------------------------

def _valid_case():
    gen = torch.Generator().manual_seed(10)
    q, k, v = make_qkv(1, 8, 2, 256, 256, 64, torch.bfloat16, gen)
    sel = random_selection(2, 4, 256, fixed_offsets(256, 32), 128, 0.5, gen)
    index, count, _ = _cuda().selections_to_indices([sel], False)
    return q, k, v, index, count


@pytest.mark.parametrize("corruption", ["index_high", "index_huge", "index_negative", "count_high",
                                        "count_negative", "not_ascending"])
def test_bad_indices_raise(corruption):
    cuda = _cuda()
    q, k, v, index, count = _valid_case()
    good = cuda.block_sparse_attention_cuda(q, k, v, index, count, q_block=128, k_block=32)
    index, count = index.clone(), count.clone()
    if corruption == "index_high":
        index[0, 1, 1, 0] = 8  # nC = 8
    elif corruption == "index_huge":
        index[0, 0, 1, 0] = 2**30
    elif corruption == "index_negative":
        count[0, 0, 1] = index.shape[-1]
        index[0, 0, 1, -1] = -1
        if index[0, 0, 1].min() >= 0:
            index[0, 0, 1, 0] = -5
    elif corruption == "count_high":
        count[0, 0, 0] = index.shape[-1] + 1
    elif corruption == "count_negative":
        count[0, 1, 0] = -3
    elif corruption == "not_ascending":
        count[0, 0, 1] = 2
        index[0, 0, 1, :2] = torch.tensor([3, 1], dtype=torch.int32)
    with pytest.raises(DHSAError, match="rejected its indices"):
        cuda.block_sparse_attention_cuda(q, k, v, index, count, q_block=128, k_block=32)
    torch.cuda.synchronize()  # the context is still healthy
    again = cuda.block_sparse_attention_cuda(q, k, v, *_valid_case()[3:], q_block=128, k_block=32)
    assert torch.equal(again, good)


@pytest.mark.parametrize("corruption", ["past_end", "decreasing"])
def test_bad_chunk_offsets_raise(corruption):
    cuda = _cuda()
    gen = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(1, 4, 1, 200, 200, 64, torch.float16, gen)
    sel = random_selection(1, 4, 200, random_offsets(200, gen), 64, 1.0, gen)
    index, count, offsets = cuda.selections_to_indices([sel], True)
    offsets = offsets.clone()
    if corruption == "past_end":
        offsets[0, -1] = 10_000
    else:
        offsets[0, 3] = offsets[0, 1] - 1 if offsets[0, 1] > 0 else -1
    with pytest.raises(DHSAError, match="rejected its indices"):
        cuda.block_sparse_attention_cuda(q, k, v, index, count, offsets, q_block=64)


def test_host_validation_errors():
    cuda = _cuda()
    q, k, v, index, count = _valid_case()
    with pytest.raises(DHSAError, match="float16 or bfloat16"):
        cuda.block_sparse_attention_cuda(q.float(), k.float(), v.float(), index, count)
    with pytest.raises(DHSAError, match="head_dim 96"):
        gen = torch.Generator().manual_seed(1)
        q2, k2, v2 = make_qkv(1, 8, 2, 256, 256, 96, torch.bfloat16, gen)
        cuda.block_sparse_attention_cuda(q2, k2, v2, index, count)
    with pytest.raises(DHSAError, match="nQ"):
        cuda.block_sparse_attention_cuda(q, k, v, index, count, q_block=64)
    with pytest.raises(DHSAError, match="does not divide"):
        # Hr = 1: a routing head of 8 query heads would span the 2 KV heads (GQA ratio 4)
        cuda.block_sparse_attention_cuda(q, k, v, index[:, :1].contiguous(), count[:, :1].contiguous())


# ------------------------------------------------------------------------------------------------
# Hopper wgmma variants: the edge cases of DESIGN.md section 4 (random shapes above)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(WGMMA.values()), ids=list(WGMMA))
@pytest.mark.parametrize("d", [64, 128])
def test_wgmma_edge_cases(variant, d):
    skip_without_wgmma(variant)
    cuda = _cuda()
    gen = torch.Generator().manual_seed(20 + variant + d)
    # one block; Lq not a multiple of the block with Lq < Lk; a single query; a short tail
    for lq, lk, q_block, k_block, p in ((20, 20, 128, 32, 1.0), (333, 400, 128, 32, 0.4),
                                        (1, 300, 64, 16, 0.5), (129, 129, 64, 64, 0.6),
                                        (700, 700, 128, 32, 1.0),  # every block selected
                                        (300, 300, 64, 48, 0.5)):  # k_block not dividing 128
        q, k, v = make_qkv(1, 8, 2, lq, lk, d, torch.bfloat16, gen)
        sels = [random_selection(2, 4, lq, fixed_offsets(lk, k_block), q_block, p, gen)]
        check(run_kernel(q, k, v, sels, False, q_block, k_block, variant), reference(q, k, v, sels))
    # causal diagonal only, GQA 8 with head routing, long enough for several K/V tiles per CTA
    q, k, v = make_qkv(1, 16, 2, 1100, 1100, d, torch.bfloat16, gen)
    sels = [random_selection(16, 1, 1100, fixed_offsets(1100, 32), 128, 0.0, gen)]
    check(run_kernel(q, k, v, sels, False, 128, 32, variant), reference(q, k, v, sels))
    sels = [random_selection(2, 8, 1100, fixed_offsets(1100, 32), 128, 0.7, gen)]
    check(run_kernel(q, k, v, sels, False, 128, 32, variant), reference(q, k, v, sels))
    # variable chunks, fp16
    q, k, v = make_qkv(2, 8, 2, 900, 900, d, torch.float16, gen)
    sels = [random_selection(2, 4, 900, random_offsets(900, gen), 64, 0.5, gen) for _ in range(2)]
    check(run_kernel(q, k, v, sels, True, 64, 32, variant), reference(q, k, v, sels))
    # non-causal with a scale
    sel = random_selection(2, 4, 200, fixed_offsets(333, 32), 64, 0.3, gen)
    q, k, v = make_qkv(1, 8, 2, 200, 333, d, torch.bfloat16, gen)
    out = run_kernel(q, k, v, [sel], False, 64, 32, variant, causal=False, scale=0.05)
    ref = run_kernel(q, k, v, [sel], False, 64, 32, 3, causal=False, scale=0.05)
    check(out, ref.float())
    # bad indices: flagged, the row gives zeros, every output written
    q, k, v, index, count = _valid_case()
    index = index.clone()
    index[0, 1, 1, 0] = 8  # nC = 8
    out, ws = cuda.launch(q, k, v, index, count, None, 128, 32, variant=variant,
                          out=torch.full_like(q, float("nan")))
    with pytest.raises(DHSAError, match="rejected its indices"):
        cuda.raise_on_error_flag(ws)
    assert not torch.isnan(out).any()
    assert (out[0, 4:8, 128:] == 0).all()  # routing head 1 = query heads 4..7, query block 1


@pytest.mark.parametrize("variant", list(WGMMA.values()), ids=list(WGMMA))
def test_partial_last_block_reads_nothing_past_its_head(variant):
    """Lk not a multiple of k_block: the last block's missing rows are zeros, not the next head's
    or the next sequence's keys (the TMA producer copies whole k_block boxes). The second sequence
    is all NaN; the first must still match the reference."""
    skip_without_wgmma(variant)
    gen = torch.Generator().manual_seed(41 + variant)
    q, k, v = make_qkv(2, 8, 2, 301, 301, 128, torch.bfloat16, gen)
    for t in (k, v):
        t[1] = float("nan")
    sels = [random_selection(2, 4, 301, fixed_offsets(301, 32), 128, 0.5, gen) for _ in range(2)]
    out = run_kernel(q, k, v, sels, False, 128, 32, variant)
    check(out[:1], reference(q[:1], k[:1], v[:1], sels[:1]))


def test_auto_variant_matches_mma_sync():
    """The automatic choice (wgmma on an H100/H200 with an sm_90a build) agrees with m128w4."""
    gen = torch.Generator().manual_seed(31)
    q, k, v = make_qkv(1, 32, 8, 2048, 2048, 128, torch.bfloat16, gen)
    sels = [random_selection(8, 4, 2048, fixed_offsets(2048, 32), 128, 0.2, gen)]
    auto = run_kernel(q, k, v, sels, False, 128, 32, 0)
    assert rel_err(auto, run_kernel(q, k, v, sels, False, 128, 32, 3).float()) <= 5e-3


def test_custom_op_opcheck_and_compile():
    _cuda()
    q, k, v, index, count = _valid_case()
    torch.library.opcheck(torch.ops.dhsa.block_sparse_attention.default,
                          (q, k, v, index, count, None, 128, 32, 0.0, True, True))
    eager = torch.ops.dhsa.block_sparse_attention(q, k, v, index, count, None, 128, 32, 0.0, True, True)
    compiled = torch.compile(lambda *a: torch.ops.dhsa.block_sparse_attention(*a) * 2, fullgraph=True)
    out = compiled(q, k, v, index, count, None, 128, 32, 1 / math.sqrt(64), True, False)
    assert torch.allclose(out, eager * 2)
