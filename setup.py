from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

SOURCES = [
    "kt_ops_csrc/ops.cpp",
    "kt_ops_csrc/moe_sft.cpp",
    "kt_ops_csrc/runtime/cpu.cpp",
    "kt_ops_csrc/runtime/thread_pool.cpp",
    "kt_ops_csrc/kernels/gemm_ref.cpp",
    "kt_ops_csrc/kernels/gemm_avx2.cpp",
]

setup(
    ext_modules=[
        CppExtension(
            "kt_ops._C",
            SOURCES,
            # Baseline x86-64 flags for everything; ISA kernels raise their own target per file.
            extra_compile_args={"cxx": ["-O3", "-fno-math-errno"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
