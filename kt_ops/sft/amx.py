"""kt-kernel's import path `kt_kernel.sft.amx` for AMXSFTMoEWrapper; it lives in
kt_ops.wrappers.amx_sft."""

from ..wrappers.amx_sft import AMXSFTMoEWrapper

__all__ = ["AMXSFTMoEWrapper"]
