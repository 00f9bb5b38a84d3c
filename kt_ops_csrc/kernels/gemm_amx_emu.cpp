// "amx-emu": the AMX kernel source (gemm_amx.inc) compiled a second time, for baseline x86-64,
// against the software tiles of amx_emu.h instead of the AMX instructions. It runs on any CPU and
// exists to test the AMX code paths (tile shapes, blocking, padding, the bf16 rounding of the
// activations, the gemm_nn repacking) where no AMX hardware is at hand; it is slow and never chosen
// by "auto". The only differences from the real build are the #ifndef KT_AMX_EMULATE blocks of
// gemm_amx.inc: AVX-512 versions of the fp32 -> bf16 conversion and of the 16-column repack, with
// scalar code computing the same bits here. dot and axpy are the portable reference ones.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "gemm.h"

#define KT_AMX_EMULATE 1
#include "amx_emu.h"
#include "gemm_amx.inc"

namespace kt {

const Kernels<float>* amx_emu_kernels_f32() {
  static const Kernels<float> kernels{gemm_nt_amx, gemm_nn_amx, ref_kernels_f32().dot, ref_kernels_f32().axpy,
                                      "amx-emu"};
  return &kernels;
}

}  // namespace kt
