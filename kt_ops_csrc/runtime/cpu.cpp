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
  f.avx512_vbmi = os_avx512 && (c & (1u << 1));
  f.amx_bf16 = os_amx && (d & (1u << 22));
  f.amx_tile = os_amx && (d & (1u << 24));
  f.amx_int8 = os_amx && (d & (1u << 25));
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512_bf16 = os_avx512 && (a & (1u << 5));
  return f;
}

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

// Every ISA once, in enum order: its name, the CPU features it needs, why its kernels can be absent
// from a build, and its GEMM table. The name list, the name lookup of set_isa, the feature checks and
// the table choice all read this.
struct Feature {
  const char* name;
  bool CpuFeatures::* present;
};

struct IsaInfo {
  Isa isa;
  const char* name;
  const char* needs;      // the features in words, for the error message ("" for none)
  Feature features[5];    // what cpuid must report; ends at the first empty name
  const char* not_built;  // the error message's reason when kernels() has no table
  IsaKernels (*kernels)();
};

constexpr const char* kNotBuilt = "kernels are not part of this build (compiler too old?).";

constexpr IsaInfo kIsas[] = {
    {Isa::Ref, "ref", "", {}, kNotBuilt, [] { return IsaKernels{&ref_kernels_f32(), nullptr}; }},
    {Isa::Avx2,
     "avx2",
     "AVX2 and FMA",
     {{"AVX2", &CpuFeatures::avx2}, {"FMA", &CpuFeatures::fma}},
     kNotBuilt,
     [] { return IsaKernels{avx2_kernels_f32(), nullptr}; }},
    {Isa::Avx512,
     "avx512",
     "AVX-512 F/BW/VL",
     {{"AVX512F", &CpuFeatures::avx512f}, {"AVX512BW", &CpuFeatures::avx512bw}, {"AVX512VL", &CpuFeatures::avx512vl}},
     kNotBuilt,
     // vdpbf16ps where the CPU has AVX512_BF16 (activations rounded to bf16), else fp32 FMA.
     [] {
       const KernelsBf16* bf16 = cpu_features().avx512_bf16 ? avx512bf16_kernels() : nullptr;
       return bf16 ? IsaKernels{nullptr, bf16} : IsaKernels{avx512_kernels_f32(), nullptr};
     }},
    {Isa::Amx,
     "amx",
     "AMX-TILE, AMX-BF16 and AVX-512 F/BW/VL",
     {{"AMX-TILE", &CpuFeatures::amx_tile},
      {"AMX-BF16", &CpuFeatures::amx_bf16},
      {"AVX512F", &CpuFeatures::avx512f},
      {"AVX512BW", &CpuFeatures::avx512bw},
      {"AVX512VL", &CpuFeatures::avx512vl}},
     kNotBuilt,
     [] { return IsaKernels{nullptr, amx_kernels()}; }},
    {Isa::AmxEmu, "amx-emu", "", {}, kNotBuilt, [] { return IsaKernels{nullptr, amx_emu_kernels()}; }},
    {Isa::Avx512Bf16Emu,
     "avx512-bf16-emu",
     "",
     {},
     "is not part of this build (it is built only where the SIMDe headers were installed, e.g. Debian's "
     "libsimde-dev).",
     [] { return IsaKernels{nullptr, avx512bf16_emu_kernels()}; }},
};

constexpr bool in_enum_order() {
  for (int i = 0; i < static_cast<int>(sizeof(kIsas) / sizeof(kIsas[0])); ++i)
    if (kIsas[i].isa != static_cast<Isa>(i)) return false;
  return sizeof(kIsas) / sizeof(kIsas[0]) == static_cast<size_t>(Isa::Avx512Bf16Emu) + 1;
}
static_assert(in_enum_order(), "kIsas lists every Isa once, in enum order");

const IsaInfo& info(Isa isa) { return kIsas[static_cast<int>(isa)]; }

// The needed features this CPU lacks, comma-separated; empty when it has them all.
std::string missing_features(const IsaInfo& isa) {
  const CpuFeatures& f = cpu_features();
  std::string missing;
  for (const Feature& feature : isa.features)
    if (feature.name != nullptr && !(f.*feature.present))
      missing += (missing.empty() ? "" : ", ") + std::string(feature.name);
  return missing;
}

bool isa_supported(Isa isa) {
  return missing_features(info(isa)).empty() && info(isa).kernels().built() && (isa != Isa::Amx || amx_permission());
}

// "auto": the fastest the CPU runs; the emulations are test vehicles and never chosen.
Isa best_isa() {
  for (Isa isa : {Isa::Amx, Isa::Avx512, Isa::Avx2})
    if (isa_supported(isa)) return isa;
  return Isa::Ref;
}

