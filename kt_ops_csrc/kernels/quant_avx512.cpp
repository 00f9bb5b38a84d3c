// The AVX-512 quant table for CPUs with AVX-512 F/BW/VL, VNNI, VBMI and AVX512_BF16 (Zen 4/5, Sapphire
// Rapids and later): quant_avx512.inc, rounding to bf16 with vcvtne2ps2bf16. Same ODR rules as
// gemm_avx2.cpp (standard headers before the target pragma, internal linkage).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "quant.h"

// GCC >= 10 (AVX512_BF16 target support); clang ignores "#pragma GCC target", so it gets no table.
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bf16,avx2,fma")
// GCC 12 reports its own AVX-512 intrinsic headers ('__Y' may be used uninitialized, GCC bug
// 105593) at every inlined use; silence that for the header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#define KT_QUANT_BF16_ROUNDING 1
#define KT_QUANT_TABLE avx512_dequant
#include "quant_avx512.inc"
#else
namespace kt {
const DequantKernels* avx512_dequant() { return nullptr; }
}  // namespace kt
#endif
