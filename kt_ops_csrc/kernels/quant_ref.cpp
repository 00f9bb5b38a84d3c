#include <cstring>

#include "gemm.h"
#include "quant.h"

namespace kt {
namespace {

inline uint16_t round_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline bool has_zero_point(WeightFormat f) { return f == WeightFormat::Int4Zp || f == WeightFormat::Int4ZpKGroup; }
inline bool is_int8(WeightFormat f) { return f == WeightFormat::Int8 || f == WeightFormat::Int8KGroup; }

// w[n, 2kp + h] in fp32 (the exact value of the code).
inline float dequant_value(const QuantMatrix& w, int64_t n, int64_t kp, int h) {
  const int64_t Kp = k_pairs(w.K), pairs_per_group = Kp / w.groups, group = kp / pairs_per_group;
  const int64_t panel = n / kPanelRows, i = n % kPanelRows, pair_row = panel * Kp + kp;
  const float* s = w.scales + (n * w.groups + group) * (has_zero_point(w.format) ? 2 : 1);
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
        for (int h = 0; h < 2; ++h) dst[i * 2 + h] = round_to_bf16(dequant_value(w, (p0 + p) * kPanelRows + i, kp0 + q, h));
    }
}

}  // namespace

void dequant_f32(const QuantMatrix& w, int64_t rows, float* out) {
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t k = 0; k < w.K; ++k) out[n * w.K + k] = dequant_value(w, n, k / 2, k % 2);
}

const DequantKernels& ref_dequant() {
  static const DequantKernels kernels{dequant_ref, nullptr};
  return kernels;
}

}  // namespace kt
