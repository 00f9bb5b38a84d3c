// Kernel-level check of the kernel tables (kernels/gemm.h) against float64 sums: gemm_w (with and
// without accumulation and extra products) and gemm_a on random and edge shapes (m, K, N not
// multiples of the tile sizes, odd K, panel subsets), NaN rows and Inf weights staying in their row /
// column; the panel packers of bf16 matrices (pack_rows and pack_cols must agree bit for bit, and
// with the layout, widened where the activations are fp32),
// repack_nn, gemm_nn (and its batch invariance, bit for bit), the activation conversions (rounding to
// nearest even, the split residual), the gated activation and the rank-r contraction / rank-1 update.
// Every buffer is allocated at the size the interface promises (A and C rows up to row_capacity(m),
// panels of their documented length), so AddressSanitizer sees any access outside it. Rounding tables
// are fed bf16 activations, so their products are checked at the same tight bar as the exact ones.
// Built and run by run.sh.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gemm.h"

using namespace kt;
static std::mt19937_64 rng(12345);
static float randn() {
  static std::normal_distribution<float> d;
  return d(rng);
}
static int rint_(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }
static int failures = 0;

static uint16_t bits16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b >> 16;
}
static float bf16_round(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) {
    b |= 0x400000u;
    b &= 0xFFFF0000u;
  } else {
    b += 0x7FFFu + ((b >> 16) & 1u);
    b &= 0xFFFF0000u;
  }
  float r;
  std::memcpy(&r, &b, 4);
  return r;
}
static float value_of(float x) { return x; }
static float value_of(uint16_t bits) {
  uint32_t w = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
template <typename Act>
static Act act_of(float x);
template <>
float act_of<float>(float x) {
  return x;
}
template <>
uint16_t act_of<uint16_t>(float x) {
  return bits16(bf16_round(x));
}

template <typename Act>
struct Table {
  std::string name;
  const Kernels<float, Act>* k;
};

// Allocations of exactly `n` elements (at least one), so ASan sees reads past them.
template <typename U>
static U* exact(size_t n) {
  return static_cast<U*>(std::calloc(n ? n : 1, sizeof(U)));
}

static void check(const std::string& table, const char* what, double got, double exp, double scale, const char* ctx) {
  const double tol = 3e-5 * scale + 1e-30;
  const bool ok =
      (std::isnan(exp) && std::isnan(got)) || (std::isinf(exp) && got == exp) || std::fabs(got - exp) <= tol;
  if (!ok && failures++ < 20)
    std::printf("FAIL %s %s %s: got %.9g expected %.9g (tol %.3g)\n", table.c_str(), what, ctx, got, exp, tol);
}

struct Weights {  // W [N, K] in bf16, packed as weight panels at its exact size
  int N, K;
  std::vector<float> w;
  uint16_t* packed;
  size_t elems;
  Weights(int N_, int K_) : N(N_), K(K_), w(size_t(N_) * K_) {
    for (auto& x : w) x = bf16_round(randn() * 0.5f);
    elems = size_t(padded_rows(N)) * k_pairs(K) * 2;
    packed = exact<uint16_t>(elems);
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k)
        packed[((n / 16 * k_pairs(K) + k / 2) * 16 + n % 16) * 2 + k % 2] = bits16(w[size_t(n) * K + k]);
  }
  ~Weights() { std::free(packed); }
  float at(int n, int k) const { return n < N && k < K ? w[size_t(n) * K + k] : 0.0f; }
  NnWeights nn() const {
    NnWeights nw;
    nw.panels = packed;
    nw.kp = k_pairs(K);
    return nw;
  }
};

template <typename Act>
struct Rows {  // m activation rows of K values, lda apart, readable to row_capacity(m)
  int m, K;
  int64_t lda;
  Act* a;
  Rows(int m_, int K_, int pad) : m(m_), K(K_), lda(act_stride(K_) + pad) {
    a = exact<Act>(size_t(row_capacity(m)) * lda);
    for (int i = 0; i < m; ++i)
      for (int k = 0; k < K; ++k) a[i * lda + k] = act_of<Act>(randn());
  }
  ~Rows() { std::free(a); }
  double at(int i, int k) const { return value_of(a[i * lda + k]); }
};

