"""Routing replayed from CUDA graphs (``dhsa_export.backends.torch_cuda.routing_graph``).

CPU: the cache logic (keys, admission on the second call, LRU and memory bounds, eager fallbacks,
returned selections surviving later replays) with a recorder that re-runs the captured body
instead of a graph. GPU (marked): real graphs give the eager selection bit for bit, in
``dhsa_attention(backend="torch-cuda")``, in a transformers model and in the benchmark.
"""

from __future__ import annotations

import gc

import pytest
import torch

from dhsa_export import DHSAConfig
from dhsa_export.algo import route
from dhsa_export.algo.layout import Selection
from dhsa_export.backends.torch_cuda import routing_graph
from dhsa_export.backends.torch_cuda.routing_graph import RoutingGraphCache

FIXED = ("topk", "ashape", "vslash", "vslash_blockwise")


def rerun_recorder(body, device, pool_bytes=0):
    """CPU stand-in for a CUDA graph: the outputs of the 'capture' are rewritten by every replay."""
    outputs = body()

    def replay():
        for dst, src in zip(outputs, body()):
            dst.copy_(src)

    return replay, outputs, pool_bytes


def cpu_cache(**kwargs) -> RoutingGraphCache:
    return RoutingGraphCache(recorder=kwargs.pop("recorder", rerun_recorder), device_types=("cpu",), **kwargs)


def qk(seed, hq=8, hkv=2, length=700, d=32, device="cpu", dtype=torch.float32):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(hq, length, d, generator=gen, device=device).to(dtype)
    k = (torch.randn(hkv, length, d, generator=gen, device=device) + 0.3).to(dtype)
    return q, k


def assert_same_selection(got: Selection, want: Selection) -> None:
    assert torch.equal(got.mask, want.mask)
    width = max(1, want.grid.num_chunks)
    for a, b in zip(got.to_block_index(width), want.to_block_index(width)):
        assert torch.equal(a, b)
    assert torch.equal(got.causal_block_fraction_tensor(), want.causal_block_fraction_tensor())
    assert got.head_group == want.head_group
    assert torch.equal(got.grid.chunk_offsets, want.grid.chunk_offsets)
    assert torch.equal(got.grid.q_offsets, want.grid.q_offsets)


# ------------------------------------------------------------------------------------------------
# CPU: cache logic
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", FIXED)
@pytest.mark.parametrize("head_routing", ["group", "head"])
def test_replays_give_the_eager_selection(pattern, head_routing):
    cfg = DHSAConfig(pattern=pattern, head_routing=head_routing, density=0.2, q_block=64, k_block=16,
                     vslash_blockwise_above=0)
    cache = cpu_cache()
    for seed in range(4):  # eager, capture + replay, replay, replay: new data every call
        q, k = qk(seed)
        assert_same_selection(cache.route(q, k, cfg), route(q, k, cfg))
    assert cache.counts == {"replays": 3, "eager": 1, "captures": 1, "evictions": 0, "failures": 0}


def test_returned_selections_survive_later_replays():
    cfg = DHSAConfig(density=0.2, q_block=64, k_block=16)
    cache = cpu_cache()
    cache.route(*qk(0), cfg)
    first = cache.route(*qk(1), cfg)
    second = cache.route(*qk(2), cfg)
    assert_same_selection(first, route(*qk(1), cfg))
    assert_same_selection(second, route(*qk(2), cfg))
    assert first.mask.data_ptr() != second.mask.data_ptr()


def test_precomputed_results_are_used_and_only_for_their_width():
    q, k = qk(3)
    eager = route(q, k, DHSAConfig(density=0.2, k_block=16))
    index = torch.full((1,), 7, dtype=torch.int32)
    marked = Selection(eager.grid, eager.mask, eager.head_group,
                       {("block_index", 5): (index, index), "causal_block_fraction": torch.tensor(0.5)})
    assert marked.to_block_index(5)[0] is index
    assert torch.equal(marked.to_block_index(eager.grid.num_chunks)[0], eager.to_block_index(eager.grid.num_chunks)[0])
    assert marked.causal_block_fraction() == 0.5
    assert marked == Selection(eager.grid, eager.mask, eager.head_group)  # precomputed is not compared


def test_lru_bound_on_entries():
    cfg = DHSAConfig(density=0.2, q_block=64, k_block=16)
    cache = cpu_cache(max_entries=2)
    for length in (300, 400, 500):
        for seed in range(2):
            cache.route(*qk(seed, length=length), cfg)
    assert [e["tokens"] for e in cache.info()["entries"]] == [400, 500]
    assert cache.counts["evictions"] == 1
    cache.route(*qk(5, length=400), cfg)  # a hit moves 400 to the young end
    for seed in range(2):
        cache.route(*qk(seed, length=600), cfg)
    assert [e["tokens"] for e in cache.info()["entries"]] == [400, 600]
    cache.clear()
    assert len(cache) == 0 and cache.info()["mb"] == 0


