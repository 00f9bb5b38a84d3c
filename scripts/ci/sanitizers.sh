#!/usr/bin/env bash
# CI's reliability checks beyond the test suite, each bounded in time:
#   1. the kernel sanitizer harness (scripts/kernel_check: GEMM tables under ASan+UBSan);
#   2. an ASan+UBSan build of the extension, in build/asan (the normal build is untouched), and the
#      op-level tests under it: bad-input fuzz, error checks, failure injection, the int8 integer
#      dot products (on the emulated AMX tiles too, whose 16-row blocks read into the rows' slack).
# Output goes to build/ci-logs/*.log; a failing step prints its log's tail and the script exits non-zero.
# Needs the .venv made by scripts/setup.sh. Usage: bash scripts/ci/sanitizers.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
PY="$root/.venv/bin/python"
logs="$root/build/ci-logs"
mkdir -p "$logs"

step() {  # step NAME TIMEOUT_S "COMMAND" (run by bash -c, with this script's exported variables)
  local name=$1 limit=$2 command=$3
  local start=$SECONDS
  if timeout --kill-after=10 "$limit" bash -c "$command" >"$logs/$name.log" 2>&1; then
    echo "[ci] $name: ok in $((SECONDS - start)) s (log: $logs/$name.log)"
  else
    local rc=$?
    echo "[ci] $name: FAILED (exit $rc after $((SECONDS - start)) s); last lines of $logs/$name.log:"
    tail -n 60 "$logs/$name.log"
    exit 1
  fi
}

step kernel_check 1200 "bash scripts/kernel_check/run.sh ${KT_KERNEL_CHECK_ITERS:-60}"

# The sanitized extension: a copy of the sources in build/asan, built there.
asan="$root/build/asan"
mkdir -p "$asan"
rm -rf "$asan/kt_ops" "$asan/kt_ops_csrc" "$asan/tests"
cp -r kt_ops kt_ops_csrc tests setup.py "$asan/"
rm -f "$asan"/kt_ops/_C*.so
export PY asan
export san="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
step asan_build 1500 'cd "$asan" && CFLAGS="$san" LDFLAGS="$san" MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace -q'

# Python is not sanitized, so the runtime comes first; leaks of the interpreter are not ours.
export KT_OPS_FUZZ_EXAMPLES="${KT_OPS_ASAN_FUZZ_EXAMPLES:-40}"
step asan_tests 900 'cd "$asan" && env LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "$PY" -m pytest -q -p no:cacheprovider -x tests/test_errors.py tests/test_fuzz.py \
    tests/test_reliability.py::test_task_exception_becomes_python_error_and_pool_stays_usable \
    tests/test_reliability.py::test_intermediate_size_overflow_is_refused \
    tests/test_formats.py::test_integer_dot_at_every_row_count \
    tests/test_formats.py::test_integer_dot_over_many_chunks_and_non_finite_rows'

