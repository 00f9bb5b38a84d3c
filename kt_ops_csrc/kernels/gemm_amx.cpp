// AMX-BF16 kernels (Sapphire Rapids and later): gemm_nt and gemm_nn on tiles (gemm_amx.inc), dot and
// axpy from the AVX-512 kernels. Only amx_kernels_f32() is exported; cpu.cpp calls it, and selects
// the table, only after cpuid reported AMX-TILE, AMX-BF16 and AVX-512 F/BW/VL and the kernel granted
// this process the tile-data state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)).
//
// Standard headers come before the target pragma, so none of their inline code is compiled for
// AVX-512/AMX (the linker could otherwise hand such a copy to a baseline caller). Everything inside
// the pragma has internal linkage and instantiates no standard-library template.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "gemm.h"

// GCC >= 11 (AMX target support); clang ignores "#pragma GCC target", so it gets no AMX table.
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 11
#define KT_HAVE_AMX_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,amx-tile,amx-bf16")
// GCC 12 reports its own AVX-512 intrinsic headers ('__Y' may be used uninitialized, GCC bug
// 105593) at every inlined use; silence that for the header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "gemm_amx.inc"
// The exported function below is baseline code: it may be called on any CPU.
#pragma GCC pop_options
#endif

namespace kt {

const Kernels<float>* amx_kernels_f32() {
#ifdef KT_HAVE_AMX_BUILD
  const Kernels<float>* avx512 = avx512_kernels_f32();
  if (avx512 == nullptr) return nullptr;
  static const Kernels<float> kernels{gemm_nt_amx, gemm_nn_amx, avx512->dot, avx512->axpy, "amx"};
  return &kernels;
#else
  return nullptr;
#endif
}

}  // namespace kt
