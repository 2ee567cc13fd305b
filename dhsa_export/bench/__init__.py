"""Latency / memory benchmarks on CUDA.

- ``attention``: one attention layer, DHSA (routing + block-sparse kernel) vs SDPA and
  FlexAttention: :func:`dhsa_export.bench.attention.bench_attention`
  (``python -m dhsa_export.bench.attention``);
- ``prefill``: a whole random-weights model's prefill, dense SDPA vs DHSA (torch-cuda backend):
  :func:`dhsa_export.bench.prefill.bench_prefill` (``python -m dhsa_export.bench.prefill``).
"""
