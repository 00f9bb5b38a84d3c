"""kt-kernel's import path (`kt_kernel.utils.llamafile`) for LlamafileMoEWrapper; it lives in
kt_ops.wrappers.llamafile."""

from ..wrappers.llamafile import LlamafileMoEWrapper

__all__ = ["LlamafileMoEWrapper"]
