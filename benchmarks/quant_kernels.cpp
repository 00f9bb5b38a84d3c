// Kernel-level timing of the weight formats' kernels per ISA table, one thread, no thread pool, outside
// Python: what bench_formats.py's layer times are made of, measurable on a busy machine (each line
// alternates with the others rep by rep; the minimum over reps is printed).
//   decode: one activation row against 12 expert matrices 1408 x 2048 (DeepSeek-V2-Lite's gate/up),
//           streamed from RAM: bf16 panels on the fp32 GEMM, int8 (integer dot), int4 and fp8 (fp32 on
//           the codes; fp8 with a scale per row and 128-wide K group, as AMXFP8_SFT, normal codes);
//   dequant: the same matrices dequantized into bf16 panels, 4 panels x all K at a time (a forward
//           task's block, in L2), as the prefill and training GEMMs get them;
//   prefill: 8, 12 and 16 rows (a training step's rows per expert around qlen 128) against the same
//           matrices: bf16 panels on the fp32 GEMM, and int8 / fp8 by dequant + that GEMM or, where
//           the table has it, gemm_nt_scaled (the codes decoded in registers), which quant.h's
//           kScaledGemmRows picks up to 8 rows.
// Build and run from the repository root:
//   k=kt_ops_csrc/kernels; g++ -O3 -std=c++20 -ffp-contract=off -Wno-psabi -I$k benchmarks/quant_kernels.cpp \
//     $k/quant_ref.cpp $k/quant_avx2.cpp $k/quant_avx512.cpp $k/quant_avx512_vnni.cpp $k/gemm_avx2.cpp \
//     $k/gemm_avx512.cpp $k/gemm_ref.cpp -o /tmp/quant_kernels && /tmp/quant_kernels
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "gemm.h"
#include "quant.h"
using namespace kt;

