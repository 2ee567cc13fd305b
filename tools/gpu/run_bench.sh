#!/usr/bin/env bash
# GPU machine driver: build the CUDA kernels, run the GPU tests, run the attention benchmark.
# Run from the repository root:   OUT=/some/dir tools/gpu/run_bench.sh
# Writes under $OUT (default out/gpu): machine.txt, build.log, tests.log, junit.xml, bench.log,
# bench_attention.json. Knobs (environment): TOKENS (default 8192,32768,65536,131072), VARIANTS
# (kernel tile variants to time, default auto), TESTS (pytest paths), SKIP_TESTS=1, SKIP_BENCH=1, PYTEST_ARGS, PYTHON,
# DHSA_CACHE_DIR (kernel build cache; default ./.kcache, carry it to reuse a local build).
set -uo pipefail
OUT="${OUT:-out/gpu}"
TOKENS="${TOKENS:-8192,32768,65536,131072}"
VARIANTS="${VARIANTS:-auto}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export DHSA_CACHE_DIR="${DHSA_CACHE_DIR:-$PWD/.kcache}"
status=0

{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; nvcc --version | tail -n 2; } >"$OUT/machine.txt" 2>&1

start=$(date +%s)
"$PY" -m dhsa_export.backends.torch_cuda.build >"$OUT/build.log" 2>&1 || { status=1; cat "$OUT/build.log"; }
echo "build: $(( $(date +%s) - start )) s ($(tail -n 1 "$OUT/build.log"))"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  start=$(date +%s)
  timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -m gpu ${TESTS:-tests/backends/test_torch_cuda.py} -p no:cacheprovider -rfE \
    --junitxml="$OUT/junit.xml" ${PYTEST_ARGS:-} >"$OUT/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|Error|error:|assert" "$OUT/tests.log" | head -n 40
  tail -n 3 "$OUT/tests.log"
  echo "tests: $(( $(date +%s) - start )) s"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-420}" "$PY" -m dhsa_export.bench.attention --tokens "$TOKENS" \
    --variants "$VARIANTS" --json "$OUT/bench_attention.json" >"$OUT/bench.log" 2>&1 || status=1
  grep -vE "^\s*$" "$OUT/bench.log" | grep -vE "warn|Warning" | tail -n 30
  echo "bench: $(( $(date +%s) - start )) s"
fi
exit $status
