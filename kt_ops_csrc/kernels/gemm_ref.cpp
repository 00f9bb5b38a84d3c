// Portable kernels: plain loops over the packed layout. They define the packed-weight indexing for
// every other ISA and are the only kernels that run in float64 (gradcheck).
#include "gemm.h"

#include <cstring>

namespace kt {
namespace {

inline float bf16_to_float(uint16_t bits) {
  uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

// Offset of W[n, k] inside one expert's packed weight.
inline int64_t packed_index(int64_t n, int64_t k, int64_t K) {
  const int64_t panel = n / kPanelRows, row = n % kPanelRows;
  return ((panel * k_pairs(K) + k / 2) * kPanelRows + row) * 2 + k % 2;
}

template <typename T>
void gemm_nt_ref(const T* const* a_rows, int m, int K, const uint16_t* w, int p0, int np, T* c) {
  const int cols = np * kPanelRows;
  for (int i = 0; i < m; ++i) {
    const T* a = a_rows[i];
    for (int col = 0; col < cols; ++col) {
      const int64_t n = static_cast<int64_t>(p0) * kPanelRows + col;
      T acc = 0;
      for (int k = 0; k < K; ++k) acc += a[k] * static_cast<T>(bf16_to_float(w[packed_index(n, k, K)]));
      c[static_cast<int64_t>(i) * cols + col] = acc;
    }
  }
}

template <typename T>
void gemm_nn_ref(const T* const* a_rows, int m, int n_padded, const uint16_t* w, int K, int k0, int kc,
                 T* c, int ldc) {
  for (int i = 0; i < m; ++i) {
    const T* a = a_rows[i];
    for (int col = 0; col < kc; ++col) {
      T acc = 0;
      for (int n = 0; n < n_padded; ++n) acc += a[n] * static_cast<T>(bf16_to_float(w[packed_index(n, k0 + col, K)]));
      c[static_cast<int64_t>(i) * ldc + col] = acc;
    }
  }
}

template <typename T>
T dot_ref(const T* a, const T* b, int64_t n) {
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
void axpy_ref(T alpha, const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

const Kernels<float>& ref_kernels_f32() {
  static const Kernels<float> kernels{gemm_nt_ref<float>, gemm_nn_ref<float>, dot_ref<float>, axpy_ref<float>, "ref"};
  return kernels;
}

const Kernels<double>& ref_kernels_f64() {
  static const Kernels<double> kernels{gemm_nt_ref<double>, gemm_nn_ref<double>, dot_ref<double>, axpy_ref<double>, "ref"};
  return kernels;
}

}  // namespace kt