template <typename Act>
struct Panels {  // B [N, K] (bf16 bits) and its activation panels from the table's pack_rows
  int N, K;
  std::vector<uint16_t> b;
  Act* p;
  int64_t stride;
  Panels(const Kernels<float, Act>* k, int N_, int K_) : N(N_), K(K_), b(size_t(N_) * K_), stride(act_panel_elems(K_)) {
    for (auto& x : b) x = act_of<uint16_t>(randn());
    p = exact<Act>(size_t((N + 15) / 16) * stride);
    k->pack_rows(b.data(), K, N, K, p, stride);
  }
  ~Panels() { std::free(p); }
  double at(int n, int kk) const { return n < N && kk < K ? value_of(b[size_t(n) * K + kk]) : 0.0; }
};

// A random prefetch hint over `base` for a GEMM's extras (kernels may ignore it; it must not change C).
template <typename Act>
static void draw_prefetch(ExtraProducts<Act>& extra, const void* base) {
  extra.prefetch = static_cast<const char*>(base);
  extra.prefetch_stride = 64 * rint_(1, 8);
  extra.prefetch_rows = rint_(1, 20);
  extra.prefetch_lines = rint_(1, 40);
}

template <typename Act>
static void test_gemm(const Table<Act>& t, int m, int K, int N, int p0, int np, bool accumulate, int extras,
                      bool specials) {
  Weights W(N, K);
  Rows<Act> A(m, K, 2 * rint_(0, 2));
  int nan_row = -1, inf_col = -1;
  if (specials && m > 2 && K > 3) {
    nan_row = 1;
    A.a[1 * A.lda + K / 2] = act_of<Act>(NAN);
  }
  if (specials && np * 16 > 3 && 16 * p0 + 2 < N) {
    inf_col = 2;
    W.packed[(((16 * p0 + 2) / 16 * k_pairs(K) + (K - 1) / 2) * 16 + 2) * 2 + (K - 1) % 2] = 0x7F80;
    W.w[size_t(16 * p0 + 2) * K + K - 1] = INFINITY;
  }
  const int Ke = rint_(1, 40);
  std::vector<Rows<Act>*> ea;
  std::vector<Panels<Act>*> eb;
  ExtraProducts<Act> extra;
  extra.count = extras;
  extra.K = Ke;
  const int64_t lda_e = act_stride(Ke) + 2;
  Act* ea_rows = exact<Act>(size_t(row_capacity(m)) * lda_e * 3);
  for (int e = 0; e < extras; ++e) {
    eb.push_back(new Panels<Act>(t.k, N, Ke));
    for (int i = 0; i < m; ++i)
      for (int k = 0; k < Ke; ++k) ea_rows[e * act_stride(Ke) + i * 3 * lda_e + k] = act_of<Act>(randn());
    extra.a[e] = ea_rows + e * act_stride(Ke);
    extra.b[e] = eb.back()->p + p0 * eb.back()->stride;
  }
  extra.lda = 3 * lda_e;
  extra.panel_stride = act_panel_elems(Ke);
  // a prefetch of "the next block" (here W itself): a hint that must not change C
  if (rint_(0, 1)) draw_prefetch(extra, W.packed);
  const int64_t ldc = np * 16 + rint_(0, 3);
  float* c = exact<float>(size_t(row_capacity(m)) * ldc);
  std::vector<float> c0(size_t(m) * ldc);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < ldc; ++j) c[i * ldc + j] = c0[i * ldc + j] = accumulate ? randn() : 12345.0f;
  t.k->gemm_w(A.a, A.lda, m, K, W.packed + int64_t(p0) * k_pairs(K) * 32, k_pairs(K) * 32, np, c, ldc, accumulate,
              extras ? &extra : nullptr);
  char ctx[160];
  std::snprintf(ctx, sizeof ctx, "m=%d K=%d N=%d p0=%d np=%d acc=%d extras=%d Ke=%d", m, K, N, p0, np, accumulate,
                extras, Ke);
  for (int i = 0; i < m; ++i)
    for (int col = 0; col < ldc; ++col) {
      const double got = c[i * ldc + col];
      if (col >= np * 16) {
        if (got != c0[i * ldc + col] && failures++ < 20)
          std::printf("FAIL %s gemm_w wrote past its panels %s\n", t.name.c_str(), ctx);
        continue;
      }
      const int n = 16 * p0 + col;
      double e = accumulate ? c0[i * ldc + col] : 0, s = std::fabs(e);
      for (int k = 0; k < K; ++k) {
        const double v = A.at(i, k) * W.at(n, k);
        e += v;
        s += std::fabs(v);
      }
      for (int x = 0; x < extras; ++x)
        for (int k = 0; k < Ke; ++k) {
          const double v = value_of(extra.a[x][i * extra.lda + k]) * eb[x]->at(n, k);
          e += v;
          s += std::fabs(v);
        }
      if (i == nan_row) {
        if (!std::isnan(got) && failures++ < 20) std::printf("FAIL %s NaN row not NaN %s\n", t.name.c_str(), ctx);
        continue;
      }
      if (col == inf_col) {
        if (std::isfinite(got) && failures++ < 20) std::printf("FAIL %s Inf column finite %s\n", t.name.c_str(), ctx);
        continue;
      }
      check(t.name, "gemm_w", got, e, s, ctx);
    }
  for (auto p : eb) delete p;
  std::free(ea_rows);
  std::free(c);
}

