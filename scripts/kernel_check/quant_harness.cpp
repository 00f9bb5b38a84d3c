// Kernel-level check of the integer dot products on int8 and 4-bit codes (DequantKernels::quantize_rows
// and gemm_nt_int8, kernels/quant.h): every table must give the reference's bits, and the reference must meet the
// activation quantization bound against float64 sums over the exact dequantized weights:
//   |c - x.w| <= sum_groups step / 2 * sum_(k in group) |w| + 1e-5 sum |x w|  (the activations' groups).
// Random and edge shapes (odd K, K groups, 1-40 rows, panel subsets, codes -128 and 127, negative
// and zero scales), a K long enough to need two int32 chunks, NaN / Inf / tiny rows (fp32 fallback).
// Also the dequantization of every format (DequantKernels::dequant): every table must give the
// reference's bf16 bits for random panels / k-pair ranges of random codes (all 256 E4M3 codes, NaN
// included) and random scales (zero, and tiny enough for subnormal products now and then), and the
// reference's fp8 must equal the E4M3 value times the scale rounded to bf16. And gemm_nt_codes and
// gemm_nt_scaled (fp32 on the codes) within fp32 rounding of float64 sums over the exact dequantized
// weights.
// Buffers have their exact sizes, so AddressSanitizer sees any out-of-bounds access. Built by run.sh.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
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
static float randn() {
  static std::normal_distribution<float> d;
  return d(rng);
}
static int rint_(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

struct Table {
  std::string name;
  const DequantKernels* k;
};

struct Int8Matrix {
  int N, K;
  int64_t groups;
  int8_t* codes;
  float* scales;
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
  ~Int8Matrix() {
    std::free(codes);
    std::free(scales);
  }
  QuantMatrix view(WeightFormat f) const { return {f, reinterpret_cast<const uint8_t*>(codes), scales, K, groups}; }
};

enum class Rows { Normal, Extreme, Specials };

// gemm_nt_int8 of every table on `w` ([N, K] codes of an integer format): the reference's bits, and
// within the activation quantization bound of float64 sums over the exact dequantized weights.
static void test_integer(const std::vector<Table>& tables, const QuantMatrix& w, int m, int N, int p0, int np,
                         Rows kind) {
  const int K = static_cast<int>(w.K);
  const int64_t groups = w.groups, act_groups = activation_groups(k_pairs(K), groups);  // the activations' K groups
  std::vector<float> exact_w(size_t(N) * K);
  dequant_f32(w, N, exact_w.data());
  // The 4-bit formats' terms add sum q * offset to sum q * u * scale per chunk: fp32 rounding of
  // those terms scales with |x| (15 |scale| + |offset|), not with |x w|.
  const bool nibbles = !is_int8(w.format), zero_point = has_zero_point(w.format);
  const int64_t width = zero_point ? 2 : 1, weight_group_k = 2 * (k_pairs(K) / groups);
  const auto nibble_magnitude = [&](int n, int k) {
    const float* sc = w.scales + (int64_t(n) * groups + k / weight_group_k) * width;
    return 15.0 * std::fabs(sc[0]) + (zero_point ? std::fabs(sc[1]) : 8.0 * std::fabs(sc[0]));
  };
  std::vector<float*> rows(m);
  for (int i = 0; i < m; ++i) {
    rows[i] = static_cast<float*>(std::malloc(sizeof(float) * K));  // exact K: no read of the padding k
    const float mag = std::exp(randn() * 3.0f);
    for (int k = 0; k < K; ++k) rows[i][k] = kind == Rows::Extreme ? 3.0f : randn() * mag;
  }
  if (kind == Rows::Specials) {
    rows[0][K / 2] = NAN;
    if (m > 1) rows[1][0] = INFINITY;
    if (m > 2)
      for (int k = 0; k < K; ++k) rows[2][k] = 1e-40f * (k % 3);  // 127 / max overflows
  }
  const int ldc = np * 16;
  char ctx[160];
  std::snprintf(ctx, sizeof ctx, "%s m=%d N=%d K=%d groups=%ld (activations %ld) p0=%d np=%d kind=%d",
                weight_format_name(w.format), m, N, K, long(groups), long(act_groups), p0, np, int(kind));
  std::vector<float> ref(size_t(m) * ldc);
  for (size_t t = 0; t < tables.size(); ++t) {
    float* c = static_cast<float*>(std::malloc(sizeof(float) * m * ldc));  // exact size
    // Each table quantizes with its own quantize_rows; a false return (NaN / Inf) means fp32.
    std::vector<int16_t> q(size_t(m) * 2 * k_pairs(K));
    // the AMX tile products load rows in blocks of 16: q8 stays readable 15 rows past the last
    std::vector<int8_t> q8(q.size() + 15 * 2 * k_pairs(K));
    std::vector<float> step(size_t(m) * act_groups);
    const QuantizedRows quantized{q.data(), q8.data(), step.data(), act_groups};
    const bool usable = tables[t].k->quantize_rows(rows.data(), m, K, act_groups, q.data(), q8.data(), step.data());
    tables[t].k->gemm_nt_int8(w, rows.data(), usable ? &quantized : nullptr, m, p0, np, c);
    const char* name = tables[t].name.c_str();
    if (t == 0) std::memcpy(ref.data(), c, sizeof(float) * m * ldc);
    // Calls with NaN / Inf rows run in fp32, whose summation order is each table's own.
    if (t > 0 && kind != Rows::Specials)
      for (int i = 0; i < m * ldc; ++i)
        if (std::memcmp(&c[i], &ref[i], 4) != 0 && failures++ < 20)
          std::printf("FAIL %s differs from ref at %d: %.9g vs %.9g %s\n", name, i, c[i], ref[i], ctx);
    const int64_t group_k = 2 * (k_pairs(K) / act_groups);
    for (int i = 0; i < m; ++i)
      for (int col = 0; col < ldc; ++col) {
        const int n = 16 * p0 + col;
        double exact = 0, sum_abs = 0, bound = 0;
        bool special = false;
        for (int64_t g = 0; g < act_groups; ++g) {
          double absmax = 0, wsum = 0;
          for (int64_t k = g * group_k; k < std::min<int64_t>(K, (g + 1) * group_k); ++k) {
            const double x = rows[i][k], wk = n < N ? exact_w[size_t(n) * K + k] : 0.0;
            special = special || !std::isfinite(x);
            absmax = std::max(absmax, std::fabs(x));
            exact += x * wk, sum_abs += std::fabs(x * wk), wsum += std::fabs(wk);
            if (nibbles && n < N) sum_abs += std::fabs(x) * nibble_magnitude(n, int(k));
          }
          bound += absmax / 127.0 / 2.0 * wsum;
        }
        const double got = c[size_t(i) * ldc + col];
        if (special) {
          // The 4-bit codes kernels sum x * u and x apart (u = 0 times an Inf is NaN): a non-finite
          // exact sum may come out as NaN instead of the infinity.
          const bool ok = std::isnan(exact)                  ? std::isnan(got)
                          : nibbles && !std::isfinite(exact) ? !std::isfinite(got)
                                                             : got == exact;
          if (!ok && failures++ < 20)
            std::printf("FAIL %s NaN/Inf row %d col %d: got %g expected %g %s\n", name, i, col, got, exact, ctx);
          continue;
        }
        const double allowed = bound * (1 + 1e-5) + 1e-5 * sum_abs + 1e-30;
        if (!(std::fabs(got - exact) <= allowed) && failures++ < 20)
          std::printf("FAIL %s row %d col %d: got %.9g expected %.9g (allowed %.3g) %s\n", name, i, col, got, exact,
                      allowed, ctx);
      }
    std::free(c);
  }
  for (auto r : rows) std::free(r);
}

static uint16_t bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static float nan_with_payload(uint32_t payload) {
  const uint32_t bits = 0x7F800000u | payload;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Random codes of `format` in its packed layout for [N, K] (zero padding), scales (and mins) with
// zeros, now and then one so small that products turn subnormal (dequantizers that round in
// hardware must fall back there), exact rounding ties and infinities.
struct CodedMatrix {
  WeightFormat format;
  int N, K;
  int64_t groups;
  std::vector<uint8_t> data;
  std::vector<float> scales;
  CodedMatrix(WeightFormat f, int N_, int K_, int64_t groups_) : format(f), N(N_), K(K_), groups(groups_) {
    const int64_t Kp = k_pairs(K), width = has_zero_point(f) ? 2 : 1;
    data.assign(padded_rows(N) * Kp * (is_byte_coded(f) ? 2 : 1), 0);
    // Half of the fp8 matrices hold normal codes only, as real weights nearly do: AVX2 decodes a k pair
    // from its nibbles unless it holds a zero, subnormal or NaN code (then per code), and uniform
    // codes put one in 90% of the pairs.
    const bool normal_fp8 = f == WeightFormat::Fp8 && rint_(0, 1) == 1;
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k) {
        const int64_t slot = (n / 16 * Kp + k / 2) * 16 + n % 16;
        if (normal_fp8)
          data[slot * 2 + k % 2] = uint8_t(rint_(0, 1) << 7 | rint_(8, 0x7E));
        else if (is_byte_coded(f))
          data[slot * 2 + k % 2] = uint8_t(rint_(0, 255));
        else
          data[slot] |= uint8_t(rint_(0, 15) << (4 * (k % 2)));
      }
    scales.assign(padded_rows(N) * groups * width, 0.0f);
    for (int64_t i = 0; i < N * groups * width; ++i) {
      const int kind = rint_(0, 19);
      // kind 2: halfway between two bf16 values times a power-of-two code, so that rounding to
      // nearest even decides; kind 3: infinite (a zero code gives NaN) or NaN with a random payload
      // (the products carry it: a rounding that added to it would carry into the sign)
      const float sign = rint_(0, 1) ? 1.0f : -1.0f;
      scales[i] = kind == 0   ? 0.0f
                  : kind == 1 ? randn() * 0x1p-128f
                  : kind == 2 ? sign * std::ldexp(1.0f + 0x1p-8f + float(rint_(0, 1)) * 0x1p-7f, rint_(-20, 20))
                  : kind == 3 ? (rint_(0, 1) ? sign * INFINITY : nan_with_payload(uint32_t(rint_(1, 0x7FFFFF))))
                              : randn() * std::exp(randn() * 4.0f);
    }
  }
  QuantMatrix view() const { return {format, data.data(), scales.data(), K, groups}; }
};

// gemm_nt_int8 on int8 codes (the extreme kind: every code -128, scales 1).
static void test(const std::vector<Table>& tables, int m, int N, int K, int64_t groups, int p0, int np, Rows kind) {
  const Int8Matrix W(N, K, groups, kind == Rows::Extreme);
  test_integer(tables, W.view(groups > 1 ? WeightFormat::Int8KGroup : WeightFormat::Int8), m, N, p0, np, kind);
}

// gemm_nt_int8 on 4-bit codes, with finite scales (zero now and then) and mins; the extreme kind has
// only the codes 0 and 15.
static void test_nibbles(const std::vector<Table>& tables, WeightFormat format, int m, int N, int K, int64_t groups,
                         int p0, int np, Rows kind) {
  CodedMatrix W(format, N, K, groups);
  for (float& s : W.scales) s = s == 0.0f || rint_(0, 9) == 0 ? 0.0f : randn() * 0.01f;
  if (kind == Rows::Extreme)
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k) {
        uint8_t& byte = W.data[(n / 16 * k_pairs(K) + k / 2) * 16 + n % 16];
        byte = uint8_t((byte & (0xF0 >> (4 * (k % 2)))) | ((rint_(0, 1) ? 15 : 0) << (4 * (k % 2))));
      }
  test_integer(tables, W.view(), m, N, p0, np, kind);
}

