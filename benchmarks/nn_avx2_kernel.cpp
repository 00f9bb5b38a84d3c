// Kernel-level A/B of the AVX2 gemm_nn (the backward's base-weight products) between this checkout
// and an older gemm_avx2.cpp, one thread, no thread pool: for each shape the two alternate rep by rep
// and the minimum over reps is printed. Shapes: DeepSeek-V2-Lite's W [N, K] (down 2048 x 1408 for
// dh, gate/up 1408 x 2048 for dx), 64-column blocks as the backward's tasks, m rows of one expert.
// The old source is compiled with its namespace renamed, so both tables live in one binary:
//   git show REV:kt_ops_csrc/kernels/gemm_avx2.cpp > /tmp/old_gemm_avx2.cpp && k=kt_ops_csrc/kernels &&
//   g++ -O3 -std=c++17 -ffp-contract=off -I$k -Dkt=kt_old -c /tmp/old_gemm_avx2.cpp -o /tmp/old_nn.o &&
//   g++ -O3 -std=c++17 -ffp-contract=off -I$k benchmarks/nn_avx2_kernel.cpp /tmp/old_nn.o $k/gemm_avx2.cpp \
//     -o /tmp/nn_ab && /tmp/nn_ab
// "reldiff" is the largest relative difference between the two builds' outputs.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>
#include <algorithm>
#include "gemm.h"
using namespace kt;
namespace kt_old {
template <typename T>
struct Kernels;
const Kernels<float>* avx2_kernels_f32();
}  // namespace kt_old
int main() {
  const int reps = 40;
  std::mt19937 r(1);
  for (int m : {5, 8, 16, 64})
    for (auto NK : {std::pair<int, int>{1408, 2048}, {2048, 1408}}) {
      const int N = NK.first, K = NK.second;  // W [N, K]; nn: C[m, K cols] = A[m, N] . W
      const int np_ = padded_rows(N);
      std::vector<uint16_t> w(int64_t(np_) * k_pairs(K) * 2);
      for (auto& v : w) v = uint16_t(0x3C00 + r() % 256);
      std::vector<std::vector<float>> a(m, std::vector<float>(np_, 0.0f));  // zero beyond N, as gemm.h requires
      for (auto& x : a)
        for (int i = 0; i < N; ++i) x[i] = (r() % 2001) / 1000.0f - 1.0f;
      std::vector<const float*> rows;
      for (auto& x : a) rows.push_back(x.data());
      std::vector<float> c(m * 64), c2(m * 64);
      const Kernels<float>* n = avx2_kernels_f32();
      const Kernels<float>* o = reinterpret_cast<const Kernels<float>*>(kt_old::avx2_kernels_f32());
      double best[2] = {1e9, 1e9};
      for (int rep = 0; rep < reps; ++rep)
        for (int v = 0; v < 2; ++v) {
          auto t0 = std::chrono::steady_clock::now();
          for (int k0 = 0; k0 < K; k0 += 64)
            (v ? n : o)->gemm_nn(rows.data(), m, np_, w.data(), K, k0, std::min(64, K - k0), (v ? c2 : c).data(), 64);
          best[v] = std::min(best[v], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
      double maxdiff = 0;
      for (size_t i = 0; i < c.size(); ++i)
        maxdiff = std::max(maxdiff, (double)std::fabs(c[i] - c2[i]) / (std::fabs(c[i]) + 1e-3));
      const double gf = 2.0 * m * np_ * K / 1e9;
      std::printf("m=%2d N=%d K=%d  old %7.3f ms (%5.1f GF/s)  new %7.3f ms (%5.1f GF/s)  new/old %.2f  reldiff %.1e\n",
                  m, N, K, best[0] * 1e3, gf / best[0], best[1] * 1e3, gf / best[1], best[1] / best[0], maxdiff);
    }
}
