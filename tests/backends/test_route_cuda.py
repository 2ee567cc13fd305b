"""``dhsa::Route`` in CUDA C++ (``plugins/trt/kernels/route_kernels.cuh``) against the reference
:func:`dhsa_export.algo.routing.route` run on the CPU in fp32 on the upcast inputs.

Selections must be identical except where two candidates are within fp32 summation-order rounding
of each other: inputs built from small integers, constant over each block / chunk, have no such
near-ties and are compared exactly; random inputs may differ on a tiny fraction of rows.
The registry / C-parameter agreement and the host validation run without a GPU.
"""

from __future__ import annotations

import ctypes
import os
import re
import zlib

import pytest
import torch

from dhsa_export import DHSAConfig, DHSAError
from dhsa_export.algo.routing import route
from dhsa_export.backends.torch_cuda import build, library
from dhsa_export.config import CHUNK_SCORES, PATTERNS
from dhsa_export.onnx.registry import ROUTE, route_attributes

gpu = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


# ------------------------------------------------------------------ registry <-> C parameters (CPU)
def _header() -> str:
    return (build.kernel_source_dir() / "dhsa_kernels.h").read_text()


def assert_params_mirror(params_type, op) -> None:
    """The attribute fields of a C parameter struct are the registry op's attributes, same names, same
    order, typed by kind (strings travel as int32 enums, floats as double, ints as int32); the ctypes
    mirror has the header's fields and types."""
    fields = [name for name, _ in params_type._fields_]
    attribute_fields = [f for f in fields if f not in params_type.PROBLEM_FIELDS]
    assert attribute_fields == [a.name for a in op.attributes]
    struct = params_type.__name__
    body = re.search(rf"typedef struct {struct} \{{(.*?)\}} {struct};", _header(), re.S).group(1)
    declared = re.findall(r"^\s*(?:const\s+)?(\w+)(\s*\*)?\s*(\w+);", body, re.M)
    assert [name for _, _, name in declared] == fields
    ctypes_of = {"int32_t": ctypes.c_int32, "double": ctypes.c_double}
    for (ctype, pointer, name), (_, field) in zip(declared, params_type._fields_):
        assert field is (ctypes.c_void_p if pointer else ctypes_of[ctype]), name
    kinds = {a.name: a.kind for a in op.attributes}
    for name, field in params_type._fields_:
        if name in kinds:
            assert field is {"int": ctypes.c_int32, "float": ctypes.c_double, "string": ctypes.c_int32}[kinds[name]]


def test_route_params_mirror_the_registry_and_the_header():
    assert_params_mirror(library.DhsaRouteParams, ROUTE)


def test_route_enums_match_config_and_header():
    header = _header()

    def define(name):
        return int(re.search(rf"#define {name} (\d+)", header).group(1))

    assert list(library.ROUTE_PATTERNS) == list(PATTERNS)
    assert list(library.ROUTE_CHUNK_SCORES) == list(CHUNK_SCORES)
    for name, value in library.ROUTE_PATTERNS.items():
        assert define(f"DHSA_ROUTE_PATTERN_{name.upper()}") == value
    for name, value in library.ROUTE_CHUNK_SCORES.items():
        assert define(f"DHSA_ROUTE_CHUNK_SCORE_{name.upper()}") == value
    assert define("DHSA_DTYPE_FP32") == library.DTYPE_FP32
    assert define("DHSA_ABI_VERSION") == library.ABI_VERSION
    doc = ROUTE.attribute("pattern").doc
    assert [p.strip() for p in doc.split("|")] == list(PATTERNS)


def test_route_attribute_fields_reject_unknown_strings():
    values = ROUTE.defaults()
    with pytest.raises(DHSAError, match="pattern 'diagonal' is unknown"):
        library.route_attribute_fields({**values, "pattern": "diagonal"})
    with pytest.raises(DHSAError, match="chunk_score 'max' is unknown"):
        library.route_attribute_fields({**values, "chunk_score": "max"})


