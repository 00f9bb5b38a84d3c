// The AVX-512 intrinsics the kernels use, on SIMDe (portable C), plus the few that SIMDe 0.7.4 lacks
// (written here from the Intel definitions). Used by gemm_avx512_emu.cpp and scripts/kernel_check.
#pragma once
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernel_local.h"

static inline float kt_shim_reduce_add_ps(simde__m512 v) {
  float f[16];
  std::memcpy(f, &v, 64);
  // same tree order as GCC's _mm512_reduce_add_ps is not required; sum pairwise
  float s8[8];
  for (int i = 0; i < 8; ++i) s8[i] = f[i] + f[i + 8];
  float s4[4];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  float s2[2];
  for (int i = 0; i < 2; ++i) s2[i] = s4[i] + s4[i + 2];
  return s2[0] + s2[1];
}
#define _mm512_reduce_add_ps(v) kt_shim_reduce_add_ps(v)

// Masked loads and stores of a vector of N Elem: bit i of m selects lane i. A load zeroes the other
// lanes and does not read them; a store leaves their memory as it is.
template <typename Elem, int N, typename Vec>
static inline Vec kt_shim_maskz_loadu(uint64_t m, const void* p) {
  Elem x[N];
  const Elem* s = static_cast<const Elem*>(p);
  for (int i = 0; i < N; ++i) x[i] = (m >> i) & 1 ? s[i] : Elem(0);
  Vec r;
  std::memcpy(&r, x, sizeof(r));
  return r;
}

template <typename Elem, int N, typename Vec>
static inline void kt_shim_mask_storeu(void* p, uint64_t m, Vec v) {
  Elem x[N];
  std::memcpy(x, &v, sizeof(x));
  Elem* d = static_cast<Elem*>(p);
  for (int i = 0; i < N; ++i)
    if ((m >> i) & 1) d[i] = x[i];
}
#define _mm512_maskz_loadu_ps(m, p) kt_shim_maskz_loadu<float, 16, simde__m512>((m), (p))
#define _mm512_mask_storeu_ps(p, m, v) kt_shim_mask_storeu<float, 16, simde__m512>((p), (m), (v))
#define _mm256_mask_storeu_epi16(p, m, v) kt_shim_mask_storeu<uint16_t, 16, simde__m256i>((p), (m), (v))
#define _mm512_mask_storeu_epi16(p, m, v) kt_shim_mask_storeu<uint16_t, 32, simde__m512i>((p), (m), (v))
#define _mm512_maskz_loadu_epi8(m, p) kt_shim_maskz_loadu<uint8_t, 64, simde__m512i>((m), (p))
#define _mm512_mask_storeu_epi8(p, m, v) kt_shim_mask_storeu<uint8_t, 64, simde__m512i>((p), (m), (v))

static inline simde__m256i kt_shim_cvtepi32_epi16(simde__m512i v) {
  int32_t x[16];
  std::memcpy(x, &v, 64);
  int16_t y[16];
  for (int i = 0; i < 16; ++i) y[i] = static_cast<int16_t>(x[i]);  // truncation, as vpmovdw
  simde__m256i r;
  std::memcpy(&r, y, 32);
  return r;
}
#define _mm512_cvtepi32_epi16(v) kt_shim_cvtepi32_epi16(v)

// vcvtne2ps2bf16: round to nearest even, NaN -> quiet NaN (denormals: hardware flushes; ignored here).
static inline simde__m512bh kt_shim_cvtne2ps_pbh(simde__m512 a, simde__m512 b) {
  float fa[16], fb[16];
  std::memcpy(fa, &a, 64);
  std::memcpy(fb, &b, 64);
  uint16_t r[32];
  for (int i = 0; i < 16; ++i) {
    r[i] = kt::float_to_bf16(fb[i]);
    r[i + 16] = kt::float_to_bf16(fa[i]);
  }
  simde__m512bh out;
  std::memcpy(&out, r, 64);
  return out;
}
#define _mm512_cvtne2ps_pbh(a, b) kt_shim_cvtne2ps_pbh((a), (b))
typedef uint16_t __mmask16;
typedef uint32_t __mmask32;
typedef uint64_t __mmask64;

static inline simde__m512i kt_shim_shuffle_i64x2(simde__m512i a, simde__m512i b, int imm) {
  uint64_t x[8], y[8], r[8];
  std::memcpy(x, &a, 64);
  std::memcpy(y, &b, 64);
  for (int l = 0; l < 4; ++l) {
    const int sel = (imm >> (2 * l)) & 3;
    const uint64_t* src = l < 2 ? x : y;
    r[2 * l] = src[2 * sel];
    r[2 * l + 1] = src[2 * sel + 1];
  }
  simde__m512i out;
  std::memcpy(&out, r, 64);
  return out;
}
#define _mm512_shuffle_i64x2(a, b, imm) kt_shim_shuffle_i64x2((a), (b), (imm))

// Lane-wise conversions (vpmovsx / vpmovzx, vcvtdq2ps): lane i of `v` as lane i of the result.
// Used by quant_avx512.cpp's SIMDe build in scripts/kernel_check.
template <typename Out, typename To, typename From, int N, typename In>
static inline Out kt_shim_convert(In v) {
  From x[N];
  std::memcpy(x, &v, sizeof(x));
  To y[N];
  for (int i = 0; i < N; ++i) y[i] = static_cast<To>(x[i]);
  Out r;
  std::memcpy(&r, y, sizeof(r));
  return r;
}
#ifndef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32(v) kt_shim_convert<simde__m512i, int32_t, int8_t, 16>(v)
#endif
#ifndef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32(v) kt_shim_convert<simde__m512i, int32_t, uint8_t, 16>(v)
#endif
#ifndef _mm512_cvtepu8_epi16
#define _mm512_cvtepu8_epi16(v) kt_shim_convert<simde__m512i, int16_t, uint8_t, 32>(v)
#endif
#ifndef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32(v) kt_shim_convert<simde__m512i, int32_t, uint16_t, 16>(v)
#endif
#ifndef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps(v) kt_shim_convert<simde__m512, float, int32_t, 16>(v)
#endif
#ifndef _mm512_srai_epi32
static inline simde__m512i kt_shim_srai_epi32(simde__m512i v, unsigned count) {
  int32_t x[16];
  std::memcpy(x, &v, 64);
  for (int i = 0; i < 16; ++i) x[i] = count > 31 ? (x[i] < 0 ? -1 : 0) : x[i] >> count;  // arithmetic
  std::memcpy(&v, x, 64);
  return v;
}
#define _mm512_srai_epi32(v, count) kt_shim_srai_epi32((v), (count))
#endif
#ifndef _mm512_i32gather_ps
static inline simde__m512 kt_shim_i32gather_ps(simde__m512i index, const void* base, int scale) {
  int32_t i[16];
  std::memcpy(i, &index, 64);
  float f[16];
  for (int l = 0; l < 16; ++l) std::memcpy(&f[l], static_cast<const char*>(base) + int64_t(i[l]) * scale, 4);
  simde__m512 r;
  std::memcpy(&r, f, 64);
  return r;
}
#define _mm512_i32gather_ps(index, base, scale) kt_shim_i32gather_ps((index), (base), (scale))
#endif
