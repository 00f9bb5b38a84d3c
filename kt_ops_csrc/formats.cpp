#include "formats.h"

#include <c10/util/ParallelGuard.h>

#include <climits>
#include <cstdint>
#include <iterator>
#include <vector>

#include "kernels/gemm.h"
#include "runtime/cpu.h"
#include "runtime/thread_pool.h"

namespace kt {
namespace {

const DequantKernels& dequant_kernels() { return active_dequant_kernels(); }

// Integer codes (int8, 4-bit): integer dot products on quantized activations where the ISA has them.
bool integer_products(WeightFormat format) {
  return is_integer_coded(format) && dequant_kernels().gemm_nt_int8 != nullptr;
}

// Round-to-nearest codes for [rows, groups, group_size] values. The 4-bit formats try a few clipping
// ratios of the range per group and keep the one with the least squared error: with 16 levels,
// clipping the rare extreme values buys a finer step for all the others.
std::pair<Tensor, Tensor> quantize_groups(const Tensor& grouped, WeightFormat format) {
  const bool zero_point = has_zero_point(format), int8 = is_int8(format);
  const double qmax = int8 ? 127.0 : (zero_point ? 15.0 : 7.0);
  const double qmin = int8 ? -127.0 : (zero_point ? 0.0 : -8.0);
  const std::vector<double> ratios =
      int8 ? std::vector<double>{1.0} : std::vector<double>{1.0, 0.95, 0.9, 0.85, 0.8, 0.75};
  Tensor lo = std::get<0>(grouped.min(-1, true)), hi = std::get<0>(grouped.max(-1, true));
  Tensor absmax = at::maximum(lo.abs(), hi);
  Tensor best_codes, best_scale, best_offset, best_error;
  for (double ratio : ratios) {
    Tensor scale, offset, codes;
    if (zero_point) {
      offset = lo * ratio;
      scale = (hi * ratio - offset) / qmax;
      Tensor safe = at::where(scale > 0, scale, at::ones_like(scale));
      codes = at::round((grouped - offset) / safe).clamp(qmin, qmax);
    } else {
      scale = absmax * ratio / qmax;
      Tensor safe = at::where(scale > 0, scale, at::ones_like(scale));
      codes = at::round(grouped / safe).clamp(qmin, qmax);
    }
    Tensor restored = zero_point ? codes * scale + offset : codes * scale;
    Tensor error = (restored - grouped).square().sum(-1, true);
    if (!best_error.defined()) {
      best_codes = codes, best_scale = scale, best_offset = offset, best_error = error;
      continue;
    }
    Tensor better = error < best_error;
    best_codes = at::where(better, codes, best_codes);
    best_scale = at::where(better, scale, best_scale);
    if (zero_point) best_offset = at::where(better, offset, best_offset);
    best_error = at::where(better, error, best_error);
  }
  if (zero_point) return {best_codes, at::cat({best_scale, best_offset}, -1)};  // [rows, groups, 2]
  if (!int8) best_codes = best_codes + 8.0;                                     // 4-bit codes offset by 8
  return {best_codes, best_scale.squeeze(-1)};                                  // [rows, groups]
}

// fp8: scale = max|w| / 448 per row and group (448 is E4M3's largest finite value), codes = w / scale
// rounded to the nearest E4M3 value (ties to even, torch's float8_e4m3fn conversion), as bytes.
std::pair<Tensor, Tensor> quantize_groups_fp8(const Tensor& grouped) {
  Tensor scale = grouped.abs().amax(-1, true) / 448.0;
  Tensor safe = at::where(scale > 0, scale, at::ones_like(scale));
  Tensor codes = (grouped / safe).clamp(-448.0, 448.0).to(at::kFloat8_e4m3fn).view(at::kByte);
  return {codes, scale.squeeze(-1)};
}

}  // namespace

WeightFormat parse_weight_format(c10::string_view name) {
  for (size_t i = 0; i < std::size(kWeightFormatNames); ++i)
    if (name == kWeightFormatNames[i]) return static_cast<WeightFormat>(i);
  TORCH_CHECK_VALUE(false, "kt_ops: unknown weight_format '", std::string(name),
                    "'; supported: bf16, int8, int4, int4_1, int4_kgroup, int4_1_kgroup, int8_kgroup, fp8");
}

int64_t packed_bytes(WeightFormat format, int64_t rows, int64_t cols) {
  // Sizes come from callers (intermediate_size is an op argument): a product that wraps around
  // int64 could match a small blob and send the kernels 2^62 rows deep, so every step is checked.
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "kt_ops: matrix sizes must be >= 0, got ", rows, " x ", cols);
  const int64_t per_slot = format == WeightFormat::Bf16 ? 4 : is_byte_coded(format) ? 2 : 1;  // 4-bit: two codes a byte
  int64_t pair_rows = 0, bytes = 0;                                                           // (row, k pair) slots
  const bool overflow = rows > INT64_MAX - kPanelRows || cols == INT64_MAX ||
                        __builtin_mul_overflow(padded_rows(rows), k_pairs(cols), &pair_rows) ||
                        __builtin_mul_overflow(pair_rows, per_slot, &bytes);
  TORCH_CHECK_VALUE(!overflow, "kt_ops: a ", weight_format_name(format), " matrix of ", rows, " x ", cols,
                    " is too large (its packed size overflows int64); check hidden_size / intermediate_size");
  return bytes;
}

