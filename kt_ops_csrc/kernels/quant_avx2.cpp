// AVX2 dequantization into bf16 panels; bit-identical to quant_ref.cpp (same fp32 operations, no
// FMA contraction: the extension is built with -ffp-contract=off). Same ODR rules as gemm_avx2.cpp.
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "gemm.h"
#include "quant.h"

namespace kt {
namespace {

inline bool has_zero_point(WeightFormat f) { return f == WeightFormat::Int4Zp || f == WeightFormat::Int4ZpKGroup; }

// Round two fp32 vectors to bf16 (nearest even) and store them as 16 consecutive values.
inline void store_bf16(__m256 a, __m256 b, uint16_t* dst) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
  __m256i ia = _mm256_castps_si256(a), ib = _mm256_castps_si256(b);
  ia = _mm256_srli_epi32(_mm256_add_epi32(ia, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(ia, 16), one))), 16);
  ib = _mm256_srli_epi32(_mm256_add_epi32(ib, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(ib, 16), one))), 16);
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
      if (w.format == WeightFormat::Int8) {
        const int8_t* codes = reinterpret_cast<const int8_t*>(w.data) + pair_row * kPanelRows * 2;
        for (int j = 0; j < 4; ++j) {
          const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * j));
          v[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), s.scale[j]);
        }
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
}

// Codes of one k pair of a panel as fp32: rows 0-7 and 8-15, even and odd k.
struct PairCodes {
  __m256 even_lo, odd_lo, even_hi, odd_hi;
};

inline PairCodes int8_codes(const int8_t* pair) {
  // 16 bytes = 8 rows x (even, odd): widened to int16, each 32-bit lane holds one row's pair.
  const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair)));
  const __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 16)));
  return {_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(lo, 16), 16)), _mm256_cvtepi32_ps(_mm256_srai_epi32(lo, 16)),
          _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(hi, 16), 16)), _mm256_cvtepi32_ps(_mm256_srai_epi32(hi, 16))};
}

inline PairCodes int4_codes(const uint8_t* pair) {
  const __m256i nibble = _mm256_set1_epi32(15);
  const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pair)));
  const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pair + 8)));
  return {_mm256_cvtepi32_ps(_mm256_and_si256(lo, nibble)), _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4)),
          _mm256_cvtepi32_ps(_mm256_and_si256(hi, nibble)), _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4))};
}