template <typename Act>
static void test_gemm_a(const Table<Act>& t, int m, int K, int N) {
  Rows<Act> A(m, K, 2 * rint_(0, 2));
  Panels<Act> B(t.k, N, K);
  const int np = (N + 15) / 16;
  const int64_t ldc = np * 16;
  float* c = exact<float>(size_t(row_capacity(m)) * ldc);
  t.k->gemm_a(A.a, A.lda, m, K, B.p, B.stride, np, c, ldc, false);
  char ctx[96];
  std::snprintf(ctx, sizeof ctx, "m=%d K=%d N=%d", m, K, N);
  for (int i = 0; i < m; ++i)
    for (int n = 0; n < np * 16; ++n) {
      double e = 0, s = 0;
      for (int k = 0; k < K; ++k) {
        const double v = A.at(i, k) * B.at(n, k);
        e += v;
        s += std::fabs(v);
      }
      check(t.name, "gemm_a", c[i * ldc + n], e, s, ctx);
    }
  std::free(c);
}

// pack_rows of B and pack_cols of B^T: the same bits, B's values where the layout puts them, zero elsewhere.
template <typename Act>
static void test_pack(const Table<Act>& t, int N, int K) {
  Panels<Act> B(t.k, N, K);
  std::vector<uint16_t> bt(size_t(K) * N);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) bt[size_t(k) * N + n] = B.b[size_t(n) * K + k];
  const size_t elems = size_t((N + 15) / 16) * B.stride;
  Act* cols = exact<Act>(elems);
  t.k->pack_cols(bt.data(), N, K, N, cols, B.stride);
  char ctx[64];
  std::snprintf(ctx, sizeof ctx, "N=%d K=%d", N, K);
  if (std::memcmp(cols, B.p, elems * sizeof(Act)) != 0 && failures++ < 20)
    std::printf("FAIL %s pack_cols differs from pack_rows %s\n", t.name.c_str(), ctx);
  for (size_t x = 0; x < elems; ++x) {
    const int64_t p = x / B.stride, off = x % B.stride;
    int n, k;
    if (sizeof(Act) == 2) {
      k = int(off / 32 * 2 + off % 2);
      n = int(p * 16 + off % 32 / 2);
    } else {
      k = int(off / 16);
      n = int(p * 16 + off % 16);
    }
    if (value_of(B.p[x]) != B.at(n, k) && failures++ < 20)
      std::printf("FAIL %s pack_rows element n=%d k=%d %s\n", t.name.c_str(), n, k, ctx);
  }
  std::free(cols);
}

template <typename Act>
static void test_repack(const Table<Act>& t, int N, int K, int col0, int ncols) {
  Weights W(N, K);
  const int n_padded = int(padded_rows(N)), pairs = n_padded / 2 + rint_(0, 20);
  const int64_t stride = int64_t(pairs) * 32;
  const int blocks = (ncols + 15) / 16;
  uint16_t* dst = exact<uint16_t>(size_t(blocks) * stride);
  t.k->repack_nn(W.nn(), n_padded, pairs, col0, ncols, dst, stride);
  char ctx[96];
  std::snprintf(ctx, sizeof ctx, "N=%d K=%d col0=%d ncols=%d", N, K, col0, ncols);
  for (int b = 0; b < blocks; ++b)
    for (int j = 0; j < pairs; ++j)
      for (int c = 0; c < 16; ++c)
        for (int h = 0; h < 2; ++h) {
          const int col = b * 16 + c, n = 2 * j + h;
          const float e = col < ncols && n < n_padded ? W.at(n, col0 + col) : 0.0f;
          if (value_of(dst[b * stride + (j * 16 + c) * 2 + h]) != e && failures++ < 20)
            std::printf("FAIL %s repack_nn n=%d col=%d %s\n", t.name.c_str(), n, col, ctx);
        }
  std::free(dst);
}