int64_t check_packed_matrix(WeightFormat format, const Tensor& blob, const std::optional<Tensor>& scales,
                            int64_t num_experts, int64_t rows, int64_t cols, const char* blob_name,
                            const char* scale_name) {
  const int64_t bytes = packed_bytes(format, rows, cols);
  TORCH_CHECK_VALUE(blob.size(1) == bytes, "kt_ops: ", blob_name, " must have shape [", num_experts, ", ", bytes, "] (",
                    weight_format_name(format), " experts of ", rows, " x ", cols, "), got ", blob.sizes());
  if (format == WeightFormat::Bf16) {
    TORCH_CHECK_VALUE(!scales.has_value(), "kt_ops: weight_format 'bf16' takes no ", scale_name, " (pass None)");
    return 1;
  }
  TORCH_CHECK_VALUE(scales.has_value(), "kt_ops: weight_format '", weight_format_name(format), "' needs ", scale_name,
                    " (as kt_ops.pack_experts returns it)");
  const Tensor& s = *scales;
  TORCH_CHECK_VALUE(s.device().is_cpu(), "kt_ops: ", scale_name, " must be a CPU tensor, got device ", s.device());
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "kt_ops: ", scale_name, " must be float32, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.is_contiguous(), "kt_ops: ", scale_name, " must be contiguous");
  const int64_t width_dims = has_zero_point(format) ? 4 : 3;
  TORCH_CHECK_VALUE(s.dim() == width_dims && s.size(0) == num_experts && s.size(1) == padded_rows(rows) &&
                        (width_dims == 3 || s.size(3) == 2) && s.size(2) >= 1,
                    "kt_ops: ", scale_name, " must have shape [", num_experts, ", ", padded_rows(rows), ", groups",
                    has_zero_point(format) ? ", 2]" : "]", " for ", weight_format_name(format), ", got ", s.sizes());
  const int64_t groups = s.size(2);
  if (is_grouped(format)) {
    TORCH_CHECK_VALUE(cols % groups == 0 && (cols / groups) % 2 == 0, "kt_ops: ", scale_name, " has ", groups,
                      " groups, which do not split ", cols, " columns into groups of an even size");
  } else {
    TORCH_CHECK_VALUE(groups == 1, "kt_ops: ", scale_name, " must have one group per row for ",
                      weight_format_name(format), ", got ", groups);
  }
  return groups;
}

ExpertWeights::ExpertWeights(WeightFormat format, const Tensor& blob, const std::optional<Tensor>& scales, int64_t rows,
                             int64_t cols, int64_t groups)
    : format_(format), data_(blob.data_ptr<uint8_t>()), expert_bytes_(blob.size(1)), rows_(rows), cols_(cols),
      groups_(groups) {
  if (scales.has_value()) {
    scales_ = scales->data_ptr<float>();
    expert_scales_ = scales->numel() / scales->size(0);
  }
}

QuantMatrix ExpertWeights::matrix(int64_t expert) const {
  return {format_, data_ + expert * expert_bytes_, scales_ + expert * expert_scales_, cols_, groups_};
}

bool ExpertWeights::codes_path(int64_t m, bool integer_dot) const {
  if (integer_products(format_)) return m <= kDirectQuantRows || integer_dot;
  return format_ != WeightFormat::Bf16 && m <= kDirectQuantRows && dequant_kernels().gemm_nt_codes != nullptr;
}

