// AVX2 dequantization into bf16 panels; bit-identical to quant_ref.cpp (same fp32 operations, no
// FMA contraction: the extension is built with -ffp-contract=off). Same ODR rules as gemm_avx2.cpp.
// The standard headers come before the target pragma: their inline templates are shared with units
// built for plain x86-64, so they must not be compiled for AVX2 here.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "gemm.h"
#include "quant.h"

namespace kt {
namespace {

// Round two fp32 vectors to bf16 (nearest even) and store them as 16 consecutive values.
// A NaN could carry into the sign; dequant_avx2 leaves the only ones that can have such a payload,
// those of a NaN scale or min, to quant_ref.
inline void store_bf16(__m256 a, __m256 b, uint16_t* dst) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
  __m256i ia = _mm256_castps_si256(a), ib = _mm256_castps_si256(b);
  ia = _mm256_srli_epi32(_mm256_add_epi32(ia, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(ia, 16), one))),
                         16);
  ib = _mm256_srli_epi32(_mm256_add_epi32(ib, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(ib, 16), one))),
                         16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(ia, ib), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), packed);
}

// Per (panel, group): each row's scale (and min) duplicated for its two halves, in output order.
struct PanelScales {
  __m256 scale[4], offset[4];
};

inline PanelScales load_scales(const QuantMatrix& w, int64_t panel, int64_t group, bool zero_point) {
  alignas(32) float scale[32], offset[32];
  const int64_t width = zero_point ? 2 : 1;
  for (int i = 0; i < kPanelRows; ++i) {
    const float* s = w.scales + ((panel * kPanelRows + i) * w.groups + group) * width;
    scale[2 * i] = scale[2 * i + 1] = s[0];
    offset[2 * i] = offset[2 * i + 1] = zero_point ? s[1] : 0.0f;
  }
  PanelScales out;
  for (int v = 0; v < 4; ++v) {
    out.scale[v] = _mm256_load_ps(scale + 8 * v);
    out.offset[v] = _mm256_load_ps(offset + 8 * v);
  }
  return out;
}

// An E4M3 value is exact in fp32 with its low 16 bits zero: the code's value is its fp32 bytes 2
// ("low": the exponent's low bit and the 3 mantissa bits) and 3 ("high": sign and the exponent's top
// 7 bits). A normal code's two bytes come from its nibbles: high by a 16-entry vpshufb table on the
// high nibble (sign and e / 2; the exponent e + 120 halved is 60 + e / 2), low is the low nibble
// shifted up. Zeros, subnormals (exponent 0) and NaN (0x7F) break that rule; 32 codes holding one take
// a per-code table instead (rare in real weights: a zero or subnormal code is a weight below 2^-6 of
// its scale, 1/28672 of the largest code's). The per-code arithmetic this replaces (shifts, an int to
// float conversion, two blends per 8 codes) made fp8 decode 3x slower than int8's
// (benchmarks/quant_kernels.cpp); this is within 1.25x.
struct E4m3Bytes {
  __m256i low, high;  // in the codes' order
};

inline const uint16_t* e4m3_top_halves() {
  static const auto table = [] {
    std::array<uint16_t, 256> halves{};
    for (int code = 0; code < 256; ++code) {
      const float value = e4m3_value(static_cast<uint8_t>(code));
      uint32_t bits;
      std::memcpy(&bits, &value, sizeof(bits));
      halves[code] = static_cast<uint16_t>(bits >> 16);
    }
    return halves;
  }();
  return table.data();
}

// Out of line (and its loop kept out of the callers' registers: inlined, it made the decode loop keep
// its accumulators on the stack, 12 cycles per k pair).
__attribute__((noinline, cold)) void e4m3_bytes_per_code(const uint8_t* codes, uint8_t* low, uint8_t* high) {
  const uint16_t* halves = e4m3_top_halves();
  for (int i = 0; i < 32; ++i) {
    low[i] = static_cast<uint8_t>(halves[codes[i]]);
    high[i] = static_cast<uint8_t>(halves[codes[i]] >> 8);
  }
}

// A 16-entry vpshufb table in both 128-bit lanes.
inline __m256i lane_table(const uint8_t (&entries)[16]) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(entries));
  return _mm256_broadcastsi128_si256(t);
}