def test_route_cuda_rejects_cpu_tensors_before_loading():
    from dhsa_export.backends.torch_cuda import route_cuda

    q, k = torch.zeros(1, 4, 64, 64), torch.zeros(1, 2, 64, 64)
    with pytest.raises(DHSAError, match="q is on cpu; route_cuda needs CUDA tensors"):
        route_cuda(q, k, DHSAConfig())


def _loadable_library():
    """The kernel library when it is already built (never builds in a test: minutes of nvcc)."""
    path = os.environ.get("DHSA_KERNEL_LIBRARY")
    if not path:
        try:
            path = str(build.library_path())
        except DHSAError as exc:
            pytest.skip(str(exc))
    if not os.path.isfile(path):
        pytest.skip(f"kernel library not built ({path}); python -m dhsa_export.backends.torch_cuda.build")
    try:
        return library.load_library(path)
    except DHSAError as exc:
        pytest.skip(str(exc))


def _host_params(**changes):
    """Parameters with fake (never dereferenced) pointers: host validation only."""
    values = library.route_attribute_fields(ROUTE.defaults())
    fields = dict(q=16, k=16, key_chunk_offsets=None, block_index=16, block_count=16, batch=1,
                  num_q_heads=8, num_kv_heads=2, q_len=256, k_len=256, head_dim=128, offsets_width=0,
                  dtype=library.DTYPE_BF16, **{a.name: values[a.name] for a in ROUTE.attributes})
    fields.update(changes)
    return library.DhsaRouteParams(**fields)


@pytest.mark.parametrize("changes, message", [
    (dict(density=0.0), r"density = 0 is outside \(0, 1\]"),
    (dict(density=1.5), r"density = 1.5 is outside \(0, 1\]"),
    (dict(head_group=3), r"head_group = 3 must be 1 \(per head\) or Hq/Hkv = 4"),
    (dict(num_kv_heads=3), "query heads 8 are not a multiple of key heads 3"),
    (dict(q_len=300), "query length 300 exceeds key length 256"),
    (dict(pattern=7), "pattern = 7 is unknown"),
    (dict(chunk_score=5), "chunk_score = 5 is unknown"),
    (dict(head_dim=512), "head_dim 512 is not supported"),
    (dict(dtype=9), "dtype 9 is not supported"),
    (dict(q_block=0), "q_block = 0 must be >= 1"),
    (dict(k_block=-1), "k_block = -1 must be >= 1"),
    (dict(sink_tokens=-2), "sink_tokens = -2"),
    (dict(key_chunk_offsets=16, offsets_width=0), "needs at least one column"),
    (dict(batch=0), "bad sizes batch=0"),
])
def test_route_host_validation_names_the_value(changes, message):
    lib = _loadable_library()
    with pytest.raises(DHSAError, match=message):
        library.route_output_shape(lib, _host_params(**changes))
    with pytest.raises(DHSAError, match=message):
        library.route_workspace_size(lib, _host_params(**changes))


def test_route_forward_checks_buffers_before_the_gpu():
    """Buffers are checked by forward only (shapes and workspace sizes are asked without them)."""
    lib = _loadable_library()
    assert library.route_output_shape(lib, _host_params(q=None, block_index=None)) == (8, 2, 8)
    with pytest.raises(DHSAError, match="a required pointer is NULL"):
        library.route_forward(lib, _host_params(q=None), 0, 0, 0)
    with pytest.raises(DHSAError, match="bytes needed"):
        library.route_forward(lib, _host_params(), 0, 0, 0)