// gemm_nn against float64 sums over W's rows (A rows of n_padded values, zero beyond N).
template <typename Act>
static void test_nn(const Table<Act>& t, int m, int N, int K, int col0, int ncols, bool accumulate) {
  Weights W(N, K);
  const int n_padded = int(padded_rows(N));
  Rows<Act> A(m, n_padded, 2 * rint_(0, 2));
  for (int i = 0; i < m; ++i)
    for (int n = N; n < n_padded; ++n) A.a[i * A.lda + n] = act_of<Act>(0.0f);
  const int np = (ncols + 15) / 16;
  const int64_t ldc = np * 16 + 2 * rint_(0, 2);
  float* c = exact<float>(size_t(row_capacity(m)) * ldc);
  std::vector<float> c0(size_t(m) * ldc);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < ldc; ++j) c[i * ldc + j] = c0[i * ldc + j] = accumulate ? randn() : 12345.0f;
  t.k->gemm_nn(A.a, A.lda, m, n_padded, W.nn(), col0, ncols, c, ldc, accumulate, nullptr);
  char ctx[128];
  std::snprintf(ctx, sizeof ctx, "m=%d N=%d K=%d col0=%d ncols=%d acc=%d", m, N, K, col0, ncols, accumulate);
  for (int i = 0; i < m; ++i)
    for (int col = 0; col < np * 16; ++col) {
      double e = accumulate ? c0[i * ldc + col] : 0, s = std::fabs(e);
      for (int n = 0; n < n_padded; ++n) {
        const double v = col < ncols ? A.at(i, n) * W.at(n, col0 + col) : 0.0;
        e += v;
        s += std::fabs(v);
      }
      check(t.name, "gemm_nn", c[i * ldc + col], e, s, ctx);
    }
  std::free(c);
}

// gemm_nn's rows do not depend on how many come with them (the few-row and the repacked forms, AMX's
// row blocks): rows r0 .. r0 + m - 1 of A alone give bit for bit what the same rows give among 8 and 16
// (data-parallel training compares half batches with whole ones), with accumulation and extra products.
template <typename Act>
static void test_nn_batch_invariant(const Table<Act>& t, int N, int K, int col0, int ncols, bool accumulate,
                                    int extras) {
  constexpr int kMaxRows = 16;
  Weights W(N, K);
  const int n_padded = int(padded_rows(N)), np = (ncols + 15) / 16, Ke = rint_(1, 40);
  Rows<Act> A(2 * kMaxRows, n_padded, 2 * rint_(0, 2));
  for (int i = 0; i < 2 * kMaxRows; ++i)
    for (int n = N; n < n_padded; ++n) A.a[i * A.lda + n] = act_of<Act>(0.0f);
  Rows<Act> EA(2 * kMaxRows, 3 * int(act_stride(Ke)), 0);  // the extras' rows side by side, zero past Ke
  for (int i = 0; i < 2 * kMaxRows; ++i)
    for (int e = 0; e < 3; ++e)
      for (int k = Ke; k < act_stride(Ke); ++k) EA.a[i * EA.lda + e * act_stride(Ke) + k] = act_of<Act>(0.0f);
  std::vector<Panels<Act>*> eb;
  ExtraProducts<Act> extra;
  extra.count = extras;
  extra.K = Ke;
  extra.lda = EA.lda;
  extra.panel_stride = act_panel_elems(Ke);
  // the backward's prefetch of the next block (here W's own panels): a hint only
  if (rint_(0, 1)) draw_prefetch(extra, W.nn().panels);
  for (int e = 0; e < extras; ++e) {
    eb.push_back(new Panels<Act>(t.k, 16 * np, Ke));
    extra.b[e] = eb.back()->p;
  }
  const int64_t ldc = np * 16;
  std::vector<float> c0(size_t(2 * kMaxRows) * ldc);
  for (auto& x : c0) x = randn();
  // C of the rows from r0 on, computed m at a time: row_capacity(m) rows of room, as gemm.h promises.
  const auto run = [&](int r0, int m) {
    float* c = exact<float>(size_t(row_capacity(m)) * ldc);
    std::memcpy(c, c0.data() + r0 * ldc, sizeof(float) * m * ldc);
    for (int e = 0; e < extras; ++e) extra.a[e] = EA.a + r0 * EA.lda + e * act_stride(Ke);
    t.k->gemm_nn(A.a + r0 * A.lda, A.lda, m, n_padded, W.nn(), col0, ncols, c, ldc, accumulate,
                 extras ? &extra : nullptr);
    std::vector<float> rows(c, c + size_t(m) * ldc);
    std::free(c);
    return rows;
  };
  for (int whole : {8, kMaxRows}) {
    const std::vector<float> all = run(0, whole);
    for (int m = 1; m <= 4; ++m) {
      const int r0 = rint_(0, whole - m);
      const std::vector<float> part = run(r0, m);
      if (std::memcmp(part.data(), all.data() + r0 * ldc, sizeof(float) * m * ldc) != 0 && failures++ < 20)
        std::printf(
            "FAIL %s gemm_nn rows %d..%d alone differ from among %d: N=%d K=%d col0=%d ncols=%d acc=%d extras=%d\n",
            t.name.c_str(), r0, r0 + m - 1, whole, N, K, col0, ncols, accumulate, extras);
    }
  }
  for (auto p : eb) delete p;
}

