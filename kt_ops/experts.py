"""kt-kernel's import path for the wrapper factory (`kt_kernel.experts`); it lives in kt_ops.wrappers."""

from .wrappers.factory import KTMoEWrapper
from .wrappers.sft import KExpertsSFTBuffer

__all__ = ["KExpertsSFTBuffer", "KTMoEWrapper"]