def test_route_params_from_tensors():
    """route_params maps tensors and a config's registry attributes onto the C fields."""
    from dhsa_export.backends.torch_cuda.ops import route_params

    lib = _loadable_library()
    q, k = torch.zeros(2, 8, 300, 64, dtype=torch.bfloat16), torch.zeros(2, 2, 700, 64, dtype=torch.bfloat16)
    cfg = DHSAConfig(pattern="dynamic", q_block=64, k_block=16, density=0.25)
    params = route_params(q, k, route_attributes(cfg, 8, 2), torch.zeros(2, 41, dtype=torch.int32))
    assert (params.batch, params.num_q_heads, params.num_kv_heads, params.q_len, params.k_len) == (2, 8, 2, 300, 700)
    assert (params.pattern, params.density, params.head_group, params.offsets_width) == (4, 0.25, 4, 41)
    assert params.dtype == library.DTYPE_BF16 and params.chunk_score == library.ROUTE_CHUNK_SCORES["mass"]
    assert library.route_output_shape(lib, params) == (2, 5, 40)
    assert library.route_workspace_size(lib, params) > 0


def test_route_output_shape_follows_the_registry():
    lib = _loadable_library()
    attrs = {"q_block": 64, "k_block": 16, "head_group": 4}
    params = _host_params(q_len=200, k_len=700, **attrs)
    expected = ROUTE.output_shapes(attrs, (1, 8, 200, 128), (1, 2, 700, 128))[0]
    assert library.route_output_shape(lib, params) == tuple(expected[1:])
    variable = _host_params(pattern=library.ROUTE_PATTERNS["dynamic"], key_chunk_offsets=16, offsets_width=41)
    assert library.route_output_shape(lib, variable)[2] == 40
    assert library.route_workspace_size(lib, variable) > 0


# ------------------------------------------------------------------------------ GPU comparisons
def reference(q, k, cfg, offsets=None):
    """``(block_index, block_count)`` of the CPU fp32 reference, width nC."""
    indices, counts = [], []
    for b in range(q.shape[0]):
        off = None if offsets is None else offsets[b].long().cpu()
        selection = route(q[b].float().cpu(), k[b].float().cpu(), cfg, off)
        index, count = selection.to_block_index(max(1, selection.grid.num_chunks))
        indices.append(index)
        counts.append(count)
    return torch.stack(indices), torch.stack(counts)


def row_sets(index, count):
    index, count = index.cpu(), count.cpu()
    return [frozenset(index[b, r, i, : count[b, r, i]].tolist())
            for b in range(index.shape[0]) for r in range(index.shape[1]) for i in range(index.shape[2])]


def differing_rows(got, want) -> float:
    a, b = row_sets(*got), row_sets(*want)
    return sum(x != y for x, y in zip(a, b)) / max(1, len(a))


def assert_near_ties_only(got, want, fraction=0.02):
    """At most ``fraction`` of the rows (and at least one row allowed) select other chunks."""
    a, b = row_sets(*got), row_sets(*want)
    differing = sum(x != y for x, y in zip(a, b))
    assert differing <= max(1, int(fraction * len(a))), f"{differing} of {len(a)} rows differ"


def seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def assert_well_formed(index, count):
    """Ascending ids in [0, nC), -1 after the count."""
    index, count = index.cpu(), count.cpu()
    nc = index.shape[-1]
    assert ((count >= 1) & (count <= nc)).all()
    slots = torch.arange(nc)
    valid = slots < count[..., None]
    assert (index[~valid] == -1).all()
    assert ((index >= 0) & (index < nc))[valid].all()
    ids = torch.where(valid, index, torch.iinfo(torch.int32).max)
    assert (ids[..., 1:] > ids[..., :-1])[valid[..., 1:]].all()


def block_constant(batch, heads, length, dim, bounds, gen, lo, hi):
    """Integers in [lo, hi) constant over each segment of ``bounds`` (ascending, 0 .. length)."""
    x = torch.empty(batch, heads, length, dim)
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            x[:, :, s:e] = torch.randint(lo, hi, (batch, heads, 1, dim), generator=gen).float()
    return x


def fixed_bounds(length, block):
    return list(range(0, length, block)) + [length]


