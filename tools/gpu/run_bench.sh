#!/usr/bin/env bash
# GPU machine driver: kernel library, GPU tests, routing profile, attention and prefill benchmarks.
# Run from the repository root:   OUT=/some/dir tools/gpu/run_bench.sh
#
# STEPS (comma list, default tests,routing,attention,prefill,topk) picks what runs, in this order:
#   tests      pytest -m gpu $TESTS                         -> $OUT/tests.log
#   routing    tools/gpu/profile_routing.py (before/after)  -> $OUT/routing.json
#   attention  python -m dhsa_export.bench.attention (vslash, $TOKENS) -> $OUT/bench_attention.json
#   prefill    python -m dhsa_export.bench.prefill ($PREFILL_TOKENS)   -> $OUT/bench_prefill.json
#   topk       the attention benchmark with --pattern topk at $TOPK_TOKENS -> $OUT/bench_attention_topk.json
#   memory     python -m dhsa_export.bench.memory: $MEMORY_TOKENS-token prefill + decode of the full
#              LLaMA-3.1-8B-shaped model under a $MEMORY_BUDGET_GIB GiB cap (not in the default
#              list; e.g. STEPS=tests,memory TESTS=tests/backends)  -> $OUT/bench_memory.json
# Everything else goes to $OUT/run.log (machine, build, step logs); summary tables are printed last.
# Knobs: TOKENS (8192,32768,65536,131072), PREFILL_TOKENS (32768,131072), TOPK_TOKENS (32768),
# MEMORY_TOKENS (100000), MEMORY_BUDGET_GIB (24), MEMORY_ARGS (more bench.memory options),
# VARIANTS (kernel variants to time, default auto), TESTS, PYTEST_ARGS, PYTHON, ROUTING_ARGS,
# DHSA_KERNEL_LIBRARY (a prebuilt libdhsa_kernels.so; else it is built into DHSA_CACHE_DIR,
# default ./.kcache: carry it to reuse a local build). Routing CUDA graphs (torch-cuda backend):
# DHSA_ROUTING_GRAPH=0 turns them off, DHSA_ROUTING_GRAPH_MAX_TOKENS / _CACHE / _MAX_MB bound them.
# DHSA_ROUTING_FUSED=0 turns off the fused Triton routing (routing_fused.py; the torch steps run).
# The TensorRT plugin's GPU tests (tests/backends/test_trt_plugin_cuda.py, part of `tests`) compile
# against TensorRT headers and the GPU machine has no network: copy the pinned ones here first
# (cp -r ~/.cache/dhsa-export/trt-headers/kernel-lens-2.0.1 .kcache/trt-headers); DHSA_TRT_HEADERS
# defaults to that folder when it exists.
set -uo pipefail
OUT="${OUT:-out/gpu}"
STEPS=",${STEPS:-tests,routing,attention,prefill,topk},"
TOKENS="${TOKENS:-8192,32768,65536,131072}"
PREFILL_TOKENS="${PREFILL_TOKENS:-32768,131072}"
TOPK_TOKENS="${TOPK_TOKENS:-32768}"
VARIANTS="${VARIANTS:-auto}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1
export DHSA_CACHE_DIR="${DHSA_CACHE_DIR:-$PWD/.kcache}"
if [ -z "${DHSA_TRT_HEADERS:-}" ] && [ -f "$DHSA_CACHE_DIR/trt-headers/NvInfer.h" ]; then
  export DHSA_TRT_HEADERS="$DHSA_CACHE_DIR/trt-headers"
fi
status=0
step() { case "$STEPS" in *",$1,"*) return 0;; *) return 1;; esac; }
stamp() { echo "== $1: $(( $(date +%s) - t0 )) s" | tee -a "$LOG"; }

{ nvidia-smi; "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"; nvcc --version | tail -n 2; } >>"$LOG" 2>&1

t0=$(date +%s)
if [ -n "${DHSA_KERNEL_LIBRARY:-}" ] && [ -f "$DHSA_KERNEL_LIBRARY" ]; then
  echo "library: $DHSA_KERNEL_LIBRARY (prebuilt)" | tee -a "$LOG"
else
  unset DHSA_KERNEL_LIBRARY
  "$PY" -m dhsa_export.backends.torch_cuda.build >>"$LOG" 2>&1 || { status=1; tail -n 20 "$LOG"; }
  stamp "build ($(tail -n 1 "$LOG"))"
fi

if step tests; then
  t0=$(date +%s)
  timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -m gpu ${TESTS:-tests/backends/test_torch_cuda.py tests/backends/test_torch_cuda_hf.py} \
    -p no:cacheprovider -rfE ${PYTEST_ARGS:-} >"$OUT/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 30
  tail -n 2 "$OUT/tests.log"
  stamp tests
fi

if step routing; then
  t0=$(date +%s)
  timeout "${ROUTING_TIMEOUT:-200}" "$PY" tools/gpu/profile_routing.py --tokens "$TOKENS" --json "$OUT/routing.json" \
    ${ROUTING_ARGS:-} >>"$LOG" 2>&1 || status=1
  stamp routing
fi

if step attention; then
  t0=$(date +%s)
  timeout "${BENCH_TIMEOUT:-240}" "$PY" -m dhsa_export.bench.attention --tokens "$TOKENS" --pattern vslash \
    --variants "$VARIANTS" --json "$OUT/bench_attention.json" >>"$LOG" 2>&1 || status=1
  stamp attention
fi

if step prefill; then
  t0=$(date +%s)
  timeout "${PREFILL_TIMEOUT:-200}" "$PY" -m dhsa_export.bench.prefill --tokens "$PREFILL_TOKENS" \
    --json "$OUT/bench_prefill.json" >>"$LOG" 2>&1 || status=1
  stamp prefill
fi

if step topk; then
  t0=$(date +%s)
  timeout "${TOPK_TIMEOUT:-120}" "$PY" -m dhsa_export.bench.attention --tokens "$TOPK_TOKENS" --pattern topk \
    --json "$OUT/bench_attention_topk.json" >>"$LOG" 2>&1 || status=1
  stamp topk
fi

if step memory; then
  t0=$(date +%s)
  PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}" \
  timeout "${MEMORY_TIMEOUT:-480}" "$PY" -m dhsa_export.bench.memory --tokens "${MEMORY_TOKENS:-100000}" \
    --budget-gib "${MEMORY_BUDGET_GIB:-24}" --decode-tokens 16 --json "$OUT/bench_memory.json" \
    ${MEMORY_ARGS:-} >>"$LOG" 2>&1 || status=1
  stamp memory
fi

echo "---- summary"
grep -E "^(\| |DIFF|Traceback|[A-Za-z]*Error)" "$LOG" | grep -v "^| Name" | tail -n 60
exit $status