// The exceptions by nibble: bit 0 of exception_high[hn] is set where e / 2 is 0 (the high nibble's
// sign bit ignored), bit 1 where it is 7; bit 0 of exception_low[ln] where the exponent's low bit is 0
// (so e is 0 where e / 2 is too), bit 1 where ln is 0xF (NaN where e is 15). A code is an exception
// iff the two share a bit, which one vptest finds for 32 codes.
inline E4m3Bytes e4m3_bytes(__m256i code) {
  static constexpr uint8_t top[16] = {0x3C, 0x3D, 0x3E, 0x3F, 0x40, 0x41, 0x42, 0x43,
                                      0xBC, 0xBD, 0xBE, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3};
  static constexpr uint8_t exception_high[16] = {1, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 2};
  static constexpr uint8_t exception_low[16] = {1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 2};
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i low_nibble = _mm256_and_si256(code, nibble);
  const __m256i high_nibble = _mm256_and_si256(_mm256_srli_epi16(code, 4), nibble);
  if (!_mm256_testz_si256(_mm256_shuffle_epi8(lane_table(exception_high), high_nibble),
                          _mm256_shuffle_epi8(lane_table(exception_low), low_nibble))) [[unlikely]] {
    alignas(32) uint8_t codes[32], low[32], high[32];
    _mm256_store_si256(reinterpret_cast<__m256i*>(codes), code);
    e4m3_bytes_per_code(codes, low, high);
    return {_mm256_load_si256(reinterpret_cast<const __m256i*>(low)),
            _mm256_load_si256(reinterpret_cast<const __m256i*>(high))};
  }
  return {_mm256_slli_epi16(low_nibble, 4), _mm256_shuffle_epi8(lane_table(top), high_nibble)};
}

// 32 E4M3 codes (one k pair of a panel: 16 rows x 2) as exact fp32 values, 8 consecutive per vector.
inline void e4m3_quads(const uint8_t* codes, __m256 out[4]) {
  // dwords reordered so that the in-lane byte and word interleaves give codes 8j..8j+7 in vector j
  const E4m3Bytes bytes = e4m3_bytes(_mm256_permutevar8x32_epi32(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)));
  const __m256i first = _mm256_unpacklo_epi8(bytes.low, bytes.high);
  const __m256i second = _mm256_unpackhi_epi8(bytes.low, bytes.high);
  const __m256i zero = _mm256_setzero_si256();
  out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, first));
  out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, first));
  out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, second));
  out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, second));
}

// The (panel, group) ranges of out whose scale or min is NaN on some row, dequantized again by
// quant_ref: store_bf16's rounding could carry such a NaN's payload into the sign. A check per group
// after the fact keeps the loop above free of it (a branch there cost 8% of its time).
void redo_nan_scales(const QuantMatrix& w, int64_t p0, int64_t np, int64_t kp0, int64_t nkp, uint16_t* out) {
  const int64_t Kp = k_pairs(w.K), pairs_per_group = Kp / w.groups, width = has_zero_point(w.format) ? 2 : 1;
  for (int64_t p = 0; p < np; ++p)
    for (int64_t q0 = 0; q0 < nkp;) {
      const int64_t group = (kp0 + q0) / pairs_per_group;
      const int64_t q1 = std::min(nkp, (group + 1) * pairs_per_group - kp0);
      bool nan = false;
      for (int i = 0; i < kPanelRows; ++i)
        for (int64_t j = 0; j < width; ++j) {
          const float v = w.scales[(((p0 + p) * kPanelRows + i) * w.groups + group) * width + j];
          nan |= v != v;
        }
      if (nan) ref_dequant().dequant(w, p0 + p, 1, kp0 + q0, q1 - q0, out + (p * nkp + q0) * kPanelRows * 2);
      q0 = q1;
    }
}

