// AVX-512 kernels (source: gemm_avx512.inc), two tables:
//   avx512_kernels_f32()      AVX-512 F/BW/VL: fp32 FMA on bf16 weights widened to fp32. One 512-bit
//                             load of a panel's k pair covers all 16 rows x (k, k+1).
//   avx512bf16_kernels_f32()  + AVX512_BF16: vdpbf16ps on the pair layout as stored; the activations
//                             are rounded to bf16 (nearest even) first, accumulation stays fp32.
// cpu.cpp hands these out only after cpuid reported the features (and the OS the zmm state).
//
// The target pragmas (rather than global -m flags) keep the rest of the extension runnable on any
// x86-64 CPU. Standard headers come before them so none of their inline code is compiled for
// AVX-512; everything inside the pragmas has internal linkage and instantiates no standard-library
// template, so the linker cannot hand AVX-512 code to a baseline caller. The exported functions at
// the end are baseline code.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "gemm.h"

// GCC >= 10 (AVX512_BF16 target support); clang ignores "#pragma GCC target", so it gets no table.
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 10
#define KT_HAVE_AVX512_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
// GCC 12 reports its own AVX-512 intrinsic headers ('__Y' may be used uninitialized, GCC bug
// 105593) at every inlined use; silence that for the header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "kernel_local.h"
#define KT_VEC_BYTES 64
#include "kernel_common.inc"
#include "gemm_repack.inc"
#define KT_AVX512_PART 1
#include "gemm_avx512.inc"
#undef KT_AVX512_PART

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")
#define KT_AVX512_PART 2
#include "gemm_avx512.inc"
#undef KT_AVX512_PART
#pragma GCC pop_options
#endif  // KT_HAVE_AVX512_BUILD

namespace kt {

#ifdef KT_HAVE_AVX512_BUILD
const KernelsF32* avx512_kernels_f32() {
  static const KernelsF32 kernels = avx512_table("avx512");
  return &kernels;
}

const KernelsBf16* avx512bf16_kernels() {
  static const KernelsBf16 kernels = avx512bf16_table("avx512-bf16");
  return &kernels;
}
#else
const KernelsF32* avx512_kernels_f32() { return nullptr; }
const KernelsBf16* avx512bf16_kernels() { return nullptr; }
#endif

}  // namespace kt
