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

void dequant_ref(const QuantMatrix& w, int64_t p0, int64_t np, int64_t kp0, int64_t nkp, uint16_t* out) {
  const int64_t Kp = k_pairs(w.K), pairs_per_group = Kp / w.groups;
  const int64_t scale_width = has_zero_point(w.format) ? 2 : 1;
  for (int64_t p = 0; p < np; ++p) {
    for (int64_t q = 0; q < nkp; ++q) {
      const int64_t kp = kp0 + q, group = kp / pairs_per_group;
      const int64_t pair_row = (p0 + p) * Kp + kp;  // index of this (panel, pair) in the code array
      uint16_t* dst = out + (p * nkp + q) * kPanelRows * 2;
      for (int i = 0; i < kPanelRows; ++i) {
        const int64_t n = (p0 + p) * kPanelRows + i;
        const float* s = w.scales + (n * w.groups + group) * scale_width;
        for (int h = 0; h < 2; ++h) {
          float value;
          if (w.format == WeightFormat::Int8) {
            value = static_cast<float>(reinterpret_cast<const int8_t*>(w.data)[(pair_row * kPanelRows + i) * 2 + h]) * s[0];
          } else {
            const uint8_t byte = w.data[pair_row * kPanelRows + i];
            const float code = static_cast<float>(h ? byte >> 4 : byte & 15);
            if (has_zero_point(w.format)) {
              value = code * s[0];
              value = value + s[1];
            } else {
              value = (code - 8.0f) * s[0];
            }
          }
          dst[i * 2 + h] = round_to_bf16(value);
        }
      }
    }
  }
}

}  // namespace

const DequantKernels& ref_dequant() {
  static const DequantKernels kernels{dequant_ref};
  return kernels;
}

}  // namespace kt
