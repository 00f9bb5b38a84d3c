// Kernel-level A/B of an fp32 table's gemm_nn (the backward's base-weight products over W's rows)
// between this checkout and an older source of the same table, one thread, no thread pool: for each
// shape the two alternate rep by rep and the minimum over reps is printed. Shapes: DeepSeek-V2-Lite's
// W [N, K] (down 2048 x 1408 for dh, gate/up 1408 x 2048 for dx), 64-column blocks as the backward's
// tasks, m rows of one expert (up to 8 with AVX2, 10 with AVX-512: the few-row form; more: the repacked one; 48 is a
// training batch of 512 tokens), each call on another of 16 experts' weights (from DRAM, as in a backward: a build that
// ran on the same weights just before would leave them in L3 for the other). KT_AB_TABLE names the table
// (avx2_kernels_f32, the default, or avx512_kernels_f32); u below is its source file. The old source is compiled with
// its namespace renamed (its own includes, from its own directory), so both tables live in one binary; it must have
// this checkout's gemm_nn interface:
//   git worktree add /tmp/old REV && k=kt_ops_csrc/kernels && u=gemm_avx512.cpp t=avx512_kernels_f32 &&
//   g++ -O3 -std=c++20 -ffp-contract=off -I/tmp/old/$k -Dkt=kt_old -c /tmp/old/$k/$u -o /tmp/old_nn.o &&
//   g++ -O3 -std=c++20 -ffp-contract=off -I$k -DKT_AB_TABLE=$t benchmarks/nn_kernel_ab.cpp /tmp/old_nn.o \
//     $k/$u -o /tmp/nn_ab && /tmp/nn_ab
// (u=gemm_avx2.cpp t=avx2_kernels_f32 for AVX2.) "same bits" says whether the two builds' outputs
// are identical.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "gemm.h"
#ifndef KT_AB_TABLE
#define KT_AB_TABLE avx2_kernels_f32
#endif
using namespace kt;
namespace kt_old {
const KernelsF32* KT_AB_TABLE();
}  // namespace kt_old

int main() {
  constexpr int kExperts = 16, kReps = 24, kCols = 64;
  std::mt19937 r(1);
  const KernelsF32* tables[2] = {reinterpret_cast<const KernelsF32*>(kt_old::KT_AB_TABLE()), KT_AB_TABLE()};
  if (tables[0] == nullptr || tables[1] == nullptr) {
    std::printf("this CPU cannot run the table\n");
    return 1;
  }
  for (auto NK : {std::pair<int, int>{2048, 1408}, {1408, 2048}})
    for (int m : {1, 4, 5, 6, 8, 10, 11, 12, 16, 48}) {
      const int N = NK.first, K = NK.second, n_padded = static_cast<int>(padded_rows(N));
      const int64_t kp = k_pairs(K), lda = act_stride(n_padded);
      std::vector<uint16_t> w(static_cast<size_t>(kExperts) * n_padded * kp * 2);
      for (auto& v : w) v = static_cast<uint16_t>(0x3C00 + r() % 256);
      std::vector<float> a(static_cast<size_t>(row_capacity(m)) * lda, 0.0f);  // zero beyond N
      for (int i = 0; i < m; ++i)
        for (int n = 0; n < N; ++n) a[i * lda + n] = (r() % 2001) / 1000.0f - 1.0f;
      std::vector<float> c[2];
      for (auto& x : c) x.assign(static_cast<size_t>(row_capacity(m)) * kCols * ((K + kCols - 1) / kCols), 0.0f);
      const auto run = [&](int v, int expert) {
        NnWeights we;
        we.panels = w.data() + static_cast<size_t>(expert) * n_padded * kp * 2;
        we.kp = kp;
        for (int k0 = 0, b = 0; k0 < K; k0 += kCols, ++b) {
          // The backward's hint (moe_sft.cpp's prefetch_columns): the next block's columns of every panel.
          ExtraProducts<float> next;
          if (k0 + kCols < K) {
            next.prefetch = reinterpret_cast<const char*>(we.panels + ((k0 + kCols) / 2) * 2 * kPanelRows);
            next.prefetch_stride = kp * 2 * kPanelRows * static_cast<int64_t>(sizeof(uint16_t));
            next.prefetch_rows = n_padded / kPanelRows;
            next.prefetch_lines = (std::min(kCols, K - k0 - kCols) + 1) / 2;
          }
          tables[v]->gemm_nn(a.data(), lda, m, n_padded, we, k0, std::min(kCols, K - k0),
                             c[v].data() + static_cast<size_t>(b) * row_capacity(m) * kCols, kCols, false, &next);
        }
      };
      double best[2] = {1e9, 1e9};
      for (int rep = 0; rep < kReps; ++rep)
        for (int v = 0; v < 2; ++v) {
          const auto t0 = std::chrono::steady_clock::now();
          run(v, (2 * rep + v) % kExperts);
          best[v] = std::min(best[v], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
      run(0, 0);
      run(1, 0);
      const bool same = std::memcmp(c[0].data(), c[1].data(), sizeof(float) * c[0].size()) == 0;
      const double gbytes = 2.0 * n_padded * K / 1e9;
      std::printf("m=%d N=%d K=%d  old %6.3f ms (%5.1f GB/s of W)  new %6.3f ms (%5.1f GB/s)  new/old %.2f  %s\n", m, N,
                  K, best[0] * 1e3, gbytes / best[0], best[1] * 1e3, gbytes / best[1], best[1] / best[0],
                  same ? "same bits" : "different bits");
    }
}
