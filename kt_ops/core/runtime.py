"""The kernels' run-time settings: which ISA runs, how many threads the kt_ops pool has, and whether
the int8 and 4-bit formats multiply by integer dot products."""

from __future__ import annotations

import os

from .. import _C
from .checks import check_int


def set_isa(name: str) -> None:
    """Choose the kernel ISA: 'auto' (best for this CPU), 'ref', 'avx2', 'avx512', 'amx' or 'amx-emu'.
    Raises ValueError for an unknown name or one this CPU or build cannot run."""
    if not isinstance(name, str):
        raise TypeError(f"isa name must be a str, got {type(name).__name__}")
    _C.set_isa(name)


def get_isa() -> str:
    return _C.get_isa()


def set_integer_dot(enabled: bool) -> None:
    """Multiply the int8 and 4-bit weight formats ("int8", "int8_kgroup", "int4", "int4_1",
    "int4_kgroup", "int4_1_kgroup"; methods AMXINT8_SFT, AMXINT4_SFT, ...) by integer dot products at
    every row count, process-wide (default off; the environment variable KT_OPS_INTEGER_DOT=1 turns
    it on at import). Each expert's input rows of the forward projections are then quantized to int8
    per row and 128 k (within the weights' K groups; step max|x| / 127), a coarser rounding than bf16,
    and the weights are never dequantized into bf16 panels (int8: AMX-INT8 tiles, AVX-512 VNNI, or
    AVX2's 16-bit products; 4-bit: AVX-512 VNNI or AVX2). Decode (up to 4 rows per expert) takes these
    products whatever the setting. The backward is unchanged. The error, and when it is worth
    it, is in benchmarks/RESULTS.md (bench_fp8.py --accuracy)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _C.set_integer_dot(enabled)


def environment_flag(name: str) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off, any case."""
    value = os.environ[name].strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be one of 1/true/yes/on or 0/false/no/off, got {os.environ[name]!r}")


def get_integer_dot() -> bool:
    """The set_integer_dot setting."""
    return _C.get_integer_dot()


def set_num_threads(num_threads: int) -> None:
    """Size of the kt_ops worker pool (default: the number of physical cores)."""
    _C.set_num_threads(check_int(num_threads, "num_threads", 1))


def get_num_threads() -> int:
    return _C.get_num_threads()


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_info() -> dict:
    """CPU features found, the kernel ISA in use and the ones this CPU and build can run."""
    return {
        "model": _C.cpu_model_name(),
        "features": dict(_C.cpu_features()),
        "physical_cores": _C.physical_cores(),
        "isa": _C.get_isa(),
        "available_isas": list(_C.available_isas()),
        "num_threads": _C.get_num_threads(),
    }
