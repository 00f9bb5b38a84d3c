#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "gemm.h"
#include "kernel_local.h"
#include "quant.h"

namespace kt {
namespace {

const std::array<float, 256> kE4m3 = [] {
  std::array<float, 256> table{};
  for (int code = 0; code < 256; ++code) table[code] = e4m3_value(static_cast<uint8_t>(code));
  return table;
}();

// w[n, 2kp + h] in fp32 (the exact value of the code).
inline float dequant_value(const QuantMatrix& w, int64_t n, int64_t kp, int h) {
  const int64_t Kp = k_pairs(w.K), pairs_per_group = Kp / w.groups, group = kp / pairs_per_group;
  const int64_t panel = n / kPanelRows, i = n % kPanelRows, pair_row = panel * Kp + kp;
  const float* s = w.scales + (n * w.groups + group) * (has_zero_point(w.format) ? 2 : 1);
  if (w.format == WeightFormat::Fp8) return kE4m3[w.data[(pair_row * kPanelRows + i) * 2 + h]] * s[0];
  if (is_int8(w.format))
    return static_cast<float>(reinterpret_cast<const int8_t*>(w.data)[(pair_row * kPanelRows + i) * 2 + h]) * s[0];
  const uint8_t byte = w.data[pair_row * kPanelRows + i];
  const float code = static_cast<float>(h ? byte >> 4 : byte & 15);
  if (!has_zero_point(w.format)) return (code - 8.0f) * s[0];
  const float scaled = code * s[0];
  return scaled + s[1];
}

void dequant_ref(const QuantMatrix& w, int64_t p0, int64_t np, int64_t kp0, int64_t nkp, uint16_t* out) {
  for (int64_t p = 0; p < np; ++p)
    for (int64_t q = 0; q < nkp; ++q) {
      uint16_t* dst = out + (p * nkp + q) * kPanelRows * 2;
      for (int i = 0; i < kPanelRows; ++i)
        for (int h = 0; h < 2; ++h)
          dst[i * 2 + h] = float_to_bf16(dequant_value(w, (p0 + p) * kPanelRows + i, kp0 + q, h));
    }
}

// fp32 on the exact code values: the int8 path's fallback for rows holding NaN or Inf.
void gemm_nt_f32_ref(const QuantMatrix& w, const float* const* a_rows, int m, int p0, int np, float* c) {
  const int ldc = np * kPanelRows;
  for (int r = 0; r < m; ++r)
    for (int j = 0; j < ldc; ++j) {
      const int64_t n = int64_t(p0) * kPanelRows + j;
      float sum = 0.0f;
      for (int64_t k = 0; k < w.K; ++k) sum += a_rows[r][k] * dequant_value(w, n, k / 2, k % 2);
      c[int64_t(r) * ldc + j] = sum;
    }
}

// The activation quantization of quant.h for one row: codes [2 Kp] (odd K: the padding k is 0) and
// one step per group. False if the row holds NaN or Inf (or a group's 127 / max|x| overflows).
bool quantize_row_ref(const float* x, int64_t K, int64_t groups, int16_t* q, float* step) {
  const int64_t Kp = k_pairs(K), group_k = 2 * (Kp / groups);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * group_k, k1 = std::min(K, k0 + group_k);
    float absmax = 0.0f;
    for (int64_t k = k0; k < k1; ++k) {
      if (!std::isfinite(x[k])) return false;
      absmax = std::max(absmax, std::fabs(x[k]));
    }
    step[g] = absmax / 127.0f;
    const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
    if (std::isinf(inv)) return false;  // a group of tiny subnormals: no finite step reaches 127
    for (int64_t k = k0; k < k1; ++k) q[k] = static_cast<int16_t>(std::nearbyint(x[k] * inv));
  }
  if (K % 2) q[K] = 0;
  return true;
}

bool quantize_rows_ref(const float* const* a, int m, int64_t K, int64_t groups, int16_t* q, int8_t* q8, float* step) {
  const int64_t row_q = 2 * k_pairs(K);
  for (int r = 0; r < m; ++r)
    if (!quantize_row_ref(a[r], K, groups, q + r * row_q, step + r * groups)) return false;
  std::copy(q, q + m * row_q, q8);  // |q| <= 127
  return true;
}

// An integer code's value in the integer products: the int8 code, a symmetric 4-bit code u as u - 8,
// a zero-point one as u (its min applies apart, to sum q).
inline int32_t integer_code(const QuantMatrix& w, int64_t pair_row, int i, int h) {
  if (is_int8(w.format)) return reinterpret_cast<const int8_t*>(w.data)[(pair_row * kPanelRows + i) * 2 + h];
  const uint8_t byte = w.data[pair_row * kPanelRows + i];
  const int32_t u = h ? byte >> 4 : byte & 15;
  return has_zero_point(w.format) ? u : u - 8;
}

void gemm_nt_int8_ref(const QuantMatrix& w, const float* const* a_rows, const QuantizedRows* quantized, int m, int p0,
                      int np, float* c) {
  if (quantized == nullptr) return gemm_nt_f32_ref(w, a_rows, m, p0, np, c);
  const int64_t K = w.K, Kp = k_pairs(K), groups = quantized->groups, pairs_per_group = Kp / groups;
  const bool zero_point = has_zero_point(w.format);
  const int ldc = np * kPanelRows;
  for (int r = 0; r < m; ++r) {
    const int16_t* q = quantized->q + r * 2 * Kp;
    for (int j = 0; j < ldc; ++j) {
      const int64_t n = int64_t(p0) * kPanelRows + j, panel = n / kPanelRows, i = n % kPanelRows;
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t c0 = g * pairs_per_group; c0 < (g + 1) * pairs_per_group; c0 += kMaxPairsPerInt32) {
          const int64_t c1 = std::min((g + 1) * pairs_per_group, c0 + kMaxPairsPerInt32);
          int32_t acc = 0, sum_q = 0;
          for (int64_t kp = c0; kp < c1; ++kp)
            for (int h = 0; h < 2; ++h) {
              acc += integer_code(w, panel * Kp + kp, static_cast<int>(i), h) * q[2 * kp + h];
              sum_q += q[2 * kp + h];
            }
          const int64_t wg = weight_group_of(g, groups, w.groups);
          const float* s = w.scales + (n * w.groups + wg) * (zero_point ? 2 : 1);
          float term = static_cast<float>(acc) * s[0];
          if (zero_point) term = term + static_cast<float>(sum_q) * s[1];
          total = total + term * quantized->step[r * groups + g];
        }
      c[int64_t(r) * ldc + j] = total;
    }
  }
}

}  // namespace

void dequant_f32(const QuantMatrix& w, int64_t rows, float* out) {
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t k = 0; k < w.K; ++k) out[n * w.K + k] = dequant_value(w, n, k / 2, k % 2);
}

const DequantKernels& ref_dequant() {
  static const DequantKernels kernels{dequant_ref, nullptr, gemm_nt_int8_ref, quantize_rows_ref};
  return kernels;
}

}  // namespace kt
