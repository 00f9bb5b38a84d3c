"""The kernels' run-time settings: which ISA runs and how many threads the kt_ops pool has."""

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
