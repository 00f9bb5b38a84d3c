// A software model of the AMX tile intrinsics that gemm_amx.inc and quant_amx.inc use, so that the
// AMX kernel source can be compiled a second time for any x86-64 CPU ("amx-emu") and tested on
// machines without AMX.
//
// Emulated: _tile_loadconfig, _tile_release, _tile_zero, _tile_loadd, _tile_stored, _tile_dpbf16ps,
// _tile_dpbssd, on a thread-local register file of 8 tiles x 16 rows x 64 bytes (palette 1), as the
// hardware has per logical CPU. What the model keeps of the architecture:
//   - _tile_loadconfig takes the 64-byte config (palette_id, start_row, colsb[16], rows[16]), checks
//     it (palette 1, rows <= 16, colsb <= 64, unused tiles all zero) and zeroes every tile;
//     palette 0 is the same as _tile_release.
//   - a load reads exactly rows[t] rows of colsb[t] bytes at base + r * stride and zero-fills the rest
//     of the tile; a store writes exactly those bytes. So an out-of-bounds access of the real kernel is
//     an out-of-bounds access here too (address sanitizer finds it).
//   - tdpbf16ps checks the shapes the hardware checks (#UD there): C rows = A rows, A colsb = 4 * B
//     rows, B colsb = C colsb, and for every C element and k pair adds the two bf16 x bf16 products
//     one after the other in fp32 (each product is exact in fp32; the adds round to nearest even).
//   - using a tile without a valid config is an error.
// Not modelled: DAZ/FTZ (the hardware treats bf16 denormal inputs as zero and flushes denormal
// results; here they are kept), start_row / restartable loads, the tile_stream_loadd hint, timing.
// A violated check prints the reason and aborts: it is a bug in the kernel, which would fault on AMX.
//
// Include this header instead of the AMX intrinsics (immintrin.h) in a file compiled for baseline
// x86-64. Everything here has internal linkage.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "quant.h"  // bf16_value