def test_memory_budget_evicts_and_refuses():
    cfg = DHSAConfig(density=0.2, q_block=64, k_block=16)
    cache = cpu_cache(max_mb=3, recorder=lambda body, device: rerun_recorder(body, device, 2 * 2**20))
    for length in (300, 400):
        for seed in range(2):
            cache.route(*qk(seed, length=length), cfg)
    assert [e["tokens"] for e in cache.info()["entries"]] == [400]  # two would exceed 3 MiB
    big = cpu_cache(max_mb=1, recorder=lambda body, device: rerun_recorder(body, device, 2 * 2**20))
    for seed in range(3):
        q, k = qk(seed)
        assert_same_selection(big.route(q, k, cfg), route(q, k, cfg))
    assert len(big) == 0 and big.counts["eager"] == 3 and "budget" in big.info()["refused"][0]


def test_eager_where_no_graph_applies(monkeypatch):
    cfg = DHSAConfig(density=0.2, q_block=64, k_block=16)
    q, k = qk(0)
    cache = cpu_cache()
    assert cache.key(q, k, cfg) is not None
    assert cache.key(q, k, cfg.replace(pattern="dynamic")) is None
    assert RoutingGraphCache().key(q, k, cfg) is None  # CPU tensors: CUDA only by default
    assert cache.key(q, k[:1].expand(2, -1, -1), cfg) is None  # not dense: expanded
    assert cache.key(q, k[:, ::2], cfg) is None  # not dense: strided
    assert cache.key(q.transpose(0, 1).contiguous().transpose(0, 1), k, cfg) is not None  # HF layout
    monkeypatch.setenv(routing_graph.ENV_MAX_TOKENS, "512")
    assert cache.key(q, k, cfg) is None
    monkeypatch.setenv(routing_graph.ENV_MAX_TOKENS, "0")
    assert cache.key(q, k, cfg) is not None
    monkeypatch.setenv(routing_graph.ENV_SWITCH, "0")
    assert cache.key(q, k, cfg) is None
    for seed in range(3):
        cache.route(*qk(seed), cfg)
    assert cache.counts["eager"] == 3 and len(cache) == 0


def test_strided_inputs_get_buffers_of_their_layout():
    cfg = DHSAConfig(density=0.2, q_block=64, k_block=16)
    cache = cpu_cache()
    for seed in range(3):
        q, k = qk(seed)
        q_hf = q.transpose(0, 1).contiguous().transpose(0, 1)  # [H, L, D] view of a [L, H, D] buffer
        assert_same_selection(cache.route(q_hf, k, cfg), route(q, k, cfg))
    entry = next(iter(cache._entries.values()))
    assert entry.static_q.stride() == q_hf.stride()


def test_capture_failure_warns_once_and_stays_eager():
    def broken(body, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    cfg = DHSAConfig(density=0.2, q_block=64, k_block=16)
    cache = cpu_cache(recorder=broken)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        for seed in range(4):
            q, k = qk(seed)
            assert_same_selection(cache.route(q, k, cfg), route(q, k, cfg))
    assert cache.counts["failures"] == 1 and cache.counts["eager"] == 4


def test_backends_pick_their_router():
    from dhsa_export.algo.attention import routing_function
    from dhsa_export.hf.attention import DHSARuntime

    cache = cpu_cache()
    assert routing_function("reference", cache) is route
    assert routing_function("torch-cuda", cache) == cache.route
    assert routing_function("torch-cuda", False) is route
    assert routing_function("torch-cuda") == routing_graph.default_cache().route
    runtime = DHSARuntime(DHSAConfig())
    assert runtime.routing_graphs is runtime.routing_graphs
    assert runtime.routing_graphs is not routing_graph.default_cache()


def test_dhsa_attention_routes_through_the_cache(monkeypatch):
    """The reference attention with the torch-cuda router (the kernel itself needs a GPU)."""
    from dhsa_export.algo import attention

    cfg = DHSAConfig(density=0.2, q_block=64, k_block=16)
    cache = cpu_cache()
    monkeypatch.setattr(attention, "sparse_attention_function", lambda backend: attention.block_sparse_attention)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 300, 32, generator=gen) for h in (8, 2, 2))
    want = attention.dhsa_attention(q, k, v, cfg)
    got = [attention.dhsa_attention(q, k, v, cfg, backend="torch-cuda", routing_graphs=cache) for _ in range(2)]
    assert all(torch.equal(g, want) for g in got)
    assert cache.counts["replays"] == 3 and cache.counts["eager"] == 1