bool ExpertWeights::scaled_path(int64_t m) const {
  return format_ != WeightFormat::Bf16 && m <= kScaledGemmRows && dequant_kernels().gemm_nt_scaled != nullptr;
}

void ExpertWeights::gemm_nt_scaled(int64_t expert, const float* a, int64_t lda, int64_t m, int64_t p0, int64_t np,
                                   float* c, int64_t ldc) const {
  dequant_kernels().gemm_nt_scaled(matrix(expert), a, lda, static_cast<int>(m), static_cast<int>(p0),
                                   static_cast<int>(np), c, ldc);
}

bool ExpertWeights::codes_quantized() const { return integer_products(format_); }

bool ExpertWeights::quantize_rows(const float* const* a_rows, int m, int16_t* q, int8_t* q8, float* step) const {
  return dequant_kernels().quantize_rows(a_rows, m, cols_, activation_groups(), q, q8, step);
}

void ExpertWeights::gemm_nt_codes(int64_t expert, const float* const* a_rows, const QuantizedRows* quantized, int m,
                                  int64_t p0, int64_t np, float* c) const {
  const DequantKernels& kernels = dequant_kernels();
  if (integer_products(format_))
    kernels.gemm_nt_int8(matrix(expert), a_rows, quantized, m, static_cast<int>(p0), static_cast<int>(np), c);
  else
    kernels.gemm_nt_codes(matrix(expert), a_rows, m, static_cast<int>(p0), static_cast<int>(np), c);
}

const uint16_t* ExpertWeights::nt_panels(int64_t expert, int64_t p0, int64_t np, int64_t& panel_stride,
                                         uint16_t* buffer) const {
  panel_stride = k_pairs(cols_) * 2 * kPanelRows;
  if (format_ == WeightFormat::Bf16)
    return reinterpret_cast<const uint16_t*>(data_ + expert * expert_bytes_) + p0 * panel_stride;
  dequant_kernels().dequant(matrix(expert), p0, np, 0, k_pairs(cols_), buffer);
  return buffer;
}

NnWeights ExpertWeights::nn_weights(int64_t expert) const {
  NnWeights w;
  if (format_ == WeightFormat::Bf16) {
    w.panels = reinterpret_cast<const uint16_t*>(data_ + expert * expert_bytes_);
    w.kp = k_pairs(cols_);
  } else {
    w.codes = matrix(expert);
    w.dequant = dequant_kernels().dequant;
  }
  return w;
}

namespace {

// [E, Np, K] -> the view [E, Np/16, Kp, 16, 2] (odd K padded by one column): the panel / k-pair
// order of every format.
Tensor panel_view(const Tensor& t, int64_t E, int64_t Np, int64_t K) {
  const int64_t Kp = k_pairs(K);
  Tensor even = 2 * Kp != K ? at::constant_pad_nd(t, {0, 1}) : t;
  return even.reshape({E, Np / kPanelRows, kPanelRows, Kp, 2}).permute({0, 1, 3, 2, 4});
}

// A packed weight blob [E, bytes], uint8, to be filled. The layer keeps it for the process's life and
// every op call streams it, so one of a huge page or more is on huge pages (map_pages).
Tensor weight_blob(int64_t E, int64_t bytes) {
  const size_t total = static_cast<size_t>(E) * static_cast<size_t>(bytes);
  if (total < kHugePageBytes) return at::empty({E, bytes}, at::kByte);
  void* pages = map_pages(total);
  return at::from_blob(
      pages, {E, bytes}, [total](void* p) { release_pages(p, total); }, at::TensorOptions().dtype(at::kByte));
}

// Codes [E, Np, K] (integer valued) as the format's byte blob [E, packed_bytes].
Tensor codes_to_blob(const Tensor& codes, WeightFormat format, int64_t E, int64_t N, int64_t K) {
  const int64_t Np = padded_rows(N), Kp = k_pairs(K);
  Tensor blob = weight_blob(E, packed_bytes(format, N, K));
  Tensor panels = panel_view(codes, E, Np, K);
  if (is_int8(format)) {
    blob.view(at::kChar).view(panels.sizes()).copy_(panels);
  } else if (format == WeightFormat::Fp8) {
    blob.view(panels.sizes()).copy_(panels);
  } else {
    Tensor nibbles = panels.to(at::kByte);  // [..., 16, 2]: even k in the low nibble
    blob.view({E, Np / kPanelRows, Kp, kPanelRows})
        .copy_(nibbles.select(-1, 0).bitwise_or(nibbles.select(-1, 1).bitwise_left_shift(4)));
  }
  return blob;
}

}  // namespace

