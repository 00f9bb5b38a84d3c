// The ISA-specific primitives of the MoE op. Every product of the op, base weights and LoRA alike,
// is one shape: C[i, n] = sum_k A[i, k] B[n, k], with A the activation rows and B given as *panels*.
//
// Weight panels ("bf16" weight format, what pack_experts stores; the VNNI pair layout that
// AVX512_BF16 (vdpbf16ps) and AMX (tile B rows) consume directly): B [N, K] is cut into panels of 16
// rows (N padded with zero rows to a multiple of 16, K padded with a zero column to even). Panel p
// stores, for each k pair kp, 16 x 2 bf16 values: element (i, h) is B[16p + i, 2kp + h]. With AVX2,
// one 256-bit load covers 8 rows x 2 k and widens to fp32 with one shift (even k) or one mask (odd
// k); the 64 bytes of one pair are exactly one AMX tile row.
//
// Activation type Act: what an ISA multiplies the weights with.
//   * rounding ISAs (AMX, AVX512_BF16 and their emulations): bf16 bits (uint16_t), fp32 values
//     rounded to nearest even once, when the activation rows are written;
//   * fp32 / fp64 ISAs (ref, AVX2, AVX-512 F): T itself, exact.
// Activation panels: a matrix the op builds (LoRA matrices, and activations as the B operand of the
// LoRA gradients) in the ISA's Act: with Act = bf16 the weight-panel layout itself ([kp][16][2]);
// with Act = T, [K][16] (no pairs).
//
// Padding rules every caller keeps (they let the AMX tiles read whole 16 x 32 blocks):
//   * A rows have an even lda >= act_stride(K) elements (pairs of bf16 are read as one 32-bit
//     unit), zero in [K, act_stride(K)), and rows up to round_up(m, 16) can be read (their contents
//     do not matter: those C rows are dropped);
//   * C has room for round_up(m, 16) rows of ldc (rows >= m may be overwritten);
//   * a panel holds k_pairs(K) pairs (weights) or act_pairs(K) pairs (activation panels, zero
//     beyond K); the kernels never read past a panel's last pair.
//
// This header is included by translation units compiled with different -m flags: it must stay free
// of inline code with external linkage (an inline function compiled with AVX2 could be picked by the
// linker for a baseline caller).
#pragma once
#include <cstdint>

#include "quant.h"

