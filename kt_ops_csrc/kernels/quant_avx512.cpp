// AVX-512 dequantization and decode on the codes (quant.h), for CPUs with AVX-512 F/BW/VL, VNNI, VBMI
// and AVX512_BF16 (Zen 4/5, Sapphire Rapids and later): the AVX2 dequantizer takes 8 lanes and a dozen
// integer steps per 16 bf16, which on an AMX CPU costs more than the tile products it feeds (over half
// of a quantized base's training step). Bit-identical to quant_ref.cpp like the AVX2 table; same
// ODR rules as gemm_avx2.cpp (standard headers before the target pragma, internal linkage).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "quant.h"

// GCC >= 10 (AVX512_BF16 target support); clang ignores "#pragma GCC target", so it gets no table.
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 10
#define KT_HAVE_AVX512_QUANT_BUILD 1
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bf16,avx2,fma")
// GCC 12 reports its own AVX-512 intrinsic headers ('__Y' may be used uninitialized, GCC bug
// 105593) at every inlined use; silence that for the header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

namespace kt {
namespace {

constexpr int kPairValues = 2 * kPanelRows;  // one k pair of a panel: 16 rows x (even k, odd k)

// The codes of one k pair of a panel, de-interleaved: lane i of `even` holds row i's code for the
// even k, lane i of `odd` its code for the odd k. Each row then stays in one lane, so a row's scale,
// an activation broadcast per k and the products need no lane pairs (the stored (even, odd) order
// comes back only when dequantized panels are written).

// Per (panel, group): the 16 rows' scales (and mins). vcvtne2ps2bf16 rounds to nearest even like
// quant_ref's rounding but flushes denormal inputs to zero; no product is denormal when every scale
// and min is 0 or at least 2^-100 in magnitude (a nonzero code times such a scale, plus such a min,
// stays a multiple of 2^-123 and so >= 2^-126 when nonzero; the smallest fp8 value, 2^-9, still
// gives >= 2^-109). Otherwise the AVX2 dequantizer's integer rounding takes that (panel, group).
struct PanelScales {
  __m512 scale, offset;
  bool hardware_rounding;
};

inline PanelScales load_scales(const QuantMatrix& w, int64_t panel, int64_t group, bool zero_point) {
  const int64_t width = zero_point ? 2 : 1, row_stride = w.groups * width;
  const float* first = w.scales + (panel * kPanelRows * w.groups + group) * width;
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(row_stride)));
  PanelScales out{_mm512_setzero_ps(), _mm512_setzero_ps(), false};
  __mmask16 subnormal_products = 0;
  for (int part = 0; part < width; ++part) {
    const __m512 v = row_stride == 1 ? _mm512_loadu_ps(first) : _mm512_i32gather_ps(rows, first + part, 4);
    const __m512 magnitude = _mm512_abs_ps(v);
    subnormal_products |= _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(0x1p-100f), _CMP_LT_OQ) &
                          _mm512_cmp_ps_mask(magnitude, _mm512_setzero_ps(), _CMP_NEQ_OQ);
    (part ? out.offset : out.scale) = v;
  }
  out.hardware_rounding = subnormal_products == 0;
  return out;
}

// E4M3 magnitudes 0..127 as bf16 bits (every E4M3 value is exact in bf16), split into their low and
// high bytes: 128-entry byte tables, each two registers, that vpermi2b indexes with a code's low 7
// bits. One byte lookup covers 64 codes, so two k pairs cost two lookups and two byte interleaves;
// a table of 16-bit words needed a widening and two multi-µop vpermi2w per pair (its fp8 decode
// ran as slow as bf16's from DRAM with the weights in L3).
struct Fp8Table {
  __m512i low[2], high[2];
  __m512i first_pair, second_pair;  // byte interleaves: word j of a pair = (low[j], high[j])
};

struct Fp8Bits {
  alignas(64) uint8_t low[128];
  alignas(64) uint8_t high[128];
  alignas(64) uint8_t first_pair[64];
  alignas(64) uint8_t second_pair[64];
};