// One panel, all K, MR (1 or 2) rows: per group acc = sum x * code, then
// total += scale * acc + offset * sum x, with offset = 0 (int8), -8 scale (int4) or min (zero point).
template <int MR>
void codes_panel(const QuantMatrix& w, const float* const* a, int64_t panel, float* c, int ldc) {
  const int64_t K = w.K, Kp = k_pairs(K), pairs_per_group = Kp / w.groups;
  const bool int8 = w.format == WeightFormat::Int8, zero_point = has_zero_point(w.format);
  const int64_t width = zero_point ? 2 : 1;
  const float* a0 = a[0];
  const float* a1 = a[MR > 1 ? 1 : 0];
  __m256 total_lo0 = _mm256_setzero_ps(), total_hi0 = _mm256_setzero_ps();
  __m256 total_lo1 = _mm256_setzero_ps(), total_hi1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t kp_begin = g * pairs_per_group, kp_end = kp_begin + pairs_per_group;
    __m256 acc_lo0 = _mm256_setzero_ps(), acc_hi0 = _mm256_setzero_ps();
    __m256 acc_lo1 = _mm256_setzero_ps(), acc_hi1 = _mm256_setzero_ps();
    for (int64_t kp = kp_begin; kp < kp_end; ++kp) {
      const int64_t pair_row = panel * Kp + kp, k = 2 * kp;
      const PairCodes q = int8 ? int8_codes(reinterpret_cast<const int8_t*>(w.data) + pair_row * kPanelRows * 2)
                               : int4_codes(w.data + pair_row * kPanelRows);
      __m256 x = _mm256_broadcast_ss(a0 + k);
      acc_lo0 = _mm256_fmadd_ps(x, q.even_lo, acc_lo0);
      acc_hi0 = _mm256_fmadd_ps(x, q.even_hi, acc_hi0);
      if (MR > 1) {
        x = _mm256_broadcast_ss(a1 + k);
        acc_lo1 = _mm256_fmadd_ps(x, q.even_lo, acc_lo1);
        acc_hi1 = _mm256_fmadd_ps(x, q.even_hi, acc_hi1);
      }
      if (k + 1 < K) {  // odd K: the last pair's odd half is padding
        x = _mm256_broadcast_ss(a0 + k + 1);
        acc_lo0 = _mm256_fmadd_ps(x, q.odd_lo, acc_lo0);
        acc_hi0 = _mm256_fmadd_ps(x, q.odd_hi, acc_hi0);
        if (MR > 1) {
          x = _mm256_broadcast_ss(a1 + k + 1);
          acc_lo1 = _mm256_fmadd_ps(x, q.odd_lo, acc_lo1);
          acc_hi1 = _mm256_fmadd_ps(x, q.odd_hi, acc_hi1);
        }
      }
    }
    alignas(32) float scale[16], offset[16];
    for (int i = 0; i < kPanelRows; ++i) {
      const float* s = w.scales + ((panel * kPanelRows + i) * w.groups + g) * width;
      scale[i] = s[0];
      offset[i] = zero_point ? s[1] : (int8 ? 0.0f : -8.0f * s[0]);
    }
    const int64_t k_end = kp_end * 2 < K ? kp_end * 2 : K;
    float sum0 = 0.0f, sum1 = 0.0f;
    for (int64_t k = kp_begin * 2; k < k_end; ++k) {
      sum0 += a0[k];
      if (MR > 1) sum1 += a1[k];
    }
    const __m256 s_lo = _mm256_load_ps(scale), s_hi = _mm256_load_ps(scale + 8);
    const __m256 o_lo = _mm256_load_ps(offset), o_hi = _mm256_load_ps(offset + 8);
    total_lo0 = _mm256_fmadd_ps(acc_lo0, s_lo, _mm256_fmadd_ps(_mm256_set1_ps(sum0), o_lo, total_lo0));
    total_hi0 = _mm256_fmadd_ps(acc_hi0, s_hi, _mm256_fmadd_ps(_mm256_set1_ps(sum0), o_hi, total_hi0));
    if (MR > 1) {
      total_lo1 = _mm256_fmadd_ps(acc_lo1, s_lo, _mm256_fmadd_ps(_mm256_set1_ps(sum1), o_lo, total_lo1));
      total_hi1 = _mm256_fmadd_ps(acc_hi1, s_hi, _mm256_fmadd_ps(_mm256_set1_ps(sum1), o_hi, total_hi1));
    }
  }
  _mm256_storeu_ps(c, total_lo0);
  _mm256_storeu_ps(c + 8, total_hi0);
  if (MR > 1) {
    _mm256_storeu_ps(c + ldc, total_lo1);
    _mm256_storeu_ps(c + ldc + 8, total_hi1);
  }
}

void gemm_nt_codes_avx2(const QuantMatrix& w, const float* const* a_rows, int m, int p0, int np, float* c) {
  const int ldc = np * kPanelRows;
  for (int p = 0; p < np; ++p)
    for (int i = 0; i < m; i += 2) {
      float* out = c + static_cast<int64_t>(i) * ldc + p * kPanelRows;
      if (i + 1 < m)
        codes_panel<2>(w, a_rows + i, p0 + p, out, ldc);
      else
        codes_panel<1>(w, a_rows + i, p0 + p, out, ldc);
    }
}

}  // namespace

const DequantKernels* avx2_dequant() {
  static const DequantKernels kernels{dequant_avx2, gemm_nt_codes_avx2};
  return &kernels;
}

}  // namespace kt