std::tuple<Tensor, Tensor> pack_weights(const Tensor& weight, c10::string_view weight_format, int64_t group_size) {
  c10::ParallelGuard inline_torch_ops(false);  // packing is a one-off: let torch use its threads
  const WeightFormat format = parse_weight_format(weight_format);
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "kt_ops: weight must be a CPU tensor, got device ", weight.device());
  TORCH_CHECK_VALUE(weight.dim() == 3,
                    "kt_ops: weight must be 3-D [num_experts, out_features, in_features], got shape ", weight.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), "kt_ops: weight must be a floating tensor, got ",
                   weight.scalar_type());
  const int64_t E = weight.size(0), N = weight.size(1), K = weight.size(2);
  TORCH_CHECK_VALUE(E >= 1 && N >= 1 && K >= 1, "kt_ops: weight must be non-empty, got shape ", weight.sizes());
  int64_t groups = 1;
  if (is_grouped(format)) {
    TORCH_CHECK_VALUE(group_size >= 2 && group_size % 2 == 0 && K % group_size == 0, "kt_ops: group_size ", group_size,
                      " must be even and divide in_features ", K, " for weight_format '", weight_format_name(format),
                      "' (e.g. 32, 64 or 128 dividing both hidden_size and intermediate_size)");
    groups = K / group_size;
  }
  const int64_t Np = padded_rows(N);
  if (format == WeightFormat::Bf16) {
    Tensor panels = panel_view(at::constant_pad_nd(weight.to(at::kBFloat16), {0, 0, 0, Np - N}), E, Np, K);
    Tensor blob = weight_blob(E, packed_bytes(format, N, K));
    blob.view(at::kBFloat16).view(panels.sizes()).copy_(panels);
    return {blob, at::empty({0}, weight.options().dtype(at::kFloat))};
  }
  // Statistics over the real columns only; padded rows get zero scales (they dequantize to zero).
  // One expert at a time bounds the fp32 working copy to one expert's matrix.
  std::vector<Tensor> expert_codes, expert_scales;
  for (int64_t e = 0; e < E; ++e) {
    Tensor w = weight.select(0, e).to(at::kFloat);
    if (Np != N) w = at::constant_pad_nd(w, {0, 0, 0, Np - N});
    auto [codes, scales] = format == WeightFormat::Fp8 ? quantize_groups_fp8(w.view({Np, groups, K / groups}))
                                                       : quantize_groups(w.view({Np, groups, K / groups}), format);
    expert_codes.push_back(codes.view({Np, K}));
    expert_scales.push_back(scales);
  }
  return {codes_to_blob(at::stack(expert_codes), format, E, N, K), at::stack(expert_scales).contiguous()};
}

