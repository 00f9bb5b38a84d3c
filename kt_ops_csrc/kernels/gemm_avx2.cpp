// AVX2 + FMA kernels. The target pragma (rather than a global -mavx2) keeps the rest of the
// extension runnable on any x86-64 CPU. Everything here has internal linkage and no standard-library
// template is instantiated, so the linker cannot hand AVX2 code to a baseline caller; only
// avx2_kernels_f32() is exported, and it is called only after cpuid reported AVX2 and FMA.
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "gemm.h"

namespace kt {
namespace {

inline int min_int(int a, int b) { return a < b ? a : b; }

// Rows of A per register block (6 rows x 16 columns = 12 accumulators) and the K slice whose
// 16-column weight panel (8 KiB of bf16) stays in L1 while all row blocks pass over it.
constexpr int kNtRows = 6;
constexpr int kNtDepth = 256;

inline void widen_panel_row(const uint16_t* src, __m256& rows_lo, __m256& rows_hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  rows_lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  rows_hi = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <int MR>
inline void nt_block(const float* const* a, int k_begin, int k_end, const uint16_t* panel, float* c,
                     int ldc, bool accumulate) {
  __m256 acc_lo[MR], acc_hi[MR];
  for (int i = 0; i < MR; ++i) {
    acc_lo[i] = accumulate ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
    acc_hi[i] = accumulate ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
  }
  for (int k = k_begin; k < k_end; ++k) {
    __m256 w_lo, w_hi;
    widen_panel_row(panel + static_cast<int64_t>(k) * kPanelRows, w_lo, w_hi);
    for (int i = 0; i < MR; ++i) {
      const __m256 x = _mm256_broadcast_ss(a[i] + k);
      acc_lo[i] = _mm256_fmadd_ps(x, w_lo, acc_lo[i]);
      acc_hi[i] = _mm256_fmadd_ps(x, w_hi, acc_hi[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(c + i * ldc, acc_lo[i]);
    _mm256_storeu_ps(c + i * ldc + 8, acc_hi[i]);
  }
}

template <int MR>
void nt_rows(const float* const* a, int k_begin, int k_end, const uint16_t* panel, float* c, int ldc,
             bool accumulate) {
  nt_block<MR>(a, k_begin, k_end, panel, c, ldc, accumulate);
}

void gemm_nt_avx2(const float* const* a_rows, int m, int K, const uint16_t* w, int p0, int np, float* c) {
  using RowsFn = void (*)(const float* const*, int, int, const uint16_t*, float*, int, bool);
  static constexpr RowsFn kTail[kNtRows] = {nullptr, nt_rows<1>, nt_rows<2>, nt_rows<3>, nt_rows<4>, nt_rows<5>};
  const int ldc = np * kPanelRows;
  for (int p = 0; p < np; ++p) {
    const uint16_t* panel = w + static_cast<int64_t>(p0 + p) * K * kPanelRows;
    for (int k0 = 0; k0 < K; k0 += kNtDepth) {
      const int k1 = min_int(K, k0 + kNtDepth);
      const bool accumulate = k0 > 0;
      int i = 0;
      for (; i + kNtRows <= m; i += kNtRows)
        nt_block<kNtRows>(a_rows + i, k0, k1, panel, c + static_cast<int64_t>(i) * ldc + p * kPanelRows, ldc, accumulate);
      if (i < m) kTail[m - i](a_rows + i, k0, k1, panel, c + static_cast<int64_t>(i) * ldc + p * kPanelRows, ldc, accumulate);
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Dot-product form: for output column k the 16 weights of a panel are contiguous in n, so each
// accumulator holds 8 partial sums over n, reduced once per reduction chunk. A block of 4 rows x
// 2 columns (8 accumulators) reuses each A vector twice and each widened weight vector 4 times.
constexpr int kNnRows = 4;
constexpr int kNnCols = 2;
constexpr int kNnChunkPanels = 64;  // 1024 n: 4 rows of A (16 KiB fp32) stay in L1 across columns

template <int MR, int KR>
inline void nn_block(const float* const* a, int p_begin, int p_end, const uint16_t* w, int K, int k,
                     float* c, int ldc) {
  __m256 acc[MR][KR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < KR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int p = p_begin; p < p_end; ++p) {
    __m256 w_lo[KR], w_hi[KR];
    const uint16_t* src = w + (static_cast<int64_t>(p) * K + k) * kPanelRows;
    for (int j = 0; j < KR; ++j) widen_panel_row(src + j * kPanelRows, w_lo[j], w_hi[j]);
    for (int i = 0; i < MR; ++i) {
      const __m256 a_lo = _mm256_loadu_ps(a[i] + p * kPanelRows);
      const __m256 a_hi = _mm256_loadu_ps(a[i] + p * kPanelRows + 8);
      for (int j = 0; j < KR; ++j) {
        acc[i][j] = _mm256_fmadd_ps(a_lo, w_lo[j], acc[i][j]);
        acc[i][j] = _mm256_fmadd_ps(a_hi, w_hi[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < KR; ++j) c[i * ldc + j] += hsum(acc[i][j]);
}

template <int MR>
void nn_rows(const float* const* a, int p_begin, int p_end, const uint16_t* w, int K, int k0, int kc,
             float* c, int ldc) {
  int j = 0;
  for (; j + kNnCols <= kc; j += kNnCols) nn_block<MR, kNnCols>(a, p_begin, p_end, w, K, k0 + j, c + j, ldc);
  for (; j < kc; ++j) nn_block<MR, 1>(a, p_begin, p_end, w, K, k0 + j, c + j, ldc);
}

void gemm_nn_avx2(const float* const* a_rows, int m, int n_padded, const uint16_t* w, int K, int k0, int kc,
                  float* c, int ldc) {
  using RowsFn = void (*)(const float* const*, int, int, const uint16_t*, int, int, int, float*, int);
  static constexpr RowsFn kRows[kNnRows + 1] = {nullptr, nn_rows<1>, nn_rows<2>, nn_rows<3>, nn_rows<4>};
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < kc; ++j) c[static_cast<int64_t>(i) * ldc + j] = 0.0f;
  const int panels = n_padded / kPanelRows;
  for (int pc = 0; pc < panels; pc += kNnChunkPanels) {
    const int pe = min_int(panels, pc + kNnChunkPanels);
    for (int i = 0; i < m; i += kNnRows) {
      const int rows = min_int(kNnRows, m - i);
      kRows[rows](a_rows + i, pc, pe, w, K, k0, kc, c + static_cast<int64_t>(i) * ldc, ldc);
    }
  }
}

// Four independent accumulators hide the FMA latency of the reduction.
float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void axpy_avx2(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

const Kernels<float>* avx2_kernels_f32() {
  static const Kernels<float> kernels{gemm_nt_avx2, gemm_nn_avx2, dot_avx2, axpy_avx2, "avx2"};
  return &kernels;
}

}  // namespace kt
