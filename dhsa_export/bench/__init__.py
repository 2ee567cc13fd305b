"""Latency / memory benchmarks. ``attention``: one attention layer on CUDA, DHSA vs SDPA and
FlexAttention (``python -m dhsa_export.bench.attention``)."""
