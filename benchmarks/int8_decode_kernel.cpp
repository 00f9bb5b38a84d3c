// Kernel-level decode timing of the int8 formats against bf16, one thread, no thread pool:
// one activation row against 12 matrices 1408 x 2048 (6 experts x gate, up of DeepSeek-V2-Lite),
// streamed from RAM; the kernels alternate rep by rep and the minimum over reps is printed (the
// machine may be shared). Build and run from the repository root:
//   k=kt_ops_csrc/kernels; g++ -O3 -std=c++17 -ffp-contract=off -I$k benchmarks/int8_decode_kernel.cpp \
//     $k/quant_ref.cpp $k/quant_avx2.cpp $k/gemm_avx2.cpp $k/gemm_ref.cpp -o /tmp/int8_decode && /tmp/int8_decode
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>
#include "gemm.h"
#include "quant.h"
using namespace kt;
int main() {
  const int E = 64, N = 1408, K = 2048;
  const int64_t bytes = int64_t(padded_rows(N)) * k_pairs(K) * 2;
  std::mt19937 r(1);
  std::vector<int8_t> codes(bytes * E);
  for (auto& c : codes) c = int8_t(r() % 255 - 127);
  std::vector<uint16_t> wb(bytes * E);
  for (auto& v : wb) v = uint16_t(0x3C00 + r() % 256);
  std::vector<float> scales(int64_t(padded_rows(N)) * 16 * E, 0.01f);
  std::vector<float> x(K);
  for (auto& v : x) v = (r() % 1000) / 500.0f - 1.0f;
  const float* rows[1] = {x.data()};
  std::vector<float> c(64 + 16);
  auto quant = [&](int groups, bool dot) {
    return [&, groups, dot](int ex) {
      QuantMatrix w{groups > 1 ? WeightFormat::Int8KGroup : WeightFormat::Int8,
                    reinterpret_cast<uint8_t*>(codes.data() + ex * bytes), scales.data() + ex * padded_rows(N) * groups,
                    K, groups};
      auto fn = dot ? avx2_dequant()->gemm_nt_int8 : avx2_dequant()->gemm_nt_codes;
      for (int p0 = 0; p0 < N / 16; p0 += 4) fn(w, rows, 1, p0, 4, c.data());
    };
  };
  std::vector<std::pair<const char*, std::function<void(int)>>> ks{
      {"bf16 gemm_nt (avx2)",
       [&](int ex) {
         for (int p0 = 0; p0 < N / 16; p0 += 4)
           avx2_kernels_f32()->gemm_nt(rows, 1, K, wb.data() + ex * bytes, p0, 4, c.data());
       }},
      {"int8 fp32-on-codes (before)", quant(1, false)},
      {"int8 integer dot (after)", quant(1, true)},
      {"int8_kgroup g128 fp32-on-codes (before)", quant(16, false)},
      {"int8_kgroup g128 integer dot (after)", quant(16, true)}};
  std::vector<double> best(ks.size(), 1e9);
  for (int rep = 0; rep < 100; ++rep)
    for (size_t i = 0; i < ks.size(); ++i) {
      auto t0 = std::chrono::steady_clock::now();
      for (int e = 0; e < 12; ++e) ks[i].second((rep * 12 + e) % E);
      best[i] = std::min(best[i], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  for (size_t i = 0; i < ks.size(); ++i)
    std::printf("%-42s %7.3f ms  (x bf16 %.2f)\n", ks[i].first, best[i] * 1e3, best[0] / best[i]);
}