namespace kt {
namespace amx_emu {
namespace {

constexpr int kTiles = 8;
constexpr int kMaxRows = 16;
constexpr int kMaxColsb = 64;

struct RegisterFile {
  bool configured = false;
  uint8_t rows[kTiles] = {};
  uint16_t colsb[kTiles] = {};
  alignas(64) unsigned char data[kTiles][kMaxRows * kMaxColsb] = {};
};

thread_local RegisterFile t_tiles;

[[noreturn]] void fail(const char* what, int tile) {
  std::fprintf(stderr, "kt_ops amx-emu: %s (tile %d); the AMX kernel would fault on real hardware\n", what, tile);
  std::abort();
}

void check_tile(int t) {
  if (t < 0 || t >= kTiles) fail("tile number out of range", t);
  if (!t_tiles.configured) fail("tile used without a valid tile config", t);
  if (t_tiles.rows[t] == 0 || t_tiles.colsb[t] == 0) fail("tile not configured", t);
}

void tile_release() {
  t_tiles.configured = false;
  std::memset(t_tiles.rows, 0, sizeof(t_tiles.rows));
  std::memset(t_tiles.colsb, 0, sizeof(t_tiles.colsb));
  std::memset(t_tiles.data, 0, sizeof(t_tiles.data));
}

void tile_loadconfig(const void* config) {
  const unsigned char* cfg = static_cast<const unsigned char*>(config);
  const uint8_t palette = cfg[0];
  if (palette == 0) {
    tile_release();
    return;
  }
  if (palette != 1) fail("unsupported palette", -1);
  if (cfg[1] != 0) fail("start_row must be 0 outside a restarted load", -1);
  for (int i = 2; i < 16; ++i)
    if (cfg[i] != 0) fail("reserved config bytes must be zero", -1);
  tile_release();
  for (int t = 0; t < 16; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, cfg + 16 + 2 * t, sizeof(colsb));
    const uint8_t rows = cfg[48 + t];
    if (t >= kTiles) {
      if (colsb != 0 || rows != 0) fail("palette 1 has 8 tiles", t);
      continue;
    }
    if (rows > kMaxRows || colsb > kMaxColsb) fail("tile shape exceeds 16 rows x 64 bytes", t);
    if ((rows == 0) != (colsb == 0)) fail("tile with rows but no columns (or the reverse)", t);
    t_tiles.rows[t] = rows;
    t_tiles.colsb[t] = colsb;
  }
  t_tiles.configured = true;
}

void tile_zero(int t) {
  check_tile(t);
  std::memset(t_tiles.data[t], 0, sizeof(t_tiles.data[t]));
}

void tile_loadd(int t, const void* base, long stride) {
  check_tile(t);
  const unsigned char* src = static_cast<const unsigned char*>(base);
  unsigned char* dst = t_tiles.data[t];
  std::memset(dst, 0, sizeof(t_tiles.data[t]));
  for (int r = 0; r < t_tiles.rows[t]; ++r) std::memcpy(dst + r * kMaxColsb, src + r * stride, t_tiles.colsb[t]);
}

void tile_stored(int t, void* base, long stride) {
  check_tile(t);
  unsigned char* dst = static_cast<unsigned char*>(base);
  for (int r = 0; r < t_tiles.rows[t]; ++r)
    std::memcpy(dst + r * stride, t_tiles.data[t] + r * kMaxColsb, t_tiles.colsb[t]);
}

// C[m][n] += sum over k pairs of A[m][k].lo * B[k][n].lo + A[m][k].hi * B[k][n].hi (fp32 C, bf16 A/B).
void tile_dpbf16ps(int dst, int a, int b) {
  check_tile(dst);
  check_tile(a);
  check_tile(b);
  if (dst == a || dst == b || a == b) fail("tdpbf16ps needs three different tiles", dst);
  const int M = t_tiles.rows[dst], N = t_tiles.colsb[dst] / 4, K = t_tiles.colsb[a] / 4;
  if (t_tiles.colsb[dst] % 4 || t_tiles.colsb[a] % 4) fail("tdpbf16ps needs whole 4-byte elements", dst);
  if (t_tiles.rows[a] != M) fail("tdpbf16ps: A rows differ from C rows", a);
  if (t_tiles.rows[b] != K) fail("tdpbf16ps: B rows differ from the k pairs of A", b);
  if (t_tiles.colsb[b] != t_tiles.colsb[dst]) fail("tdpbf16ps: B columns differ from C columns", b);
  const unsigned char* ta = t_tiles.data[a];
  const unsigned char* tb = t_tiles.data[b];
  unsigned char* tc = t_tiles.data[dst];
  for (int m = 0; m < M; ++m) {
    float c[16];
    std::memcpy(c, tc + m * kMaxColsb, 4 * N);
    for (int k = 0; k < K; ++k) {
      uint16_t ap[2];
      std::memcpy(ap, ta + m * kMaxColsb + 4 * k, sizeof(ap));
      const float a0 = bf16_value(ap[0]), a1 = bf16_value(ap[1]);
      uint16_t bp[32];
      std::memcpy(bp, tb + k * kMaxColsb, 4 * N);
      for (int n = 0; n < N; ++n) {
        c[n] += a0 * bf16_value(bp[2 * n]);
        c[n] += a1 * bf16_value(bp[2 * n + 1]);
      }
    }
    std::memcpy(tc + m * kMaxColsb, c, 4 * N);
  }
}

// C[m][n] += sum over k of the 4 signed-byte products A[m][4k + i] * B[k][4n + i] (int32 C; the sum
// wraps modulo 2^32, as the hardware's does).
void tile_dpbssd(int dst, int a, int b) {
  check_tile(dst);
  check_tile(a);
  check_tile(b);
  if (dst == a || dst == b || a == b) fail("tdpbssd needs three different tiles", dst);
  const int M = t_tiles.rows[dst], N = t_tiles.colsb[dst] / 4, K = t_tiles.colsb[a] / 4;
  if (t_tiles.colsb[dst] % 4 || t_tiles.colsb[a] % 4) fail("tdpbssd needs whole 4-byte elements", dst);
  if (t_tiles.rows[a] != M) fail("tdpbssd: A rows differ from C rows", a);
  if (t_tiles.rows[b] != K) fail("tdpbssd: B rows differ from the byte quads of A", b);
  if (t_tiles.colsb[b] != t_tiles.colsb[dst]) fail("tdpbssd: B columns differ from C columns", b);
  const int8_t* ta = reinterpret_cast<const int8_t*>(t_tiles.data[a]);
  const int8_t* tb = reinterpret_cast<const int8_t*>(t_tiles.data[b]);
  unsigned char* tc = t_tiles.data[dst];
  for (int m = 0; m < M; ++m) {
    uint32_t c[16];
    std::memcpy(c, tc + m * kMaxColsb, 4 * N);
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n)
        for (int i = 0; i < 4; ++i)
          c[n] += static_cast<uint32_t>(ta[m * kMaxColsb + 4 * k + i] * tb[k * kMaxColsb + 4 * n + i]);
    std::memcpy(tc + m * kMaxColsb, c, 4 * N);
  }
}

}  // namespace
}  // namespace amx_emu
}  // namespace kt

// The intrinsic names, as the kernel source spells them (tile numbers are literal integers there).
#define _tile_loadconfig(config) ::kt::amx_emu::tile_loadconfig(config)
#define _tile_release() ::kt::amx_emu::tile_release()
#define _tile_zero(t) ::kt::amx_emu::tile_zero(t)
#define _tile_loadd(t, base, stride) ::kt::amx_emu::tile_loadd((t), (base), static_cast<long>(stride))
#define _tile_stored(t, base, stride) ::kt::amx_emu::tile_stored((t), (base), static_cast<long>(stride))
#define _tile_dpbf16ps(dst, a, b) ::kt::amx_emu::tile_dpbf16ps((dst), (a), (b))
#define _tile_dpbssd(dst, a, b) ::kt::amx_emu::tile_dpbssd((dst), (a), (b))
