// "avx512-bf16-emu": the AVX512_BF16 kernel source (gemm_avx512.inc) compiled a second time, for
// baseline x86-64, with the AVX-512 intrinsics on SIMDe (portable C; gemm_simde.h adds the few that
// SIMDe lacks). It runs on any CPU and exists so that the Python suite exercises the avx512-bf16 code
// paths (bf16 rounding of the activations, the nn repack, tails) where no AVX-512 hardware is at hand;
// it is slow and never chosen by "auto". Built only where the SIMDe headers are installed (Debian /
// Ubuntu: libsimde-dev); otherwise the table is absent and the ISA unavailable.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "gemm.h"

#if defined(__has_include)
#if __has_include(<simde/x86/avx512.h>)
#define KT_HAVE_AVX512_EMU_BUILD 1
#endif
#endif

#ifdef KT_HAVE_AVX512_EMU_BUILD
// SIMDe passes its 512-bit structs by value between internal functions; GCC notes that their ABI
// would differ from AVX-512 code, which never calls them.
#pragma GCC diagnostic ignored "-Wpsabi"
#include "gemm_simde.h"

#include "kernel_local.h"
#define KT_VEC_BYTES 16
#include "kernel_common.inc"
#include "gemm_repack.inc"
#define KT_AVX512_PART 1
#include "gemm_avx512.inc"
#undef KT_AVX512_PART
#define KT_AVX512_PART 2
#include "gemm_avx512.inc"
#undef KT_AVX512_PART
#endif

namespace kt {

const KernelsBf16* avx512bf16_emu_kernels() {
#ifdef KT_HAVE_AVX512_EMU_BUILD
  static const KernelsBf16 kernels = avx512bf16_table("avx512-bf16-emu");
  return &kernels;
#else
  return nullptr;
#endif
}

}  // namespace kt
