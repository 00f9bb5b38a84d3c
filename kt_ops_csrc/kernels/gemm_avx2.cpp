// AVX2 + FMA kernels. The target pragma (rather than a global -mavx2) keeps the rest of the
// extension runnable on any x86-64 CPU. Everything here has internal linkage and no standard-library
// template is instantiated, so the linker cannot hand AVX2 code to a baseline caller; only
// avx2_kernels_f32() is exported, and it is called only after cpuid reported AVX2 and FMA.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "gemm.h"
#include "kernel_local.h"
#define KT_REPACK_AVX2
#include "gemm_repack.inc"
#undef KT_REPACK_AVX2

namespace kt {
namespace {

// Rows of A per register block (6 rows x 16 columns = 12 accumulators) and the K slice whose
// 16-column weight panel (8 KiB of bf16) stays in L1 while all row blocks pass over it.
constexpr int kNtRows = 6;
constexpr int kNtDepth = 256;
constexpr int kPrefetchPairs = 16;

// One 256-bit load of a panel's k pair covers 8 rows x (k, k+1); the even k is the low half of each
// 32-bit lane, the odd k the high half.
inline __m256 widen_even(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
inline __m256 widen_odd(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline __m256i load_pairs(const uint16_t* src) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Accumulators are named variables rather than an array: GCC keeps arrays of vectors on the stack
// and reloads them every iteration, which halves the FMA rate.
#define KT_ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)

template <int MR>
inline void nt_block(const float* const* a, int k_begin, int k_end, const uint16_t* panel, float* c,
                     int ldc, bool accumulate) {
#define KT_DECLARE(i)                                                                      \
  __m256 lo##i = _mm256_setzero_ps(), hi##i = _mm256_setzero_ps();                         \
  const float* a##i = a[i < MR ? i : 0];                                                   \
  if (i < MR && accumulate) {                                                              \
    lo##i = _mm256_loadu_ps(c + i * ldc);                                                  \
    hi##i = _mm256_loadu_ps(c + i * ldc + 8);                                              \
  }
  KT_ROWS6(KT_DECLARE)
#undef KT_DECLARE
  // k_begin is even; an odd k_end (odd K) leaves a last pair whose odd half is padding.
  for (int k = k_begin; k < k_end; k += 2) {
    const uint16_t* pair = panel + static_cast<int64_t>(k / 2) * 2 * kPanelRows;
    // One k pair of a panel is one 64-byte line; fetching 16 lines ahead keeps the weight stream
    // (the bound at decode, where each line feeds only a few FMAs) ahead of the loads.
    _mm_prefetch(reinterpret_cast<const char*>(pair + kPrefetchPairs * 2 * kPanelRows), _MM_HINT_T0);
#define KT_FMA(i, kk)                                      \
  if (i < MR) {                                            \
    const __m256 x = _mm256_broadcast_ss(a##i + kk);       \
    lo##i = _mm256_fmadd_ps(x, w_lo, lo##i);               \
    hi##i = _mm256_fmadd_ps(x, w_hi, hi##i);               \
  }
#define KT_FMA_EVEN(i) KT_FMA(i, k)
#define KT_FMA_ODD(i) KT_FMA(i, k + 1)
    {
      const __m256 w_lo = widen_even(load_pairs(pair)), w_hi = widen_even(load_pairs(pair + kPanelRows));
      KT_ROWS6(KT_FMA_EVEN)
    }
    if (k + 1 < k_end) {
      const __m256 w_lo = widen_odd(load_pairs(pair)), w_hi = widen_odd(load_pairs(pair + kPanelRows));
      KT_ROWS6(KT_FMA_ODD)
    }
#undef KT_FMA_ODD
#undef KT_FMA_EVEN
#undef KT_FMA
  }
#define KT_STORE(i)                             \
  if (i < MR) {                                 \
    _mm256_storeu_ps(c + i * ldc, lo##i);       \
    _mm256_storeu_ps(c + i * ldc + 8, hi##i);   \
  }
  KT_ROWS6(KT_STORE)
#undef KT_STORE
}

template <int MR>
void nt_rows(const float* const* a, int k_begin, int k_end, const uint16_t* panel, float* c, int ldc,
             bool accumulate) {
  nt_block<MR>(a, k_begin, k_end, panel, c, ldc, accumulate);
}

// C[i, 0..16) = A[i] . panel^T for rows i < m, the reduction [0, K) in slices whose part of the
// panel stays in L1 while every row block passes over it. A rows have K elements.
void nt_panel(const float* const* a_rows, int m, int K, const uint16_t* panel, float* c, int ldc) {
  using RowsFn = void (*)(const float* const*, int, int, const uint16_t*, float*, int, bool);
  static constexpr RowsFn kTail[kNtRows] = {nullptr, nt_rows<1>, nt_rows<2>, nt_rows<3>, nt_rows<4>, nt_rows<5>};
  for (int k0 = 0; k0 < K; k0 += kNtDepth) {
    const int k1 = min_int(K, k0 + kNtDepth);
    const bool accumulate = k0 > 0;
    int i = 0;
    for (; i + kNtRows <= m; i += kNtRows)
      nt_block<kNtRows>(a_rows + i, k0, k1, panel, c + static_cast<int64_t>(i) * ldc, ldc, accumulate);
    if (i < m) kTail[m - i](a_rows + i, k0, k1, panel, c + static_cast<int64_t>(i) * ldc, ldc, accumulate);
  }
}

void gemm_nt_avx2(const float* const* a_rows, int m, int K, const uint16_t* w, int p0, int np, float* c) {
  const int ldc = np * kPanelRows;
  for (int p = 0; p < np; ++p)
    nt_panel(a_rows, m, K, w + static_cast<int64_t>(p0 + p) * k_pairs(K) * 2 * kPanelRows, c + p * kPanelRows, ldc);
}

constexpr int kNnRows = 4;  // up to this many rows gemm_nn streams W once (nn_few)

// Few rows (the backward of a decode step): a dot-product form that walks each column pair down all
// panels loads with a stride of a whole panel (tens of KiB), which the prefetchers do not follow;
// with one row per expert nothing amortizes it. Here the weights are read in memory order: per panel
// the block's k pairs are consecutive 64-byte lines, and each line's widened halves are multiplied by
// the panel's 16 activations into per-(row, k pair) lane sums kept in L1, folded once at the end.
constexpr int kNnFewPairs = 32;  // k pairs per block: MR x 32 x 16 floats of lane sums (<= 8 KiB)

template <int MR>
void nn_few(const float* const* a, int panels, const uint16_t* w, int K, int k0, int kc, float* c, int ldc) {
  const int64_t Kp = k_pairs(K), line = 2 * kPanelRows;  // uint16 per pair-row
  alignas(32) float sums[MR][kNnFewPairs][16];
  for (int j0 = 0; j0 < kc; j0 += 2 * kNnFewPairs) {
    const int cols = min_int(kc - j0, 2 * kNnFewPairs), pairs = (cols + 1) / 2, kp0 = (k0 + j0) / 2;
    for (int i = 0; i < MR; ++i)
      for (int q = 0; q < pairs; ++q)
        for (int l = 0; l < 16; ++l) sums[i][q][l] = 0.0f;
    for (int p = 0; p < panels; ++p) {
      const uint16_t* block = w + (static_cast<int64_t>(p) * Kp + kp0) * line;
      __m256 g_lo[MR], g_hi[MR];
      for (int i = 0; i < MR; ++i) {
        g_lo[i] = _mm256_loadu_ps(a[i] + p * kPanelRows);
        g_hi[i] = _mm256_loadu_ps(a[i] + p * kPanelRows + 8);
      }
      for (int q = 0; q < pairs; ++q) {
        const uint16_t* pair = block + q * line;
        _mm_prefetch(reinterpret_cast<const char*>(pair + Kp * line), _MM_HINT_T0);  // the next panel
        const __m256i lo = load_pairs(pair), hi = load_pairs(pair + kPanelRows);
        const __m256 e_lo = widen_even(lo), e_hi = widen_even(hi), o_lo = widen_odd(lo), o_hi = widen_odd(hi);
        for (int i = 0; i < MR; ++i) {
          float* s = sums[i][q];
          _mm256_store_ps(s, _mm256_fmadd_ps(g_hi[i], e_hi, _mm256_fmadd_ps(g_lo[i], e_lo, _mm256_load_ps(s))));
          _mm256_store_ps(s + 8, _mm256_fmadd_ps(g_hi[i], o_hi, _mm256_fmadd_ps(g_lo[i], o_lo, _mm256_load_ps(s + 8))));
        }
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < cols; ++j)
        c[static_cast<int64_t>(i) * ldc + j0 + j] = hsum(_mm256_load_ps(sums[i][j / 2] + 8 * (j % 2)));
  }
}

// More rows: the wanted columns are repacked into transposed panels (gemm_repack.inc: n_padded x 16
// bf16 per 16 columns, 64 KiB at n = 2048, so a 64-column task's block stays in L2) and the nt
// micro-kernel runs on them: 12 FMAs per two widened weight loads, where the dot-product form
// (4 rows x 2 columns per pass over n) needed 8 activation loads per 16 FMAs plus a horizontal sum
// per output. The repack is one pass over the block; all m rows reuse it.
void nn_repacked(const float* const* a_rows, int m, int n_padded, const uint16_t* w, int K, int k0, int kc,
                 float* c, int ldc) {
  const int kp = n_padded / 2;  // n_padded is a multiple of 16
  const int np = (kc + kPanelRows - 1) / kPanelRows;
  const int64_t panel_elems = static_cast<int64_t>(kp) * kRepackPairElems;
  const size_t b_bytes = sizeof(uint16_t) * static_cast<size_t>(np) * panel_elems;  // a multiple of 64
  char* buffer = static_cast<char*>(scratch_bytes(b_bytes + sizeof(float) * kPanelRows * static_cast<size_t>(m)));
  uint16_t* panels = reinterpret_cast<uint16_t*>(buffer);
  float* last = reinterpret_cast<float*>(buffer + b_bytes);  // a partial last panel's 16 columns
  repack_nn_columns(w, K, n_padded, k0, kc, panels);
  for (int p = 0; p < np; ++p) {
    const int cols = min_int(kPanelRows, kc - p * kPanelRows);
    if (cols == kPanelRows) {
      nt_panel(a_rows, m, n_padded, panels + p * panel_elems, c + p * kPanelRows, ldc);
      continue;
    }
    nt_panel(a_rows, m, n_padded, panels + p * panel_elems, last, kPanelRows);
    for (int i = 0; i < m; ++i)
      std::memcpy(c + static_cast<int64_t>(i) * ldc + p * kPanelRows, last + i * kPanelRows, sizeof(float) * cols);
  }
}

void gemm_nn_avx2(const float* const* a_rows, int m, int n_padded, const uint16_t* w, int K, int k0, int kc,
                  float* c, int ldc) {
  using FewFn = void (*)(const float* const*, int, const uint16_t*, int, int, int, float*, int);
  static constexpr FewFn kFew[kNnRows + 1] = {nullptr, nn_few<1>, nn_few<2>, nn_few<3>, nn_few<4>};
  if (m <= 0 || kc <= 0) return;
  if (n_padded <= 0) return zero_rows(c, m, kc, ldc);
  if (m <= kNnRows) return kFew[m](a_rows, n_padded / kPanelRows, w, K, k0, kc, c, ldc);
  nn_repacked(a_rows, m, n_padded, w, K, k0, kc, c, ldc);
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
