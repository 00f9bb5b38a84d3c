"""kt-kernel's import path `kt_kernel.sft.base`: the SFT wrapper base and its buffers, which live in
kt_ops.wrappers (sft.py, sft_state.py). The underscore names are kt-kernel's spellings."""

from ..wrappers.sft import BaseSFTMoEWrapper, KExpertsSFTBuffer
from ..wrappers.sft_state import CheckpointCacheState, supports_authoritative_optimizer_grads

_CheckpointCacheState = CheckpointCacheState
_supports_authoritative_optimizer_grads = supports_authoritative_optimizer_grads

__all__ = ["BaseSFTMoEWrapper", "CheckpointCacheState", "KExpertsSFTBuffer", "supports_authoritative_optimizer_grads"]