def random_chunk_offsets(length, gen, lo=8, hi=32, zero_every=0):
    offsets, pos, n = [0], 0, 0
    while pos < length:
        n += 1
        step = 0 if zero_every and n % zero_every == 0 else int(torch.randint(lo, hi + 1, (1,), generator=gen))
        pos = min(length, pos + step)
        offsets.append(pos)
    return offsets


def padded(rows):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], dtype=torch.int32)


SHAPES = [  # B, Hq, Hkv, Lq, Lk, D
    pytest.param((1, 4, 4, 300, 300, 64), id="Lq-not-multiple-gqa1"),
    pytest.param((1, 8, 2, 100, 100, 128), id="one-block-gqa4"),
    pytest.param((2, 8, 1, 200, 700, 64), id="Lq<Lk-gqa8"),
    pytest.param((1, 4, 1, 1024, 1024, 128), id="gqa4-1k"),
]
ROUTINGS = ["group", "head"]


def _cfg(pattern, routing, **extra):
    base = dict(pattern=pattern, head_routing=routing, q_block=64, k_block=16, density=0.2,
                sink_tokens=16, local_tokens=64, instruction_tokens=64, vslash_blockwise_above=0)
    base.update(extra)
    return DHSAConfig(**base)


def _route_cuda():
    from dhsa_export.backends.torch_cuda import route_cuda

    return route_cuda


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("pattern, extra", [
    ("topk", {}), ("ashape", {}), ("dynamic", {"chunk_score": "mean"}),
    ("topk", {"density": 1.0}), ("ashape", {"density": 1.0}),
])
def test_exact_on_block_constant_integers(shape, routing, pattern, extra):
    b, hq, hkv, lq, lk, d = shape
    cfg = _cfg(pattern, routing, **extra)
    gen = torch.Generator().manual_seed(seed(shape, routing, pattern, extra))
    q = block_constant(b, hq, lq, d, fixed_bounds(lq, cfg.q_block), gen, -3, 4)
    k = block_constant(b, hkv, lk, d, fixed_bounds(lk, cfg.k_block), gen, -3, 4)
    if pattern == "dynamic":  # positive values: no two chunk scores are (irrationally) near-equal
        q, k = q.abs() + 1, k.abs() + 1
    for dtype in DTYPES:
        got = _route_cuda()(q.to("cuda", dtype), k.to("cuda", dtype), cfg)
        want = reference(q, k, cfg)
        assert_well_formed(*got)
        assert torch.equal(got[1].cpu(), want[1]), (dtype, pattern)
        assert torch.equal(got[0].cpu(), want[0]), (dtype, pattern)


@gpu
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("score", ["mean", "mass"])
def test_dynamic_variable_chunks_exact(routing, score):
    """Variable chunks (zero-length ones, rows of different nC padded with Lk): mean on chunk-constant
    integers, mass on token-level integers (logsumexp of well-separated logits)."""
    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, lq, lk, d = 2, 8, 2, 500, 640, 64
    rows = [random_chunk_offsets(lk, gen, zero_every=9), random_chunk_offsets(lk, gen, 4, 40)]
    offsets = padded(rows)
    cfg = _cfg("dynamic", routing, chunk_score=score)
    q = block_constant(b, hq, lq, d, fixed_bounds(lq, cfg.q_block), gen, 1, 5)
    if score == "mean":
        k = torch.cat([block_constant(1, hkv, lk, d, rows[i], gen, 1, 5) for i in range(b)])
    else:
        k = torch.randint(-6, 7, (b, hkv, lk, d), generator=gen).float()
    for dtype in DTYPES + [torch.float32]:
        got = _route_cuda()(q.to("cuda", dtype), k.to("cuda", dtype), cfg, offsets.cuda())
        want = reference(q, k, cfg, offsets)
        assert_well_formed(*got)
        assert differing_rows(got, want) == 0.0, dtype
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
def test_random_inputs_agree(shape, routing, pattern, dtype):
    """Random inputs: the same counts (fixed-block patterns) and the same rows except a tiny
    fraction (near-ties from the fp32 summation order)."""
    b, hq, hkv, lq, lk, d = shape
    cfg = _cfg(pattern, routing)
    gen = torch.Generator().manual_seed(seed(shape, routing, pattern, str(dtype)))
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
    got = _route_cuda()(q.cuda(), k.cuda(), cfg)
    want = reference(q.float(), k.float(), cfg)
    assert_well_formed(*got)
    assert got[0].shape == want[0].shape
    if pattern != "dynamic":
        assert torch.equal(got[1].cpu(), want[1])
    assert_near_ties_only(got, want)


