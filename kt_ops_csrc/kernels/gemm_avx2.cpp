// AVX2 + FMA kernels. The target pragma (rather than a global -mavx2) keeps the rest of the
// extension runnable on any x86-64 CPU. Everything here has internal linkage and no standard-library
// template is instantiated, so the linker cannot hand AVX2 code to a baseline caller; only
// avx2_kernels_f32() is exported, and it is called only after cpuid reported AVX2 and FMA.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "gemm.h"
#include "kernel_local.h"
#define KT_VEC_BYTES 32
#include "kernel_common.inc"
#define KT_REPACK_AVX2
#include "gemm_repack.inc"
#undef KT_REPACK_AVX2
#define KT_NN_FEW_DPBF16 0
#define KT_NN_FEW_ZMM 0
#include "gemm_nn_few.inc"
#undef KT_NN_FEW_ZMM
#undef KT_NN_FEW_DPBF16

namespace kt {
namespace {

// Rows of A per register block (6 rows x 16 columns = 12 accumulators) and the K slice whose
// 16-column panel stays in L1 while all row blocks pass over it.
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

// Accumulators are named variables rather than an array: GCC keeps arrays of vectors on the stack
// and reloads them every iteration, which halves the FMA rate.
#define KT_ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define KT_DECLARE(i)                                              \
  __m256 lo##i = _mm256_setzero_ps(), hi##i = _mm256_setzero_ps(); \
  const float* a##i = a + (i < MR ? i : 0) * lda;                  \
  if (i < MR && accumulate) {                                      \
    lo##i = _mm256_loadu_ps(c + i * ldc);                          \
    hi##i = _mm256_loadu_ps(c + i * ldc + 8);                      \
  }
#define KT_FMA(i, kk)                                \
  if (i < MR) {                                      \
    const __m256 x = _mm256_broadcast_ss(a##i + kk); \
    lo##i = _mm256_fmadd_ps(x, w_lo, lo##i);         \
    hi##i = _mm256_fmadd_ps(x, w_hi, hi##i);         \
  }
#define KT_STORE(i)                           \
  if (i < MR) {                               \
    _mm256_storeu_ps(c + i * ldc, lo##i);     \
    _mm256_storeu_ps(c + i * ldc + 8, hi##i); \
  }

// Weight panel: MR rows x 16 columns over k in [k_begin, k_end) (k_begin even).
template <int MR>
void w_block(const float* a, int64_t lda, int k_begin, int k_end, const uint16_t* panel, float* c, int64_t ldc,
             bool accumulate) {
  KT_ROWS6(KT_DECLARE)
  // An odd k_end (odd K) leaves a last pair whose odd half is padding.
  for (int k = k_begin; k < k_end; k += 2) {
    const uint16_t* pair = panel + static_cast<int64_t>(k / 2) * 2 * kPanelRows;
    // One k pair of a panel is one 64-byte line; fetching 16 lines ahead keeps the weight stream
    // (the bound at decode, where each line feeds only a few FMAs) ahead of the loads.
    _mm_prefetch(reinterpret_cast<const char*>(pair + kPrefetchPairs * 2 * kPanelRows), _MM_HINT_T0);
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
  }
  KT_ROWS6(KT_STORE)
}

// Activation panel ([K][16] fp32): MR rows x 16 columns over k in [k_begin, k_end).
template <int MR>
void a_block(const float* a, int64_t lda, int k_begin, int k_end, const float* panel, float* c, int64_t ldc,
             bool accumulate) {
  KT_ROWS6(KT_DECLARE)
  for (int k = k_begin; k < k_end; ++k) {
    const float* row = panel + static_cast<int64_t>(k) * kPanelRows;
    const __m256 w_lo = _mm256_loadu_ps(row), w_hi = _mm256_loadu_ps(row + 8);
#define KT_FMA_K(i) KT_FMA(i, k)
    KT_ROWS6(KT_FMA_K)
#undef KT_FMA_K
  }
  KT_ROWS6(KT_STORE)
}

#undef KT_DECLARE
#undef KT_FMA
#undef KT_STORE

// C[i, 16 p + c] over panels p < np, the reduction in slices whose part of a panel stays in L1 while
// every row block passes over it. Block is w_block or a_block; P is the panel element type.
template <typename P, template <int> class Block>
void gemm_panels(const float* a, int64_t lda, int m, int K, const P* b, int64_t panel_stride, int np, float* c,
                 int64_t ldc, bool accumulate) {
  using Fn = void (*)(const float*, int64_t, int, int, const P*, float*, int64_t, bool);
  static constexpr Fn kRows[kNtRows + 1] = {nullptr,       Block<1>::run, Block<2>::run, Block<3>::run,
                                            Block<4>::run, Block<5>::run, Block<6>::run};
  if (K <= 0) {
    if (!accumulate)
      for (int p = 0; p < np; ++p) zero_rows(c + p * kPanelRows, m, kPanelRows, static_cast<int>(ldc));
    return;
  }
  for (int p = 0; p < np; ++p) {
    const P* panel = b + p * panel_stride;
    float* cp = c + p * kPanelRows;
    for (int k0 = 0; k0 < K; k0 += kNtDepth) {
      const int k1 = min_int(K, k0 + kNtDepth);
      const bool acc = accumulate || k0 > 0;
      for (int i = 0; i < m; i += kNtRows)
        kRows[min_int(kNtRows, m - i)](a + i * lda, lda, k0, k1, panel, cp + i * ldc, ldc, acc);
    }
  }
}

template <int MR>
struct WBlock {
  static void run(const float* a, int64_t lda, int k0, int k1, const uint16_t* p, float* c, int64_t ldc, bool acc) {
    w_block<MR>(a, lda, k0, k1, p, c, ldc, acc);
  }
};
template <int MR>
struct ABlock {
  static void run(const float* a, int64_t lda, int k0, int k1, const float* p, float* c, int64_t ldc, bool acc) {
    a_block<MR>(a, lda, k0, k1, p, c, ldc, acc);
  }
};

void gemm_w_avx2(const float* a, int64_t lda, int m, int K, const uint16_t* w, int64_t panel_stride, int np, float* c,
                 int64_t ldc, bool accumulate) {
  gemm_panels<uint16_t, WBlock>(a, lda, m, K, w, panel_stride, np, c, ldc, accumulate);
}

void gemm_a_avx2(const float* a, int64_t lda, int m, int K, const float* b, int64_t panel_stride, int np, float* c,
                 int64_t ldc, bool accumulate) {
  gemm_panels<float, ABlock>(a, lda, m, K, b, panel_stride, np, c, ldc, accumulate);
}

}  // namespace

const KernelsF32* avx2_kernels_f32() {
  static const KernelsF32 kernels{
      gemm_w_then_extra<float, float, gemm_w_avx2, gemm_a_avx2>,
      gemm_a_avx2,
      gemm_a_exact_common<float, float>,
      nn_few_fma::gemm_nn<
          4, gemm_nn_repacked<float, float, gemm_w_then_extra<float, float, gemm_w_avx2, gemm_a_avx2>, repack_nn>,
          gemm_a_avx2, 2>,
      repack_nn,
      to_act_common<float, float>,
      bf16_to_act_common<float>,
      to_act_residual_common<float, float>,
      pack_rows_bf16<float>,
      pack_cols_common<float>,
      pack_rows_split_common<float, float>,
      pack_cols_split_common<float, float>,
      glu_forward_common<float>,
      glu_backward_common<float>,
      contract_common<float>,
      rank1_common<float>,
      outer_sum_common<float>,
      "avx2"};
  return &kernels;
}

}  // namespace kt
