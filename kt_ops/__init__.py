"""kt_ops: CPU Mixture-of-Experts operators with fused LoRA, registered as torch.ops.kt.*."""
from __future__ import annotations

import os

import torch

from . import _C
from .experts import KTMoEWrapper
from .experts_base import BaseMoEWrapper, CPUInfer, WorkerPoolConfig
from .experts_sft import BaseSFTMoEWrapper, KExpertsSFTBuffer
from .function import KTMoEFunction
from .layer import SFT_METHOD_FORMATS, KTMoELayer
from .loaders import BF16SafeTensorLoader, SafeTensorLoader
from .ops import WEIGHT_FORMATS, PackedExperts, moe_sft, pack_experts, unpack_experts
from .packed_io import load_packed_experts, packed_layers, save_packed_experts
from .utils.amx import AMXMoEWrapper
from .utils.llamafile import LlamafileMoEWrapper
from .utils.native import NativeMoEWrapper
from .utils.amx_sft import AMXSFTMoEWrapper

__all__ = [
    "AMXMoEWrapper", "AMXSFTMoEWrapper", "BF16SafeTensorLoader", "BaseMoEWrapper", "BaseSFTMoEWrapper",
    "SafeTensorLoader", "CPUInfer", "KExpertsSFTBuffer",
    "KTMoEWrapper", "LlamafileMoEWrapper", "NativeMoEWrapper", "WorkerPoolConfig", "KTMoEFunction", "KTMoELayer", "PackedExperts", "SFT_METHOD_FORMATS", "WEIGHT_FORMATS", "cpu_info", "get_isa",
    "get_num_threads", "load_packed_experts", "moe_sft", "pack_experts", "packed_layers", "save_packed_experts",
    "set_isa", "set_num_threads", "unpack_experts",
]


_INTEGRATION = ("apply_kt", "export_merged", "save_kt_adapter", "load_kt_adapter")


def __getattr__(name: str):
    # The Hugging Face integration imports transformers and peft, so it loads on first use only.
    if name in _INTEGRATION:
        from . import integration
        return getattr(integration, name)
    raise AttributeError(f"module 'kt_ops' has no attribute {name!r}")


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
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    _C.set_num_threads(num_threads)


def get_num_threads() -> int:
    return _C.get_num_threads()


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


if os.environ.get("KT_OPS_ISA"):
    set_isa(os.environ["KT_OPS_ISA"])
