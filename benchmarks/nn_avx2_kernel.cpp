// Kernel-level A/B of the AVX2 gemm_nn (the backward's base-weight products) between this checkout
// and an older gemm_avx2.cpp, one thread, no thread pool: for each shape the two alternate rep by rep
// and the minimum over reps is printed. Shapes: DeepSeek-V2-Lite's W [N, K] (down 2048 x 1408 for
// dh, gate/up 1408 x 2048 for dx), 64-column blocks as the backward's tasks, m rows of one expert,
// each rep on another of 8 experts' weights (as a decode step reads each expert once, from DRAM).
// The old source is compiled with its namespace renamed (its own includes, from its own directory),
// so both tables live in one binary; it must have this checkout's gemm_nn interface (W as NnWeights):
//   git worktree add /tmp/old REV && k=kt_ops_csrc/kernels &&
//   g++ -O3 -std=c++17 -ffp-contract=off -I/tmp/old/$k -Dkt=kt_old -c /tmp/old/$k/gemm_avx2.cpp -o /tmp/old_nn.o &&
//   g++ -O3 -std=c++17 -ffp-contract=off -I$k benchmarks/nn_avx2_kernel.cpp /tmp/old_nn.o $k/gemm_avx2.cpp \
//     -o /tmp/nn_ab && /tmp/nn_ab
// "same bits" says whether the two builds' outputs are identical.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "gemm.h"
using namespace kt;
namespace kt_old {
const KernelsF32* avx2_kernels_f32();
}  // namespace kt_old

int main() {
  constexpr int kExperts = 8, kReps = 24, kCols = 64;
  std::mt19937 r(1);
  const KernelsF32* tables[2] = {reinterpret_cast<const KernelsF32*>(kt_old::avx2_kernels_f32()), avx2_kernels_f32()};
  for (auto NK : {std::pair<int, int>{2048, 1408}, {1408, 2048}})
    for (int m : {1, 2, 4, 5, 8}) {
      const int N = NK.first, K = NK.second, n_padded = static_cast<int>(padded_rows(N));
      const int64_t kp = k_pairs(K), lda = act_stride(n_padded);
      std::vector<uint16_t> w(static_cast<size_t>(kExperts) * n_padded * kp * 2);
      for (auto& v : w) v = static_cast<uint16_t>(0x3C00 + r() % 256);
      std::vector<float> a(static_cast<size_t>(row_capacity(m)) * lda, 0.0f);  // zero beyond N
      for (int i = 0; i < m; ++i)
        for (int n = 0; n < N; ++n) a[i * lda + n] = (r() % 2001) / 1000.0f - 1.0f;
      std::vector<float> c[2];
      for (auto& x : c) x.assign(static_cast<size_t>(row_capacity(m)) * kCols * ((K + kCols - 1) / kCols), 0.0f);
      double best[2] = {1e9, 1e9};
      for (int rep = 0; rep < kReps; ++rep)
        for (int v = 0; v < 2; ++v) {
          NnWeights we;
          we.panels = w.data() + static_cast<size_t>(rep % kExperts) * n_padded * kp * 2;
          we.kp = kp;
          const auto t0 = std::chrono::steady_clock::now();
          for (int k0 = 0, b = 0; k0 < K; k0 += kCols, ++b)
            tables[v]->gemm_nn(a.data(), lda, m, n_padded, we, k0, std::min(kCols, K - k0),
                               c[v].data() + static_cast<size_t>(b) * row_capacity(m) * kCols, kCols, false, nullptr);
          best[v] = std::min(best[v], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
      const bool same = std::memcmp(c[0].data(), c[1].data(), sizeof(float) * c[0].size()) == 0;
      const double gbytes = 2.0 * n_padded * K / 1e9;
      std::printf("m=%d N=%d K=%d  old %6.3f ms (%5.1f GB/s of W)  new %6.3f ms (%5.1f GB/s)  new/old %.2f  %s\n", m, N,
                  K, best[0] * 1e3, gbytes / best[0], best[1] * 1e3, gbytes / best[1], best[1] / best[0],
                  same ? "same bits" : "different bits");
    }
}