# ------------------------------------------------------------------------------------------------
# GPU: real CUDA graphs
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("pattern", FIXED)
@pytest.mark.parametrize("head_routing", ["group", "head"])
@pytest.mark.parametrize("shape", [(32, 8, 8192, 128, torch.bfloat16), (8, 2, 3001, 64, torch.float16),
                                   (8, 2, 1000, 64, torch.float32)], ids=["8k-bf16", "odd-fp16", "fp32"])
def test_cuda_graph_selection_is_bit_identical(pattern, head_routing, shape):
    hq, hkv, length, d, dtype = shape
    cfg = DHSAConfig(pattern=pattern, head_routing=head_routing, vslash_blockwise_above=0)
    cache = RoutingGraphCache()
    for seed in range(4):
        q, k = qk(seed, hq, hkv, length, d, "cuda", dtype)
        if seed % 2:  # transformers' layout: [H, L, D] views of [L, H, D] buffers
            q = q.transpose(0, 1).contiguous().transpose(0, 1)
            k = k.transpose(0, 1).contiguous().transpose(0, 1)
        assert_same_selection(cache.route(q, k, cfg), route(q, k, cfg))
    assert cache.counts["captures"] == 2 and cache.counts["replays"] == 2, cache.info()  # one key per layout


@pytest.mark.gpu
def test_cuda_graph_fallbacks_and_memory(monkeypatch):
    cfg = DHSAConfig()
    q, k = qk(0, 32, 8, 4096, 128, "cuda", torch.bfloat16)
    route(q, k, cfg)  # the current stream's cuBLAS workspace (cleared by captures) exists before
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    cache = RoutingGraphCache()
    for _ in range(3):
        cache.route(q, k, cfg)
    # fused routing: the graph holds k (8 MiB), q's block means and last rows, not q (32 MiB)
    assert cache.counts["replays"] == 2 and 8 < cache.info()["mb"] < 512, cache.info()
    assert next(iter(cache._entries.values())).parts
    cache.clear()
    gc.collect()
    assert torch.cuda.memory_allocated() - before < 2**20  # static buffers and pool released
    dynamic = RoutingGraphCache()
    for _ in range(3):
        dynamic.route(q, k, cfg.replace(pattern="dynamic"))
    monkeypatch.setenv(routing_graph.ENV_MAX_TOKENS, "2048")
    for _ in range(3):
        dynamic.route(q, k, cfg)
    assert dynamic.counts["eager"] == 6 and len(dynamic) == 0
    monkeypatch.setenv(routing_graph.ENV_MAX_TOKENS, "0")
    assert cache.key(q, k, cfg) is not None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # routing inside someone else's capture stays eager (no nesting)
        inside = cache.key(q, k, cfg)
        q.new_zeros(1).add_(1)  # something to capture
    assert inside is None


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["vslash", "topk"])
def test_dhsa_attention_torch_cuda_graph_equals_eager(pattern):
    from dhsa_export.algo.attention import dhsa_attention

    cfg = DHSAConfig(pattern=pattern)
    gen = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (torch.randn(2, h, 4096, 128, device="cuda", generator=gen).bfloat16() for h in (32, 8, 8))
    cache = RoutingGraphCache()
    eager = dhsa_attention(q, k, v, cfg, backend="torch-cuda", routing_graphs=False)
    graphed = [dhsa_attention(q, k, v, cfg, backend="torch-cuda", routing_graphs=cache) for _ in range(2)]
    assert all(torch.equal(g, eager) for g in graphed)
    assert cache.counts["replays"] == 3, cache.info()


@pytest.mark.gpu
def test_transformers_model_replays_routing_per_layer(monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from dhsa_export.hf.attention import enable_dhsa

    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=512,
                                  max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 512, (1, 2000), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    cfg = DHSAConfig(density=0.2, q_block=64, k_block=16)
    runtime = enable_dhsa(model, cfg, backend="torch-cuda")
    with torch.no_grad():
        graphed = model(ids).logits
    assert runtime.routing_graphs.counts["replays"] == 3, runtime.routing_graphs.info()  # layers 2-4
    monkeypatch.setenv(routing_graph.ENV_SWITCH, "0")
    with torch.no_grad():
        eager = model(ids).logits
    assert torch.equal(graphed, eager)
    assert runtime.stats.calls == 8


@pytest.mark.gpu
def test_benchmark_reports_graph_and_eager_routing():
    from dhsa_export.bench.attention import bench_attention

    result = bench_attention([4096], flex=False, repeats=3, warmup=3, log=print)
    row = result["rows"][0]
    assert row["routing_graph_used"] and row["graph_vs_eager_mask_diff"] == 0 and row["graph_vs_eager_index_equal"]
    assert row["routing_ms"] > 0 and row["routing_eager_ms"] > 0
