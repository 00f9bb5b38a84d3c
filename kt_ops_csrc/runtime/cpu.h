// CPU feature detection and the run-time choice of kernel ISA.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace kt {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512_vnni = false, avx512_vbmi = false,
       avx512_bf16 = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
};

const CpuFeatures& cpu_features();
std::string cpu_model_name();
std::vector<std::pair<std::string, bool>> cpu_feature_list();

// Ref: portable loops. Avx2: AVX2 + FMA. Avx512: AVX-512 F/BW/VL (vdpbf16ps, with bf16-rounded
// activations, where the CPU has AVX512_BF16). Amx: AMX-BF16 tiles. AmxEmu: the AMX kernel source on
// software tiles. Avx512Bf16Emu: the AVX512_BF16 kernel source on SIMDe (builds with SIMDe only).
// The two emulations run on any CPU, for testing; "auto" never chooses them.
enum class Isa { Ref, Avx2, Avx512, Amx, AmxEmu, Avx512Bf16Emu };

// Names accepted by set_isa; "auto" picks the best the CPU and this build support.
std::vector<std::string> known_isa_names();
std::vector<std::string> available_isa_names();
void set_isa(const std::string& name);  // throws c10::ValueError with the reason when unusable
Isa current_isa();
std::string isa_name(Isa isa);

// Integer dot products for the integer-coded formats (int8, 4-bit) at every row count (opt-in,
// process-wide; off by default): each expert's rows are quantized to int8 per row and 128 k
// (quant.h activation_groups), a coarser rounding than bf16 (quant.h, gemm_nt_int8, bounds the
// error), in exchange for not dequantizing the weights into bf16 panels. Up to kDirectQuantRows rows
// per expert (decode) these formats take these products whatever the setting.
void set_integer_dot(bool enabled);
bool integer_dot_enabled();

template <typename T, typename Act>
struct Kernels;
struct DequantKernels;

// An ISA's kernel table for fp32 computations: exactly one of the two is set, by the activation type
// the ISA multiplies (gemm.h): exact fp32, or bf16-rounded.
struct IsaKernels {
  const Kernels<float, float>* f32 = nullptr;
  const Kernels<float, uint16_t>* bf16 = nullptr;
  bool built() const { return f32 != nullptr || bf16 != nullptr; }
};

// The one place where the ISA in use becomes kernels: the kernel table (for "avx512", vdpbf16ps where
// the CPU has AVX512_BF16) and the dequantizer of the quantized formats.
IsaKernels active_gemm_kernels();
const DequantKernels& active_dequant_kernels();

}  // namespace kt