void dequant_avx2(const QuantMatrix& w, int64_t p0, int64_t np, int64_t kp0, int64_t nkp, uint16_t* out) {
  const int64_t Kp = k_pairs(w.K), pairs_per_group = Kp / w.groups;
  const bool zero_point = has_zero_point(w.format);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int64_t p = 0; p < np; ++p) {
    int64_t loaded_group = -1;
    PanelScales s;
    for (int64_t q = 0; q < nkp; ++q) {
      const int64_t kp = kp0 + q, group = kp / pairs_per_group;
      if (group != loaded_group) {
        s = load_scales(w, p0 + p, group, zero_point);
        loaded_group = group;
      }
      const int64_t pair_row = (p0 + p) * Kp + kp;
      uint16_t* dst = out + (p * nkp + q) * kPanelRows * 2;
      __m256 v[4];
      if (is_int8(w.format)) {
        const int8_t* codes = reinterpret_cast<const int8_t*>(w.data) + pair_row * kPanelRows * 2;
        for (int j = 0; j < 4; ++j) {
          const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * j));
          v[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), s.scale[j]);
        }
      } else if (w.format == WeightFormat::Fp8) {
        e4m3_quads(w.data + pair_row * kPanelRows * 2, v);
        for (int j = 0; j < 4; ++j) v[j] = _mm256_mul_ps(v[j], s.scale[j]);
      } else {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.data + pair_row * kPanelRows));
        const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
        const __m128i rows_0_7 = _mm_unpacklo_epi8(lo, hi), rows_8_15 = _mm_unpackhi_epi8(lo, hi);
        const __m128i parts[4] = {rows_0_7, _mm_srli_si128(rows_0_7, 8), rows_8_15, _mm_srli_si128(rows_8_15, 8)};
        for (int j = 0; j < 4; ++j) {
          const __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]));
          v[j] = zero_point ? _mm256_add_ps(_mm256_mul_ps(code, s.scale[j]), s.offset[j])
                            : _mm256_mul_ps(_mm256_sub_ps(code, eight), s.scale[j]);
        }
      }
      store_bf16(v[0], v[1], dst);
      store_bf16(v[2], v[3], dst + 16);
    }
  }
  redo_nan_scales(w, p0, np, kp0, nkp, out);
}

// The direct decode kernels stream a panel's codes once, with few instructions per byte: the core's
// out-of-order window then covers too few cache lines to keep the memory system busy. Fetching
// 1 KiB ahead (as the bf16 kernel does) made the int8 kernel ~10% faster, one row from RAM.
constexpr int64_t kPrefetchBytes = 1024;

// Called once per k pair of `pair_bytes` code bytes; touches each line once.
inline void prefetch_codes(const uint8_t* pair, int64_t kp, int64_t pair_bytes) {
  if ((kp * pair_bytes) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(pair + kPrefetchBytes), _MM_HINT_T0);
}

// One k pair of a panel's codes as fp32, in the stored row-interleaved order: vector j holds rows
// 4j..4j+3 as (even k, odd k) lane pairs. Both int8 (2 bytes per row) and int4 (a byte per row, low
// nibble even) unpack to that order, so one broadcast of (x[k], x[k+1]) multiplies all of them.
struct PairCodes {
  __m256 v0, v1, v2, v3;
};

inline __m256 int8_quad(const int8_t* codes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes))));
}
inline __m256 uint8_quad(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

inline PairCodes pair_codes(const QuantMatrix& w, int64_t pair_row, bool int8) {
  if (int8) {
    const int8_t* codes = reinterpret_cast<const int8_t*>(w.data) + pair_row * kPanelRows * 2;
    return {int8_quad(codes), int8_quad(codes + 8), int8_quad(codes + 16), int8_quad(codes + 24)};
  }
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.data + pair_row * kPanelRows));
  const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
  const __m128i rows_0_7 = _mm_unpacklo_epi8(lo, hi), rows_8_15 = _mm_unpackhi_epi8(lo, hi);
  return {uint8_quad(rows_0_7), uint8_quad(_mm_srli_si128(rows_0_7, 8)), uint8_quad(rows_8_15),
          uint8_quad(_mm_srli_si128(rows_8_15, 8))};
}

// (x[k], x[k+1]) in every lane pair; for odd K the last pair's odd half is padding and must
// multiply a zero, not whatever lies past the row.
inline __m256 x_pair(const float* x, int64_t k, int64_t K) {
  if (k + 1 < K) return _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(x + k)));
  return _mm256_setr_ps(x[k], 0.0f, x[k], 0.0f, x[k], 0.0f, x[k], 0.0f);
}