// gemm_nn and repack_nn on a quantized format's codes (the kernel dequantizes them as it goes, with
// the reference dequantizer here) give bit for bit what they give on the same codes dequantized
// into bf16 panels first.
template <typename Act>
static void test_nn_codes(const Table<Act>& t, WeightFormat format, int m, int N, int K, int col0, int ncols,
                          bool accumulate) {
  const int n_padded = int(padded_rows(N)), kp = int(k_pairs(K));
  const int64_t groups = is_grouped(format) && K % 4 == 0 ? 2 : 1, width = has_zero_point(format) ? 2 : 1;
  const size_t code_bytes = size_t(n_padded / 16) * kp * code_bytes_per_pair(format);
  uint8_t* codes = exact<uint8_t>(code_bytes);
  for (size_t i = 0; i < code_bytes; ++i) codes[i] = uint8_t(rng());
  std::vector<float> scales(size_t(n_padded) * groups * width);
  for (auto& x : scales) x = randn() * 0.01f;
  const QuantMatrix q{format, codes, scales.data(), K, groups};
  uint16_t* panels = exact<uint16_t>(size_t(n_padded) * kp * 2);
  ref_dequant().dequant(q, 0, n_padded / 16, 0, kp, panels);
  NnWeights on_codes, on_panels;
  on_codes.codes = q;
  on_codes.dequant = ref_dequant().dequant;
  on_panels.panels = panels;
  on_panels.kp = kp;
  char ctx[128];
  std::snprintf(ctx, sizeof ctx, "%s m=%d N=%d K=%d col0=%d ncols=%d acc=%d", weight_format_name(format), m, N, K, col0,
                ncols, accumulate);
  const int np = (ncols + 15) / 16;
  const int64_t stride = int64_t(n_padded) * 16;
  std::vector<uint16_t> repacked[2];
  for (int i = 0; i < 2; ++i) {
    uint16_t* dst = exact<uint16_t>(size_t(np) * stride);
    t.k->repack_nn(i ? on_panels : on_codes, n_padded, n_padded / 2, col0, ncols, dst, stride);
    repacked[i].assign(dst, dst + size_t(np) * stride);
    std::free(dst);
  }
  if (repacked[0] != repacked[1] && failures++ < 20)
    std::printf("FAIL %s repack_nn on codes differs from on panels: %s\n", t.name.c_str(), ctx);
  Rows<Act> A(m, n_padded, 2 * rint_(0, 2));
  const int64_t ldc = np * 16;
  std::vector<float> c0(size_t(m) * ldc), results[2];
  for (auto& x : c0) x = randn();
  for (int i = 0; i < 2; ++i) {
    float* c = exact<float>(size_t(row_capacity(m)) * ldc);
    std::memcpy(c, c0.data(), sizeof(float) * c0.size());
    t.k->gemm_nn(A.a, A.lda, m, n_padded, i ? on_panels : on_codes, col0, ncols, c, ldc, accumulate, nullptr);
    results[i].assign(c, c + size_t(m) * ldc);
    std::free(c);
  }
  // Bit for bit, except that a NaN is a NaN: random fp8 bytes hold NaN weights, and a sum that meets
  // a NaN in one operand order and an inf - inf in the other gets x86's default NaN (sign set) in one
  // and the weight's quiet NaN in the other.
  bool same = true;
  for (size_t j = 0; j < results[0].size(); ++j) {
    const float x = results[0][j], y = results[1][j];
    same = same && ((std::isnan(x) && std::isnan(y)) || std::memcmp(&x, &y, sizeof(float)) == 0);
  }
  if (!same && failures++ < 20)
    std::printf("FAIL %s gemm_nn on codes differs from on panels: %s\n", t.name.c_str(), ctx);
  std::free(panels);
  std::free(codes);
}