// Every table's dequantized panels must be the reference's bits; the reference's fp8 must equal the
// E4M3 value times the scale rounded to bf16.
static void test_dequant(const std::vector<Table>& tables, WeightFormat format, int N, int K, int64_t groups) {
  const CodedMatrix W(format, N, K, groups);
  const QuantMatrix w = W.view();
  const int64_t Kp = k_pairs(K);
  const int np_all = padded_rows(N) / 16;
  const int p0 = rint_(0, np_all - 1), np = rint_(1, np_all - p0);
  const int64_t kp0 = rint_(0, int(Kp) - 1), nkp = rint_(1, int(Kp - kp0));
  const size_t out_size = size_t(np) * nkp * 32;
  std::vector<uint16_t> ref(out_size);
  char ctx[140];
  std::snprintf(ctx, sizeof ctx, "%s N=%d K=%d groups=%ld p0=%d np=%d kp0=%ld nkp=%ld", weight_format_name(format), N,
                K, long(groups), p0, np, long(kp0), long(nkp));
  for (size_t t = 0; t < tables.size(); ++t) {
    uint16_t* out = static_cast<uint16_t*>(std::malloc(out_size * 2));  // exact size
    tables[t].k->dequant(w, p0, np, kp0, nkp, out);
    if (t == 0) {
      std::memcpy(ref.data(), out, out_size * 2);
      if (format != WeightFormat::Fp8) {
        std::free(out);
        continue;
      }
      const int64_t group_k = 2 * (Kp / groups);
      for (int p = 0; p < np; ++p)
        for (int64_t q = 0; q < nkp; ++q)
          for (int i = 0; i < 16; ++i)
            for (int h = 0; h < 2; ++h) {
              const int n = (p0 + p) * 16 + i;
              const int64_t k = 2 * (kp0 + q) + h;
              const uint8_t code = W.data[(((p0 + p) * Kp + kp0 + q) * 16 + i) * 2 + h];
              const uint16_t want = bf16_bits(e4m3_value(code) * W.scales[n * groups + k / group_k]);
              const uint16_t got = out[((p * nkp + q) * 16 + i) * 2 + h];
              const bool both_nan = (want & 0x7FFF) > 0x7F80 && (got & 0x7FFF) > 0x7F80;
              if (got != want && !both_nan && failures++ < 20)
                std::printf("FAIL ref fp8 code 0x%02x at n=%d k=%ld: 0x%04x vs 0x%04x %s\n", code, n, long(k), got,
                            want, ctx);
            }
    } else {
      // NaN is NaN: which of two NaN operands' payloads an add passes on depends on the operand order
      const auto is_nan = [](uint16_t bits) { return (bits & 0x7FFF) > 0x7F80; };
      for (size_t e = 0; e < out_size; ++e)
        if (out[e] != ref[e] && !(is_nan(out[e]) && is_nan(ref[e]))) {
          if (failures++ < 20)
            std::printf("FAIL %s dequant differs from ref at %zu: 0x%04x vs 0x%04x %s\n", tables[t].name.c_str(), e,
                        out[e], ref[e], ctx);
          break;
        }
    }
    std::free(out);
  }
}

