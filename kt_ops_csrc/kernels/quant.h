// Quantized weight formats. Every format keeps the panel / k-pair structure of the bf16 layout
// (gemm.h): element (panel p, pair kp, row i, half h) is W[16p + i, 2kp + h]. A GEMM task
// dequantizes the panels it needs into a bf16 buffer of that layout (in L2) and runs the bf16
// kernels on it, so every ISA's GEMM serves every format and the weights stay compressed in RAM.
// Fewer rows multiply the codes directly: decode's (gemm_nt_codes, gemm_nt_int8) and, on the fp32
// ISAs, a forward's experts of up to kScaledGemmRows rows (gemm_nt_scaled).
//
//   int8            int8 codes, 2 bytes per pair-row; w = q * scale[n]                (symmetric, per row)
//   int4            4-bit codes u (low nibble = even k, high = odd k); w = (u - 8) * scale[n]
//   int4_1          4-bit codes; w = u * scale[n] + min[n]                             (zero point, per row)
//   int4_kgroup     like int4 with one scale per row and group of `group_size` k
//   int4_1_kgroup   like int4_1 with one (scale, min) per row and group
//   int8_kgroup     like int8 with one scale per row and group (GGUF Q8_0 is group 32)
//   fp8             float8 E4M3 codes (the OCP "e4m3fn" encoding: bias 7, no infinities, 0x7F / 0xFF
//                   NaN), 2 bytes per pair-row like int8; w = e4m3(code) * scale[n, group]. A
//                   DeepSeek-V3 128x128 block scale is its row range's scale for the 128-wide group.
// Scales are fp32 [Np, groups] (symmetric) or [Np, groups, 2] = (scale, min); padded rows have
// zero scales, so they dequantize to zero (the byte 0 is +0 in every format's codes too). Dequantization is w = code *
// scale (+ min) in fp32 with no fused multiply-add, rounded to bf16 to nearest even: every ISA produces the same bits.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kt {

enum class WeightFormat { Bf16, Int8, Int4, Int4Zp, Int4KGroup, Int4ZpKGroup, Int8KGroup, Fp8 };
// The formats' names (the op's weight_format strings), in the enum's order.
static constexpr const char* kWeightFormatNames[] = {"bf16",        "int8",          "int4",        "int4_1",
                                                     "int4_kgroup", "int4_1_kgroup", "int8_kgroup", "fp8"};

// `static`: this header is included by units compiled for different target ISAs (see gemm.h).
static constexpr const char* weight_format_name(WeightFormat f) { return kWeightFormatNames[static_cast<int>(f)]; }
static constexpr bool is_grouped(WeightFormat f) {
  return f == WeightFormat::Int4KGroup || f == WeightFormat::Int4ZpKGroup || f == WeightFormat::Int8KGroup ||
         f == WeightFormat::Fp8;
}
static constexpr bool has_zero_point(WeightFormat f) {
  return f == WeightFormat::Int4Zp || f == WeightFormat::Int4ZpKGroup;
}
static constexpr bool is_int8(WeightFormat f) { return f == WeightFormat::Int8 || f == WeightFormat::Int8KGroup; }
// Integer codes (int8 or 4-bit): what gemm_nt_int8 multiplies as integers.
static constexpr bool is_integer_coded(WeightFormat f) { return f != WeightFormat::Bf16 && f != WeightFormat::Fp8; }
// One byte per weight (int8 codes or fp8 codes): 2 bytes per (row, k pair) slot.
static constexpr bool is_byte_coded(WeightFormat f) { return is_int8(f) || f == WeightFormat::Fp8; }
// Bytes of one k pair of a panel (16 rows x 2 weights): the unit of the codes' panel / pair order.
static constexpr int64_t code_bytes_per_pair(WeightFormat f) { return is_byte_coded(f) ? 32 : 16; }

// A bf16's value (its bits widened into fp32's upper half).
static inline float bf16_value(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

// The exact fp32 value of an E4M3 code (every one is exact in fp32; NaN for 0x7F and 0xFF).
static inline float e4m3_value(uint8_t code) {
  const int exponent = (code >> 3) & 15, mantissa = code & 7;
  float magnitude;
  if (exponent == 15 && mantissa == 7) {
    magnitude = __builtin_nanf("");
  } else if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * 0x1p-9f;  // subnormal: mantissa / 8 * 2^-6
  } else {
    magnitude = __builtin_ldexpf(static_cast<float>(8 + mantissa), exponent - 10);  // (1 + m/8) 2^(e-7)
  }
  return code & 0x80 ? -magnitude : magnitude;
}