// Built once, on the first call (a function-local static: code of this unit must not run at load
// time, on a CPU without AVX-512): a decode calls the kernels hundreds of times, and the 128 ldexpf
// of e4m3_value cost about as much as a call's products.
inline const Fp8Bits& fp8_bits() {
  static const Fp8Bits table = [] {
    Fp8Bits bits{};
    for (int code = 0; code < 128; ++code) {
      const float value = e4m3_value(static_cast<uint8_t>(code));
      uint32_t word;
      std::memcpy(&word, &value, sizeof(word));
      bits.low[code] = static_cast<uint8_t>(word >> 16);
      bits.high[code] = static_cast<uint8_t>(word >> 24);
    }
    // vpermi2b index bit 6 picks the second source (the high bytes)
    for (int j = 0; j < 32; ++j) {
      bits.first_pair[2 * j] = static_cast<uint8_t>(j);
      bits.first_pair[2 * j + 1] = static_cast<uint8_t>(64 + j);
      bits.second_pair[2 * j] = static_cast<uint8_t>(32 + j);
      bits.second_pair[2 * j + 1] = static_cast<uint8_t>(96 + j);
    }
    return bits;
  }();
  return table;
}

inline Fp8Table fp8_table() {
  const Fp8Bits& bits = fp8_bits();
  Fp8Table table;
  for (int half = 0; half < 2; ++half) {
    table.low[half] = _mm512_load_si512(bits.low + 64 * half);
    table.high[half] = _mm512_load_si512(bits.high + 64 * half);
  }
  table.first_pair = _mm512_load_si512(bits.first_pair);
  table.second_pair = _mm512_load_si512(bits.second_pair);
  return table;
}

// The codes' exact fp32 values (int4: the unsigned nibble; the caller applies the - 8 or the zero
// point).
struct PairValues {
  __m512 even, odd;
};

// A row's two bytes (or bf16 words) widened into one 32-bit lane: the even k's in the low half.
inline PairValues int8_values(const int8_t* codes) {
  const __m512i rows = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
  return {_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(rows, 16), 16)),
          _mm512_cvtepi32_ps(_mm512_srai_epi32(rows, 16))};
}

// A nibble's value by vpermps from the 16 values (the index's low 4 bits): no mask, no conversion.
inline PairValues nibble_values(const uint8_t* codes) {
  const __m512i rows = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return {_mm512_permutexvar_ps(rows, values), _mm512_permutexvar_ps(_mm512_srli_epi32(rows, 4), values)};
}

// Two k pairs of fp8 codes (the second only if `both`; 64 bytes apart from the first's 32) as bf16
// words in the codes' order: word 2i of a pair is row i's even k, word 2i + 1 its odd k.
struct Fp8Words {
  __m512i first, second;
};

inline Fp8Words fp8_words(const uint8_t* codes, bool both, const Fp8Table& t) {
  const __m512i code =
      both ? _mm512_loadu_si512(codes)
           : _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)), 0);
  const __m512i low = _mm512_permutex2var_epi8(t.low[0], code, t.low[1]);
  // high | (code & 0x80): the sign bit
  const __m512i high = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.high[0], code, t.high[1]), code,
                                                 _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);
  return {_mm512_permutex2var_epi8(low, t.first_pair, high), _mm512_permutex2var_epi8(low, t.second_pair, high)};
}

// bf16 words in the codes' order as the exact fp32 values of the even and odd k.
inline PairValues word_values(__m512i words) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(words, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}

