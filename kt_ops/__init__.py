"""kt_ops: CPU Mixture-of-Experts operators with fused LoRA, registered as torch.ops.kt.*."""

from __future__ import annotations

import os

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import _C  # noqa: F401
from .core.formats import LORA_NAMES, SFT_METHOD_FORMATS, SFT_METHODS, WEIGHT_FORMATS
from .core.packed import PackedExperts, pack_experts, unpack_experts
from .core.runtime import (
    cpu_info,
    environment_flag,
    get_integer_dot,
    get_isa,
    get_num_threads,
    set_integer_dot,
    set_isa,
    set_num_threads,
)
from .core.settings import KTSettings
from .function import KTMoEFunction
from .layer import KTMoELayer
from .ops import moe_sft
from .weights.loaders import BF16SafeTensorLoader, SafeTensorLoader
from .weights.packed_io import load_packed_experts, packed_layers, save_packed_experts
from .wrappers import (
    AMXMoEWrapper,
    AMXSFTMoEWrapper,
    BaseMoEWrapper,
    BaseSFTMoEWrapper,
    CPUInfer,
    KExpertsSFTBuffer,
    KTMoEWrapper,
    LlamafileMoEWrapper,
    NativeMoEWrapper,
    WorkerPoolConfig,
)

__all__ = [
    "AMXMoEWrapper",
    "AMXSFTMoEWrapper",
    "BF16SafeTensorLoader",
    "BaseMoEWrapper",
    "BaseSFTMoEWrapper",
    "CPUInfer",
    "KExpertsSFTBuffer",
    "KTMoEFunction",
    "KTMoELayer",
    "KTMoEWrapper",
    "KTSettings",
    "LORA_NAMES",
    "LlamafileMoEWrapper",
    "NativeMoEWrapper",
    "PackedExperts",
    "SFT_METHODS",
    "SFT_METHOD_FORMATS",
    "SafeTensorLoader",
    "WEIGHT_FORMATS",
    "WorkerPoolConfig",
    "cpu_info",
    "get_integer_dot",
    "get_isa",
    "get_num_threads",
    "load_packed_experts",
    "moe_sft",
    "pack_experts",
    "packed_layers",
    "save_packed_experts",
    "set_integer_dot",
    "set_isa",
    "set_num_threads",
    "unpack_experts",
]


_INTEGRATION = ("apply_kt", "export_merged", "save_kt_adapter", "load_kt_adapter")


def __getattr__(name: str):
    # The Hugging Face integration imports transformers and peft, so it loads on first use only.
    if name in _INTEGRATION:
        from . import integration

        return getattr(integration, name)
    raise AttributeError(f"module 'kt_ops' has no attribute {name!r}")


if os.environ.get("KT_OPS_ISA"):
    set_isa(os.environ["KT_OPS_ISA"])
if os.environ.get("KT_OPS_INTEGER_DOT"):
    set_integer_dot(environment_flag("KT_OPS_INTEGER_DOT"))
