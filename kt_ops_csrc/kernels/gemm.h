// The ISA-specific primitives: the two GEMM shapes every MoE projection reduces to, over one expert's
// packed bf16 weight W [N, K], and the dot/axpy that carry the rank-r LoRA work.
//
// Packed layout ("bf16" weight format), the VNNI pair layout that AVX-512 BF16 (vdpbf16ps) and AMX
// (tile B rows) consume directly: W is cut into panels of 16 output rows (N padded with zero rows to
// a multiple of 16, K padded with a zero column to even). Panel p stores, for each k pair kp, 16 x 2
// bf16 values: element (i, h) is W[16p + i, 2kp + h]. With AVX2, one 256-bit load covers 8 rows x
// 2 k and widens to fp32 with one shift (even k) or one mask (odd k); the 64 bytes of one pair
// are exactly one AMX tile row.
//
// This header is included by translation units compiled with different -m flags: it must stay free
// of inline code (an inline function compiled with AVX2 could be picked by the linker for a
// baseline caller).
#pragma once
#include <cstdint>

namespace kt {

constexpr int kPanelRows = 16;

static constexpr int64_t padded_rows(int64_t n) { return (n + kPanelRows - 1) / kPanelRows * kPanelRows; }
static constexpr int64_t k_pairs(int64_t k) { return (k + 1) / 2; }

template <typename T>
struct Kernels {
  // C[i, c] = sum_k A[i][k] * W[16*p0 + c, k] for i < m, c < 16*np.
  // A rows have K elements. C is dense [m, 16*np] (padded columns included).
  void (*gemm_nt)(const T* const* a_rows, int m, int K, const uint16_t* w, int p0, int np, T* c);
  // C[i, c] = sum_n A[i][n] * W[n, k0 + c] for i < m, c < kc; n runs over the padded N.
  // A rows have padded-N elements (zero beyond N). C is [m, ldc]. k0 is even.
  void (*gemm_nn)(const T* const* a_rows, int m, int n_padded, const uint16_t* w, int K, int k0,
                  int kc, T* c, int ldc);
  T (*dot)(const T* a, const T* b, int64_t n);
  void (*axpy)(T alpha, const T* x, T* y, int64_t n);  // y += alpha * x
  const char* name;
};

// One table per ISA. The getters are baseline code, safe to call on any CPU; cpu.cpp uses a table
// only after cpuid reported its features. A pointer getter returns nullptr when its kernels are not
// compiled into this build.
// Portable loops; the only kernels in float64 (gradcheck).
const Kernels<float>& ref_kernels_f32();
const Kernels<double>& ref_kernels_f64();
// AVX2 + FMA: fp32 FMA on widened bf16 weights (exact fp32 activations).
const Kernels<float>* avx2_kernels_f32();
// AVX-512 F/BW/VL: fp32 FMA on widened bf16 weights (exact fp32 activations).
const Kernels<float>* avx512_kernels_f32();
// AVX-512 F/BW/VL + AVX512_BF16: vdpbf16ps, activations rounded to bf16 (fp32 accumulation).
const Kernels<float>* avx512bf16_kernels_f32();
// AMX-BF16 tiles (+ AVX-512), activations rounded to bf16. Needs the XTILEDATA permission first.
const Kernels<float>* amx_kernels_f32();
// The AMX kernel source on software tiles (kernels/amx_emu.h): any CPU, for testing. Never nullptr.
const Kernels<float>* amx_emu_kernels_f32();
// The AVX512_BF16 kernel source on SIMDe: any CPU, for testing. nullptr when built without SIMDe.
const Kernels<float>* avx512bf16_emu_kernels_f32();

}  // namespace kt