// The values of k pairs pair_row and, if `both`, pair_row + 1 (fp8 decodes the two at once). `is_fp8`:
// w.format == Fp8, which a caller may know at compile time.
inline void pair_values(const QuantMatrix& w, int64_t pair_row, bool both, bool is_fp8, const Fp8Table& fp8,
                        PairValues& first, PairValues& second) {
  if (is_fp8) {
    const Fp8Words words = fp8_words(w.data + pair_row * kPairValues, both, fp8);
    first = word_values(words.first);
    second = word_values(words.second);
    return;
  }
  const auto one = [&](int64_t row) {
    if (is_int8(w.format)) return int8_values(reinterpret_cast<const int8_t*>(w.data) + row * kPairValues);
    return nibble_values(w.data + row * kPanelRows);
  };
  first = one(pair_row);
  if (both) second = one(pair_row + 1);
}

// w = code * scale (+ min) per row, in fp32 without FMA (quant.h's rule); int4 codes are offset by -8.
inline PairValues scaled(PairValues v, const PanelScales& s, bool nibbles, bool zero_point) {
  if (nibbles && zero_point)
    return {_mm512_add_ps(_mm512_mul_ps(v.even, s.scale), s.offset),
            _mm512_add_ps(_mm512_mul_ps(v.odd, s.scale), s.offset)};
  if (nibbles) {
    v.even = _mm512_sub_ps(v.even, _mm512_set1_ps(8.0f));
    v.odd = _mm512_sub_ps(v.odd, _mm512_set1_ps(8.0f));
  }
  return {_mm512_mul_ps(v.even, s.scale), _mm512_mul_ps(v.odd, s.scale)};
}

// One k pair of int8 codes dequantized in stored order: rows 0-7 and 8-15 widened straight to fp32
// (lane 2i + h: row i's k half h) against each row's scale in both of its lanes (scale_lo: rows 0-7,
// scale_hi: rows 8-15), so the rounded words come out in the panel's order, with no even / odd split
// to undo.
struct Int8PairScales {
  __m512 lo, hi;
};

inline Int8PairScales int8_pair_scales(const PanelScales& s) {
  const __m512i row_of_lane = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  return {_mm512_permutexvar_ps(row_of_lane, s.scale),
          _mm512_permutexvar_ps(_mm512_add_epi32(row_of_lane, _mm512_set1_epi32(8)), s.scale)};
}

inline __m512i int8_pair_bf16(const int8_t* codes, const Int8PairScales& s) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16))));
  const __m512bh rounded = _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s.hi), _mm512_mul_ps(lo, s.lo));
  __m512i words;
  std::memcpy(&words, &rounded, sizeof(words));
  return words;
}

// A decode streams each panel's codes once, from DRAM, at a few cycles per line: fetching 8 KiB ahead
// into L2 keeps enough lines in flight for one core to read near DRAM speed (on a Sapphire-Rapids-class
// Xeon, INT8 / INT4 / FP8 decode ran 10-15% slower when fetching 1 KiB ahead into L1, the AVX2 table's
// choice).
constexpr int64_t kPrefetchBytes = 8192;

inline void prefetch_codes(const uint8_t* pair, int64_t kp, int64_t pair_bytes) {
  if ((kp * pair_bytes) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(pair + kPrefetchBytes), _MM_HINT_T1);
}

// A panel's codes for a short k-pair range (a backward task's columns) are a few lines, the next
// panel's a whole panel further on: a jump the hardware prefetchers do not follow. Those of the
// panel after next are fetched as a panel starts; long ranges stream and are fetched ahead as they go.
constexpr int64_t kShortRangeBytes = 4096;
constexpr int64_t kPanelsAhead = 2;

