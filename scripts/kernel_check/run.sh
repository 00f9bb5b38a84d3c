#!/usr/bin/env bash
# Kernel-level checks of the GEMM tables, outside Python, under AddressSanitizer + UBSan:
#   quant:  the dequantizers and integer-dot kernels of the weight formats (AMX-INT8 tiles real and
#           emulated included; quant_harness.cpp), and under
#           simde the AVX-512 one's logic on any CPU;
#   native: ref, amx-emu, and the real avx2 / avx512 / avx512-bf16 / amx kernels where this CPU runs them;
#           and avx512-bf16-emu (the AVX512_BF16 source on SIMDe) where SIMDe is installed;
#   simde:  if SIMDe is installed (Debian/Ubuntu: libsimde-dev), the avx512, avx512-bf16 and amx
#           sources again with the AVX-512 intrinsics on SIMDe (portable C, kernels/gemm_simde.h) and
#           the AMX tiles on kernels/amx_emu.h, so their logic is checked on a CPU without AVX-512 or AMX.
# Usage: scripts/kernel_check/run.sh [random iterations per table, default 200]  (several minutes: the
# SIMDe build under the sanitizers is slow to compile)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
k="$here/../../kt_ops_csrc/kernels"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
flags=(-std=c++20 -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -Wno-psabi -I"$k")
iters="${1:-200}"

g++ "${flags[@]}" "$here/harness.cpp" "$k/gemm_ref.cpp" "$k/gemm_amx_emu.cpp" "$k/gemm_avx512.cpp" "$k/gemm_amx.cpp" \
  "$k/gemm_avx512_emu.cpp" "$k/gemm_avx2.cpp" "$k/quant_ref.cpp" -o "$out/native"
echo "== native"
"$out/native" "$iters"

g++ "${flags[@]}" "$here/quant_harness.cpp" "$k/quant_ref.cpp" "$k/quant_avx2.cpp" "$k/quant_avx512.cpp" \
  "$k/quant_avx512_vnni.cpp" "$k/gemm_amx_emu.cpp" "$k/gemm_amx.cpp" -o "$out/quant"
echo "== quant: integer dot products on int8 and 4-bit codes (int8 AMX tiles emulated, and real where this CPU has AMX-INT8), dequantization, decode on the codes (ref; avx2 and avx512 where this CPU runs them)"
"$out/quant" "$iters"

if [ -f /usr/include/simde/x86/avx512.h ]; then
  # The same sources with the target pragma dropped and immintrin.h replaced by SIMDe (+ tile emulation).
  mkdir -p "$out/src"
  sed -e 's|^#pragma GCC target.*$|// (target pragma dropped for the SIMDe build)|' \
      -e 's|^#include <immintrin.h>|#include "gemm_simde.h"|' "$k/gemm_avx512.cpp" >"$out/src/gemm_avx512.cpp"
  sed -e 's|^#pragma GCC target.*$|// (target pragma dropped for the SIMDe build)|' \
      -e 's|^#include <immintrin.h>|#include "gemm_simde.h"\n#include "amx_emu.h"|' "$k/gemm_amx.cpp" >"$out/src/gemm_amx.cpp"
  g++ "${flags[@]}" -DKT_SIMDE "$here/harness.cpp" "$k/gemm_ref.cpp" "$k/gemm_amx_emu.cpp" \
    "$out/src/gemm_avx512.cpp" "$out/src/gemm_amx.cpp" "$k/gemm_avx512_emu.cpp" "$k/quant_ref.cpp" -o "$out/simde" 2> >(grep -v "variable tracking\|^ *[0-9]* |\|^ *|\|In function" >&2)
  echo "== simde"
  "$out/simde" "$iters"
  for f in quant_avx512 quant_avx512_vnni; do
    sed -e 's|^#pragma GCC target.*$|// (target pragma dropped for the SIMDe build)|' \
        -e 's|^#include <immintrin.h>|#include "gemm_simde.h"|' "$k/$f.cpp" >"$out/src/$f.cpp"
  done
  g++ "${flags[@]}" -DKT_SIMDE "$here/quant_harness.cpp" "$k/quant_ref.cpp" "$k/quant_avx2.cpp" \
    "$out/src/quant_avx512.cpp" "$out/src/quant_avx512_vnni.cpp" "$k/gemm_amx_emu.cpp" -o "$out/quant_simde"
  echo "== quant on simde: the avx512 dequantizers' logic (bf16 rounding by instruction and in integer steps)"
  "$out/quant_simde" "$iters"
else
  echo "== simde: skipped (no /usr/include/simde; apt-get install libsimde-dev)"
fi
