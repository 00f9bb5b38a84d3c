// AVX-512 kernels, two tables:
//   avx512_kernels_f32()      AVX-512 F/BW/VL: fp32 FMA on bf16 weights widened to fp32. One 512-bit
//                             load of a panel's k pair covers all 16 rows x (k, k+1).
//   avx512bf16_kernels_f32()  + AVX512_BF16: vdpbf16ps on the pair layout as stored; the activations
//                             are rounded to bf16 (nearest even) first, accumulation stays fp32.
// cpu.cpp hands these out only after cpuid reported the features (and the OS the zmm state).
//
// The target pragmas (rather than global -m flags) keep the rest of the extension runnable on any
// x86-64 CPU. Standard headers come before them so none of their inline code is compiled for
// AVX-512; everything inside the pragmas has internal linkage and instantiates no standard-library
// template, so the linker cannot hand AVX-512 code to a baseline caller. The exported functions at
// the end are baseline code.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "gemm.h"

// GCC >= 10 (AVX512_BF16 target support); clang ignores "#pragma GCC target", so it gets no table.
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 10
#define KT_HAVE_AVX512_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
// GCC 12 reports its own AVX-512 intrinsic headers ('__Y' may be used uninitialized, GCC bug
// 105593) at every inlined use; silence that for the header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

