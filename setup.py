import glob
import os
import re
import subprocess
import sys

import torch.utils.cpp_extension as cpp_extension
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
    "kt_ops_csrc/kernels/quant_avx512.cpp",
    "kt_ops_csrc/kernels/quant_avx512_vnni.cpp",
]
# setuptools skips the build when the library is newer than `sources + depends`; listing the headers
# and the kernel sources included by several units (*.inc) makes a change to one of them reach ninja,
# whose depfiles then recompile just the files including it.
DEPENDS = sorted(glob.glob("kt_ops_csrc/**/*.h", recursive=True) + glob.glob("kt_ops_csrc/**/*.inc", recursive=True))

# The compile command in torch's build.ninja names the file after a `-c`.
_SOURCE = re.compile(r"\s-c\s+(\S+\.(?:cpp|cc|c))\s")
_STATUS = re.compile(r"^\[(\d+)/(\d+)\]\s")


def _run_ninja_one_line_per_file(build_directory: str, verbose: bool, error_prefix: str) -> None:
    """torch's ninja runner, printing `[i/n] <source>` per compiled file instead of `ninja -v`'s
    full command lines (several hundred characters each); what the compiler itself prints
    (warnings, errors) is passed through unchanged."""
    command = ["ninja", "-v"]
    workers = os.environ.get("MAX_JOBS")
    if workers:
        command += ["-j", workers]
    with subprocess.Popen(
        command, cwd=build_directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as ninja:
        output = []
        for line in ninja.stdout:
            output.append(line)
            status, source = _STATUS.match(line), _SOURCE.search(line)
            if status and source:
                print(f"[{status[1]}/{status[2]}] {os.path.relpath(source[1].strip(chr(39)))}", flush=True)
            elif not status:
                sys.stdout.write(line)
    if ninja.returncode:
        raise RuntimeError(f"{error_prefix}: ninja exited with {ninja.returncode}; its output:\n{''.join(output)}")


cpp_extension._run_ninja_build = _run_ninja_one_line_per_file

# scripts/setup.sh sets KT_OPS_NO_EXT=1 for the editable install (package + console script only) and
# builds the extension in place with `setup.py build_ext --inplace`, keeping ninja's state in build/.
ext_modules = (
    []
    if os.environ.get("KT_OPS_NO_EXT") == "1"
    else [
        CppExtension(
            "kt_ops._C",
            SOURCES,
            depends=DEPENDS,
            # Baseline x86-64 flags for everything; ISA kernels raise their own target per file.
            # No FMA contraction: explicit intrinsics decide where FMAs go, so dequantization and
            # reductions give the same bits on every ISA.
            # -Wno-psabi: GCC notes that passing 64-byte vectors by value (SIMDe does, in the emulated
            # AVX-512 unit) changed ABI in GCC 4.6; one compiler builds every caller here.
            extra_compile_args={"cxx": ["-O3", "-fno-math-errno", "-ffp-contract=off", "-Wno-psabi"]},
        )
    ]
)

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