inline float sum_range(const float* x, int64_t begin, int64_t end) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t k = begin;
  for (; k + 16 <= end; k += 16) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + k));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + k + 8));
  }
  __m256 s = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float total = _mm_cvtss_f32(h);
  for (; k < end; ++k) total += x[k];
  return total;
}

// Lane-pair (even, odd) sums of rows 0-3 and 4-7 as one vector of rows 0-7.
inline __m256 fold_pairs(__m256 rows_0_3, __m256 rows_4_7) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(rows_0_3, rows_4_7)), 0xD8));
}

// One panel, all K, MR (1 or 2) rows, int8 or 4-bit codes. Per group each row-interleaved accumulator
// collects x * code; it is then scaled (scale per row, duplicated over the lane pair) into the totals,
// and offset * sum(x over the group) is added, with offset = 0 (int8), -8 scale (int4) or min (zero
// point). Four independent accumulators per row keep the FMA latency off the critical path; the
// lane pairs are folded once per panel.
template <int MR>
void codes_panel(const QuantMatrix& w, const float* const* a, int64_t panel, float* c, int ldc) {
  const int64_t K = w.K, Kp = k_pairs(K), pairs_per_group = Kp / w.groups;
  const bool int8 = is_int8(w.format), zero_point = has_zero_point(w.format);
  const bool offset = !int8;  // the 4-bit formats
  const int64_t pair_bytes = code_bytes_per_pair(w.format);
  const float* a0 = a[0];
  const float* a1 = a[MR > 1 ? 1 : 0];
  __m256 t00 = _mm256_setzero_ps(), t01 = _mm256_setzero_ps(), t02 = _mm256_setzero_ps(), t03 = _mm256_setzero_ps();
  __m256 t10 = _mm256_setzero_ps(), t11 = _mm256_setzero_ps(), t12 = _mm256_setzero_ps(), t13 = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t kp_begin = g * pairs_per_group, kp_end = kp_begin + pairs_per_group;
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c02 = _mm256_setzero_ps(), c03 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(), c12 = _mm256_setzero_ps(), c13 = _mm256_setzero_ps();
    for (int64_t kp = kp_begin; kp < kp_end; ++kp) {
      prefetch_codes(w.data + (panel * Kp + kp) * pair_bytes, kp, pair_bytes);
      const PairCodes q = pair_codes(w, panel * Kp + kp, int8);
      const __m256 x0 = x_pair(a0, 2 * kp, K);
      c00 = _mm256_fmadd_ps(x0, q.v0, c00);
      c01 = _mm256_fmadd_ps(x0, q.v1, c01);
      c02 = _mm256_fmadd_ps(x0, q.v2, c02);
      c03 = _mm256_fmadd_ps(x0, q.v3, c03);
      if (MR > 1) {
        const __m256 x1 = x_pair(a1, 2 * kp, K);
        c10 = _mm256_fmadd_ps(x1, q.v0, c10);
        c11 = _mm256_fmadd_ps(x1, q.v1, c11);
        c12 = _mm256_fmadd_ps(x1, q.v2, c12);
        c13 = _mm256_fmadd_ps(x1, q.v3, c13);
      }
    }
    const PanelScales s = load_scales(w, panel, g, zero_point);
    t00 = _mm256_fmadd_ps(c00, s.scale[0], t00);
    t01 = _mm256_fmadd_ps(c01, s.scale[1], t01);
    t02 = _mm256_fmadd_ps(c02, s.scale[2], t02);
    t03 = _mm256_fmadd_ps(c03, s.scale[3], t03);
    if (MR > 1) {
      t10 = _mm256_fmadd_ps(c10, s.scale[0], t10);
      t11 = _mm256_fmadd_ps(c11, s.scale[1], t11);
      t12 = _mm256_fmadd_ps(c12, s.scale[2], t12);
      t13 = _mm256_fmadd_ps(c13, s.scale[3], t13);
    }
    if (offset) {
      // Each lane pair gets half the group sum in each lane, so folding the pair restores it.
      const int64_t k_begin = 2 * kp_begin, k_end = 2 * kp_end < K ? 2 * kp_end : K;
      const __m256 half = _mm256_set1_ps(0.5f);
      const __m256 o0 = zero_point ? s.offset[0] : _mm256_mul_ps(_mm256_set1_ps(-8.0f), s.scale[0]);
      const __m256 o1 = zero_point ? s.offset[1] : _mm256_mul_ps(_mm256_set1_ps(-8.0f), s.scale[1]);
      const __m256 o2 = zero_point ? s.offset[2] : _mm256_mul_ps(_mm256_set1_ps(-8.0f), s.scale[2]);
      const __m256 o3 = zero_point ? s.offset[3] : _mm256_mul_ps(_mm256_set1_ps(-8.0f), s.scale[3]);
      const __m256 sum0 = _mm256_mul_ps(half, _mm256_set1_ps(sum_range(a0, k_begin, k_end)));
      t00 = _mm256_fmadd_ps(sum0, o0, t00);
      t01 = _mm256_fmadd_ps(sum0, o1, t01);
      t02 = _mm256_fmadd_ps(sum0, o2, t02);
      t03 = _mm256_fmadd_ps(sum0, o3, t03);
      if (MR > 1) {
        const __m256 sum1 = _mm256_mul_ps(half, _mm256_set1_ps(sum_range(a1, k_begin, k_end)));
        t10 = _mm256_fmadd_ps(sum1, o0, t10);
        t11 = _mm256_fmadd_ps(sum1, o1, t11);
        t12 = _mm256_fmadd_ps(sum1, o2, t12);
        t13 = _mm256_fmadd_ps(sum1, o3, t13);
      }
    }
  }
  _mm256_storeu_ps(c, fold_pairs(t00, t01));
  _mm256_storeu_ps(c + 8, fold_pairs(t02, t03));
  if (MR > 1) {
    _mm256_storeu_ps(c + ldc, fold_pairs(t10, t11));
    _mm256_storeu_ps(c + ldc + 8, fold_pairs(t12, t13));
  }
}

