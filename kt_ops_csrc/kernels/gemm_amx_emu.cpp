// "amx-emu": the AMX kernel source (gemm_amx.inc, quant_amx.inc) compiled a second time, for baseline x86-64,
// against the software tiles of amx_emu.h instead of the AMX instructions. It runs on any CPU and
// exists to test the AMX code paths (tile shapes, blocking, padding, accumulation into C, the tail
// chunk) where no AMX hardware is at hand; it is slow and never chosen by "auto". Besides the tiles,
// its table has the common conversions and activation at baseline width and the portable repack,
// which compute the same bits as the AVX-512 ones of the real table.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "gemm.h"
#include "quant.h"
#include "kernel_local.h"
#define KT_VEC_BYTES 16
#include "kernel_common.inc"
#define KT_REPACK_SCALAR 1
#include "gemm_repack.inc"

#define KT_AMX_EMULATE 1
#include "amx_emu.h"
#include "gemm_amx.inc"
#include "quant_amx.inc"

namespace kt {

const KernelsBf16* amx_emu_kernels() {
  static const KernelsBf16 kernels = amx_table("amx-emu");
  return &kernels;
}

const DequantKernels* amx_emu_int8_dequant(const DequantKernels& base) {
  static const DequantKernels kernels = with_int8_tiles(base);
  return &kernels;
}

}  // namespace kt
