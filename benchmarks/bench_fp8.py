#!/usr/bin/env python3
"""The fp8 weight format (AMXFP8_SFT) beside bf16 and int8 (with and without integer dot products,
kt_ops.set_integer_dot): accuracy against the bf16 reference, and
the AVX2 E4M3 decode measured against the alternative of a table gather. Speed and resident memory
of the whole layer are bench_formats.py's (`--methods AMXBF16_SFT,AMXFP8_SFT,AMXINT8_SFT`).

  .venv/bin/python benchmarks/bench_fp8.py [--accuracy] [--decode] [--threads 2]

--accuracy: relative mean-abs error of the output and of every gradient against the float64
  reference on the bf16 weights, per method, on DeepSeek-V2-Lite's expert shape with fewer experts
  (E=16 H=2048 I=1408 k=4 r=16, T=64 tokens: the float64 reference holds every expert in float64;
  weights N(0, 0.02), LoRA N(0, 0.02); hidden states N(0, 1), then again with 4 channels at 30x), and
  of fp8 and int8 against the reference on their own dequantized weights (the kernels' error alone).
--decode: ns per weight to dequantize one [1408, 2048] matrix into the GEMMs' bf16 panels, single
  thread: int8_kgroup and fp8 through kt_ops' AVX2 dequantizer (kernels/quant_avx2.cpp: E4M3 by
  integer bit manipulation into fp32), and two variants compiled here with the same loop otherwise:
  the E4M3 values by vgatherdps from a 256-entry table, or the code's exponent and mantissa bits
  taken as an fp16 (code * 2^-8 exactly) widened by F16C and multiplied by 256 (finite codes only, as
  the test data has). Needs g++ and an AVX2 CPU with F16C.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "kt_ops_csrc", "kernels")

DECODE_SOURCE = r"""
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include "gemm.h"
#include "quant.h"
using namespace kt;

// The fp8 branch of dequant_avx2 with the E4M3 decode replaced by a gather from a table (Gather) or by
// F16C: the code's bits shifted left by 7, sign to bit 15, are the fp16 of code * 2^-8 (subnormals
// included); widened and multiplied by 256 (no NaN handling: the data here has no NaN codes).
static float kTable[256];
enum class Decode { Gather, F16c };
static inline __m256 f16c_decode(__m256i code) {
  const __m256i half = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(0x80)), 8),
                                       _mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(0x7F)), 7));
  const __m128i packed = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(half, half), 0x08));
  return _mm256_mul_ps(_mm256_cvtph_ps(packed), _mm256_set1_ps(256.0f));
}
template <Decode kind>
static void dequant_variant(const QuantMatrix& w, int64_t p0, int64_t np, int64_t kp0, int64_t nkp, uint16_t* out) {
  const int64_t Kp = k_pairs(w.K), ppg = Kp / w.groups;
  for (int64_t p = 0; p < np; ++p) {
    int64_t loaded = -1;
    __m256 sc[4];
    for (int64_t q = 0; q < nkp; ++q) {
      const int64_t kp = kp0 + q, g = kp / ppg;
      if (g != loaded) {
        alignas(32) float s[32];
        for (int i = 0; i < 16; ++i) s[2 * i] = s[2 * i + 1] = w.scales[((p0 + p) * 16 + i) * w.groups + g];
        for (int v = 0; v < 4; ++v) sc[v] = _mm256_load_ps(s + 8 * v);
        loaded = g;
      }
      const uint8_t* codes = w.data + ((p0 + p) * Kp + kp) * 32;
      __m256i r[4];
      for (int j = 0; j < 4; ++j) {
        const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * j)));
        const __m256 v = _mm256_mul_ps(kind == Decode::Gather ? _mm256_i32gather_ps(kTable, idx, 4) : f16c_decode(idx), sc[j]);
        __m256i b = _mm256_castps_si256(v);
        b = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                             _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1))));
        r[j] = _mm256_srli_epi32(b, 16);
      }
      uint16_t* dst = out + (p * nkp + q) * 32;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), _mm256_permute4x64_epi64(_mm256_packus_epi32(r[2], r[3]), 0xD8));
    }
  }
}

template <typename F>
static double ns_per_weight(F run, int64_t weights) {
  run();
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 5; ++i) run();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 5;
    best = best < s ? best : s;
  }
  return best * 1e9 / weights;
}