// codes_panel for fp8: the two fp32 bytes of a k pair's 32 values, byte-interleaved within each 128-bit
// lane, are (even k, odd k) word pairs of rows 0-3 and 8-11 (first) and 4-7 and 12-15 (second); a
// shift and a mask make them fp32 vectors of one k each, against a broadcast x[k]: two shuffles per k
// pair where the stored (row, k)-interleaved order took eight. Per group the rows' scales are
// gathered in that order; the row order is restored once per panel.
template <int MR>
void fp8_codes_panel(const QuantMatrix& w, const float* const* a, int64_t panel, float* c, int ldc) {
  const int64_t K = w.K, Kp = k_pairs(K), pairs_per_group = Kp / w.groups;
  constexpr int64_t kPairBytes = kPanelRows * 2;
  // lanes of `first`: rows 0-3 and 8-11; of `second`: rows 4-7 and 12-15
  const __m256i first_rows = _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11);
  const __m256i second_rows = _mm256_add_epi32(first_rows, _mm256_set1_epi32(4));
  const __m256i row_stride = _mm256_set1_epi32(static_cast<int>(w.groups));
  const uint8_t* const codes = w.data + panel * Kp * kPairBytes;
  const float* x[MR];
  __m256 total[MR][2];
  for (int r = 0; r < MR; ++r) {
    x[r] = a[r];
    total[r][0] = total[r][1] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t kp_begin = g * pairs_per_group, kp_end = kp_begin + pairs_per_group;
    __m256 acc[MR][4];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm256_setzero_ps();
    const auto pair_products = [&](int64_t kp, bool odd_k_real) {
      const uint8_t* pair = codes + kp * kPairBytes;
      // each line twice (two k pairs per line): cheaper than a test per k pair
      _mm_prefetch(reinterpret_cast<const char*>(pair + kPrefetchBytes), _MM_HINT_T0);
      const E4m3Bytes bytes = e4m3_bytes(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair)));
      const __m256i first = _mm256_unpacklo_epi8(bytes.low, bytes.high);
      const __m256i second = _mm256_unpackhi_epi8(bytes.low, bytes.high);
      const __m256 first_even = _mm256_castsi256_ps(_mm256_slli_epi32(first, 16));
      const __m256 first_odd = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(first, 16), 16));
      const __m256 second_even = _mm256_castsi256_ps(_mm256_slli_epi32(second, 16));
      const __m256 second_odd = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(second, 16), 16));
      for (int r = 0; r < MR; ++r) {
        // the padding k of an odd K multiplies a zero, not what lies past the row
        const __m256 x_even = _mm256_broadcast_ss(x[r] + 2 * kp);
        const __m256 x_odd = odd_k_real ? _mm256_broadcast_ss(x[r] + 2 * kp + 1) : _mm256_setzero_ps();
        acc[r][0] = _mm256_fmadd_ps(x_even, first_even, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(x_odd, first_odd, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(x_even, second_even, acc[r][2]);
        acc[r][3] = _mm256_fmadd_ps(x_odd, second_odd, acc[r][3]);
      }
    };
    const int64_t whole_pairs_end = std::min(kp_end, K / 2);
    int64_t kp = kp_begin;
    for (; kp < whole_pairs_end; ++kp) pair_products(kp, true);
    if (kp < kp_end) pair_products(kp, false);
    const float* scales = w.scales + panel * kPanelRows * w.groups + g;
    const __m256 first_scale = _mm256_i32gather_ps(scales, _mm256_mullo_epi32(first_rows, row_stride), 4);
    const __m256 second_scale = _mm256_i32gather_ps(scales, _mm256_mullo_epi32(second_rows, row_stride), 4);
    for (int r = 0; r < MR; ++r) {
      total[r][0] = _mm256_fmadd_ps(_mm256_add_ps(acc[r][0], acc[r][1]), first_scale, total[r][0]);
      total[r][1] = _mm256_fmadd_ps(_mm256_add_ps(acc[r][2], acc[r][3]), second_scale, total[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, _mm256_permute2f128_ps(total[r][0], total[r][1], 0x20));      // rows 0-7
    _mm256_storeu_ps(c + r * ldc + 8, _mm256_permute2f128_ps(total[r][0], total[r][1], 0x31));  // rows 8-15
  }
}

void gemm_nt_codes_avx2(const QuantMatrix& w, const float* const* a_rows, int m, int p0, int np, float* c) {
  const int ldc = np * kPanelRows;
  for (int p = 0; p < np; ++p)
    for (int i = 0; i < m; i += 2) {
      float* out = c + static_cast<int64_t>(i) * ldc + p * kPanelRows;
      if (w.format == WeightFormat::Fp8 && i + 1 < m)
        fp8_codes_panel<2>(w, a_rows + i, p0 + p, out, ldc);
      else if (w.format == WeightFormat::Fp8)
        fp8_codes_panel<1>(w, a_rows + i, p0 + p, out, ldc);
      else if (i + 1 < m)
        codes_panel<2>(w, a_rows + i, p0 + p, out, ldc);
      else
        codes_panel<1>(w, a_rows + i, p0 + p, out, ldc);
    }
}

// ---- integer dot products on quantized activations (quant.h, gemm_nt_int8) ----------------------
//
// vpmaddwd on the codes widened to 16 bits: one k pair of a panel is 16 rows x (even k, odd k)
// bytes, and vpmaddwd against the broadcast activation pair (q[k], q[k+1]) sums exactly each row's
// pair into one int32 lane, so the accumulators hold rows 0-7 and 8-15 with no lane folding. The
// 8-bit vpmaddubsw would need the pair sums widened per k pair anyway (its int16 sums of two
// k pairs overflow), an unpack and a vpmaddwd each: no fewer instructions than this. Activations
// are stored as int16 values in [-127, 127] so that one 32-bit broadcast carries a pair.

}  // namespace

