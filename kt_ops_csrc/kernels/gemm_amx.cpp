// AMX-BF16 kernels (Sapphire Rapids and later): the tile GEMM (gemm_amx.inc) for both gemm_w and
// gemm_a, the AVX-512 repack, and the common conversions and activation at AVX-512 width; and the
// int8 formats' integer dot products on AMX-INT8 tiles (quant_amx.inc). Only
// amx_kernels() is exported; cpu.cpp calls it, and selects the table, only after cpuid reported
// AMX-TILE, AMX-BF16 and AVX-512 F/BW/VL and the kernel granted this process the tile-data state
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)).
//
// Standard headers come before the target pragma, so none of their inline code is compiled for
// AVX-512/AMX (the linker could otherwise hand such a copy to a baseline caller). Everything inside
// the pragma has internal linkage and instantiates no standard-library template.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "gemm.h"
#include "quant.h"

// GCC >= 11 (AMX target support); clang ignores "#pragma GCC target", so it gets no AMX table.
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 11
#define KT_HAVE_AMX_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,amx-tile,amx-bf16,amx-int8")
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
#include "gemm_amx.inc"
#include "quant_amx.inc"
// The exported function below is baseline code: it may be called on any CPU.
#pragma GCC pop_options
#endif

namespace kt {

const KernelsBf16* amx_kernels() {
#ifdef KT_HAVE_AMX_BUILD
  static const KernelsBf16 kernels = amx_table("amx");
  return &kernels;
#else
  return nullptr;
#endif
}

const DequantKernels* amx_int8_dequant(const DequantKernels& base) {
#ifdef KT_HAVE_AMX_BUILD
  static const DequantKernels kernels = with_int8_tiles(base);
  return &kernels;
#else
  (void)base;
  return nullptr;
#endif
}

}  // namespace kt