std::atomic<int> g_isa{-1};
std::atomic<bool> g_integer_dot{false};

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
  return {{"avx2", f.avx2},
          {"fma", f.fma},
          {"f16c", f.f16c},
          {"avx512f", f.avx512f},
          {"avx512bw", f.avx512bw},
          {"avx512vl", f.avx512vl},
          {"avx512_vnni", f.avx512_vnni},
          {"avx512_vbmi", f.avx512_vbmi},
          {"avx512_bf16", f.avx512_bf16},
          {"amx_tile", f.amx_tile},
          {"amx_bf16", f.amx_bf16},
          {"amx_int8", f.amx_int8}};
}

std::vector<std::string> known_isa_names() {
  std::vector<std::string> names{"auto"};
  for (const IsaInfo& isa : kIsas) names.push_back(isa.name);
  return names;
}

std::vector<std::string> available_isa_names() {
  std::vector<std::string> names;
  for (const IsaInfo& isa : kIsas)
    if (isa_supported(isa.isa)) names.push_back(isa.name);
  return names;
}

std::string isa_name(Isa isa) { return info(isa).name; }

namespace {

std::string joined(const std::vector<std::string>& names) {
  std::string list;
  for (const std::string& name : names) list += (list.empty() ? "" : ", ") + name;
  return list;
}

}  // namespace

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_isa = static_cast<int>(best_isa());
    return;
  }
  const IsaInfo* found = nullptr;
  for (const IsaInfo& isa : kIsas)
    if (name == isa.name) found = &isa;
  TORCH_CHECK_VALUE(found != nullptr, "KT_OPS_ISA/set_isa: unknown ISA '", name, "'; expected one of ",
                    joined(known_isa_names()));
  const IsaInfo& isa = *found;
  const std::string missing = missing_features(isa);
  TORCH_CHECK_VALUE(missing.empty(), "KT_OPS_ISA/set_isa: '", name, "' needs a CPU with ", isa.needs, "; this CPU (",
                    cpu_model_name(), ") lacks ", missing,
                    " (or the OS does not enable them). Available: ", joined(available_isa_names()));
  TORCH_CHECK_VALUE(isa.isa != Isa::Amx || amx_permission(),
                    "KT_OPS_ISA/set_isa: 'amx': the CPU has AMX but the OS refused this process the tile-data "
                    "state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed; Linux >= 5.16 is "
                    "needed). Available: ",
                    joined(available_isa_names()));
  TORCH_CHECK_VALUE(isa.kernels().built(), "KT_OPS_ISA/set_isa: '", name, "' ", isa.not_built,
                    " Available: ", joined(available_isa_names()));
  g_isa = static_cast<int>(isa.isa);
}

// set_isa only selects an ISA whose table exists and whose CPU features are present.
IsaKernels active_gemm_kernels() { return info(current_isa()).kernels(); }

const DequantKernels& active_dequant_kernels() {
  // The native AVX-512 ISAs dequantize with AVX-512 where the CPU has VNNI and VBMI (rounding to bf16
  // with AVX512_BF16 where it has that too); the AVX2 dequantizer serves every other ISA above ref
  // (the emulations included) on CPUs with AVX2.
  // The AMX ISAs add the int8 formats' tile products (real where the CPU has AMX-INT8, or software
  // tiles) to that table. All give the same bits.
  const CpuFeatures& f = cpu_features();
  const Isa isa = current_isa();
  const bool avx512_quant = (isa == Isa::Avx512 || isa == Isa::Amx) && f.avx512f && f.avx512bw && f.avx512vl &&
                            f.avx512_vnni && f.avx512_vbmi;
  const DequantKernels* avx512 = !avx512_quant ? nullptr : f.avx512_bf16 ? avx512_dequant() : avx512_vnni_dequant();
  const DequantKernels& vector =
      avx512 ? *avx512 : (isa != Isa::Ref && f.avx2 && f.fma ? *avx2_dequant() : ref_dequant());
  if (isa == Isa::Amx && f.amx_int8 && amx_int8_dequant(vector)) return *amx_int8_dequant(vector);
  if (isa == Isa::AmxEmu) return *amx_emu_int8_dequant(vector);
  return vector;
}

void set_integer_dot(bool enabled) { g_integer_dot = enabled; }

bool integer_dot_enabled() { return g_integer_dot.load(); }

Isa current_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = static_cast<int>(best_isa());
    g_isa = isa;
  }
  return static_cast<Isa>(isa);
}

}  // namespace kt