bool quantize_rows_avx2(const float* const* a, int m, int64_t K, int64_t groups, int16_t* q, int8_t* q8, float* step) {
  const int64_t Kp = k_pairs(K), group_k = 2 * (Kp / groups);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i exponent = _mm256_set1_epi32(0x7F800000);
  for (int r = 0; r < m; ++r) {
    const float* x = a[r];
    int16_t* qr = q + r * 2 * Kp;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_k, k1 = std::min(K, k0 + group_k);
      __m256 vmax = _mm256_setzero_ps();
      __m256i special = _mm256_setzero_si256();  // all-ones exponent: NaN or Inf
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) {
        const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
        vmax = _mm256_max_ps(vmax, v);
        special =
            _mm256_or_si256(special, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), exponent), exponent));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      float absmax = _mm_cvtss_f32(h);
      bool finite = _mm256_testz_si256(special, special);
      for (; k < k1; ++k) {
        finite = finite && std::isfinite(x[k]);
        absmax = std::max(absmax, std::fabs(x[k]));
      }
      const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
      if (!finite || std::isinf(inv)) return false;
      step[r * groups + g] = absmax / 127.0f;
      const __m256 vinv = _mm256_set1_ps(inv);
      for (k = k0; k + 16 <= k1; k += 16) {
        const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
        const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
      }
      for (; k < k1; ++k) qr[k] = static_cast<int16_t>(_mm_cvtss_si32(_mm_set_ss(x[k] * inv)));
    }
    if (K % 2) qr[K] = 0;
  }
  std::copy(q, q + m * 2 * Kp, q8);  // |q| <= 127
  return true;
}