void dequant_avx512(const QuantMatrix& w, int64_t p0, int64_t np, int64_t kp0, int64_t nkp, uint16_t* out) {
  const int64_t Kp = k_pairs(w.K), pairs_per_group = Kp / w.groups;
  const bool zero_point = has_zero_point(w.format), nibbles = !is_byte_coded(w.format), int8 = is_int8(w.format);
  const int64_t pair_bytes = code_bytes_per_pair(w.format), range_bytes = nkp * pair_bytes;
  const Fp8Table fp8 = w.format == WeightFormat::Fp8 ? fp8_table() : Fp8Table{};
  // word 2i: row i's even k (word i of the rounded pair), word 2i + 1: its odd k (word 16 + i)
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const auto store_pair = [&](const PairValues& v, uint16_t* dst) {
    const __m512bh rounded = _mm512_cvtne2ps_pbh(v.odd, v.even);  // even rows in words 0-15
    __m512i words;
    std::memcpy(&words, &rounded, sizeof(words));
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(interleave, words));
  };
  for (int64_t p = 0; p < np; ++p) {
    if (range_bytes <= kShortRangeBytes && p + kPanelsAhead < np) {
      const uint8_t* ahead = w.data + ((p0 + p + kPanelsAhead) * Kp + kp0) * pair_bytes;
      for (int64_t line = 0; line < range_bytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + line), _MM_HINT_T0);
    }
    for (int64_t q0 = 0; q0 < nkp;) {
      const int64_t group = (kp0 + q0) / pairs_per_group;
      const int64_t q1 = std::min(nkp, (group + 1) * pairs_per_group - kp0);
      uint16_t* dst = out + (p * nkp + q0) * kPairValues;
      const PanelScales s = load_scales(w, p0 + p, group, zero_point);
      if (!s.hardware_rounding) {
        avx2_dequant()->dequant(w, p0 + p, 1, kp0 + q0, q1 - q0, dst);
        q0 = q1;
        continue;
      }
      const Int8PairScales int8_scales = int8 ? int8_pair_scales(s) : Int8PairScales{};
      for (; q0 < q1; ++q0, dst += kPairValues) {
        const int64_t pair_row = (p0 + p) * Kp + kp0 + q0;
        if (range_bytes > kShortRangeBytes) prefetch_codes(w.data + pair_row * pair_bytes, pair_row, pair_bytes);
        if (int8) {
          _mm512_storeu_si512(
              dst, int8_pair_bf16(reinterpret_cast<const int8_t*>(w.data) + pair_row * pair_bytes, int8_scales));
          continue;
        }
        const bool both = q0 + 1 < q1;
        if (both && range_bytes > kShortRangeBytes)
          prefetch_codes(w.data + (pair_row + 1) * pair_bytes, pair_row + 1, pair_bytes);
        PairValues first, second;
        pair_values(w, pair_row, both, w.format == WeightFormat::Fp8, fp8, first, second);
        store_pair(scaled(first, s, nibbles, zero_point), dst);
        if (!both) continue;
        store_pair(scaled(second, s, nibbles, zero_point), dst + kPairValues);
        ++q0;
        dst += kPairValues;
      }
    }
  }
}

inline float sum_range(const float* x, int64_t begin, int64_t end) {
  __m512 s = _mm512_setzero_ps();
  int64_t k = begin;
  for (; k + 16 <= end; k += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(x + k));
  float total = _mm512_reduce_add_ps(s);
  for (; k < end; ++k) total += x[k];
  return total;
}

