// Small helpers of the ISA kernel sources (gemm_avx2.cpp, gemm_avx512.inc, gemm_amx.inc), written once.
//
// Those sources are compiled into several translation units under different target ISAs (baseline,
// AVX2, AVX-512, AMX, and again on SIMDe / software tiles). Everything here therefore has internal
// linkage: each unit gets its own copy, compiled for its own target, and its own per-thread scratch.
// An inline function with external linkage would be one entity across those units, and the linker
// could keep the AVX-512 copy for a baseline caller.
//
// The includer provides <cstdint>, <cstdlib>, <cstring> and <new> before any target pragma, so no
// standard-library code is compiled here under a wider ISA.
#pragma once

namespace kt {
namespace {

inline int min_int(int a, int b) { return a < b ? a : b; }
inline int round_up(int x, int to) { return (x + to - 1) / to * to; }

// Rows [0, m) of a [m, ldc] fp32 matrix get `cols` zeros each.
inline void zero_rows(float* c, int m, int cols, int ldc) {
  for (int i = 0; i < m; ++i) std::memset(c + static_cast<int64_t>(i) * ldc, 0, sizeof(float) * cols);
}

// fp32 -> bf16 bits, round to nearest even; NaN stays NaN (quiet), as vcvtne2ps2bf16 does.
inline uint16_t float_to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Grow-only per-thread scratch, 64-byte aligned (pool threads live as long as the process). Two
// buffers per thread and unit: a GEMM's own (slot 0) and that of a kernel calling a GEMM (slot 1).
struct ThreadScratch {
  void* data = nullptr;
  size_t bytes = 0;
  ~ThreadScratch() { std::free(data); }
};
thread_local ThreadScratch t_scratch[2];

inline void* scratch_bytes(size_t bytes, int slot = 0) {
  ThreadScratch& s = t_scratch[slot];
  if (s.bytes < bytes) {
    std::free(s.data);
    s.bytes = 0;
    s.data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (s.data == nullptr) throw std::bad_alloc();
    s.bytes = (bytes + 63) / 64 * 64;
  }
  return s.data;
}

}  // namespace
}  // namespace kt
