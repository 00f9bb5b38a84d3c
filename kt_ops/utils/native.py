"""kt-kernel's import path (`kt_kernel.utils.native`) for NativeMoEWrapper; it lives in kt_ops.wrappers.native."""

from ..wrappers.native import NativeMoEWrapper

__all__ = ["NativeMoEWrapper"]
