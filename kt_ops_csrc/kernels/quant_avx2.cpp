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

}  // namespace

const DequantKernels* avx2_dequant() {
  static const DequantKernels kernels{dequant_avx2};
  return &kernels;
}

}  // namespace kt
