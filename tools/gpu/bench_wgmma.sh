#!/usr/bin/env bash
# One device call for the Hopper wgmma kernel (docs/GPU_NOTES.md "v7"): smoke check of every variant
# against m128w4 at the LLaMA shape, the kernel's GPU tests, then the one-layer attention benchmark
# (wgmma variants vs m128w4, SDPA and FlexAttention) at $TOKENS.
#   OUT=/dir DHSA_KERNEL_LIBRARY=/path/libdhsa_kernels.so tools/gpu/bench_wgmma.sh
# STEPS (default smoke,tests,attention), VARIANTS (default auto,m128w4 + the wgmma variants),
# TOKENS (default 8192,32768,65536,131072), TESTS (default tests/backends/test_torch_cuda.py),
# PYTEST_ARGS (default -x; PYTEST_ARGS= runs every test).
set -uo pipefail
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS=",${STEPS:-smoke,tests,attention},"
status=0
step() { case "$STEPS" in *",$1,"*) return 0;; *) return 1;; esac; }
if step smoke; then
  timeout "${SMOKE_TIMEOUT:-90}" python3 tools/gpu/smoke_variants.py --variants "${SMOKE_VARIANTS:-wgmma,wgmma_serial,wgmma_overlap,wgmma_split}" \
    2>&1 | tee "$OUT/smoke.log" || { echo "smoke check failed: stopping"; exit 1; }
fi
if step tests; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu ${TESTS:-tests/backends/test_torch_cuda.py} -p no:cacheprovider -rfEs \
    ${PYTEST_ARGS--x} >"$OUT/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/tests.log" | head -n 20
  tail -n 2 "$OUT/tests.log"
fi
if step attention; then
  timeout "${BENCH_TIMEOUT:-300}" python3 -m dhsa_export.bench.attention --tokens "${TOKENS:-8192,32768,65536,131072}" \
    --pattern vslash --variants "${VARIANTS:-auto,m128w4,wgmma,wgmma_serial,wgmma_overlap,wgmma_split}" \
    --json "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench.log" | grep -v "^|" || status=1
fi
exit $status