namespace kt {

constexpr int kPanelRows = 16;
constexpr int kActAlign = 32;  // A rows: elements per AMX tile row (64 bytes of bf16)
constexpr int kRowAlign = 16;  // A and C rows: rows per AMX tile

static constexpr int64_t padded_rows(int64_t n) { return (n + kPanelRows - 1) / kPanelRows * kPanelRows; }
static constexpr int64_t k_pairs(int64_t k) { return (k + 1) / 2; }
static constexpr int64_t act_stride(int64_t k) { return (k + kActAlign - 1) / kActAlign * kActAlign; }
static constexpr int64_t row_capacity(int64_t m) { return (m + kRowAlign - 1) / kRowAlign * kRowAlign; }

// The gated activation of the expert MLP, elementwise over one row segment. Silu: h = silu(g) * u.
// Clamped (gpt-oss' SwiGLU, DeepSeek-V4's clamped SiLU): g' = min(g, limit), u' = clamp(u, -limit,
// limit), h = (u' + up_offset) * g' * sigmoid(alpha * g'). A clamped value passes no gradient
// (torch.clamp's rule: the bounds themselves pass it).
template <typename T>
struct Glu {
  bool clamped;
  T alpha, up_offset, limit;
};

// What a weight GEMM does besides C = A . W^T:
//   * up to three products with activation panels added to C before it is stored:
//     C += sum_i A_i . B_i^T, each over the same K (the LoRA expansions: split bf16 uses two or
//     three); A_i: m rows, lda apart; B_i: panels (the GEMM's first panel at b[i]) panel_stride apart;
//   * a prefetch of memory the caller reads next (the next weight block of the backward), spread
//     over the GEMM's work so that its DRAM reads overlap the products: `prefetch_lines` 64-byte
//     lines at prefetch + i * prefetch_stride + 64 j (i < prefetch_rows, j < prefetch_lines), into
//     L2. A hint: kernels may ignore it.
template <typename Act>
struct ExtraProducts {
  int count = 0;
  int K = 0;
  int64_t lda = 0, panel_stride = 0;
  const Act* a[3] = {};
  const Act* b[3] = {};
  const char* prefetch = nullptr;
  int64_t prefetch_stride = 0;
  int prefetch_rows = 0, prefetch_lines = 0;
};

// W [n_padded x K] as gemm_nn reads it: bf16 weight panels (k_pairs(K) = kp pairs each), or a
// quantized format's codes (quant.h), which the kernel dequantizes a panel's few wanted pairs at a
// time as it reaches them, with `dequant`: the bf16 values never take a pass of their own through
// memory. Either gives the same bits as the other on the same values.
struct NnWeights {
  const uint16_t* panels = nullptr;  // bf16; nullptr: codes
  int64_t kp = 0;
  QuantMatrix codes{};
  void (*dequant)(const QuantMatrix& w, int64_t p0, int64_t np, int64_t kp0, int64_t nkp, uint16_t* out) = nullptr;
};

template <typename T, typename Act>
struct Kernels {
  using act_type = Act;
  // C[i, 16 p + c] (+)= sum_k A[i][k] W_p[c][k] (+ the extra products) for i < m, panels p < np (at
  // w + p * panel_stride uint16 elements), c < 16; C is [m, ldc] (accumulate: added to what C holds).
  void (*gemm_w)(const Act* a, int64_t lda, int m, int K, const uint16_t* w, int64_t panel_stride, int np, T* c,
                 int64_t ldc, bool accumulate, const ExtraProducts<Act>* extra);
  // The same with activation panels (b at b + p * panel_stride Act elements).
  void (*gemm_a)(const Act* a, int64_t lda, int m, int K, const Act* b, int64_t panel_stride, int np, T* c, int64_t ldc,
                 bool accumulate);
  // C[i, 16 p + c] += sum_(k < K) V[i][k] (hi_p[c][k] + lo_p[c][k]) for i < m, p < np, c < 16:
  // exact T rows V (ldv apart) times activation panels B = hi + lo (lo may be null: a split bf16 B,
  // or one exact in Act), summed in T, then added to C. The LoRA products of the few rows that go on
  // the codes (decode: the expansions, and h . Ad^T): exact, and without the 16-row tiles that gemm_a
  // spends on each row.
  void (*gemm_a_exact)(const T* v, int64_t ldv, int m, int K, const Act* hi, const Act* lo, int64_t panel_stride,
                       int np, T* c, int64_t ldc);
  // C[i, c] (+)= sum_n A[i][n] W[n, col0 + c] (+ the extra products) for i < m, c < 16 np, with
  // 16 np >= ncols: the product that reduces over W's rows n (the backward's dY . Wd, dG . Wg), A rows
  // of n_padded values. Columns from ncols on see zero weights. A row's result does not depend on m,
  // bit for bit (data-parallel training compares half batches with whole ones).
  void (*gemm_nn)(const Act* a, int64_t lda, int m, int n_padded, const NnWeights& w, int col0, int ncols, T* c,
                  int64_t ldc, bool accumulate, const ExtraProducts<Act>* extra);
  // Weight panels of W^T for gemm_nn-shaped products (the reduction over W's rows n): columns
  // [col0, col0 + ncols) (col0 even) of W [n_padded x K], transposed, as ceil(ncols / 16) panels
  // panel_stride apart: row j of panel b holds (W[2j, c], W[2j + 1, c]) for its 16 columns
  // c = col0 + 16 b + ... (zero beyond ncols), n pairs j < n_padded / 2; pairs [n_padded / 2,
  // total_pairs) are zero.
  void (*repack_nn)(const NnWeights& w, int n_padded, int total_pairs, int col0, int ncols, uint16_t* dst,
                    int64_t panel_stride);
  // dst[0, n) = act(src[0, n)), dst[n, n_padded) = 0; from T or from bf16 bits.
  void (*to_act)(const T* src, int64_t n, Act* dst, int64_t n_padded);
  void (*bf16_to_act)(const uint16_t* src, int64_t n, Act* dst, int64_t n_padded);
  // dst[0, n) = act(src - act(src)): what rounding to the activation type left out (zero for exact
  // types; with bf16, the lo of a split hi + lo), dst[n, n_padded) = 0.
  void (*to_act_residual)(const T* src, int64_t n, Act* dst, int64_t n_padded);
  // Activation panels of a bf16 matrix B [N, K] given row-major as its bits (row n at src + n * lds):
  // ceil(N / 16) panels of act_pairs(K) pairs each, panel_stride elements apart, zero beyond N and K;
  // the values widened (exactly) where Act is wider than bf16 (the bf16 LoRA matrices' slices).
  void (*pack_rows)(const uint16_t* src, int64_t lds, int N, int K, Act* dst, int64_t panel_stride);
  // The same panels of B given as B^T row-major: src [K rows][N columns] (row k at src + k * lds).
  void (*pack_cols)(const uint16_t* src, int64_t lds, int K, int N, Act* dst, int64_t panel_stride);
  // pack_rows / pack_cols of T values: the panels of act(B) into hi and, where lo is not null, those
  // of act(B - act(B)) into lo (a split bf16 B = hi + lo; exact types have no lo).
  void (*pack_rows_split)(const T* src, int64_t lds, int N, int K, Act* hi, Act* lo, int64_t panel_stride);
  void (*pack_cols_split)(const T* src, int64_t lds, int K, int N, Act* hi, Act* lo, int64_t panel_stride);
  // h[0, n) = glu(g, u); g and u are the pre-activations (biases included).
  void (*glu_forward)(const T* g, const T* u, int64_t n, const Glu<T>& glu, T* h);
  // Backward through the activation for one row segment, dh_raw = dY . Wd (unweighted), w the
  // routing weight: h = glu(g, u), dg / du = w dh_raw dh/dg, dh/du; returns sum h * dh_raw (the
  // routing weight's gradient, over this segment).
  T (*glu_backward)(const T* g, const T* u, const T* dh_raw, T w, int64_t n, const Glu<T>& glu, T* h, T* dg, T* du);
  // out[q] = sum_(i < n) v[i] m[i * r + q] for q < r: a row segment contracted to the LoRA rank, in T
  // (the rank-r products of the intermediates h, dg and du stay exact on every ISA).
  void (*contract)(const T* v, int64_t n, const T* m, int64_t r, T* out);
  // acc[i * ny + j] += x[i] y[j]: one row's term of a LoRA gradient, accumulated in T.
  void (*rank1)(const T* x, int64_t nx, const T* y, int64_t ny, T* acc);
  // acc[i * ny + j] += sum_(t < m) x[t * ldx + i] y[t * ldy + j]: a LoRA gradient's terms over m rows
  // (X^T Y), accumulated in T in row order t, with blocks of acc held in registers.
  void (*outer_sum)(const T* x, int64_t ldx, int64_t nx, const T* y, int64_t ldy, int64_t ny, int64_t m, T* acc);
  const char* name;
};

// The pairs an activation panel holds for K: rounding ISAs read whole 32-element chunks.
static constexpr int64_t act_pairs(int64_t k) { return act_stride(k) / 2; }
// Elements of one activation panel of K (either Act: bf16 pairs [kp][16][2] or T [K][16] padded alike).
static constexpr int64_t act_panel_elems(int64_t k) { return act_stride(k) * kPanelRows; }

using KernelsF32 = Kernels<float, float>;
using KernelsBf16 = Kernels<float, uint16_t>;
using KernelsF64 = Kernels<double, double>;

// One table per ISA. The getters are baseline code, safe to call on any CPU; cpu.cpp uses a table
// only after cpuid reported its features. A pointer getter returns nullptr when its kernels are not
// compiled into this build.
// Portable loops; the only kernels in float64 (gradcheck).
const KernelsF32& ref_kernels_f32();
const KernelsF64& ref_kernels_f64();
// AVX2 + FMA: fp32 FMA on widened bf16 weights (exact fp32 activations).
const KernelsF32* avx2_kernels_f32();
// AVX-512 F/BW/VL: fp32 FMA on widened bf16 weights (exact fp32 activations).
const KernelsF32* avx512_kernels_f32();
// AVX-512 F/BW/VL + AVX512_BF16: vdpbf16ps, activations rounded to bf16 (fp32 accumulation).
const KernelsBf16* avx512bf16_kernels();
// AMX-BF16 tiles (+ AVX-512), activations rounded to bf16. Needs the XTILEDATA permission first.
const KernelsBf16* amx_kernels();
// The AMX kernel source on software tiles (kernels/amx_emu.h): any CPU, for testing. Never nullptr.
const KernelsBf16* amx_emu_kernels();
// The AVX512_BF16 kernel source on SIMDe: any CPU, for testing. nullptr when built without SIMDe.
const KernelsBf16* avx512bf16_emu_kernels();

}  // namespace kt
