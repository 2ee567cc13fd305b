#!/usr/bin/env bash
# Build the ONNX Runtime CPU custom-op library with AddressSanitizer + UndefinedBehaviorSanitizer
# (-fsanitize=address,undefined -fno-omit-frame-pointer) and run the ORT kernel tests against it.
#
# Usage: tools/test_ort_sanitized.sh [pytest args...]      (PYTHON, CXX override the tools)
#
# The ASan runtime must be the first library in the process, so it is LD_PRELOADed into Python
# (with libstdc++);
# leak checking is off (CPython and its extensions keep allocations alive until exit). Sanitizer
# reports go to log files (pytest captures stderr); any report, a crash or a failing test fails
# the script with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
CXX=${CXX:-g++}

LIB=$("$PYTHON" -c 'from dhsa_export.backends.ort_cpu import build_library; print(build_library(sanitize=True))')
ASAN_RT=$("$CXX" -print-file-name=libasan.so)
if [ ! -e "$ASAN_RT" ] || [ "$ASAN_RT" = "libasan.so" ]; then
  echo "test_ort_sanitized: $CXX has no libasan.so (install the compiler's sanitizer runtime, e.g. libasan8)" >&2
  exit 1
fi
if ! readelf --dyn-syms "$LIB" | grep -c __asan >/dev/null; then
  echo "test_ort_sanitized: $LIB is not an ASan build" >&2
  exit 1
fi
echo "sanitized library: $LIB"

LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
# libstdc++ is preloaded too: Python does not link it, and ASan's __cxa_throw interceptor must find
# the real one when it initializes (otherwise the first C++ exception aborts in the interceptor).
STDCXX_RT=$("$CXX" -print-file-name=libstdc++.so.6)
export LD_PRELOAD="$ASAN_RT:$STDCXX_RT${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_string_checks=1:log_path=$LOGS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$LOGS/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export DHSA_ORT_SANITIZE=1

status=0
"$PYTHON" -m pytest -q -p no:cacheprovider tests/backends/test_ort_cpu*.py "$@" || status=$?

reports=$(find "$LOGS" -type f -size +0c | sort)
if [ -n "$reports" ]; then
  echo "test_ort_sanitized: sanitizer reports:" >&2
  for report in $reports; do echo "== $report" >&2; cat "$report" >&2; done
  [ "$status" -ne 0 ] || status=1
fi
if [ "$status" -ne 0 ]; then
  echo "test_ort_sanitized: FAILED (exit $status)" >&2
else
  echo "test_ort_sanitized: passed with ASan+UBSan, no sanitizer reports"
fi
exit "$status"
