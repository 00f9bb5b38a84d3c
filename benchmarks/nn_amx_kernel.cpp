// Kernel-level timing of the AMX table's two weight products, one thread, no thread pool, outside
// Python: gemm_nn (the backward's reduction over W's rows, dY . Wd and dG . Wg, which repacks W's
// columns into tiles as it goes) against gemm_w (the forward's x . W^T, W's panels loaded as tiles in
// place) over the same bytes. Shapes: DeepSeek-V2-Lite's W [N, K] (down 2048 x 1408, gate/up 1408 x
// 2048), 64-column blocks as the backward's tasks, m rows of one expert (3: a decode-like qlen-32
// step; 16, 32: qlen 128; 48-80: qlen 512). "DRAM": each expert's pass on another of 32 experts'
// weights (180 MB, as a training step reads them); "cached": 32 passes over one expert (5.8 MB, last-
// level cache). GB/s = bf16 weight bytes / time; both products read each weight byte once. The
// gemm_nn int8 column runs the same gemm_nn on int8 codes of the same shape (per-row scales, the
// AVX-512 dequantizer), which the kernel dequantizes as it repacks: its time over bf16 gemm_nn's.
// The activation rows are act_stride + one cache line apart, as the op lays them out; PAD=0 in the
// environment gives the bare act_stride (a 4 KiB stride for N = 2048) for comparison.
// Needs an AMX CPU (it asks Linux for the tile-data state first). Build and run from the repository
// root:
//   k=kt_ops_csrc/kernels; g++ -O3 -std=c++20 -ffp-contract=off -Wno-psabi -I$k benchmarks/nn_amx_kernel.cpp \
//     $k/gemm_amx.cpp $k/quant_ref.cpp $k/quant_avx2.cpp $k/quant_avx512.cpp -o /tmp/nn_amx_kernel &&
//     /tmp/nn_amx_kernel
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "gemm.h"
using namespace kt;

int main() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  const KernelsBf16* k = amx_kernels();
  if (k == nullptr || avx512_dequant() == nullptr ||
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    std::printf("no AMX: this build has no AMX table or the kernel refused the tile-data state\n");
    return 1;
  }
  const char* pad_env = std::getenv("PAD");
  const int line = 32;  // bf16 per cache line
  const int kExperts = 32, kCols = 64, kReps = 3;
  std::mt19937 r(1);
  for (auto NK : {std::pair<int, int>{2048, 1408}, {1408, 2048}}) {
    const int N = NK.first, K = NK.second, kp = static_cast<int>(k_pairs(K));
    const size_t expert_elems = size_t(padded_rows(N)) * kp * 2;
    std::vector<uint16_t> w(expert_elems * kExperts);
    for (auto& v : w) v = uint16_t(0x3C00 + r() % 256);
    std::vector<int8_t> codes(expert_elems * kExperts);
    for (auto& v : codes) v = int8_t(r() % 255 - 127);
    const std::vector<float> scales(size_t(padded_rows(N)) * kExperts, 0.01f);
    const DequantKernels* dq = avx512_dequant();
    const auto weights = [&](int e, bool int8) {
      NnWeights nw;
      if (int8) {
        nw.codes = {WeightFormat::Int8, reinterpret_cast<const uint8_t*>(codes.data()) + e * expert_elems,
                    scales.data() + e * padded_rows(N), K, 1};
        nw.dequant = dq->dequant;
      } else {
        nw.panels = w.data() + e * expert_elems;
        nw.kp = kp;
      }
      return nw;
    };
    // A rows: n values (gemm_nn) or K values (gemm_w), one extra line unless PAD=0.
    const int lda_nn = N + (pad_env && std::atoi(pad_env) == 0 ? 0 : line);
    const int lda_w = static_cast<int>(act_stride(K)) + (pad_env && std::atoi(pad_env) == 0 ? 0 : line);
    for (int m : {3, 16, 32, 48, 64, 80}) {
      const int rows = static_cast<int>(row_capacity(m)) + kRowAlign;
      std::vector<uint16_t> a_nn(size_t(rows) * lda_nn, 0x3C00), a_w(size_t(rows) * lda_w, 0x3C00);
      std::vector<float> c(size_t(rows) * kCols);
      for (int cached = 0; cached < 2; ++cached) {
        double best_nn = 1e30, best_w = 1e30, best_int8 = 1e30;
        for (int rep = 0; rep < kReps; ++rep) {
          for (int int8 = 0; int8 < 2; ++int8) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int e = 0; e < kExperts; ++e) {
              const NnWeights we = weights(cached ? 0 : e, int8);
              for (int col0 = 0; col0 < K; col0 += kCols)
                k->gemm_nn(a_nn.data(), lda_nn, m, static_cast<int>(padded_rows(N)), we, col0,
                           std::min(kCols, K - col0), c.data(), kCols, false, nullptr);
            }
            const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            (int8 ? best_int8 : best_nn) = std::min(int8 ? best_int8 : best_nn, t);
          }
          const auto t0 = std::chrono::steady_clock::now();
          for (int e = 0; e < kExperts; ++e) {
            const uint16_t* we = w.data() + (cached ? 0 : e) * expert_elems;
            for (int p = 0; p < padded_rows(N) / kPanelRows; p += kCols / kPanelRows)
              k->gemm_w(a_w.data(), lda_w, m, K, we + size_t(p) * kp * 2 * kPanelRows, int64_t(kp) * 2 * kPanelRows,
                        kCols / kPanelRows, c.data(), kCols, false, nullptr);
          }
          best_w = std::min(best_w, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        const double gb = double(kExperts) * expert_elems * 2 / 1e9;
        std::printf(
            "W %d x %d  m=%2d  %-6s  gemm_nn %5.1f GB/s   gemm_w %5.1f GB/s   nn/w time %.2f   gemm_nn int8/bf16 time "
            "%.2f\n",
            N, K, m, cached ? "cached" : "DRAM", gb / best_nn, gb / best_w, best_nn / best_w, best_int8 / best_nn);
      }
    }
  }
  return 0;
}