int main() {
  const int E = 64, N = 1408, K = 2048, kExperts = 12, kBlockPanels = 4;
  const int64_t pair_rows = int64_t(padded_rows(N) / kPanelRows) * k_pairs(K) * kPanelRows;
  std::mt19937 r(1);
  std::vector<uint16_t> bf16(pair_rows * 2 * E);
  for (auto& v : bf16) v = uint16_t(0x3C00 + r() % 256);
  std::vector<uint8_t> bytes(pair_rows * 2 * E), fp8(pair_rows * 2 * E), nibbles(pair_rows * E);
  for (auto& v : bytes) v = uint8_t(r());
  // fp8 as real weights nearly are: normal codes only (AVX2 takes a k pair holding a zero, subnormal or
  // NaN code per code; uniform bytes put one in 90% of the pairs)
  for (auto& v : fp8) v = uint8_t((r() % 2) << 7 | (8 + r() % 119));
  for (auto& v : nibbles) v = uint8_t(r());
  // fp8 as AMXFP8_SFT packs it (and DeepSeek-V3 ships it): one scale per row and 128-wide K group
  const int kFp8Groups = K / 128;
  std::vector<float> scales(int64_t(padded_rows(N)) * kFp8Groups * E, 0.01f);
  std::vector<float> x(K);
  for (auto& v : x) v = (r() % 1000) / 500.0f - 1.0f;
  const float* rows[1] = {x.data()};
  std::vector<int16_t> x_q(2 * k_pairs(K));
  std::vector<int8_t> x_q8(x_q.size());
  const int64_t act_groups = activation_groups(k_pairs(K), 1);  // as the op quantizes a row for int8
  std::vector<float> x_step(act_groups);
  quantize_rows_avx2(rows, 1, K, act_groups, x_q.data(), x_q8.data(), x_step.data());
  constexpr int kPrefillRows[] = {8, 12, 16};
  std::vector<float> prefill_x(size_t(16) * K);
  for (auto& v : prefill_x) v = (r() % 1000) / 500.0f - 1.0f;
  std::vector<float> c(size_t(16) * padded_rows(N));
  std::vector<uint16_t> panels(int64_t(kBlockPanels) * k_pairs(K) * 2 * kPanelRows);
  const int kColumnPairs = 32;  // a backward task's 64 columns of W, all rows (for gemm_nn)
  std::vector<uint16_t> columns(int64_t(padded_rows(N)) * kColumnPairs * 2);
  const auto matrix = [&](WeightFormat f, int e) {
    const uint8_t* data = f == WeightFormat::Int4  ? nibbles.data() + e * pair_rows
                          : f == WeightFormat::Fp8 ? fp8.data() + e * pair_rows * 2
                                                   : bytes.data() + e * pair_rows * 2;
    const int groups = f == WeightFormat::Fp8 ? kFp8Groups : 1;
    return QuantMatrix{f, data, scales.data() + e * padded_rows(N) * groups, K, groups};
  };

  struct Table {
    std::string name;
    const DequantKernels* quant;
    const KernelsF32* gemm;
  };
  std::vector<Table> tables;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    tables.push_back({"avx2", avx2_dequant(), avx2_kernels_f32()});
  const bool avx512_vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                           __builtin_cpu_supports("avx512vbmi");
  if (avx512_vnni && avx512_vnni_dequant())
    tables.push_back({"avx512-vnni", avx512_vnni_dequant(), avx512_kernels_f32()});
  if (avx512_vnni && __builtin_cpu_supports("avx512bf16") && avx512_dequant())
    tables.push_back({"avx512", avx512_dequant(), avx512_kernels_f32()});

  struct Line {
    std::string name;
    std::function<void(int)> run;  // one expert's matrix, N x K weights
  };
  std::vector<Line> lines;
  const int np = padded_rows(N) / kPanelRows;
  for (const Table& t : tables) {
    lines.push_back({"decode bf16 (" + t.name + " fp32 GEMM)", [&, t](int e) {
                       const int64_t stride = k_pairs(K) * 2 * kPanelRows;
                       t.gemm->gemm_w(x.data(), K, 1, K, bf16.data() + e * pair_rows * 2, stride, np, c.data(),
                                      padded_rows(N), false, nullptr);
                     }});
    lines.push_back({"decode int8 (" + t.name + ")", [&, t](int e) {
                       // The row is quantized once per call, as the op does, not per matrix.
                       const QuantizedRows quantized{x_q.data(), x_q8.data(), x_step.data(), act_groups};
                       t.quant->gemm_nt_int8(matrix(WeightFormat::Int8, e), rows, &quantized, 1, 0, np, c.data());
                     }});
    for (WeightFormat f : {WeightFormat::Int4, WeightFormat::Fp8})
      lines.push_back({std::string("decode ") + weight_format_name(f) + " (" + t.name + ")",
                       [&, t, f](int e) { t.quant->gemm_nt_codes(matrix(f, e), rows, 1, 0, np, c.data()); }});
    // The same work on 8 panels (256 KiB of fp8) read again and again from L2: the kernel's own speed,
    // which decides how much of DRAM's a core's share of a decode reaches.
    lines.push_back({"decode fp8 in L2 (" + t.name + ")", [&, t](int) {
                       for (int i = 0; i < np / 8; ++i)
                         t.quant->gemm_nt_codes(matrix(WeightFormat::Fp8, 0), rows, 1, 0, 8, c.data());
                     }});
  }
  for (const Table& t : tables)
    for (const int m : kPrefillRows) {
      const std::string rows_name = std::to_string(m) + " rows";
      const int64_t stride = k_pairs(K) * 2 * kPanelRows;
      lines.push_back({"prefill " + rows_name + " bf16 (" + t.name + ")", [&, t, m, stride](int e) {
                         for (int p0 = 0; p0 < np; p0 += kBlockPanels)
                           t.gemm->gemm_w(prefill_x.data(), K, m, K, bf16.data() + e * pair_rows * 2 + p0 * stride,
                                          stride, std::min(kBlockPanels, np - p0), c.data() + p0 * kPanelRows,
                                          padded_rows(N), false, nullptr);
                       }});
      for (WeightFormat f : {WeightFormat::Int8, WeightFormat::Fp8}) {
        const std::string name = rows_name + " " + weight_format_name(f) + " (" + t.name + ")";
        lines.push_back({"prefill " + name + " dequant", [&, t, m, f, stride](int e) {
                           for (int p0 = 0; p0 < np; p0 += kBlockPanels) {
                             const int n = std::min(kBlockPanels, np - p0);
                             t.quant->dequant(matrix(f, e), p0, n, 0, k_pairs(K), panels.data());
                             t.gemm->gemm_w(prefill_x.data(), K, m, K, panels.data(), stride, n,
                                            c.data() + p0 * kPanelRows, padded_rows(N), false, nullptr);
                           }
                         }});
        if (t.quant->gemm_nt_scaled)
          lines.push_back({"prefill " + name + " scaled", [&, t, m, f](int e) {
                             for (int p0 = 0; p0 < np; p0 += kBlockPanels)
                               t.quant->gemm_nt_scaled(matrix(f, e), prefill_x.data(), K, m, p0,
                                                       std::min(kBlockPanels, np - p0), c.data() + p0 * kPanelRows,
                                                       padded_rows(N));
                           }});
      }
    }
  for (const char* shape : {"", "columns "})
    for (const Table& t : tables)
      for (WeightFormat f : {WeightFormat::Int8, WeightFormat::Int4, WeightFormat::Fp8})
        lines.push_back({std::string("dequant ") + shape + weight_format_name(f) + " (" + t.name + ")",
                         [&, t, f, columns_form = *shape != 0](int e) {
                           if (columns_form)
                             for (int kp0 = 0; kp0 < k_pairs(K); kp0 += kColumnPairs)
                               t.quant->dequant(matrix(f, e), 0, np, kp0,
                                                std::min<int64_t>(kColumnPairs, k_pairs(K) - kp0), columns.data());
                           else
                             for (int p0 = 0; p0 < np; p0 += kBlockPanels)
                               t.quant->dequant(matrix(f, e), p0, std::min(kBlockPanels, np - p0), 0, k_pairs(K),
                                                panels.data());
                         }});
  std::vector<double> best(lines.size(), 1e9);
  for (int rep = 0; rep < 40; ++rep)
    for (size_t i = 0; i < lines.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int e = 0; e < kExperts; ++e) lines[i].run((rep * kExperts + e) % E);
      best[i] = std::min(best[i], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  std::printf("%-44s %9s %14s\n", "kernel, 12 matrices 1408 x 2048", "ms", "Gweights/s");
  for (size_t i = 0; i < lines.size(); ++i)
    std::printf("%-44s %9.3f %14.2f\n", lines[i].name.c_str(), best[i] * 1e3,
                kExperts * double(N) * K / best[i] * 1e-9);
}