// One panel, all K, MR rows (1..4) on the codes' exact values: per group x * code is collected, then
// scaled per row into the totals, plus offset * sum(x over the group) for the 4-bit formats (offset
// -8 scale, or the zero point's min). Two k pairs per step into separate accumulators (four chains
// per row) keep the FMA latency off the critical path at one row.
template <int MR, bool kFp8>
void codes_panel(const QuantMatrix& w, const float* const* a, int64_t panel, const Fp8Table& fp8, float* c, int ldc) {
  const int64_t K = w.K, Kp = k_pairs(K), pairs_per_group = Kp / w.groups;
  const bool zero_point = has_zero_point(w.format), nibbles = !is_byte_coded(w.format);
  const int64_t pair_bytes = code_bytes_per_pair(w.format);
  // x[k] for every lane, broadcast from memory; the padding k of an odd K multiplies a zero, not
  // what lies past the row
  const auto x_at = [&](int r, int64_t k) { return _mm512_set1_ps(a[r][k]); };
  __m512 total[MR];
  for (int r = 0; r < MR; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t kp_begin = g * pairs_per_group, kp_end = kp_begin + pairs_per_group;
    __m512 acc[MR][4];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
    for (int64_t kp = kp_begin; kp < kp_end; kp += 2) {
      const int64_t pair_row = panel * Kp + kp;
      const bool both = kp + 1 < kp_end;
      prefetch_codes(w.data + pair_row * pair_bytes, pair_row, pair_bytes);
      if (both) prefetch_codes(w.data + (pair_row + 1) * pair_bytes, pair_row + 1, pair_bytes);
      PairValues v0, v1;
      pair_values(w, pair_row, both, kFp8, fp8, v0, v1);
      for (int r = 0; r < MR; ++r) {
        acc[r][0] = _mm512_fmadd_ps(x_at(r, 2 * kp), v0.even, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x_at(r, 2 * kp + 1), v0.odd, acc[r][1]);
      }
      if (!both) break;
      for (int r = 0; r < MR; ++r) {
        acc[r][2] = _mm512_fmadd_ps(x_at(r, 2 * kp + 2), v1.even, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(x_at(r, 2 * kp + 3), v1.odd, acc[r][3]);
      }
    }
    const PanelScales s = load_scales(w, panel, g, zero_point);
    const __m512 offset = zero_point ? s.offset : _mm512_mul_ps(_mm512_set1_ps(-8.0f), s.scale);
    for (int r = 0; r < MR; ++r) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
      total[r] = _mm512_fmadd_ps(sum, s.scale, total[r]);
      if (nibbles) {
        const __m512 x_sum = _mm512_set1_ps(sum_range(a[r], 2 * kp_begin, std::min(2 * kp_end, K)));
        total[r] = _mm512_fmadd_ps(x_sum, offset, total[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(c + r * ldc, total[r]);
}

void gemm_nt_codes_avx512(const QuantMatrix& w, const float* const* rows_in, int m, int p0, int np, float* c) {
  const Fp8Table fp8 = w.format == WeightFormat::Fp8 ? fp8_table() : Fp8Table{};
  // The rows padded to whole k pairs with zeros, as the codes are.
  const int64_t padded_k = 2 * k_pairs(w.K);
  thread_local std::vector<float> padded;
  if (padded.size() < size_t(m) * padded_k) padded.resize(size_t(m) * padded_k);
  std::vector<const float*> a_rows(m);
  for (int r = 0; r < m; ++r) {
    float* row = padded.data() + r * padded_k;
    std::copy(rows_in[r], rows_in[r] + w.K, row);
    std::fill(row + w.K, row + padded_k, 0.0f);
    a_rows[r] = row;
  }
  const int ldc = np * kPanelRows;
  for (int p = 0; p < np; ++p)
    for_row_blocks(m, [&](int i, auto rows) {
      float* out = c + static_cast<int64_t>(i) * ldc + p * kPanelRows;
      if (w.format == WeightFormat::Fp8)
        codes_panel<rows(), true>(w, a_rows.data() + i, p0 + p, fp8, out, ldc);
      else
        codes_panel<rows(), false>(w, a_rows.data() + i, p0 + p, fp8, out, ldc);
    });
}

// ---- int8 formats: integer dot products on quantized activations (quant.h, gemm_nt_int8) --------
//
// Two ways to multiply a panel's codes by a few rows, both exact integer sums per chunk (and then the
// scales applied as on every table, so the bits are the same):
//   * words (decode, up to 4 rows): vpdpwssd on the codes sign-extended to 16 bits: one k pair of a
//     panel is 16 rows x (even k, odd k), 32 words, against the broadcast activation pair; two
//     accumulators per row (even and odd k pairs) hide the instruction's latency. Measured faster
//     than quads at one row (benchmarks/quant_kernels.cpp: 13.2 against 11.8 GB/s).
//   * quads (blocks of 8 rows): vpdpbusd, 4 unsigned by 4 signed bytes per int32 lane, twice the
//     products per instruction. Two consecutive k pairs (64 bytes) are interleaved by one vpermw so
//     that lane i holds row i's 4 codes, and offset into unsigned bytes by + 128 (xor 0x80), against
//     the row's 4 int8 activations: that sums code q + 128 q, so 128 * sum q over the chunk is
//     subtracted afterwards. int32 arithmetic wraps, and the true sum is within
//     2 * 128 * 127 * kMaxPairsPerInt32 < 2^31: the result is exact whatever the intermediate wrap.
constexpr int kQuadRowBlock = 8;

inline __m512i quad_codes(const int8_t* pairs, bool both) {
  static const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23,
                                                     7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i codes =
      both ? _mm512_loadu_si512(pairs)
           : _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs)), 0);
  const __m512i offset = _mm512_xor_si512(_mm512_permutexvar_epi16(interleave, codes), _mm512_set1_epi8(-128));
  // one pair left: the second's lanes (odd words) contribute nothing
  return both ? offset : _mm512_maskz_mov_epi16(0x55555555u, offset);
}

// sum of a row's activations over k pairs [c0, c1)
inline int32_t activation_sum(const int8_t* q8, int64_t c0, int64_t c1) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  int64_t k = 2 * c0;
  const int64_t k1 = 2 * c1;
  for (; k + 64 <= k1; k += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(q8 + k));
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, acc);
  int32_t sum = 0;
  for (int32_t lane : lanes) sum += lane;
  for (; k < k1; ++k) sum += q8[k];
  return sum;
}