// gemm_nt_codes (fp32 on the codes' exact values, each table its own summation order) against
// float64 sums over the reference's exact dequantized weights (dequant_f32).
static void test_codes(const std::vector<Table>& tables, WeightFormat format, int m, int N, int K, int64_t groups) {
  CodedMatrix W(format, N, K, groups);
  for (float& s : W.scales) s = std::fabs(s) < 0x1p-60f ? s : randn() * 0.01f;  // keep the sums finite
  if (format == WeightFormat::Fp8)                                              // NaN codes would make every sum NaN
    for (uint8_t& code : W.data)
      if ((code & 0x7F) == 0x7F) code = 0;
  const QuantMatrix w = W.view();
  std::vector<float> exact_w(size_t(N) * K);
  dequant_f32(w, N, exact_w.data());
  const int p0 = rint_(0, (N - 1) / 16), np = rint_(1, padded_rows(N) / 16 - p0), ldc = np * 16;
  std::vector<std::vector<float>> rows(m, std::vector<float>(K));
  std::vector<const float*> row_ptrs(m);
  for (int i = 0; i < m; ++i) {
    for (float& x : rows[i]) x = randn();
    row_ptrs[i] = rows[i].data();
  }
  char ctx[140];
  std::snprintf(ctx, sizeof ctx, "codes %s m=%d N=%d K=%d groups=%ld p0=%d np=%d", weight_format_name(format), m, N, K,
                long(groups), p0, np);
  // gemm_nt_scaled reads the rows lda apart and writes C ldc_scaled apart (both past their minimum)
  const int lda = K + rint_(0, 5), ldc_scaled = ldc + rint_(0, 3);
  std::vector<float> a(size_t(m) * lda);
  for (int i = 0; i < m; ++i) std::copy(rows[i].begin(), rows[i].end(), a.begin() + size_t(i) * lda);
  for (const Table& t : tables)
    for (const bool scaled : {false, true}) {
      if (!(scaled ? t.k->gemm_nt_scaled != nullptr : t.k->gemm_nt_codes != nullptr)) continue;
      std::vector<float> c(size_t(m) * ldc);
      if (scaled) {
        std::vector<float> wide(size_t(m) * ldc_scaled);
        t.k->gemm_nt_scaled(w, a.data(), lda, m, p0, np, wide.data(), ldc_scaled);
        for (int i = 0; i < m; ++i)
          std::copy_n(wide.begin() + size_t(i) * ldc_scaled, ldc, c.begin() + size_t(i) * ldc);
      } else {
        t.k->gemm_nt_codes(w, row_ptrs.data(), m, p0, np, c.data());
      }
      for (int i = 0; i < m; ++i)
        for (int col = 0; col < ldc; ++col) {
          const int n = 16 * p0 + col;
          // gemm_nt_codes' 4-bit formats sum x * code and x apart, then apply scale and offset per
          // group: their fp32 rounding scales with |x| (15 |scale| + |offset|), not with |x w|.
          // gemm_nt_scaled sums x * w on the exact weights.
          const int64_t width = has_zero_point(format) ? 2 : 1, group_k = 2 * (k_pairs(K) / groups);
          double exact = 0, magnitude = 0;
          for (int k = 0; n < N && k < K; ++k) {
            const double x = rows[i][k], term = x * exact_w[size_t(n) * K + k];
            exact += term;
            magnitude += std::fabs(term);
            if (!scaled && !is_byte_coded(format)) {
              const float* s = &W.scales[(n * groups + k / group_k) * width];
              magnitude +=
                  std::fabs(x) * (15.0 * std::fabs(s[0]) + (width == 2 ? std::fabs(s[1]) : 8.0 * std::fabs(s[0])));
            }
          }
          const double allowed = 2e-5 * magnitude + 1e-30;
          const double got = c[size_t(i) * ldc + col];
          if (!(std::fabs(got - exact) <= allowed) && failures++ < 20)
            std::printf("FAIL %s%s row %d col %d: got %.9g expected %.9g (allowed %.3g) %s\n", t.name.c_str(),
                        scaled ? " scaled" : "", i, col, got, exact, allowed, ctx);
        }
    }
}

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 200;
  std::vector<Table> tables{{"ref", &ref_dequant()}};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && avx2_dequant())
    tables.push_back({"avx2", avx2_dequant()});
