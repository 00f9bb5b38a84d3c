// Weight formats: names, packed sizes, scale shapes, packing (quantization) and the per-task view
// that hands bf16 panels to the GEMM kernels (dequantizing when the format is quantized).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>

#include "kernels/gemm.h"
#include "kernels/quant.h"

namespace kt {

using at::Tensor;

WeightFormat parse_weight_format(c10::string_view name);  // ValueError listing the formats
int64_t packed_bytes(WeightFormat format, int64_t rows, int64_t cols);

// Validates `blob` ([E, bytes] uint8) and `scales` for an [E, rows, cols] matrix in `format`;
// returns the number of K groups (1 for per-row formats).
int64_t check_packed_matrix(WeightFormat format, const Tensor& blob, const std::optional<Tensor>& scales,
                            int64_t num_experts, int64_t rows, int64_t cols, const char* blob_name,
                            const char* scale_name);

// One projection's experts, as the kernels read them.
class ExpertWeights {
 public:
  ExpertWeights(WeightFormat format, const Tensor& blob, const std::optional<Tensor>& scales, int64_t rows,
                int64_t cols, int64_t groups);

  // Whether gemm_nt_codes takes m rows: a quantized format with a kernel for it and m <=
  // kDirectQuantRows, or an integer-coded format (int8, 4-bit) at any m under integer_dot
  // (runtime/cpu.h's setting, read once per call by the caller: another thread may change it
  // meanwhile).
  bool codes_path(int64_t m, bool integer_dot) const;
  // Whether gemm_nt_codes multiplies rows quantized by quantize_rows (the integer-coded formats'
  // integer dot products, quant.h) rather than fp32 rows.
  bool codes_quantized() const;
  // quant.h's quantize_rows for this matrix's K and activation groups: q, q8 [m][2 k_pairs(cols())],
  // step [m][activation_groups()].
  bool quantize_rows(const float* const* a_rows, int m, int16_t* q, int8_t* q8, float* step) const;
  // gemm_nt straight on quantized codes, for rows the caller put on the codes (codes_path; see
  // quant.h): `quantized` is the rows' quantize_rows where codes_quantized(), nullptr where that
  // returned false or is not needed.
  void gemm_nt_codes(int64_t expert, const float* const* a_rows, const QuantizedRows* quantized, int m, int64_t p0,
                     int64_t np, float* c) const;
  // Whether gemm_nt_scaled (quant.h) multiplies m rows: a quantized format, up to kScaledGemmRows rows,
  // where the ISA's table has the kernel. Only the fp32 ISAs call it (the bf16 ones round activations
  // and take bf16 panels).
  bool scaled_path(int64_t m) const;
  void gemm_nt_scaled(int64_t expert, const float* a, int64_t lda, int64_t m, int64_t p0, int64_t np, float* c,
                      int64_t ldc) const;
  // Panels [p0, p0 + np) over all K as bf16 weight panels (gemm.h), panel_stride uint16 apart: the
  // packed weights themselves, or (quantized formats) dequantized into `buffer`, which has room for
  // nt_buffer_elems(np) values.
  const uint16_t* nt_panels(int64_t expert, int64_t p0, int64_t np, int64_t& panel_stride, uint16_t* buffer) const;
  int64_t nt_buffer_elems(int64_t np) const { return np * k_pairs(cols_) * 2 * kPanelRows; }
  // W as gemm_nn reads it (gemm.h): the packed bf16 panels, or the codes with this CPU's dequantizer.
  NnWeights nn_weights(int64_t expert) const;
  bool is_bf16() const { return format_ == WeightFormat::Bf16; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  // The K groups gemm_nt_codes quantizes rows in (quant.h activation_groups).
  int64_t activation_groups() const { return kt::activation_groups(k_pairs(cols_), groups_); }

 private:
  QuantMatrix matrix(int64_t expert) const;

  WeightFormat format_;
  const uint8_t* data_;
  int64_t expert_bytes_;
  const float* scales_ = nullptr;
  int64_t expert_scales_ = 0;
  int64_t rows_, cols_, groups_;
};

std::tuple<Tensor, Tensor> pack_weights(const Tensor& weight, c10::string_view weight_format, int64_t group_size);
// Already quantized codes (e.g. from a GGUF file, or float8_e4m3fn bytes of an FP8 checkpoint for
// `fp8`) and their scales, in the format's layout, exactly.
std::tuple<Tensor, Tensor> pack_codes(const Tensor& codes, const Tensor& scales, c10::string_view weight_format);
Tensor unpack_weights(const Tensor& packed, const std::optional<Tensor>& scales, c10::string_view weight_format,
                      int64_t rows, int64_t cols);

}  // namespace kt
