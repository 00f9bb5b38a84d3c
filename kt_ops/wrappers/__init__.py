"""The kt-kernel-compatible wrappers: kt-kernel's (and the specification's) wrapper API, each a thin
adapter over a KTMoELayer. KTMoEWrapper (factory.py) picks the concrete wrapper by mode and method:
sft -> AMXSFTMoEWrapper (amx_sft.py, on sft.py's forward_sft / backward protocol); inference ->
AMXMoEWrapper (amx.py), NativeMoEWrapper (native.py), LlamafileMoEWrapper (llamafile.py), on base.py's
CPUInfer. kt-kernel's import paths (kt_ops.experts, kt_ops.experts_base, kt_ops.utils.amx_sft, ...)
re-export them."""

from .amx import AMXMoEWrapper
from .amx_sft import AMXSFTMoEWrapper
from .base import BaseMoEWrapper, CPUInfer, WorkerPoolConfig
from .factory import KTMoEWrapper
from .llamafile import LlamafileMoEWrapper
from .native import NativeMoEWrapper
from .sft import BaseSFTMoEWrapper, KExpertsSFTBuffer

__all__ = [
    "AMXMoEWrapper",
    "AMXSFTMoEWrapper",
    "BaseMoEWrapper",
    "BaseSFTMoEWrapper",
    "CPUInfer",
    "KExpertsSFTBuffer",
    "KTMoEWrapper",
    "LlamafileMoEWrapper",
    "NativeMoEWrapper",
    "WorkerPoolConfig",
]