namespace {

// One k pair's codes as 16-bit values in vpmaddwd's order: rows 0-7 in w0 and 8-15 in w1, each row's
// (even k, odd k) in one 32-bit lane. int8 codes are sign-extended; a 4-bit code's two nibbles are
// split into their rows' lanes, as u - 8 for the symmetric formats (the value gemm_nt_int8 sums).
template <bool kNibbles>
inline void code_words(const uint8_t* codes, int64_t kp, bool zero_point, __m256i& w0, __m256i& w1) {
  if constexpr (kNibbles) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + kp * kPanelRows));
    const __m128i low = _mm_set1_epi8(15);
    const __m128i even = _mm_and_si128(bytes, low), odd = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    w0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(even, odd));
    w1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(even, odd));
    if (!zero_point) {
      w0 = _mm256_sub_epi16(w0, _mm256_set1_epi16(8));
      w1 = _mm256_sub_epi16(w1, _mm256_set1_epi16(8));
    }
  } else {
    const int8_t* pair = reinterpret_cast<const int8_t*>(codes) + kp * kPanelRows * 2;
    w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair)));
    w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 16)));
  }
}

inline __m256i broadcast_pair(const int16_t* q) {
  int32_t pair;
  std::memcpy(&pair, q, sizeof(pair));
  return _mm256_set1_epi32(pair);
}

// sum q over k pairs [c0, c1) of a row
inline int32_t activation_sum(const int16_t* q, int64_t c0, int64_t c1) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  int64_t k = 2 * c0;
  const int64_t k1 = 2 * c1;
  for (; k + 16 <= k1; k += 16)
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k)), ones));
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  int32_t sum = 0;
  for (int32_t lane : lanes) sum += lane;
  for (; k < k1; ++k) sum += q[k];
  return sum;
}

// sum q per row and chunk (activation groups cut every kMaxPairsPerInt32 k pairs): [m][chunks].
std::vector<int32_t> chunk_activation_sums(const int16_t* q, int m, int64_t Kp, int64_t groups, int64_t& chunks) {
  const int64_t pairs_per_group = Kp / groups;
  chunks = groups * ((pairs_per_group + kMaxPairsPerInt32 - 1) / kMaxPairsPerInt32);
  std::vector<int32_t> sums(static_cast<size_t>(m) * chunks);
  for (int r = 0; r < m; ++r) {
    int64_t chunk = 0;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t c0 = g * pairs_per_group; c0 < (g + 1) * pairs_per_group; c0 += kMaxPairsPerInt32)
        sums[r * chunks + chunk++] =
            activation_sum(q + r * 2 * Kp, c0, std::min((g + 1) * pairs_per_group, c0 + kMaxPairsPerInt32));
  }
  return sums;
}

