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

setup(
    ext_modules=[
        CppExtension(
            "kt_ops._C",
            SOURCES,
            # Baseline x86-64 flags for everything; ISA kernels raise their own target per file.
            # No FMA contraction: explicit intrinsics decide where FMAs go, so dequantization and
            # reductions give the same bits on every ISA.
            extra_compile_args={"cxx": ["-O3", "-fno-math-errno", "-ffp-contract=off"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