@gpu
@pytest.mark.parametrize("pattern", ["vslash", "vslash_blockwise"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("logits", ["tensor-cores", "fp32"])
def test_vslash_lines_agree_at_larger_lengths(pattern, d, logits, monkeypatch):
    """Default blocks (128 / 32) over 4K keys, GQA 4 group routing, and the vslash -> blockwise switch;
    vslash's logits on the tensor cores (default for fp16 / bf16) and on the CUDA cores."""
    if logits == "fp32":
        monkeypatch.setenv("DHSA_ROUTE_LOGITS", "fp32")
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 8, 4096, d, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 2, 4096, d, generator=gen).to(torch.bfloat16)
    above = 2048 if pattern == "vslash_blockwise" else 0
    cfg = DHSAConfig(pattern="vslash", vslash_blockwise_above=above, density=0.1)
    got = _route_cuda()(q.cuda(), k.cuda(), cfg)
    want = reference(q.float(), k.float(), cfg)
    assert torch.equal(got[1].cpu(), want[1])
    assert_near_ties_only(got, want)


@gpu
def test_fp32_inputs_and_attribute_dicts():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 256, 64, generator=gen)
    k = torch.randn(1, 2, 256, 64, generator=gen)
    cfg = _cfg("vslash", "group")
    attrs = route_attributes(cfg, 4, 2)
    got = _route_cuda()(q.cuda(), k.cuda(), attrs)
    want = reference(q, k, cfg)
    assert_near_ties_only(got, want)


@gpu
def test_bad_chunk_offsets_are_flagged_and_never_read():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 128, 64, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(2, 4, 128, 64, generator=gen).to("cuda", torch.bfloat16)
    cfg = _cfg("dynamic", "head")
    good = random_chunk_offsets(128, gen)
    offsets = padded([good, good])
    offsets[1, 2] = 10**6  # out of range, and decreasing after it
    with pytest.raises(DHSAError, match="bad key_chunk_offsets"):
        _route_cuda()(q, k, cfg, offsets.cuda())
    index, count = _route_cuda()(q, k, cfg, offsets.cuda(), check=False)
    torch.cuda.synchronize()
    assert (count[1] == 0).all() and (index[1] == -1).all()
    want = reference(q[:1].float(), k[:1].float(), cfg, offsets[:1])
    assert torch.equal(index[:1].cpu(), want[0]) and torch.equal(count[:1].cpu(), want[1])
    last = offsets.clone()
    last[0, -1] = 127  # does not end at Lk
    with pytest.raises(DHSAError, match="bad key_chunk_offsets"):
        _route_cuda()(q, k, cfg, last.cuda())


@gpu
def test_bad_tensors_are_rejected_before_launch():
    q = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    cfg = DHSAConfig(pattern="topk")
    with pytest.raises(DHSAError, match="needs CUDA tensors"):
        _route_cuda()(q.cpu(), k.cpu(), cfg)
    with pytest.raises(DHSAError, match="dtypes differ"):
        _route_cuda()(q, k.half(), cfg)
    with pytest.raises(DHSAError, match="exceeds key length"):
        _route_cuda()(torch.cat([q, q], 2), k, cfg)
    with pytest.raises(DHSAError, match="chunk_offsets has shape"):
        _route_cuda()(q, k, DHSAConfig(pattern="dynamic"), torch.zeros(2, 3, 5, dtype=torch.int32))