struct QuantMatrix {  // one expert's W [N, K]
  WeightFormat format;
  const uint8_t* data;
  const float* scales;
  int64_t K;
  int64_t groups;  // 1 for the per-row formats
};

// Rows quantized by quantize_rows in `groups` K groups (activation_groups below): q (as int16, and the
// same values as int8 in q8) rows 2 k_pairs(K) apart, steps `groups` apart.
struct QuantizedRows {
  const int16_t* q;
  const int8_t* q8;
  const float* step;
  int64_t groups;
};

// The K groups that gemm_nt_int8's activations are quantized in: the weights' groups, split into
// groups of kActivationGroupPairs k pairs where they are longer and a multiple of it (a per-row
// format's whole row included). Each lies within one weight group. A few large channels (the
// outliers of LLM hidden states) then coarsen the step of their own 128 k only, not the whole row's.
constexpr int64_t kActivationGroupPairs = 64;
static constexpr int64_t activation_groups(int64_t k_pairs_total, int64_t weight_groups) {
  const int64_t pairs = k_pairs_total / weight_groups;
  return pairs > kActivationGroupPairs && pairs % kActivationGroupPairs == 0 ? k_pairs_total / kActivationGroupPairs
                                                                             : weight_groups;
}
// The weight group that holds activation group g of `groups`.
static constexpr int64_t weight_group_of(int64_t g, int64_t groups, int64_t weight_groups) {
  return g / (groups / weight_groups);
}
// The scales of `panel`'s 16 rows (gemm.h's kPanelRows; gemm.h includes this header) for activation
// group g of `groups`, and, for a zero-point format, their mins into `mins`.
static inline void panel_scales(const QuantMatrix& w, int64_t panel, int64_t g, int64_t groups, float* out,
                                float* mins = nullptr) {
  const int64_t wg = weight_group_of(g, groups, w.groups), width = has_zero_point(w.format) ? 2 : 1;
  for (int i = 0; i < 16; ++i) {
    const float* s = w.scales + ((panel * 16 + i) * w.groups + wg) * width;
    out[i] = s[0];
    if (mins != nullptr) mins[i] = s[1];
  }
}

struct DequantKernels {
  // out: [np][nkp][16][2] bf16 for panels [p0, p0 + np) and k pairs [kp0, kp0 + nkp).
  void (*dequant)(const QuantMatrix& w, int64_t p0, int64_t np, int64_t kp0, int64_t nkp, uint16_t* out);
  // gemm_nt of gemm.h straight on the codes, for a few rows (decode), where dequantizing a panel
  // into a buffer would cost more than the bandwidth it saves. Per group it accumulates
  // sum x * code and applies w = code * scale + offset as scale * acc + offset * sum x. It rounds
  // differently from the dequantized bf16 path (no bf16 rounding of w); an fp8 code is its exact
  // E4M3 value (offset 0). nullptr: not provided.
  void (*gemm_nt_codes)(const QuantMatrix& w, const float* const* a_rows, int m, int p0, int np, float* c);
  // The same product for the integer-coded formats (int8 and 4-bit) with integer dot products
  // (decode's rows up to kDirectQuantRows, or every row under set_integer_dot; ExpertWeights::
  // gemm_nt_codes makes the choice), on the rows' quantization by quantize_rows (below) in
  // activation_groups(), done once per row by the caller rather than per call: `quantized`, or
  // nullptr where quantize_rows returned false (the product then runs in fp32 on the codes, from
  // a_rows, so that NaN and Inf propagate as on the other paths). Per activation group (in chunks of
  // at most kMaxPairsPerInt32 k pairs) two exact int32 sums: acc = sum q * v, with v the int8 code,
  // or a 4-bit code u as u - 8 (symmetric) or u (zero point; 2 * 128 * 127 * 65536 < 2^31), and,
  // for a zero point, sum_q = sum q. Then, in group order with no FMA, so that every ISA gives the
  // same bits, c += term * step with term = float(acc) * weight_scale (+ float(sum_q) * weight_min).
  // Error against the fp32 product of the exact dequantized weights: |c - x.w| <= sum_groups
  // step / 2 * sum_(k in group) |w[n, k]| (+ fp32 rounding), over the activation groups. nullptr:
  // not provided.
  void (*gemm_nt_int8)(const QuantMatrix& w, const float* const* a_rows, const QuantizedRows* quantized, int m, int p0,
                       int np, float* c);
  // The activation quantization of gemm_nt_int8 for rows [0, m), per K group (`groups`:
  // activation_groups()):
  //   step = max|x over the group| / 127,  q[k] = round_to_nearest_even(x[k] * (127 / max|x|))
  // so q lies in [-127, 127] and |x[k] - step * q[k]| <= step / 2 (up to fp32 rounding of the
  // reciprocal). Into q and q8 [m][2 Kp] (odd K: the padding k is 0) and step [m][groups]. False if a
  // row holds NaN or Inf or a group's reciprocal overflows (a group of tiny subnormals). Provided with
  // gemm_nt_int8; every table gives the same bits.
  bool (*quantize_rows)(const float* const* a, int m, int64_t K, int64_t groups, int16_t* q, int8_t* q8, float* step);
  // C [m, 16 np] (ldc apart) = A . W^T over panels [p0, p0 + np), for any number of fp32 rows A (lda
  // apart, K values each): the fp32 ISAs' product on a quantized W beyond decode's rows. Each k pair's
  // codes are decoded and scaled in registers (w = code * scale (+ min) in fp32 without FMA, the exact
  // weight: no bf16 rounding) and multiplied in blocks of rows that share them, so the weights never
  // pass through a dequantized buffer. nullptr: not provided (the bf16 panels of `dequant` serve).
  void (*gemm_nt_scaled)(const QuantMatrix& w, const float* a, int64_t lda, int m, int p0, int np, float* c,
                         int64_t ldc) = nullptr;
};