template <typename Act>
static void test_convert(const Table<Act>& t, int n) {
  std::vector<float> x(n);
  for (auto& v : x) v = randn() * std::ldexp(1.0f, rint_(-20, 20));
  if (n > 3) {
    x[1] = NAN;
    x[2] = INFINITY;
    x[3] = -0.0f;
  }
  const int padded = n + rint_(0, 9);
  Act* hi = exact<Act>(padded);
  Act* lo = exact<Act>(padded);
  t.k->to_act(x.data(), n, hi, padded);
  t.k->to_act_residual(x.data(), n, lo, padded);
  char ctx[32];
  std::snprintf(ctx, sizeof ctx, "n=%d", n);
  for (int i = 0; i < padded; ++i) {
    if (i >= n) {
      if ((value_of(hi[i]) != 0 || value_of(lo[i]) != 0) && failures++ < 20)
        std::printf("FAIL %s padding not zero %s\n", t.name.c_str(), ctx);
      continue;
    }
    const float want = sizeof(Act) == 2 ? bf16_round(x[i]) : x[i];
    const bool same = std::isnan(want) ? std::isnan(value_of(hi[i])) : value_of(hi[i]) == want;
    if (!same && failures++ < 20) std::printf("FAIL %s to_act x=%g %s\n", t.name.c_str(), x[i], ctx);
    if (std::isfinite(x[i]))
      check(t.name, "hi+lo", double(value_of(hi[i])) + value_of(lo[i]), x[i], std::fabs(x[i]) * 0.5, ctx);
  }
  std::free(hi);
  std::free(lo);
}

static double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

template <typename Act>
static void test_glu(const Table<Act>& t, int n, bool clamped) {
  const Glu<float> glu{clamped, clamped ? 1.702f : 1.0f, clamped ? 1.0f : 0.0f, 7.0f};
  std::vector<float> g(n), u(n), raw(n), h(n), dg(n), du(n), h2(n);
  for (int i = 0; i < n; ++i) {
    g[i] = randn() * 4;
    u[i] = randn() * 4;
    raw[i] = randn();
  }
  const float w = 0.7f;
  t.k->glu_forward(g.data(), u.data(), n, glu, h.data());
  const double dw = t.k->glu_backward(g.data(), u.data(), raw.data(), w, n, glu, h2.data(), dg.data(), du.data());
  char ctx[48];
  std::snprintf(ctx, sizeof ctx, "n=%d clamped=%d", n, clamped);
  double e_dw = 0, s_dw = 0;
  for (int i = 0; i < n; ++i) {
    const double L = glu.limit, gc = clamped ? std::min<double>(g[i], L) : g[i];
    const double uc = clamped ? std::max(-L, std::min<double>(u[i], L)) : u[i];
    const double a = clamped ? glu.alpha : 1.0, sig = sigmoid(a * gc), off = clamped ? glu.up_offset : 0.0;
    const double hv = (uc + off) * gc * sig, dh = w * raw[i];
    const double dgv = clamped && g[i] > L ? 0.0 : dh * (uc + off) * sig * (1 + a * gc * (1 - sig));
    const double duv = clamped && (u[i] < -L || u[i] > L) ? 0.0 : dh * gc * sig;
    check(t.name, "glu h", h[i], hv, std::fabs(hv) * 10, ctx);
    check(t.name, "glu_backward h", h2[i], hv, std::fabs(hv) * 10, ctx);
    // dg's last factor 1 + a g (1 - sig) cancels near g = -1.28: fp32 keeps its error relative to the
    // terms, not to what is left of them.
    const double dg_terms = std::fabs(dh * (uc + off) * sig) * (1 + std::fabs(a * gc * (1 - sig)));
    check(t.name, "glu dg", dg[i], dgv, dg_terms * 10 + 1e-6, ctx);
    check(t.name, "glu du", du[i], duv, std::fabs(duv) * 10 + 1e-6, ctx);
    e_dw += hv * raw[i];
    s_dw += std::fabs(hv * raw[i]);
  }
  check(t.name, "glu dweight", dw, e_dw, s_dw * 10, ctx);
}