#ifdef KT_SIMDE
  // quant_avx512.inc on SIMDe, both roundings: its logic, on any CPU (its fallback for tiny scales is the AVX2 table)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && avx512_vnni_dequant())
    tables.push_back({"avx512-vnni-simde", avx512_vnni_dequant()});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && avx512_dequant())
    tables.push_back({"avx512-simde", avx512_dequant()});
#else
  const bool avx512_vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                           __builtin_cpu_supports("avx512vbmi");
  if (avx512_vnni && avx512_vnni_dequant()) tables.push_back({"avx512-vnni", avx512_vnni_dequant()});
  if (avx512_vnni && __builtin_cpu_supports("avx512bf16") && avx512_dequant())
    tables.push_back({"avx512", avx512_dequant()});
#endif
  // gemm_nt_int8 on AMX-INT8 tiles (quant_amx.inc) over the widest vector table: software tiles on
  // any CPU, the real ones where the CPU has AMX-INT8 and the OS grants the tile state.
  const DequantKernels& widest = *tables.back().k;
  tables.push_back({"amx-emu int8 tiles", amx_emu_int8_dequant(widest)});
#ifndef KT_SIMDE
  unsigned a, b, c, d;
  __cpuid_count(7, 0, a, b, c, d);
  unsigned long perm = 0;
  if ((d & (1u << 24)) && (d & (1u << 25)) && syscall(SYS_arch_prctl, 0x1023, 18) == 0 &&
      syscall(SYS_arch_prctl, 0x1022, &perm) == 0 && (perm >> 18) & 1 && amx_int8_dequant(widest))
    tables.push_back({"amx int8 tiles", amx_int8_dequant(widest)});
  else
    std::printf("amx int8 tiles: not run (no AMX-INT8 or no tile-data permission)\n");
