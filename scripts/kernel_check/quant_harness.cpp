// Kernel-level check of the int8 integer-dot decode (DequantKernels::gemm_nt_int8, kernels/quant.h):
// every table must give the reference's bits, and the reference must meet the activation
// quantization bound against float64 sums over the exact dequantized weights:
//   |c - x.w| <= sum_groups step / 2 * sum_(k in group) |w| + 1e-5 sum |x w|.
// Random and edge shapes (odd K, K groups, 1-4 rows, panel subsets, codes -128 and 127, negative
// and zero scales), a K long enough to need two int32 chunks, NaN / Inf / tiny rows (fp32 fallback).
// Buffers have their exact sizes, so AddressSanitizer sees any out-of-bounds access. Built by run.sh.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gemm.h"
#include "quant.h"

using namespace kt;
static std::mt19937_64 rng(777);
static int failures = 0;
static float randn() { static std::normal_distribution<float> d; return d(rng); }
static int rint_(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

struct Table { std::string name; const DequantKernels* k; };

struct Int8Matrix {
  int N, K; int64_t groups; int8_t* codes; float* scales;
  Int8Matrix(int N_, int K_, int64_t groups_, bool extreme) : N(N_), K(K_), groups(groups_) {
    const int64_t bytes = padded_rows(N) * k_pairs(K) * 2;
    codes = static_cast<int8_t*>(std::malloc(bytes));
    std::memset(codes, 0, bytes);  // padding k and padded rows hold code 0
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k)
        codes[((n / 16 * k_pairs(K) + k / 2) * 16 + n % 16) * 2 + k % 2] = extreme ? -128 : int8_t(rint_(-128, 127));
    scales = static_cast<float*>(std::malloc(sizeof(float) * padded_rows(N) * groups));
    for (int64_t i = 0; i < padded_rows(N) * groups; ++i)
      scales[i] = i / groups >= N ? 0.0f : extreme ? 1.0f : (rint_(0, 9) == 0 ? 0.0f : randn() * 0.01f);
  }
  ~Int8Matrix() { std::free(codes); std::free(scales); }
  QuantMatrix view(WeightFormat f) const { return {f, reinterpret_cast<const uint8_t*>(codes), scales, K, groups}; }
  double w(int n, int k) const {
    if (n >= N || k >= K) return 0.0;
    const int64_t g = k / (2 * (k_pairs(K) / groups));
    return double(codes[((n / 16 * k_pairs(K) + k / 2) * 16 + n % 16) * 2 + k % 2]) * scales[n * groups + g];
  }
};

enum class Rows { Normal, Extreme, Specials };

static void test(const std::vector<Table>& tables, int m, int N, int K, int64_t groups, int p0, int np, Rows kind) {
  const WeightFormat f = groups > 1 ? WeightFormat::Int8KGroup : WeightFormat::Int8;
  Int8Matrix W(N, K, groups, kind == Rows::Extreme);
  std::vector<float*> rows(m);
  for (int i = 0; i < m; ++i) {
    rows[i] = static_cast<float*>(std::malloc(sizeof(float) * K));  // exact K: no read of the padding k
    const float mag = std::exp(randn() * 3.0f);
    for (int k = 0; k < K; ++k) rows[i][k] = kind == Rows::Extreme ? 3.0f : randn() * mag;
  }
  if (kind == Rows::Specials) {
    rows[0][K / 2] = NAN;
    if (m > 1) rows[1][0] = INFINITY;
    if (m > 2) for (int k = 0; k < K; ++k) rows[2][k] = 1e-40f * (k % 3);  // 127 / max overflows
  }
  const int ldc = np * 16;
  char ctx[160];
  std::snprintf(ctx, sizeof ctx, "m=%d N=%d K=%d groups=%ld p0=%d np=%d kind=%d", m, N, K, long(groups), p0, np, int(kind));
  std::vector<float> ref(size_t(m) * ldc);
  for (size_t t = 0; t < tables.size(); ++t) {
    float* c = static_cast<float*>(std::malloc(sizeof(float) * m * ldc));  // exact size
    tables[t].k->gemm_nt_int8(W.view(f), rows.data(), m, p0, np, c);
    const char* name = tables[t].name.c_str();
    if (t == 0) std::memcpy(ref.data(), c, sizeof(float) * m * ldc);
    // Calls with NaN / Inf rows run in fp32, whose summation order is each table's own.
    if (t > 0 && kind != Rows::Specials)
      for (int i = 0; i < m * ldc; ++i)
        if (std::memcmp(&c[i], &ref[i], 4) != 0 && failures++ < 20)
          std::printf("FAIL %s differs from ref at %d: %.9g vs %.9g %s\n", name, i, c[i], ref[i], ctx);
    const int64_t group_k = 2 * (k_pairs(K) / groups);
    for (int i = 0; i < m; ++i)
      for (int col = 0; col < ldc; ++col) {
        const int n = 16 * p0 + col;
        double exact = 0, sum_abs = 0, bound = 0;
        bool special = false;
        for (int64_t g = 0; g < groups; ++g) {
          double absmax = 0, wsum = 0;
          for (int64_t k = g * group_k; k < std::min<int64_t>(K, (g + 1) * group_k); ++k) {
            const double x = rows[i][k], w = W.w(n, k);
            special = special || !std::isfinite(x);
            absmax = std::max(absmax, std::fabs(x));
            exact += x * w, sum_abs += std::fabs(x * w), wsum += std::fabs(w);
          }
          bound += absmax / 127.0 / 2.0 * wsum;
        }
        const double got = c[size_t(i) * ldc + col];
        if (special) {
          const bool ok = std::isnan(exact) ? std::isnan(got) : got == exact;
          if (!ok && failures++ < 20) std::printf("FAIL %s NaN/Inf row %d col %d: got %g expected %g %s\n", name, i, col, got, exact, ctx);
          continue;
        }
        const double allowed = bound * (1 + 1e-5) + 1e-5 * sum_abs + 1e-30;
        if (!(std::fabs(got - exact) <= allowed) && failures++ < 20)
          std::printf("FAIL %s row %d col %d: got %.9g expected %.9g (allowed %.3g) %s\n", name, i, col, got, exact, allowed, ctx);
      }
    std::free(c);
  }
  for (auto r : rows) std::free(r);
}

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 200;
  std::vector<Table> tables{{"ref", &ref_dequant()}};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && avx2_dequant()) tables.push_back({"avx2", avx2_dequant()});
  for (const auto& t : tables) std::printf("table %s\n", t.name.c_str());
  for (int it = 0; it < iters; ++it) {
    const int m = rint_(1, kDirectQuantRows), N = rint_(1, 70);
    const bool grouped = rint_(0, 1);
    const int group = 2 * rint_(1, 24), K = grouped ? group * rint_(1, 5) : rint_(1, 300);
    const int p0 = rint_(0, (N - 1) / 16), np = rint_(1, padded_rows(N) / 16 - p0);
    test(tables, m, N, K, grouped ? K / group : 1, p0, np, it % 10 == 0 ? Rows::Specials : Rows::Normal);
  }
  test(tables, 1, 16, 2 * kMaxPairsPerInt32 + 6, 1, 0, 1, Rows::Extreme);  // two int32 chunks at the edge
  test(tables, 3, 20, 2 * kMaxPairsPerInt32 + 3, 1, 1, 1, Rows::Normal);
  std::printf("%s: %d failures\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