template <typename Act>
static void test_rank(const Table<Act>& t, int n, int r) {
  std::vector<float> v(n), m(size_t(n) * r), out(r), y(r), acc(size_t(n) * r);
  for (auto& x : v) x = randn();
  for (auto& x : m) x = randn();
  for (auto& x : y) x = randn();
  for (auto& x : acc) x = randn();
  const std::vector<float> acc0 = acc;
  t.k->contract(v.data(), n, m.data(), r, out.data());
  t.k->rank1(v.data(), n, y.data(), r, acc.data());
  char ctx[48];
  std::snprintf(ctx, sizeof ctx, "n=%d r=%d", n, r);
  for (int q = 0; q < r; ++q) {
    double e = 0, s = 0;
    for (int i = 0; i < n; ++i) {
      e += double(v[i]) * m[size_t(i) * r + q];
      s += std::fabs(double(v[i]) * m[size_t(i) * r + q]);
    }
    check(t.name, "contract", out[q], e, s, ctx);
  }
  for (int i = 0; i < n; ++i)
    for (int q = 0; q < r; ++q) {
      const double e = acc0[size_t(i) * r + q] + double(v[i]) * y[q];
      check(t.name, "rank1", acc[size_t(i) * r + q], e, std::fabs(e) + std::fabs(double(v[i]) * y[q]), ctx);
    }
}

// gemm_a_exact: exact fp32 rows times the split panels (hi + lo) of an fp32 B, added to C: the
// fp64 product to fp32 accuracy (with split bf16, hi + lo is B to about 2^-17).
template <typename Act>
static void test_gemm_a_exact(const Table<Act>& t, int m, int K, int N) {
  const int ldv = K + 3, np = int(padded_rows(N) / 16), ldc = np * 16 + 5;
  std::vector<float> v(size_t(m) * ldv), b(size_t(N) * K), c(size_t(m) * ldc);
  for (auto& x : v) x = randn();
  for (auto& x : b) x = randn();
  for (auto& x : c) x = randn();
  const std::vector<float> c0 = c;
  const int64_t stride = act_panel_elems(K);
  Act* hi = exact<Act>(size_t(np) * stride);
  Act* lo = sizeof(Act) == 2 ? exact<Act>(size_t(np) * stride) : nullptr;
  t.k->pack_rows_split(b.data(), K, N, K, hi, lo, stride);
  t.k->gemm_a_exact(v.data(), ldv, m, K, hi, lo, stride, np, c.data(), ldc);
  char ctx[48];
  std::snprintf(ctx, sizeof ctx, "m=%d K=%d N=%d", m, K, N);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < ldc; ++j) {
      double e = c0[size_t(i) * ldc + j], s = std::fabs(e);
      for (int k = 0; j < N && k < K; ++k) {
        e += double(v[size_t(i) * ldv + k]) * b[size_t(j) * K + k];
        s += std::fabs(double(v[size_t(i) * ldv + k]) * b[size_t(j) * K + k]);
      }
      check(t.name, "gemm_a_exact", c[size_t(i) * ldc + j], e, s, ctx);
    }
  std::free(hi);
  std::free(lo);
}

