#include "cpu.h"

#include <cpuid.h>
#include <torch/extension.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <fstream>

#include "../kernels/gemm.h"
#include "../kernels/quant.h"

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

bool has_avx512(const CpuFeatures& f) { return f.avx512f && f.avx512bw && f.avx512vl; }
bool has_amx(const CpuFeatures& f) { return f.amx_tile && f.amx_bf16 && has_avx512(f); }

// Linux (>= 5.16) hands out the AMX tile-data state only on request: until a process asks with
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), its first tile instruction raises SIGILL. The
// permission is process-wide. Asked once, and only on a CPU that reported AMX.
bool amx_permission() {
  static const bool granted = [] {
#if defined(__linux__) && defined(__x86_64__)
    constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
    constexpr unsigned long kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
    unsigned long features = 0;
    if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &features) != 0) return false;
    return (features & (1ul << kXfeatureXtiledata)) != 0;
#else
    return false;
#endif
  }();
  return granted;
}

bool isa_supported(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::Ref: return true;
    case Isa::Avx2: return f.avx2 && f.fma && avx2_kernels_f32() != nullptr;
    case Isa::Avx512: return has_avx512(f) && avx512_kernels_f32() != nullptr;
    case Isa::Amx: return has_amx(f) && amx_kernels_f32() != nullptr && amx_permission();
    case Isa::AmxEmu: return amx_emu_kernels_f32() != nullptr;
    case Isa::Avx512Bf16Emu: return avx512bf16_emu_kernels_f32() != nullptr;
  }
  return false;
}

// "auto": the fastest the CPU runs; the emulations are test vehicles and never chosen.
Isa best_isa() {
  for (Isa isa : {Isa::Amx, Isa::Avx512, Isa::Avx2})
    if (isa_supported(isa)) return isa;
  return Isa::Ref;
}

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

std::vector<std::string> known_isa_names() {
  return {"auto", "ref", "avx2", "avx512", "amx", "amx-emu", "avx512-bf16-emu"};
}

std::vector<std::string> available_isa_names() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::Ref, Isa::Avx2, Isa::Avx512, Isa::Amx, Isa::AmxEmu, Isa::Avx512Bf16Emu})
    if (isa_supported(isa)) names.push_back(isa_name(isa));
  return names;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Ref: return "ref";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Amx: return "amx";
    case Isa::AmxEmu: return "amx-emu";
    case Isa::Avx512Bf16Emu: return "avx512-bf16-emu";
  }
  return "ref";
}

namespace {

std::string available_list() {
  std::string list;
  for (const std::string& name : available_isa_names()) list += (list.empty() ? "" : ", ") + name;
  return list;
}

std::string missing_features(const CpuFeatures& f, Isa isa) {
  std::vector<std::pair<const char*, bool>> needed;
  if (isa == Isa::Avx2) needed = {{"AVX2", f.avx2}, {"FMA", f.fma}};
  if (isa == Isa::Avx512 || isa == Isa::Amx)
    needed = {{"AVX512F", f.avx512f}, {"AVX512BW", f.avx512bw}, {"AVX512VL", f.avx512vl}};
  if (isa == Isa::Amx) {
    needed.insert(needed.begin(), {"AMX-BF16", f.amx_bf16});
    needed.insert(needed.begin(), {"AMX-TILE", f.amx_tile});
  }
  std::string missing;
  for (const auto& [feature, present] : needed)
    if (!present) missing += (missing.empty() ? "" : ", ") + std::string(feature);
  return missing;
}

}  // namespace

void set_isa(const std::string& name) {
  const CpuFeatures& f = cpu_features();
  Isa isa;
  if (name == "auto") {
    isa = best_isa();
  } else if (name == "ref") {
    isa = Isa::Ref;
  } else if (name == "avx2" || name == "avx512" || name == "amx") {
    isa = name == "avx2" ? Isa::Avx2 : name == "avx512" ? Isa::Avx512 : Isa::Amx;
    const char* needs = isa == Isa::Avx2     ? "AVX2 and FMA"
                        : isa == Isa::Avx512 ? "AVX-512 F/BW/VL"
                                             : "AMX-TILE, AMX-BF16 and AVX-512 F/BW/VL";
    const std::string missing = missing_features(f, isa);
    TORCH_CHECK_VALUE(missing.empty(), "KT_OPS_ISA/set_isa: '", name, "' needs a CPU with ", needs, "; this CPU (",
                      cpu_model_name(), ") lacks ", missing, " (or the OS does not enable them). Available: ",
                      available_list());
    TORCH_CHECK_VALUE(isa != Isa::Amx || amx_permission(),
                      "KT_OPS_ISA/set_isa: 'amx': the CPU has AMX but the OS refused this process the tile-data "
                      "state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed; Linux >= 5.16 is "
                      "needed). Available: ",
                      available_list());
    TORCH_CHECK_VALUE(isa_supported(isa), "KT_OPS_ISA/set_isa: '", name,
                      "' kernels are not part of this build (compiler too old?). Available: ", available_list());
  } else if (name == "amx-emu") {
    isa = Isa::AmxEmu;
  } else if (name == "avx512-bf16-emu") {
    isa = Isa::Avx512Bf16Emu;
    TORCH_CHECK_VALUE(isa_supported(isa), "KT_OPS_ISA/set_isa: 'avx512-bf16-emu' is not part of this build (it is "
                      "built only where the SIMDe headers were installed, e.g. Debian's libsimde-dev). Available: ",
                      available_list());
  } else {
    TORCH_CHECK_VALUE(false, "KT_OPS_ISA/set_isa: unknown ISA '", name,
                      "'; expected one of auto, ref, avx2, avx512, amx, amx-emu, avx512-bf16-emu");
  }
  g_isa = static_cast<int>(isa);
}

const Kernels<float>& active_gemm_kernels() {
  // set_isa only selects an ISA whose table exists and whose CPU features are present.
  switch (current_isa()) {
    case Isa::Avx2: return *avx2_kernels_f32();
    case Isa::Avx512: {
      // vdpbf16ps where the CPU has AVX512_BF16 (activations rounded to bf16), else fp32 FMA.
      const Kernels<float>* bf16 = cpu_features().avx512_bf16 ? avx512bf16_kernels_f32() : nullptr;
      return bf16 ? *bf16 : *avx512_kernels_f32();
    }
    case Isa::Amx: return *amx_kernels_f32();
    case Isa::AmxEmu: return *amx_emu_kernels_f32();
    case Isa::Avx512Bf16Emu: return *avx512bf16_emu_kernels_f32();
    case Isa::Ref: break;
  }
  return ref_kernels_f32();
}

const DequantKernels& active_dequant_kernels() {
  // The AVX2 dequantizer serves every ISA above ref (the emulations included) on CPUs with AVX2.
  const CpuFeatures& f = cpu_features();
  return current_isa() != Isa::Ref && f.avx2 && f.fma ? *avx2_dequant() : ref_dequant();
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