constexpr int kDirectQuantRows = 4;  // rows up to which gemm_nt_codes / gemm_nt_int8 are used
// Rows per expert up to which the fp32 ISAs multiply a quantized W by gemm_nt_scaled: it decodes the
// codes once per 8 rows, bf16 panels once per call but at more instructions per weight than the
// widening the fp32 GEMM then does per 8 rows (benchmarks/quant_kernels.cpp, Ice Lake: int8 and fp8
// about 20% faster at 8 rows; at 12 int8 6% faster and fp8 9% slower; both slower at 16).
constexpr int kScaledGemmRows = 8;
constexpr int64_t kMaxPairsPerInt32 = 65536;

template <int Rows, typename Panel>
static void with_row_count(int rows, int first_row, const Panel& panel) {
  if constexpr (Rows == 1) {
    panel(first_row, std::integral_constant<int, 1>{});
  } else if (rows == Rows) {
    panel(first_row, std::integral_constant<int, Rows>{});
  } else {
    with_row_count<Rows - 1>(rows, first_row, panel);
  }
}

// Rows [0, m) in blocks of up to MaxRows, each block's row count a compile-time constant (`rows`, a
// std::integral_constant) for the codes kernels, which keep every row's accumulators in registers:
// panel(first_row, rows).
template <int MaxRows = kDirectQuantRows, typename Panel>
static void for_row_blocks(int m, const Panel& panel) {
  for (int i = 0; i < m; i += MaxRows) with_row_count<MaxRows>(m - i < MaxRows ? m - i : MaxRows, i, panel);
}

const DequantKernels& ref_dequant();
// The exact fp32 values of rows [0, rows) as [rows, K]: the weights the quantized formats stand for.
void dequant_f32(const QuantMatrix& w, int64_t rows, float* out);
const DequantKernels* avx2_dequant();
// AVX-512 F/BW/VL + VNNI + VBMI + AVX512_BF16, bit-identical to the others; nullptr when not compiled in.
const DequantKernels* avx512_dequant();
// The same kernels for AVX-512 F/BW/VL + VNNI + VBMI without AVX512_BF16 (bf16 rounding in integer
// steps); nullptr when not compiled in.
const DequantKernels* avx512_vnni_dequant();
// `base` with gemm_nt_int8 on AMX-INT8 tiles where they apply (quant_amx.inc: rows beyond decode's,
// K groups of whole 64-k tiles), base's kernel otherwise; the same bits. The first call's base is
// kept. amx_int8_dequant: nullptr when not compiled in; only for a CPU with AMX-INT8 whose tile
// state the OS granted. amx_emu_int8_dequant: the same on software tiles (any CPU).
const DequantKernels* amx_int8_dequant(const DequantKernels& base);
const DequantKernels* amx_emu_int8_dequant(const DequantKernels& base);
// DequantKernels::quantize_rows of every table above ref (AVX2).
bool quantize_rows_avx2(const float* const* a, int m, int64_t K, int64_t groups, int16_t* q, int8_t* q8, float* step);

}  // namespace kt
