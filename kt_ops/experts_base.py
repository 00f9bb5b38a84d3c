"""kt-kernel's import path for the wrappers' shared base (`kt_kernel.experts_base`); it lives in
kt_ops.wrappers.base."""

from .wrappers.base import BaseMoEWrapper, CPUInfer, WorkerPoolConfig, _MoEBase, generate_gpu_experts_masks

__all__ = ["BaseMoEWrapper", "CPUInfer", "WorkerPoolConfig", "_MoEBase", "generate_gpu_experts_masks"]