int main() {
  const int N = 1408, K = 2048, groups = K / 128;
  for (int c = 0; c < 256; ++c) kTable[c] = e4m3_value(uint8_t(c));
  std::mt19937 rng(0);
  std::vector<uint8_t> codes(size_t(N) * K);
  for (auto& c : codes) { c = uint8_t(rng()); if ((c & 0x7F) == 0x7F) c = 0; }
  std::vector<float> scales(size_t(N) * groups, 1e-3f);
  const QuantMatrix fp8{WeightFormat::Fp8, codes.data(), scales.data(), K, groups};
  const QuantMatrix int8{WeightFormat::Int8KGroup, codes.data(), scales.data(), K, groups};
  const int64_t np = N / 16, nkp = K / 2;
  // One panel at a time over all K, as gemm_nt's tasks ask for them (the buffer stays in L2).
  std::vector<uint16_t> out(size_t(nkp) * 32), check(size_t(nkp) * 32);
  const DequantKernels* avx2 = avx2_dequant();
  auto each_panel = [&](auto fn, const QuantMatrix& m) { for (int64_t p = 0; p < np; ++p) fn(m, p, 1, 0, nkp, out.data()); };
  for (int64_t p = 0; p < np; ++p) {  // the variant must decode the same bits
    avx2->dequant(fp8, p, 1, 0, nkp, check.data());
    dequant_variant<Decode::Gather>(fp8, p, 1, 0, nkp, out.data());
    if (std::memcmp(out.data(), check.data(), out.size() * 2) != 0) { std::printf("gather variant differs\n"); return 1; }
    dequant_variant<Decode::F16c>(fp8, p, 1, 0, nkp, out.data());
    if (std::memcmp(out.data(), check.data(), out.size() * 2) != 0) { std::printf("f16c variant differs\n"); return 1; }
  }
  const int64_t weights = int64_t(N) * K;
  std::printf("int8_kgroup (kt_ops avx2) %.3f\n", ns_per_weight([&] { each_panel(avx2->dequant, int8); }, weights));
  std::printf("fp8, integer bit manipulation into fp32 (kt_ops avx2) %.3f\n", ns_per_weight([&] { each_panel(avx2->dequant, fp8); }, weights));
  std::printf("fp8, E4M3 bits as fp16 widened by F16C %.3f\n", ns_per_weight([&] { each_panel(dequant_variant<Decode::F16c>, fp8); }, weights));
  std::printf("fp8, vgatherdps from a 256-entry table %.3f\n", ns_per_weight([&] { each_panel(dequant_variant<Decode::Gather>, fp8); }, weights));
  return 0;
}
"""


def header():
    import kt_ops

    info = kt_ops.cpu_info()
    return (
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {info['model']}, isa={info['isa']}, "
        f"load average before {os.getloadavg()[0]:.1f}"
    )


def decode():
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "decode.cpp"), os.path.join(tmp, "decode")
        with open(src, "w") as f:
            f.write(DECODE_SOURCE)
        subprocess.run(
            [
                "g++",
                "-std=c++17",
                "-O2",
                "-ffp-contract=off",
                "-I",
                KERNELS,
                src,
                os.path.join(KERNELS, "quant_avx2.cpp"),
                os.path.join(KERNELS, "quant_ref.cpp"),
                "-o",
                exe,
            ],
            check=True,
        )
        result = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    print(f"# E4M3 decode into bf16 panels, one [1408, 2048] matrix, 1 thread, best of 7 x 5: {header()}")
    print("| dequantizer | ns per weight |\n|---|---:|")
    for line in result.strip().splitlines():
        name, value = line.rsplit(" ", 1)
        print(f"| {name} | {value} |")


def accuracy(threads):
    import kt_ops
    from kt_ops.core.packed import unpack_experts
    from kt_ops.reference import moe_sft_reference

    kt_ops.set_num_threads(threads)
    torch.set_num_threads(threads)
    E, H, I, k, r, T = 16, 2048, 1408, 4, 16, 64
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16) for s in ((E, I, H), (E, I, H), (E, H, I))]
    lora = [torch.randn(*s, generator=gen) * 0.02 for s in kt_ops.core.formats.lora_shapes(E, H, I, r)]
    gaussian = torch.randn(T, H, generator=gen)
    # LLM hidden states carry a few channels far above the rest ("massive activations"): here 4 of H at
    # 30x, which sets the int8 activation step of every row.
    outliers = gaussian.clone()
    outliers[:, torch.randperm(H, generator=gen)[:4]] *= 30
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=gen), -1)
    dy = torch.randn(T, H, generator=gen)
    scaling = 2.0

    def grads(x, run, *base):
        leaves = [t.clone().double().requires_grad_() for t in (x, w, *lora)]
        if run is None:
            out = moe_sft_reference(
                leaves[0],
                ids,
                leaves[1],
                *(b.double() for b in base),
                *leaves[2:],
                scaling,
                compute_dtype=torch.float64,
            )
        else:
            leaves = [t.float().detach().requires_grad_() for t in leaves]
            out = kt_ops.moe_sft(leaves[0], ids, leaves[1], run, leaves[2:], scaling)
        out.backward(dy.to(out.dtype))
        return [out.detach().double()] + [t.grad.double() for t in leaves]

    def rel(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    names = ["output", "grad x", "grad topk_weights", *(f"grad {n}" for n in kt_ops.LORA_NAMES)]
    methods = (
        ("AMXBF16_SFT", "bf16", False),
        ("AMXFP8_SFT", "fp8", False),
        ("AMXINT8_SFT", "int8", False),
        ("AMXINT8_SFT+dot", "int8", True),
        ("int8_kgroup", "int8_kgroup", False),
        ("int8_kgroup+dot", "int8_kgroup", True),
    )
    packed = {fmt: kt_ops.pack_experts(*weights, fmt, group_size=128) for _, fmt, _ in methods}
    for inputs, x in (("gaussian", gaussian), ("4 outlier channels at 30x", outliers)):
        ref = grads(x, None, *weights)
        own = {fmt: grads(x, None, *unpack_experts(packed[fmt])) for fmt in ("fp8", "int8")}
        rows = {}
        for method, fmt, integer_dot in methods:
            kt_ops.set_integer_dot(integer_dot)
            got = grads(x, packed[fmt])
            rows[method] = [rel(g, rr) for g, rr in zip(got, ref)]
            if fmt in own:  # the kernels' error alone
                rows[f"{method} vs its dequantized weights"] = [rel(g, o) for g, o in zip(got, own[fmt])]
        kt_ops.set_integer_dot(False)
        print(
            f"# rel. mean-abs error vs the float64 reference on the bf16 weights, hidden states {inputs}, "
            f"E={E} H={H} I={I} k={k} r={r} T={T} (~{T * k // E} rows per expert), threads={threads}: {header()}"
        )
        print("| method | " + " | ".join(names) + " |")
        print("|---" * (1 + len(names)) + "|")
        for method, errs in rows.items():
            print(f"| {method} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.accuracy or args.decode):
        args.accuracy = args.decode = True
    if args.decode:
        decode()
    if args.accuracy:
        accuracy(args.threads)


if __name__ == "__main__":
    sys.exit(main())
