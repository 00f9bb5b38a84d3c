"""kt-kernel's import path for the SFT wrapper base (`kt_kernel.experts_sft`); it lives in
kt_ops.wrappers.sft."""

from .wrappers.sft import BaseSFTMoEWrapper, KExpertsSFTBuffer

__all__ = ["BaseSFTMoEWrapper", "KExpertsSFTBuffer"]
