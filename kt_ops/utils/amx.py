"""kt-kernel's import path (`kt_kernel.utils.amx`) for AMXMoEWrapper; it lives in kt_ops.wrappers.amx."""

from ..wrappers.amx import AMXMoEWrapper

__all__ = ["AMXMoEWrapper"]