template <typename Act>
static void run_table(const Table<Act>& t, int iters) {
  if (!t.k) {
    std::printf("%s: not built\n", t.name.c_str());
    failures++;
    return;
  }
  const int before = failures;
  const int Ks[] = {1, 2, 3, 16, 31, 32, 33, 63, 64, 65, 95, 257, 300};
  for (int K : Ks)
    for (int m : {1, 15, 16, 17, 31, 32, 33, 64, 70}) {
      test_gemm(t, m, K, 50, 0, 4, false, 0, false);
      test_gemm(t, m, K, 50, 1, 3, true, rint_(1, 3), true);
    }
  for (int it = 0; it < iters; ++it) {
    const int N = rint_(1, 130), K = rint_(1, 700), m = rint_(1, 80);
    const int panels = int(padded_rows(N) / 16);
    const int p0 = rint_(0, panels - 1), np = rint_(1, panels - p0);
    test_gemm(t, m, K, N, p0, np, it % 2 == 1, rint_(0, 3), it % 5 == 0);
    test_gemm_a(t, rint_(1, 80), rint_(1, 300), rint_(1, 70));
    test_pack(t, rint_(1, 70), rint_(1, 90));
    test_gemm_a_exact(t, rint_(1, 4), rint_(1, 70), rint_(1, 140));
    const int RK = rint_(1, 200);
    const int col0 = 2 * rint_(0, (RK - 1) / 2);
    test_repack(t, rint_(1, 100), RK, col0, rint_(1, std::min(64, RK - col0)));
    const int NN = rint_(1, 100), NK = rint_(1, 200), ncol0 = 2 * rint_(0, (NK - 1) / 2);
    test_nn(t, rint_(1, 120), NN, NK, ncol0, rint_(1, std::min(64, NK - ncol0)), it % 2 == 1);
    test_nn_batch_invariant(t, NN, NK, ncol0, rint_(1, std::min(64, NK - ncol0)), it % 2 == 1, rint_(0, 3));
  }
  test_gemm(t, 64, 2048, 64, 0, 4, false, 3, false);
  // gemm_nn's forms change at 32 and 96 rows (AMX: 2 x 2 blocks, column tiles, repacked columns)
  for (int m : {1, 16, 17, 32, 33, 48, 80, 95, 96, 97}) test_nn(t, m, 2048, 128, 0, 64, m % 2 == 1);
  test_nn_batch_invariant(t, 2048, 1408, 64, 64, false, 0);
  // gemm_nn on codes, in every form (rows across 4, 32, 80) and format family (odd K where allowed)
  for (WeightFormat f : {WeightFormat::Int8, WeightFormat::Int4, WeightFormat::Fp8, WeightFormat::Int4ZpKGroup})
    for (int m : {1, 3, 5, 10, 20, 40, 90}) {
      const int N = rint_(1, 100), K = is_grouped(f) ? 2 * rint_(1, 100) : rint_(1, 200);
      const int col0 = 2 * rint_(0, (K - 1) / 2);
      test_nn_codes(t, f, m, N, K, col0, rint_(1, std::min(64, K - col0)), m % 2 == 1);
    }
  test_nn_batch_invariant(t, 1408, 2048, 0, 64, true, 2);
  for (int n : {0, 1, 7, 15, 16, 17, 31, 63, 64, 65, 100, 1000}) {
    test_convert(t, n);
    test_glu(t, n, false);
    test_glu(t, n, true);
    test_rank(t, n, 1 + n % 40);
  }
  std::printf("%-28s %s\n", t.name.c_str(), failures == before ? "ok" : "FAILED");
}

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 200;
  std::vector<Table<float>> exact_tables{{"ref", &ref_kernels_f32()}};
  std::vector<Table<uint16_t>> rounding_tables{{"amx-emu", amx_emu_kernels()}};
  if (avx512bf16_emu_kernels() != nullptr) rounding_tables.push_back({"avx512-bf16-emu", avx512bf16_emu_kernels()});
#ifdef KT_SIMDE
  // AVX-512 intrinsics on SIMDe, AMX tiles on amx_emu.h: runs on any CPU.
  exact_tables.push_back({"avx512 (simde)", avx512_kernels_f32()});
  rounding_tables.push_back({"avx512-bf16 (simde)", avx512bf16_kernels()});
  rounding_tables.push_back({"amx (simde, emulated tiles)", amx_kernels()});
#else
  // The real kernels, where this CPU runs them.
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    exact_tables.push_back({"avx2", avx2_kernels_f32()});
  else
    std::printf("avx2: not run (no AVX2 + FMA here)\n");
  unsigned a, b, c, d;
  __cpuid_count(7, 0, a, b, c, d);
  const bool amx = (d & (1u << 22)) && (d & (1u << 24));
  __cpuid_count(7, 1, a, b, c, d);
  const bool bf16 = a & (1u << 5);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    exact_tables.push_back({"avx512", avx512_kernels_f32()});
    if (bf16) rounding_tables.push_back({"avx512-bf16", avx512bf16_kernels()});
    unsigned long perm = 0;
    if (amx && syscall(SYS_arch_prctl, 0x1023, 18) == 0 && syscall(SYS_arch_prctl, 0x1022, &perm) == 0 &&
        (perm >> 18) & 1)
      rounding_tables.push_back({"amx", amx_kernels()});
    else
      std::printf("amx: not run (no AMX or no tile-data permission)\n");
  } else {
    std::printf("avx512, avx512-bf16, amx: not run natively (no AVX-512 here)\n");
  }
#endif
  for (const auto& t : exact_tables) run_table(t, iters);
  for (const auto& t : rounding_tables) run_table(t, iters);
  std::printf(failures ? "FAILURES: %d\n" : "all ok\n", failures);
  return failures != 0;
}
