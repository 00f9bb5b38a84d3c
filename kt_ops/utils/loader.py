"""kt-kernel's import path for the loaders (`kt_kernel.utils.loader`); they live in kt_ops.weights.loaders."""

from ..weights.loaders import BF16SafeTensorLoader, SafeTensorLoader

__all__ = ["BF16SafeTensorLoader", "SafeTensorLoader"]