// The MR rows from `first` of `rows`, one panel, all K. chunk_sums (quads only): sum q per row and
// chunk, `chunks` per row.
template <int MR, bool kQuads>
void int8_panel(const QuantMatrix& w, const QuantizedRows& rows, int first, const int32_t* chunk_sums, int64_t chunks,
                int64_t panel, float* c, int ldc) {
  const int64_t Kp = k_pairs(w.K), q_stride = 2 * Kp, groups = rows.groups, pairs_per_group = Kp / groups;
  const int8_t* codes = reinterpret_cast<const int8_t*>(w.data) + panel * Kp * kPairValues;
  const int16_t* q = rows.q + first * q_stride;
  const int8_t* q8 = rows.q8 + first * q_stride;
  const float* step = rows.step + first * groups;
  const auto codes16 = [&](int64_t kp) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + kp * kPairValues)));
  };
  const auto pair_of = [&](int r, int64_t kp) {
    int32_t pair;
    std::memcpy(&pair, q + r * q_stride + 2 * kp, sizeof(pair));
    return _mm512_set1_epi32(pair);
  };
  const auto quad_of = [&](int r, int64_t kp, bool both) {
    int32_t quad = 0;
    std::memcpy(&quad, q8 + r * q_stride + 2 * kp, both ? 4 : 2);
    return _mm512_set1_epi32(quad);
  };
  __m512 total[MR];
  for (int r = 0; r < MR; ++r) total[r] = _mm512_setzero_ps();
  __m512 row_scale = _mm512_loadu_ps(w.scales + panel * kPanelRows);  // per-row weights: every group's
  int64_t chunk = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (w.groups > 1) {
      alignas(64) float scale[kPanelRows];
      panel_scales(w, panel, g, groups, scale);
      row_scale = _mm512_load_ps(scale);
    }
    const int64_t g_end = (g + 1) * pairs_per_group;
    for (int64_t c0 = g * pairs_per_group; c0 < g_end; c0 += kMaxPairsPerInt32, ++chunk) {
      const int64_t c1 = std::min(g_end, c0 + kMaxPairsPerInt32);
      __m512i even[MR], odd[MR];  // quads: one chain, in even
      for (int r = 0; r < MR; ++r) even[r] = odd[r] = _mm512_setzero_si512();
      int64_t kp = c0;
      for (; kp + 2 <= c1; kp += 2) {
        prefetch_codes(reinterpret_cast<const uint8_t*>(codes + kp * kPairValues), kp, kPairValues);
        if constexpr (kQuads) {
          const __m512i quads = quad_codes(codes + kp * kPairValues, true);
          for (int r = 0; r < MR; ++r) even[r] = _mm512_dpbusd_epi32(even[r], quads, quad_of(r, kp, true));
        } else {
          const __m512i w0 = codes16(kp), w1 = codes16(kp + 1);
          for (int r = 0; r < MR; ++r) {
            even[r] = _mm512_dpwssd_epi32(even[r], w0, pair_of(r, kp));
            odd[r] = _mm512_dpwssd_epi32(odd[r], w1, pair_of(r, kp + 1));
          }
        }
      }
      if (kp < c1) {
        if constexpr (kQuads) {
          const __m512i quads = quad_codes(codes + kp * kPairValues, false);
          for (int r = 0; r < MR; ++r) even[r] = _mm512_dpbusd_epi32(even[r], quads, quad_of(r, kp, false));
        } else {
          const __m512i w0 = codes16(kp);
          for (int r = 0; r < MR; ++r) even[r] = _mm512_dpwssd_epi32(even[r], w0, pair_of(r, kp));
        }
      }
      for (int r = 0; r < MR; ++r) {
        const __m512i exact = kQuads
                                  ? _mm512_sub_epi32(even[r], _mm512_set1_epi32(128 * chunk_sums[r * chunks + chunk]))
                                  : _mm512_add_epi32(even[r], odd[r]);
        const __m512 st = _mm512_set1_ps(step[r * groups + g]);
        total[r] = _mm512_add_ps(total[r], _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(exact), row_scale), st));
      }
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(c + r * ldc, total[r]);
}

