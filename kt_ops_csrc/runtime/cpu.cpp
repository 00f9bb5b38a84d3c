#include "cpu.h"

#include <cpuid.h>
#include <torch/extension.h>

#include <atomic>
#include <fstream>

#include "../kernels/gemm.h"

namespace kt {
namespace {

uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  // The OS must save the wider registers on context switch, or using them corrupts state.
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  const bool os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  f.fma = os_avx && (c & (1u << 12));
  f.f16c = os_avx && (c & (1u << 29));
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = os_avx && (b & (1u << 5));
  f.avx512f = os_avx512 && (b & (1u << 16));
  f.avx512bw = os_avx512 && (b & (1u << 30));
  f.avx512vl = os_avx512 && (b & (1u << 31));
  f.avx512_vnni = os_avx512 && (c & (1u << 11));
  f.amx_bf16 = os_amx && (d & (1u << 22));
  f.amx_tile = os_amx && (d & (1u << 24));
  f.amx_int8 = os_amx && (d & (1u << 25));
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512_bf16 = os_avx512 && (a & (1u << 5));
  return f;
}

bool isa_supported(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::Ref: return true;
    case Isa::Avx2: return f.avx2 && f.fma && avx2_kernels_f32() != nullptr;
  }
  return false;
}

Isa best_isa() { return isa_supported(Isa::Avx2) ? Isa::Avx2 : Isa::Ref; }

std::atomic<int> g_isa{-1};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

std::string cpu_model_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown";
}

std::vector<std::pair<std::string, bool>> cpu_feature_list() {
  const CpuFeatures& f = cpu_features();
  return {{"avx2", f.avx2},         {"fma", f.fma},           {"f16c", f.f16c},
          {"avx512f", f.avx512f},   {"avx512bw", f.avx512bw}, {"avx512vl", f.avx512vl},
          {"avx512_vnni", f.avx512_vnni}, {"avx512_bf16", f.avx512_bf16},
          {"amx_tile", f.amx_tile}, {"amx_bf16", f.amx_bf16}, {"amx_int8", f.amx_int8}};
}

std::vector<std::string> known_isa_names() { return {"auto", "ref", "avx2", "avx512", "amx", "amx-emu"}; }

std::vector<std::string> available_isa_names() {
  std::vector<std::string> names{"ref"};
  if (isa_supported(Isa::Avx2)) names.push_back("avx2");
  return names;
}

std::string isa_name(Isa isa) { return isa == Isa::Avx2 ? "avx2" : "ref"; }

void set_isa(const std::string& name) {
  const CpuFeatures& f = cpu_features();
  if (name == "auto") {
    g_isa = static_cast<int>(best_isa());
  } else if (name == "ref") {
    g_isa = static_cast<int>(Isa::Ref);
  } else if (name == "avx2") {
    TORCH_CHECK_VALUE(f.avx2 && f.fma, "KT_OPS_ISA/set_isa: 'avx2' needs a CPU with AVX2 and FMA; this CPU (",
                      cpu_model_name(), ") lacks them. Available: ref");
    g_isa = static_cast<int>(Isa::Avx2);
  } else if (name == "avx512") {
    TORCH_CHECK_VALUE(f.avx512f && f.avx512bw && f.avx512vl,
                      "KT_OPS_ISA/set_isa: 'avx512' needs AVX-512 F/BW/VL, which this CPU (", cpu_model_name(),
                      ") lacks");
    TORCH_CHECK_VALUE(false, "KT_OPS_ISA/set_isa: 'avx512' kernels are not part of this build yet");
  } else if (name == "amx" || name == "amx-emu") {
    TORCH_CHECK_VALUE(name == "amx-emu" || (f.amx_tile && f.amx_bf16),
                      "KT_OPS_ISA/set_isa: 'amx' needs AMX-TILE and AMX-BF16, which this CPU (", cpu_model_name(),
                      ") lacks");
    TORCH_CHECK_VALUE(false, "KT_OPS_ISA/set_isa: '", name, "' kernels are not part of this build yet");
  } else {
    TORCH_CHECK_VALUE(false, "KT_OPS_ISA/set_isa: unknown ISA '", name,
                      "'; expected one of auto, ref, avx2, avx512, amx, amx-emu");
  }
}

Isa current_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = static_cast<int>(best_isa());
    g_isa = isa;
  }
  return static_cast<Isa>(isa);
}

}  // namespace kt
