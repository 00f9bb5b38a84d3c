import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

SOURCES = [
    "kt_ops_csrc/ops.cpp",
    "kt_ops_csrc/moe_sft.cpp",
    "kt_ops_csrc/formats.cpp",
    "kt_ops_csrc/runtime/cpu.cpp",
    "kt_ops_csrc/runtime/thread_pool.cpp",
    "kt_ops_csrc/kernels/gemm_ref.cpp",
    "kt_ops_csrc/kernels/gemm_avx2.cpp",
    "kt_ops_csrc/kernels/gemm_avx512.cpp",
    "kt_ops_csrc/kernels/gemm_amx.cpp",
    "kt_ops_csrc/kernels/gemm_amx_emu.cpp",
    "kt_ops_csrc/kernels/gemm_avx512_emu.cpp",  # empty unless the SIMDe headers are installed
    "kt_ops_csrc/kernels/quant_ref.cpp",
    "kt_ops_csrc/kernels/quant_avx2.cpp",
]
# setuptools skips the build when the library is newer than `sources + depends`; listing the headers
# makes a header-only change reach ninja, whose depfiles then recompile just the files including it.
HEADERS = sorted(glob.glob("kt_ops_csrc/**/*.h", recursive=True))

# scripts/setup.sh sets KT_OPS_NO_EXT=1 for the editable install (package + console script only) and
# builds the extension in place with `setup.py build_ext --inplace`, keeping ninja's state in build/.
ext_modules = [] if os.environ.get("KT_OPS_NO_EXT") == "1" else [
    CppExtension(
        "kt_ops._C",
        SOURCES,
        depends=HEADERS,
        # Baseline x86-64 flags for everything; ISA kernels raise their own target per file.
        # No FMA contraction: explicit intrinsics decide where FMAs go, so dequantization and
        # reductions give the same bits on every ISA.
        extra_compile_args={"cxx": ["-O3", "-fno-math-errno", "-ffp-contract=off"]},
    )
]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