void gemm_nt_int8_avx512(const QuantMatrix& w, const float* const* a_rows, const QuantizedRows* quantized, int m,
                         int p0, int np, float* c) {
  if (quantized == nullptr) return gemm_nt_codes_avx512(w, a_rows, m, p0, np, c);
  const int ldc = np * kPanelRows;
  if (m <= kDirectQuantRows) {
    for (int p = 0; p < np; ++p)
      for_row_blocks(m, [&](int i, auto rows) {
        int8_panel<rows(), false>(w, *quantized, i, nullptr, 0, p0 + p,
                                  c + static_cast<int64_t>(i) * ldc + p * kPanelRows, ldc);
      });
    return;
  }
  const int64_t Kp = k_pairs(w.K), groups = quantized->groups, pairs_per_group = Kp / groups;
  const int64_t chunks = groups * ((pairs_per_group + kMaxPairsPerInt32 - 1) / kMaxPairsPerInt32);
  std::vector<int32_t> chunk_sums(static_cast<size_t>(m) * chunks);
  for (int r = 0; r < m; ++r) {
    int64_t chunk = 0;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t c0 = g * pairs_per_group; c0 < (g + 1) * pairs_per_group; c0 += kMaxPairsPerInt32)
        chunk_sums[r * chunks + chunk++] =
            activation_sum(quantized->q8 + r * 2 * Kp, c0, std::min((g + 1) * pairs_per_group, c0 + kMaxPairsPerInt32));
  }
  for (int p = 0; p < np; ++p)
    for_row_blocks<kQuadRowBlock>(m, [&](int i, auto rows) {
      int8_panel<rows(), true>(w, *quantized, i, chunk_sums.data() + i * chunks, chunks, p0 + p,
                               c + static_cast<int64_t>(i) * ldc + p * kPanelRows, ldc);
    });
}

}  // namespace
}  // namespace kt
#endif

namespace kt {

const DequantKernels* avx512_dequant() {
#ifdef KT_HAVE_AVX512_QUANT_BUILD
  static const DequantKernels kernels{dequant_avx512, gemm_nt_codes_avx512, gemm_nt_int8_avx512, quantize_rows_avx2};
  return &kernels;
#else
  return nullptr;
#endif
}

}  // namespace kt