namespace kt {
namespace {

inline int min_int(int a, int b) { return a < b ? a : b; }

// Elements of one panel's k pair: 16 rows x 2.
constexpr int kPairElems = 2 * kPanelRows;

// Even k is the low half of each 32-bit lane of a pair row, odd k the high half.
inline __m512 widen_even(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
inline __m512 widen_odd(__m512i pairs) {
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline __m512i load_pairs(const uint16_t* src) { return _mm512_loadu_si512(src); }
// Masks of the first `count` lanes (none for count <= 0).
inline __mmask16 tail_mask16(int64_t count) {
  if (count <= 0) return 0;
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}
inline __mmask32 tail_mask32(int64_t count) {
  if (count <= 0) return 0;
  return count >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << count) - 1);
}

// Grow-only per-thread scratch (pool threads live as long as the process).
struct ThreadScratch {
  void* data = nullptr;
  size_t bytes = 0;
  ~ThreadScratch() { std::free(data); }
};
thread_local ThreadScratch t_scratch;

void* scratch_bytes(size_t bytes) {
  ThreadScratch& s = t_scratch;
  if (s.bytes < bytes) {
    std::free(s.data);
    s.bytes = 0;
    s.data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (s.data == nullptr) throw std::bad_alloc();
    s.bytes = (bytes + 63) / 64 * 64;
  }
  return s.data;
}

// Accumulators are named variables rather than arrays (GCC keeps arrays of vectors in memory).
#define KT_ROWS8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define KT_ROWS4(X) X(0) X(1) X(2) X(3)
// The write-back of the fp32 (FMA) and bf16 (vdpbf16ps) blocks, which share their accumulator names:
// nt blocks store MR rows x NR 16-column vectors; nn blocks add the reduced lanes of KR columns.
#define KT_NT_STORE(i)                                                \
  if (i < MR) {                                                       \
    _mm512_storeu_ps(c + i * ldc, acc##i##0);                         \
    if (NR > 1) _mm512_storeu_ps(c + i * ldc + kPanelRows, acc##i##1); \
  }
#define KT_NN_STORE(i)                                                \
  if (i < MR) {                                                       \
    c[i * ldc] += _mm512_reduce_add_ps(acc##i##0);                    \
    if (KR >= 2) c[i * ldc + 1] += _mm512_reduce_add_ps(acc##i##1);   \
    if (KR == 4) {                                                    \
      c[i * ldc + 2] += _mm512_reduce_add_ps(acc##i##2);              \
      c[i * ldc + 3] += _mm512_reduce_add_ps(acc##i##3);              \
    }                                                                 \
  }

// ---------------------------------------------------------------------------------------------
// fp32 gemm_nt: a register block of MR rows x NR panels (8 x 2: 16 accumulators of 16 columns),
// over a K slice whose two panels (16 KiB of bf16) and 8 A rows (8 KiB) stay in L1.
constexpr int kNtRows = 8;
constexpr int kNtDepth = 256;

template <int MR, int NR>
void nt_block(const float* const* a, int k_begin, int k_end, const uint16_t* panel0, const uint16_t* panel1,
              float* c, int ldc, bool accumulate) {
  static_assert(MR >= 1 && MR <= kNtRows && (NR == 1 || NR == 2), "block shape");
#define KT_DECLARE(i)                                                  \
  __m512 acc##i##0 = _mm512_setzero_ps(), acc##i##1 = _mm512_setzero_ps(); \
  const float* a##i = a[i < MR ? i : 0];                               \
  if (i < MR && accumulate) {                                          \
    acc##i##0 = _mm512_loadu_ps(c + i * ldc);                          \
    if (NR > 1) acc##i##1 = _mm512_loadu_ps(c + i * ldc + kPanelRows); \
  }
  KT_ROWS8(KT_DECLARE)
#undef KT_DECLARE
#define KT_FMA(i, kk, w0, w1)                              \
  if (i < MR) {                                            \
    const __m512 x = _mm512_set1_ps(a##i[kk]);             \
    acc##i##0 = _mm512_fmadd_ps(x, w0, acc##i##0);         \
    if (NR > 1) acc##i##1 = _mm512_fmadd_ps(x, w1, acc##i##1); \
  }
#define KT_FMA_EVEN(i) KT_FMA(i, k, e0, e1)
#define KT_FMA_ODD(i) KT_FMA(i, k + 1, o0, o1)
  // k_begin is even; an odd k_end (odd K) leaves a last pair whose odd half is padding.
  int k = k_begin;
  for (; k + 1 < k_end; k += 2) {
    const int64_t off = static_cast<int64_t>(k / 2) * kPairElems;
    const __m512i p0 = load_pairs(panel0 + off);
    const __m512i p1 = NR > 1 ? load_pairs(panel1 + off) : _mm512_setzero_si512();
    const __m512 e0 = widen_even(p0), e1 = widen_even(p1);
    KT_ROWS8(KT_FMA_EVEN)
    const __m512 o0 = widen_odd(p0), o1 = widen_odd(p1);
    KT_ROWS8(KT_FMA_ODD)
  }
  if (k < k_end) {
    const int64_t off = static_cast<int64_t>(k / 2) * kPairElems;
    const __m512 e0 = widen_even(load_pairs(panel0 + off));
    const __m512 e1 = NR > 1 ? widen_even(load_pairs(panel1 + off)) : _mm512_setzero_ps();
    KT_ROWS8(KT_FMA_EVEN)
  }
#undef KT_FMA_ODD
#undef KT_FMA_EVEN
#undef KT_FMA
  KT_ROWS8(KT_NT_STORE)
}

using NtBlockFn = void (*)(const float* const*, int, int, const uint16_t*, const uint16_t*, float*, int, bool);
constexpr NtBlockFn kNtBlock[2][kNtRows] = {
    {nt_block<1, 1>, nt_block<2, 1>, nt_block<3, 1>, nt_block<4, 1>, nt_block<5, 1>, nt_block<6, 1>, nt_block<7, 1>,
     nt_block<8, 1>},
    {nt_block<1, 2>, nt_block<2, 2>, nt_block<3, 2>, nt_block<4, 2>, nt_block<5, 2>, nt_block<6, 2>, nt_block<7, 2>,
     nt_block<8, 2>}};

void zero_rows(float* c, int m, int cols, int ldc) {
  for (int i = 0; i < m; ++i) std::memset(c + static_cast<int64_t>(i) * ldc, 0, sizeof(float) * cols);
}

void gemm_nt_avx512(const float* const* a_rows, int m, int K, const uint16_t* w, int p0, int np, float* c) {
  const int ldc = np * kPanelRows;
  if (K <= 0) return zero_rows(c, m, ldc, ldc);
  const int64_t panel_elems = k_pairs(K) * kPairElems;
  for (int p = 0; p < np; p += 2) {
    const int nr = min_int(2, np - p);
    const uint16_t* panel0 = w + (p0 + p) * panel_elems;
    const uint16_t* panel1 = nr > 1 ? panel0 + panel_elems : panel0;
    for (int k0 = 0; k0 < K; k0 += kNtDepth) {
      const int k1 = min_int(K, k0 + kNtDepth);
      for (int i = 0; i < m; i += kNtRows)
        kNtBlock[nr - 1][min_int(kNtRows, m - i) - 1](a_rows + i, k0, k1, panel0, panel1,
                                                      c + static_cast<int64_t>(i) * ldc + p * kPanelRows, ldc, k0 > 0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 gemm_nn, dot-product form: for output column k the 16 weights of a panel are contiguous in n
// (one lane each), so an accumulator holds 16 partial sums over n, reduced once per chunk of panels.
// Block: 4 rows x 4 columns (two k pairs): 16 accumulators; each A vector is used 4 times, each
// widened weight vector 4 times.
constexpr int kNnRows = 4;
constexpr int kNnChunkPanels = 64;  // 1024 n: 4 rows of A (16 KiB fp32) stay in L1 across columns

template <int MR, int KR>
void nn_block(const float* const* a, int p_begin, int p_end, const uint16_t* w, int64_t panel_elems, int k, float* c,
              int ldc) {
  static_assert(MR >= 1 && MR <= kNnRows && (KR == 1 || KR == 2 || KR == 4), "block shape");
#define KT_DECLARE(i)                                                                               \
  __m512 acc##i##0 = _mm512_setzero_ps(), acc##i##1 = _mm512_setzero_ps(), acc##i##2 = _mm512_setzero_ps(), \
         acc##i##3 = _mm512_setzero_ps();                                                           \
  const float* a##i = a[i < MR ? i : 0];
  KT_ROWS4(KT_DECLARE)
#undef KT_DECLARE
  const uint16_t* col = w + static_cast<int64_t>(k / 2) * kPairElems;
  for (int p = p_begin; p < p_end; ++p) {
    const uint16_t* src = col + p * panel_elems;
    const __m512i v0 = load_pairs(src);
    const __m512i v1 = KR == 4 ? load_pairs(src + kPairElems) : _mm512_setzero_si512();
    const __m512 w0 = widen_even(v0);
    const __m512 w1 = KR >= 2 ? widen_odd(v0) : _mm512_setzero_ps();
    const __m512 w2 = KR == 4 ? widen_even(v1) : _mm512_setzero_ps();
    const __m512 w3 = KR == 4 ? widen_odd(v1) : _mm512_setzero_ps();
#define KT_FMA(i)                                                      \
  if (i < MR) {                                                        \
    const __m512 x = _mm512_loadu_ps(a##i + p * kPanelRows);           \
    acc##i##0 = _mm512_fmadd_ps(x, w0, acc##i##0);                     \
    if (KR >= 2) acc##i##1 = _mm512_fmadd_ps(x, w1, acc##i##1);        \
    if (KR == 4) {                                                     \
      acc##i##2 = _mm512_fmadd_ps(x, w2, acc##i##2);                   \
      acc##i##3 = _mm512_fmadd_ps(x, w3, acc##i##3);                   \
    }                                                                  \
  }
    KT_ROWS4(KT_FMA)
#undef KT_FMA
  }
  KT_ROWS4(KT_NN_STORE)
}

template <int MR>
void nn_rows(const float* const* a, int p_begin, int p_end, const uint16_t* w, int64_t panel_elems, int k0, int kc,
             float* c, int ldc) {
  int j = 0;
  for (; j + 4 <= kc; j += 4) nn_block<MR, 4>(a, p_begin, p_end, w, panel_elems, k0 + j, c + j, ldc);
  if (j + 2 <= kc) {
    nn_block<MR, 2>(a, p_begin, p_end, w, panel_elems, k0 + j, c + j, ldc);
    j += 2;
  }
  if (j < kc) nn_block<MR, 1>(a, p_begin, p_end, w, panel_elems, k0 + j, c + j, ldc);
}

using NnRowsFn = void (*)(const float* const*, int, int, const uint16_t*, int64_t, int, int, float*, int);
constexpr NnRowsFn kNnRowsFn[kNnRows] = {nn_rows<1>, nn_rows<2>, nn_rows<3>, nn_rows<4>};

void gemm_nn_avx512(const float* const* a_rows, int m, int n_padded, const uint16_t* w, int K, int k0, int kc,
                    float* c, int ldc) {
  zero_rows(c, m, kc, ldc);
  const int64_t panel_elems = k_pairs(K) * kPairElems;
  const int panels = n_padded / kPanelRows;
  for (int pc = 0; pc < panels; pc += kNnChunkPanels) {
    const int pe = min_int(panels, pc + kNnChunkPanels);
    for (int i = 0; i < m; i += kNnRows)
      kNnRowsFn[min_int(kNnRows, m - i) - 1](a_rows + i, pc, pe, w, panel_elems, k0, kc,
                                             c + static_cast<int64_t>(i) * ldc, ldc);
  }
}

// ---------------------------------------------------------------------------------------------
// dot / axpy (fp32; shared by both tables and by the AMX one). Masked loads handle the tails.
float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
         acc3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), acc3);
  }
  for (; i < n; i += 16) {
    const __mmask16 mask = tail_mask16(n - i);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + i), _mm512_maskz_loadu_ps(mask, b + i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
}

void axpy_avx512(float alpha, const float* x, float* y, int64_t n) {
  const __m512 a = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 mask = tail_mask16(n - i);
    _mm512_mask_storeu_ps(y + i, mask,
                          _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(mask, x + i), _mm512_maskz_loadu_ps(mask, y + i)));
  }
}

}  // namespace
}  // namespace kt

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4): vdpbf16ps. Lane j of the product adds
// a[2j] b[2j] + a[2j+1] b[2j+1]; the packed pair layout is exactly such pairs.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")

namespace kt {
namespace {

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// dst[0, n) = bf16(src[0, n)) (round to nearest even), dst[n, n_padded) = 0; n_padded is even.
void row_to_bf16(const float* src, int n, uint16_t* dst, int n_padded) {
  for (int i = 0; i < n_padded; i += 32) {
    const __m512 lo = _mm512_maskz_loadu_ps(tail_mask16(n - i), src + i);
    const __m512 hi = _mm512_maskz_loadu_ps(tail_mask16(n - i - 16), src + i + 16);
    const __m512i bf = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // elements 0-15 from lo, 16-31 from hi
    _mm512_mask_storeu_epi16(dst + i, tail_mask32(n_padded - i), bf);
  }
}

// bf16 gemm_nt: A rows as bf16 pairs (one 32-bit broadcast per row and k pair), B pair rows straight
// from the panels. Block 8 rows x 2 panels; the K slice keeps two panels' pairs (16 KiB) in L1.
constexpr int kBfNtRows = 8;
constexpr int kBfNtPairs = 128;

template <int MR, int NR>
void nt_bf16_block(const uint32_t* a, int lda, int kp_begin, int kp_end, const uint16_t* panel0,
                   const uint16_t* panel1, float* c, int ldc, bool accumulate) {
  static_assert(MR >= 1 && MR <= kBfNtRows && (NR == 1 || NR == 2), "block shape");
#define KT_DECLARE(i)                                                  \
  __m512 acc##i##0 = _mm512_setzero_ps(), acc##i##1 = _mm512_setzero_ps(); \
  const uint32_t* a##i = a + (i < MR ? i : 0) * static_cast<int64_t>(lda); \
  if (i < MR && accumulate) {                                          \
    acc##i##0 = _mm512_loadu_ps(c + i * ldc);                          \
    if (NR > 1) acc##i##1 = _mm512_loadu_ps(c + i * ldc + kPanelRows); \
  }
  KT_ROWS8(KT_DECLARE)
#undef KT_DECLARE
  for (int kp = kp_begin; kp < kp_end; ++kp) {
    const __m512bh b0 = as_bh(load_pairs(panel0 + static_cast<int64_t>(kp) * kPairElems));
    const __m512bh b1 = NR > 1 ? as_bh(load_pairs(panel1 + static_cast<int64_t>(kp) * kPairElems)) : b0;
#define KT_DP(i)                                                                  \
  if (i < MR) {                                                                   \
    const __m512bh x = as_bh(_mm512_set1_epi32(static_cast<int>(a##i[kp])));      \
    acc##i##0 = _mm512_dpbf16_ps(acc##i##0, b0, x);                               \
    if (NR > 1) acc##i##1 = _mm512_dpbf16_ps(acc##i##1, b1, x);                   \
  }
    KT_ROWS8(KT_DP)
#undef KT_DP
  }
  KT_ROWS8(KT_NT_STORE)
}

using NtBf16BlockFn = void (*)(const uint32_t*, int, int, int, const uint16_t*, const uint16_t*, float*, int, bool);
constexpr NtBf16BlockFn kNtBf16Block[2][kBfNtRows] = {
    {nt_bf16_block<1, 1>, nt_bf16_block<2, 1>, nt_bf16_block<3, 1>, nt_bf16_block<4, 1>, nt_bf16_block<5, 1>,
     nt_bf16_block<6, 1>, nt_bf16_block<7, 1>, nt_bf16_block<8, 1>},
    {nt_bf16_block<1, 2>, nt_bf16_block<2, 2>, nt_bf16_block<3, 2>, nt_bf16_block<4, 2>, nt_bf16_block<5, 2>,
     nt_bf16_block<6, 2>, nt_bf16_block<7, 2>, nt_bf16_block<8, 2>}};

void gemm_nt_avx512bf16(const float* const* a_rows, int m, int K, const uint16_t* w, int p0, int np, float* c) {
  const int ldc = np * kPanelRows;
  const int kp = static_cast<int>(k_pairs(K));
  if (kp == 0 || m <= 0) return zero_rows(c, m, ldc, ldc);
  // A rows as bf16, kp pairs each (an odd K gets a zero high half in its last pair).
  uint32_t* abuf = static_cast<uint32_t*>(scratch_bytes(sizeof(uint32_t) * static_cast<size_t>(m) * kp));
  for (int i = 0; i < m; ++i)
    row_to_bf16(a_rows[i], K, reinterpret_cast<uint16_t*>(abuf + static_cast<int64_t>(i) * kp), 2 * kp);
  const int64_t panel_elems = static_cast<int64_t>(kp) * kPairElems;
  for (int p = 0; p < np; p += 2) {
    const int nr = min_int(2, np - p);
    const uint16_t* panel0 = w + (p0 + p) * panel_elems;
    const uint16_t* panel1 = nr > 1 ? panel0 + panel_elems : panel0;
    for (int q0 = 0; q0 < kp; q0 += kBfNtPairs) {
      const int q1 = min_int(kp, q0 + kBfNtPairs);
      for (int i = 0; i < m; i += kBfNtRows)
        kNtBf16Block[nr - 1][min_int(kBfNtRows, m - i) - 1](abuf + static_cast<int64_t>(i) * kp, kp, q0, q1, panel0,
                                                             panel1, c + static_cast<int64_t>(i) * ldc + p * kPanelRows,
                                                             ldc, q0 > 0);
    }
  }
}

// bf16 gemm_nn, dot-product form over pairs of n: for output column k and 32 n (two panels), one
// vpermt2w gathers W[n, k] from the two pair rows into the order of A's bf16 row (lane j = n pair j),
// then vdpbf16ps adds 32 products per instruction. Block: 4 rows x 4 columns, 16 accumulators.
constexpr int kBfNnRows = 4;
constexpr int kBfNnChunk = 32;  // 32-n blocks per chunk (1024 n)

template <int MR, int KR>
void nn_bf16_block(const uint16_t* a, int lda, int q_begin, int q_end, int panels, const uint16_t* w,
                   int64_t panel_elems, int k, float* c, int ldc) {
  static_assert(MR >= 1 && MR <= kBfNnRows && (KR == 1 || KR == 2 || KR == 4), "block shape");
  // Word j of the result: element 2j of the first source for j < 16, element 2(j - 16) of the second
  // for j >= 16 (index bit 5 selects the source); +1 picks the odd column of the pair.
  const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32,
                                        30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
#define KT_DECLARE(i)                                                                               \
  __m512 acc##i##0 = _mm512_setzero_ps(), acc##i##1 = _mm512_setzero_ps(), acc##i##2 = _mm512_setzero_ps(), \
         acc##i##3 = _mm512_setzero_ps();                                                           \
  const uint16_t* a##i = a + (i < MR ? i : 0) * static_cast<int64_t>(lda);
  KT_ROWS4(KT_DECLARE)
#undef KT_DECLARE
  const uint16_t* col = w + static_cast<int64_t>(k / 2) * kPairElems;
  for (int q = q_begin; q < q_end; ++q) {
    const uint16_t* src = col + (2 * q) * panel_elems;
    const bool second = 2 * q + 1 < panels;
    const __m512i v0 = load_pairs(src);
    const __m512i v1 = second ? load_pairs(src + panel_elems) : _mm512_setzero_si512();
    const __m512bh w0 = as_bh(_mm512_permutex2var_epi16(v0, even, v1));
    const __m512bh w1 = KR >= 2 ? as_bh(_mm512_permutex2var_epi16(v0, odd, v1)) : w0;
    __m512bh w2 = w0, w3 = w0;
    if (KR == 4) {
      const __m512i u0 = load_pairs(src + kPairElems);
      const __m512i u1 = second ? load_pairs(src + panel_elems + kPairElems) : _mm512_setzero_si512();
      w2 = as_bh(_mm512_permutex2var_epi16(u0, even, u1));
      w3 = as_bh(_mm512_permutex2var_epi16(u0, odd, u1));
    }
#define KT_DP(i)                                                       \
  if (i < MR) {                                                        \
    const __m512bh x = as_bh(_mm512_loadu_si512(a##i + q * 32));       \
    acc##i##0 = _mm512_dpbf16_ps(acc##i##0, x, w0);                    \
    if (KR >= 2) acc##i##1 = _mm512_dpbf16_ps(acc##i##1, x, w1);       \
    if (KR == 4) {                                                     \
      acc##i##2 = _mm512_dpbf16_ps(acc##i##2, x, w2);                  \
      acc##i##3 = _mm512_dpbf16_ps(acc##i##3, x, w3);                  \
    }                                                                  \
  }
    KT_ROWS4(KT_DP)
#undef KT_DP
  }
  KT_ROWS4(KT_NN_STORE)
}

template <int MR>
void nn_bf16_rows(const uint16_t* a, int lda, int q_begin, int q_end, int panels, const uint16_t* w,
                  int64_t panel_elems, int k0, int kc, float* c, int ldc) {
  int j = 0;
  for (; j + 4 <= kc; j += 4) nn_bf16_block<MR, 4>(a, lda, q_begin, q_end, panels, w, panel_elems, k0 + j, c + j, ldc);
  if (j + 2 <= kc) {
    nn_bf16_block<MR, 2>(a, lda, q_begin, q_end, panels, w, panel_elems, k0 + j, c + j, ldc);
    j += 2;
  }
  if (j < kc) nn_bf16_block<MR, 1>(a, lda, q_begin, q_end, panels, w, panel_elems, k0 + j, c + j, ldc);
}

using NnBf16RowsFn = void (*)(const uint16_t*, int, int, int, int, const uint16_t*, int64_t, int, int, float*, int);
constexpr NnBf16RowsFn kNnBf16Rows[kBfNnRows] = {nn_bf16_rows<1>, nn_bf16_rows<2>, nn_bf16_rows<3>, nn_bf16_rows<4>};

void gemm_nn_avx512bf16(const float* const* a_rows, int m, int n_padded, const uint16_t* w, int K, int k0, int kc,
                        float* c, int ldc) {
  zero_rows(c, m, kc, ldc);
  if (m <= 0 || n_padded <= 0 || kc <= 0) return;
  const int blocks = (n_padded + 31) / 32;
  const int lda = blocks * 32;
  uint16_t* abuf = static_cast<uint16_t*>(scratch_bytes(sizeof(uint16_t) * static_cast<size_t>(m) * lda));
  for (int i = 0; i < m; ++i) row_to_bf16(a_rows[i], n_padded, abuf + static_cast<int64_t>(i) * lda, lda);
  const int64_t panel_elems = k_pairs(K) * kPairElems;
  const int panels = n_padded / kPanelRows;
  for (int qc = 0; qc < blocks; qc += kBfNnChunk) {
    const int qe = min_int(blocks, qc + kBfNnChunk);
    for (int i = 0; i < m; i += kBfNnRows)
      kNnBf16Rows[min_int(kBfNnRows, m - i) - 1](abuf + static_cast<int64_t>(i) * lda, lda, qc, qe, panels, w,
                                                 panel_elems, k0, kc, c + static_cast<int64_t>(i) * ldc, ldc);
  }
}

#undef KT_ROWS8
#undef KT_ROWS4
#undef KT_NT_STORE
#undef KT_NN_STORE

}  // namespace
}  // namespace kt

#pragma GCC pop_options
#endif  // KT_HAVE_AVX512_BUILD

namespace kt {

const Kernels<float>* avx512_kernels_f32() {
#ifdef KT_HAVE_AVX512_BUILD
  static const Kernels<float> kernels{gemm_nt_avx512, gemm_nn_avx512, dot_avx512, axpy_avx512, "avx512"};
  return &kernels;
#else
  return nullptr;
#endif
}

const Kernels<float>* avx512bf16_kernels_f32() {
#ifdef KT_HAVE_AVX512_BUILD
  static const Kernels<float> kernels{gemm_nt_avx512bf16, gemm_nn_avx512bf16, dot_avx512, axpy_avx512, "avx512-bf16"};
  return &kernels;
#else
  return nullptr;
#endif
}

}  // namespace kt