// One panel, all K, MR rows (1..4) sharing each widened load of the codes. A zero-point format adds
// float(sum q) * min per chunk: chunk_sums, `chunks` per row (nullptr for the other formats).
template <int MR, bool kNibbles>
void integer_panel(const QuantMatrix& w, const int16_t* q, int64_t q_stride, const float* step, int64_t groups,
                   const int32_t* chunk_sums, int64_t chunks, int64_t panel, float* c, int ldc) {
  const int64_t Kp = k_pairs(w.K), pairs_per_group = Kp / groups;
  const bool zero_point = has_zero_point(w.format);
  const uint8_t* codes = w.data + panel * Kp * code_bytes_per_pair(w.format);
  __m256 t[MR][2];
  for (int r = 0; r < MR; ++r) t[r][0] = t[r][1] = _mm256_setzero_ps();
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, min0 = s0, min1 = s0;
  int64_t chunk = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (g == 0 || w.groups > 1) {  // per-row weights: every group's scales are the first's
      alignas(32) float scale[kPanelRows], mins[kPanelRows];
      panel_scales(w, panel, g, groups, scale, zero_point ? mins : nullptr);
      s0 = _mm256_load_ps(scale);
      s1 = _mm256_load_ps(scale + 8);
      if (zero_point) {
        min0 = _mm256_load_ps(mins);
        min1 = _mm256_load_ps(mins + 8);
      }
    }
    const int64_t g_end = (g + 1) * pairs_per_group;
    for (int64_t c0 = g * pairs_per_group; c0 < g_end; c0 += kMaxPairsPerInt32, ++chunk) {
      const int64_t c1 = std::min(g_end, c0 + kMaxPairsPerInt32);
      __m256i acc[MR][2];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      for (int64_t kp = c0; kp < c1; ++kp) {
        prefetch_codes(codes + kp * code_bytes_per_pair(w.format), kp, code_bytes_per_pair(w.format));
        __m256i w0, w1;
        code_words<kNibbles>(codes, kp, zero_point, w0, w1);
        for (int r = 0; r < MR; ++r) {
          const __m256i x = broadcast_pair(q + r * q_stride + 2 * kp);
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, x));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, x));
        }
      }
      for (int r = 0; r < MR; ++r) {
        __m256 term0 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][0]), s0);
        __m256 term1 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][1]), s1);
        if (zero_point) {
          const __m256 sum_q = _mm256_set1_ps(static_cast<float>(chunk_sums[r * chunks + chunk]));
          term0 = _mm256_add_ps(term0, _mm256_mul_ps(sum_q, min0));
          term1 = _mm256_add_ps(term1, _mm256_mul_ps(sum_q, min1));
        }
        const __m256 st = _mm256_set1_ps(step[r * groups + g]);
        t[r][0] = _mm256_add_ps(t[r][0], _mm256_mul_ps(term0, st));
        t[r][1] = _mm256_add_ps(t[r][1], _mm256_mul_ps(term1, st));
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, t[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, t[r][1]);
  }
}

void gemm_nt_int8_avx2(const QuantMatrix& w, const float* const* a_rows, const QuantizedRows* quantized, int m, int p0,
                       int np, float* c) {
  if (quantized == nullptr) return gemm_nt_codes_avx2(w, a_rows, m, p0, np, c);
  const int64_t Kp = k_pairs(w.K);
  const int ldc = np * kPanelRows;
  int64_t chunks = 0;
  const std::vector<int32_t> chunk_sums = has_zero_point(w.format)
                                              ? chunk_activation_sums(quantized->q, m, Kp, quantized->groups, chunks)
                                              : std::vector<int32_t>();
  for (int p = 0; p < np; ++p)
    for_row_blocks(m, [&](int i, auto rows) {
      const auto panel = is_int8(w.format) ? integer_panel<rows(), false> : integer_panel<rows(), true>;
      panel(w, quantized->q + i * 2 * Kp, 2 * Kp, quantized->step + i * quantized->groups, quantized->groups,
            chunk_sums.empty() ? nullptr : chunk_sums.data() + i * chunks, chunks, p0 + p,
            c + static_cast<int64_t>(i) * ldc + p * kPanelRows, ldc);
    });
}

}  // namespace

const DequantKernels* avx2_dequant() {
  static const DequantKernels kernels{dequant_avx2, gemm_nt_codes_avx2, gemm_nt_int8_avx2, quantize_rows_avx2};
  return &kernels;
}

}  // namespace kt
