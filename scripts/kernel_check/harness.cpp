// Kernel-level check of the Kernels<float> tables (kernels/gemm.h) against float64 sums: random and
// edge shapes for gemm_nt / gemm_nn (m, K, N not multiples of the tile sizes, odd K, column and
// panel subsets), NaN rows and Inf weights staying in their row / column, dot and axpy tails. The
// packed weights, A rows and C are allocated at their exact sizes, so AddressSanitizer sees any
// out-of-bounds access. Tables that round activations to bf16 are compared with the bf16-rounded
// activations, at the same tight bar. Built and run by run.sh.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include <string>
#include "gemm.h"

using namespace kt;
static std::mt19937_64 rng(12345);
static float bf16_round(float x) {
  uint32_t b; std::memcpy(&b, &x, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) { b |= 0x400000u; b &= 0xFFFF0000u; }
  else { b += 0x7FFFu + ((b >> 16) & 1u); b &= 0xFFFF0000u; }
  float r; std::memcpy(&r, &b, 4); return r;
}
static uint16_t bits16(float x) { uint32_t b; std::memcpy(&b, &x, 4); return b >> 16; }
static int64_t packed_index(int64_t n, int64_t k, int64_t K) {
  return ((n / 16 * k_pairs(K) + k / 2) * 16 + n % 16) * 2 + k % 2;
}
static float randn() { static std::normal_distribution<float> d; return d(rng); }
static int rint_(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

struct Table { std::string name; const Kernels<float>* k; bool rounds; };
static int failures = 0;

struct Weights {
  int N, K; std::vector<float> w; uint16_t* packed; size_t packed_elems;
  Weights(int N_, int K_) : N(N_), K(K_), w(size_t(N_) * K_) {
    for (auto& x : w) x = bf16_round(randn() * 0.5f);
    packed_elems = size_t(padded_rows(N)) * k_pairs(K) * 2;
    packed = static_cast<uint16_t*>(std::malloc(packed_elems * 2));  // exact size: ASan sees over-reads
    std::memset(packed, 0, packed_elems * 2);
    for (int n = 0; n < N; ++n) for (int k = 0; k < K; ++k) packed[packed_index(n, k, K)] = bits16(w[size_t(n) * K + k]);
  }
  ~Weights() { std::free(packed); }
  float at(int n, int k) const { return n < N && k < K ? w[size_t(n) * K + k] : 0.0f; }
};

static void check(const char* what, const Table& t, double got, double exp, double scale, const char* ctx) {
  const double tol = 3e-5 * scale + 1e-30;
  const bool ok = (std::isnan(exp) && std::isnan(got)) || (std::isinf(exp) && got == exp) || std::fabs(got - exp) <= tol;
  if (!ok && failures++ < 20) std::printf("FAIL %s %s %s: got %.9g expected %.9g (tol %.3g)\n", t.name.c_str(), what, ctx, got, exp, tol);
}

static void test_nt(const Table& t, int m, int K, int N, int p0, int np, bool specials = false) {
  Weights W(N, K);
  std::vector<float*> rows(m);
  for (int i = 0; i < m; ++i) {
    rows[i] = static_cast<float*>(std::malloc(sizeof(float) * K));
    for (int k = 0; k < K; ++k) rows[i][k] = randn();
  }
  int nan_row = -1, inf_col = -1;
  if (specials && m > 2 && K > 3) { nan_row = 1; rows[1][K / 2] = NAN; }
  if (specials && np * 16 > 3 && 16 * p0 + 2 < N) { inf_col = 2; W.packed[packed_index(16 * p0 + 2, K - 1, K)] = 0x7F80; W.w[size_t(16 * p0 + 2) * K + K - 1] = INFINITY; }
  const int ldc = np * 16;
  float* c = static_cast<float*>(std::malloc(sizeof(float) * m * ldc));
  for (int i = 0; i < m * ldc; ++i) c[i] = 12345.0f;
  t.k->gemm_nt(rows.data(), m, K, W.packed, p0, np, c);
  char ctx[128]; std::snprintf(ctx, sizeof ctx, "m=%d K=%d N=%d p0=%d np=%d", m, K, N, p0, np);
  for (int i = 0; i < m; ++i) for (int col = 0; col < ldc; ++col) {
    double e = 0, s = 0; const int n = 16 * p0 + col;
    for (int k = 0; k < K; ++k) { const double a = t.rounds ? bf16_round(rows[i][k]) : rows[i][k]; e += a * W.at(n, k); s += std::fabs(a * W.at(n, k)); }
    const double got = c[i * ldc + col];
    if (i == nan_row) { if (!std::isnan(got) && failures++ < 20) std::printf("FAIL %s nt NaN row not NaN %s\n", t.name.c_str(), ctx); continue; }
    if (col == inf_col) { if (std::isfinite(got) && failures++ < 20) std::printf("FAIL %s nt Inf col finite %s\n", t.name.c_str(), ctx); continue; }
    check("nt", t, got, e, s, ctx);
  }
  for (auto r : rows) std::free(r);
  std::free(c);
}

static void test_nn(const Table& t, int m, int N, int K, int k0, int kc, int ldc) {
  Weights W(N, K);
  const int np_ = padded_rows(N);
  std::vector<float*> rows(m);
  for (int i = 0; i < m; ++i) {
    rows[i] = static_cast<float*>(std::malloc(sizeof(float) * np_));
    for (int n = 0; n < np_; ++n) rows[i][n] = n < N ? randn() : 0.0f;
  }
  float* c = static_cast<float*>(std::malloc(sizeof(float) * ((m - 1) * ldc + kc)));
  for (int i = 0; i < (m - 1) * ldc + kc; ++i) c[i] = 12345.0f;
  t.k->gemm_nn(rows.data(), m, np_, W.packed, K, k0, kc, c, ldc);
  char ctx[128]; std::snprintf(ctx, sizeof ctx, "m=%d N=%d K=%d k0=%d kc=%d ldc=%d", m, N, K, k0, kc, ldc);
  for (int i = 0; i < m; ++i) for (int col = 0; col < ldc && (i < m - 1 || col < kc); ++col) {
    const double got = c[i * ldc + col];
    if (col >= kc) { if (got != 12345.0f && failures++ < 20) std::printf("FAIL %s nn wrote outside kc %s\n", t.name.c_str(), ctx); continue; }
    double e = 0, s = 0;
    for (int n = 0; n < np_; ++n) { const double a = t.rounds ? bf16_round(rows[i][n]) : rows[i][n]; e += a * W.at(n, k0 + col); s += std::fabs(a * W.at(n, k0 + col)); }
    check("nn", t, got, e, s, ctx);
  }
  for (auto r : rows) std::free(r);
  std::free(c);
}

static void test_vec(const Table& t, int n) {
  float* a = static_cast<float*>(std::malloc(sizeof(float) * (n ? n : 1)));
  float* b = static_cast<float*>(std::malloc(sizeof(float) * (n ? n : 1)));
  double e = 0, s = 0;
  for (int i = 0; i < n; ++i) { a[i] = randn(); b[i] = randn(); e += double(a[i]) * b[i]; s += std::fabs(double(a[i]) * b[i]); }
  char ctx[64]; std::snprintf(ctx, sizeof ctx, "n=%d", n);
  check("dot", t, t.k->dot(a, b, n), e, s + 1e-20, ctx);
  std::vector<double> y(b, b + n);
  t.k->axpy(0.75f, a, b, n);
  for (int i = 0; i < n; ++i) check("axpy", t, b[i], y[i] + 0.75 * a[i], std::fabs(y[i]) + std::fabs(0.75 * a[i]), ctx);
  std::free(a); std::free(b);
}

int main(int argc, char** argv) {
  std::vector<Table> tables{{"ref", &ref_kernels_f32(), false}, {"amx-emu", amx_emu_kernels_f32(), true}};
  if (avx512bf16_emu_kernels_f32() != nullptr) tables.push_back({"avx512-bf16-emu", avx512bf16_emu_kernels_f32(), true});
#ifdef KT_SIMDE
  // AVX-512 intrinsics on SIMDe, AMX tiles on amx_emu.h: runs on any CPU.
  tables.push_back({"avx512 (simde)", avx512_kernels_f32(), false});
  tables.push_back({"avx512-bf16 (simde)", avx512bf16_kernels_f32(), true});
  tables.push_back({"amx (simde, emulated tiles)", amx_kernels_f32(), true});
#else
  // The real kernels, where this CPU runs them.
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    tables.push_back({"avx2", avx2_kernels_f32(), false});
  else
    std::printf("avx2: not run (no AVX2 + FMA here)\n");
  unsigned a, b, c, d;
  __cpuid_count(7, 0, a, b, c, d);
  const bool amx = (d & (1u << 22)) && (d & (1u << 24));
  __cpuid_count(7, 1, a, b, c, d);
  const bool bf16 = a & (1u << 5);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    tables.push_back({"avx512", avx512_kernels_f32(), false});
    if (bf16) tables.push_back({"avx512-bf16", avx512bf16_kernels_f32(), true});
    unsigned long perm = 0;
    if (amx && syscall(SYS_arch_prctl, 0x1023, 18) == 0 && syscall(SYS_arch_prctl, 0x1022, &perm) == 0 && (perm >> 18) & 1)
      tables.push_back({"amx", amx_kernels_f32(), true});
    else
      std::printf("amx: not run (no AMX or no tile-data permission)\n");
  } else {
    std::printf("avx512, avx512-bf16, amx: not run natively (no AVX-512 here)\n");
  }
#endif
  const int iters = argc > 1 ? std::atoi(argv[1]) : 200;
  for (const Table& t : tables) {
    if (!t.k) { std::printf("%s: not built\n", t.name.c_str()); failures++; continue; }
    const int before = failures;
    // Fixed shapes: tile edges and the sizes of the brief.
    const int Ks[] = {1, 2, 3, 16, 31, 32, 33, 63, 64, 65, 95, 257, 300};
    for (int K : Ks) for (int m : {1, 15, 16, 17, 31, 32, 33, 64, 70}) {
      test_nt(t, m, K, 50, 0, 4);
      test_nt(t, m, K, 50, 1, 3, true);
    }
    for (int N : {1, 16, 17, 31, 33, 64, 100}) for (int K : {1, 2, 5, 16, 17, 33, 64, 100}) for (int m : {1, 16, 17, 33, 70}) {
      test_nn(t, m, N, K, 0, K, K + 3);
      if (K > 4) test_nn(t, m, N, K, 2, K - 3, K);
    }
    for (int it = 0; it < iters; ++it) {
      const int N = rint_(1, 130), K = rint_(1, 700), m = rint_(1, 80);
      const int panels = int(padded_rows(N) / 16);
      const int p0 = rint_(0, panels - 1), np = rint_(1, panels - p0);
      test_nt(t, m, K, N, p0, np, it % 5 == 0);
      const int k0 = 2 * rint_(0, (K - 1) / 2), kc = rint_(1, K - k0);
      test_nn(t, m, N, K, k0, kc, kc + rint_(0, 5));
    }
    test_nt(t, 64, 2048, 64, 0, 4);
    test_nn(t, 64, 2048, 128, 0, 64, 64);
    for (int n : {0, 1, 7, 15, 16, 17, 31, 63, 64, 65, 100, 1000}) test_vec(t, n);
    std::printf("%-24s %s\n", t.name.c_str(), failures == before ? "ok" : "FAILED");
  }
  std::printf(failures ? "FAILURES: %d\n" : "all ok\n", failures);
  return failures != 0;
}