#endif
  for (const auto& t : tables) std::printf("table %s\n", t.name.c_str());
  for (int it = 0; it < iters; ++it) {
    // decode's few rows, and (integer dot products at every row count) blocks of 8 rows and a remainder
    const int m = rint_(1, it % 3 ? kDirectQuantRows : 20), N = rint_(1, 70);
    const bool grouped = rint_(0, 1);
    const int group = 2 * rint_(1, 24), K = grouped ? group * rint_(1, 5) : rint_(1, 300);
    const int p0 = rint_(0, (N - 1) / 16), np = rint_(1, padded_rows(N) / 16 - p0);
    test(tables, m, N, K, grouped ? K / group : 1, p0, np, it % 10 == 0 ? Rows::Specials : Rows::Normal);
  }
  // the tiles' shapes: groups of whole 64-k tiles, rows in blocks of 16 and 32 with a partial one
  for (int it = 0; it < iters / 2; ++it) {
    const int m = rint_(5, 40), N = rint_(1, 70), K = 64 * rint_(1, 6);
    const int p0 = rint_(0, (N - 1) / 16), np = rint_(1, padded_rows(N) / 16 - p0);
    // weight groups of 64 k, of K (one per row: activation groups of 128 k where 128 divides K), or
    // of 256 k (activation groups of 128 k within each)
    const int kind = rint_(0, 2);
    test(tables, m, N, K, kind == 0 ? K / 64 : (kind == 1 || K % 256 ? 1 : K / 256), p0, np,
         it % 10 == 0 ? Rows::Specials : (it % 10 == 1 ? Rows::Extreme : Rows::Normal));
  }
  // the 4-bit formats: decode's rows and (integer dot products at every row count) more; groups of
  // whole 4-k-pair blocks (the vector reordering of the activations) and of any even length
  const WeightFormat nibble_formats[] = {WeightFormat::Int4, WeightFormat::Int4Zp, WeightFormat::Int4KGroup,
                                         WeightFormat::Int4ZpKGroup};
  for (int it = 0; it < iters; ++it) {
    const WeightFormat format = nibble_formats[it % 4];
    const int m = rint_(1, it % 3 ? kDirectQuantRows : 20), N = rint_(1, 70);
    const int group = rint_(0, 1) ? 2 * rint_(1, 64) : 32 << rint_(0, 2);
    const int K = is_grouped(format) ? group * rint_(1, 5) : (rint_(0, 1) ? rint_(1, 300) : 128 * rint_(1, 4));
    const int p0 = rint_(0, (N - 1) / 16), np = rint_(1, padded_rows(N) / 16 - p0);
    test_nibbles(tables, format, m, N, K, is_grouped(format) ? K / group : 1, p0, np,
                 it % 10 == 0 ? Rows::Specials : (it % 10 == 1 ? Rows::Extreme : Rows::Normal));
  }
  const WeightFormat formats[] = {WeightFormat::Int8,   WeightFormat::Int8KGroup, WeightFormat::Int4,
                                  WeightFormat::Int4Zp, WeightFormat::Int4KGroup, WeightFormat::Int4ZpKGroup,
                                  WeightFormat::Fp8};
  for (int it = 0; it < iters; ++it)
    for (WeightFormat format : formats) {
      const bool grouped = is_grouped(format);
      const int N = rint_(1, 70), group = 2 * rint_(1, 64), K = grouped ? group * rint_(1, 4) : rint_(1, 300);
      test_dequant(tables, format, N, K, grouped ? K / group : 1);
      // decode's rows, and gemm_nt_scaled's blocks of 8 with a remainder
      if (it % 4 == 0)
        test_codes(tables, format, rint_(1, it % 8 ? kDirectQuantRows : 20), N, K, grouped ? K / group : 1);
    }
  test(tables, 1, 16, 2 * kMaxPairsPerInt32 + 6, 1, 0, 1, Rows::Extreme);  // two int32 chunks at the edge
  test(tables, 3, 20, 2 * kMaxPairsPerInt32 + 3, 1, 1, 1, Rows::Normal);
  test(tables, 11, 20, 2 * kMaxPairsPerInt32 + 3, 1, 0, 2, Rows::Extreme);
  test(tables, 21, 40, 4 * kMaxPairsPerInt32, 1, 0, 3, Rows::Extreme);  // two chunks of whole tiles
  for (WeightFormat format : nibble_formats)
    if (!is_grouped(format)) {
      test_nibbles(tables, format, 1, 16, 2 * kMaxPairsPerInt32 + 6, 1, 0, 1, Rows::Extreme);
      test_nibbles(tables, format, 7, 20, 2 * kMaxPairsPerInt32 + 3, 1, 0, 2, Rows::Extreme);
    }
  std::printf("%s: %d failures\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
