// Portable kernels: plain loops over the panel layouts. They define the layouts for every other ISA
// and are the only kernels that run in float64 (gradcheck).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "gemm.h"
#include "kernel_local.h"
#define KT_VEC_BYTES 16
#define KT_SCALAR_EXP 1
#include "kernel_common.inc"
#define KT_REPACK_SCALAR 1
#include "gemm_repack.inc"

namespace kt {
namespace {

template <typename T>
void gemm_w_ref(const T* a, int64_t lda, int m, int K, const uint16_t* w, int64_t panel_stride, int np, T* c,
                int64_t ldc, bool accumulate) {
  for (int i = 0; i < m; ++i) {
    const T* row = a + i * lda;
    for (int p = 0; p < np; ++p) {
      const uint16_t* panel = w + p * panel_stride;
      for (int col = 0; col < kPanelRows; ++col) {
        T acc = accumulate ? c[i * ldc + p * kPanelRows + col] : T(0);
        for (int k = 0; k < K; ++k)
          acc += row[k] * static_cast<T>(bf16_value(panel[(k / 2) * 2 * kPanelRows + col * 2 + (k & 1)]));
        c[i * ldc + p * kPanelRows + col] = acc;
      }
    }
  }
}

template <typename T>
void gemm_a_ref(const T* a, int64_t lda, int m, int K, const T* b, int64_t panel_stride, int np, T* c, int64_t ldc,
                bool accumulate) {
  for (int i = 0; i < m; ++i) {
    const T* row = a + i * lda;
    for (int p = 0; p < np; ++p) {
      const T* panel = b + p * panel_stride;
      for (int col = 0; col < kPanelRows; ++col) {
        T acc = accumulate ? c[i * ldc + p * kPanelRows + col] : T(0);
        for (int k = 0; k < K; ++k) acc += row[k] * panel[k * kPanelRows + col];
        c[i * ldc + p * kPanelRows + col] = acc;
      }
    }
  }
}

template <typename T>
constexpr Kernels<T, T> ref_table() {
  return {gemm_w_then_extra<T, T, gemm_w_ref<T>, gemm_a_ref<T>>,
          gemm_a_ref<T>,
          gemm_a_exact_common<T, T>,
          gemm_nn_repacked<T, T, gemm_w_then_extra<T, T, gemm_w_ref<T>, gemm_a_ref<T>>, repack_nn>,
          repack_nn,
          to_act_common<T, T>,
          bf16_to_act_common<T>,
          to_act_residual_common<T, T>,
          pack_rows_common<T>,
          pack_cols_common<T>,
          pack_rows_split_common<T, T>,
          pack_cols_split_common<T, T>,
          glu_forward_common<T>,
          glu_backward_common<T>,
          contract_common<T>,
          rank1_common<T>,
          outer_sum_common<T>,
          "ref"};
}

}  // namespace

const KernelsF32& ref_kernels_f32() {
  static const KernelsF32 kernels = ref_table<float>();
  return kernels;
}

const KernelsF64& ref_kernels_f64() {
  static const KernelsF64 kernels = ref_table<double>();
  return kernels;
}

}  // namespace kt