std::tuple<Tensor, Tensor> pack_codes(const Tensor& raw_codes, const Tensor& scales, c10::string_view weight_format) {
  const WeightFormat format = parse_weight_format(weight_format);
  TORCH_CHECK_VALUE(format != WeightFormat::Bf16, "kt_ops: pack_codes takes a quantized weight_format, got 'bf16'");
  TORCH_CHECK_VALUE(raw_codes.device().is_cpu() && scales.device().is_cpu(),
                    "kt_ops: codes and scales must be CPU tensors");
  const bool fp8 = format == WeightFormat::Fp8;
  TORCH_CHECK_TYPE(raw_codes.scalar_type() != at::kFloat8_e4m3fn || fp8,
                   "kt_ops: float8_e4m3fn codes need "
                   "weight_format 'fp8', got '",
                   weight_format_name(format), "'");
  // fp8 codes are the E4M3 bytes: a float8_e4m3fn tensor is taken bit for bit.
  const Tensor codes = raw_codes.scalar_type() == at::kFloat8_e4m3fn ? raw_codes.view(at::kByte) : raw_codes;
  TORCH_CHECK_VALUE(codes.dim() == 3, "kt_ops: codes must be 3-D [num_experts, out_features, in_features], got shape ",
                    codes.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(codes.scalar_type(), /*includeBool=*/false),
                   "kt_ops: codes must be an integer "
                   "tensor, got ",
                   codes.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(scales.scalar_type()), "kt_ops: scales must be a floating tensor, got ",
                   scales.scalar_type());
  const int64_t E = codes.size(0), N = codes.size(1), K = codes.size(2);
  TORCH_CHECK_VALUE(E >= 1 && N >= 1 && K >= 1, "kt_ops: codes must be non-empty, got shape ", codes.sizes());
  const bool zero_point = has_zero_point(format);
  TORCH_CHECK_VALUE(scales.dim() == (zero_point ? 4 : 3) && scales.size(0) == E && scales.size(1) == N &&
                        (!zero_point || scales.size(3) == 2),
                    "kt_ops: scales must have shape [", E, ", ", N, ", groups", zero_point ? ", 2]" : "]",
                    " for weight_format '", weight_format_name(format), "', got ", scales.sizes());
  const int64_t groups = scales.size(2);
  // A K-group format needs an even group size even with one group: that is what the ops accept.
  TORCH_CHECK_VALUE(groups >= 1 && K % groups == 0 && (is_grouped(format) ? (K / groups) % 2 == 0 : groups == 1),
                    "kt_ops: scales has ", groups, " groups per row; weight_format '", weight_format_name(format),
                    "' needs ", is_grouped(format) ? "an even group size dividing in_features " : "1 (per row), not ",
                    is_grouped(format) ? std::to_string(K) : std::to_string(groups));
  const int64_t lo = is_int8(format) ? -128 : 0, hi = is_int8(format) ? 127 : fp8 ? 255 : 15;
  TORCH_CHECK_VALUE(codes.min().item<int64_t>() >= lo && codes.max().item<int64_t>() <= hi, "kt_ops: codes of '",
                    weight_format_name(format), "' must lie in [", lo, ", ", hi, "]");
  const int64_t Np = padded_rows(N);
  // fp8 codes stay bytes (a checkpoint's layer is large); the others go through float once.
  Tensor padded_codes = at::constant_pad_nd(codes.to(fp8 ? at::kByte : at::kFloat), {0, 0, 0, Np - N});
  std::vector<int64_t> pad(2 * (scales.dim() - 2), 0);  // trailing dims unpadded
  pad.push_back(0);
  pad.push_back(Np - N);  // rows; padded rows get zero scales and dequantize to zero
  Tensor padded_scales = at::constant_pad_nd(scales.to(at::kFloat), pad);
  return {codes_to_blob(padded_codes, format, E, N, K), padded_scales.contiguous()};
}

Tensor unpack_weights(const Tensor& packed, const std::optional<Tensor>& scales, c10::string_view weight_format,
                      int64_t rows, int64_t cols) {
  const WeightFormat format = parse_weight_format(weight_format);
  TORCH_CHECK_VALUE(packed.device().is_cpu(), "kt_ops: packed must be a CPU tensor, got device ", packed.device());
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "kt_ops: packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 2, "kt_ops: packed must be 2-D [num_experts, packed_bytes], got ", packed.sizes());
  TORCH_CHECK_VALUE(rows >= 1 && cols >= 1, "kt_ops: rows and cols must be >= 1");
  const int64_t E = packed.size(0);
  const std::optional<Tensor> scale_arg = format == WeightFormat::Bf16 ? std::nullopt : scales;
  const int64_t groups = check_packed_matrix(format, packed, scale_arg, E, rows, cols, "packed", "scales");
  const int64_t Np = padded_rows(rows), Kp = k_pairs(cols);
  Tensor blob = packed.contiguous();
  Tensor panels;
  if (format == WeightFormat::Bf16) {
    panels = blob.view(at::kBFloat16).view({E, Np / kPanelRows, Kp, kPanelRows, 2});
  } else {
    // Quantized formats unpack to the exact fp32 values of their codes; the kernels compute with
    // these rounded to bf16 (buffered path) or exactly (few-row direct path).
    Tensor scale_tensor = scale_arg->contiguous();
    Tensor out = at::empty({E, rows, cols}, packed.options().dtype(at::kFloat));
    for (int64_t e = 0; e < E; ++e) {
      QuantMatrix m{format, blob.data_ptr<uint8_t>() + e * blob.size(1),
                    scale_tensor.data_ptr<float>() + e * (scale_tensor.numel() / E), cols, groups};
      dequant_f32(m, rows, out.data_ptr<float>() + e * rows * cols);
    }
    return out;
  }
  return panels.permute({0, 1, 3, 2, 4}).reshape({E, Np, 2 * Kp}).narrow(1, 0, rows).narrow(2, 0, cols).contiguous();
}

}  // namespace kt
