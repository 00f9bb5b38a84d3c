"""KExpertsSFTBuffer: kt-kernel's host staging buffers of the SFT wrappers, one per (qlen, sizes,
dtype), and the LoRA gradients of the latest backward at those sizes (the specification's
get_lora_grads). The wrappers themselves copy device tensors into per-call pinned tensors, so that a
task still queued on the CPUInfer thread never reads a buffer another call is refilling; this class
keeps kt-kernel's cache controls (capture sizes, clear_cache) and its staging tensors for callers that
stage by hand."""

from __future__ import annotations

import threading
from typing import ClassVar, Dict, List, Optional

import torch

from ..core.formats import LORA_NAMES, lora_shapes


class KExpertsSFTBuffer:
    """Staging tensors (pinned when CUDA is available, so device copies can overlap) are allocated on
    first use."""

    _buffer_lock: ClassVar[threading.Lock] = threading.Lock()
    capture_buffers: ClassVar[Dict[tuple, "KExpertsSFTBuffer"]] = {}
    # kt-kernel's capture batch sizes: when set, buffers of other sizes are not kept beyond the most
    # recent one, so varying sequence lengths do not pile up staging memory. Empty: every size is kept.
    capture_bs: ClassVar[List[int]] = []
    _STAGING = ("input_cpu", "expert_ids_cpu", "weights_cpu", "output_cpu", "grad_output_cpu", "grad_input_cpu")

    def __init__(
        self,
        qlen: int,
        hidden_size: int,
        moe_intermediate_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        lora_rank: int,
        dtype: torch.dtype = torch.bfloat16,
    ):
        self.qlen, self.hidden_size, self.moe_intermediate_size = qlen, hidden_size, moe_intermediate_size
        self.num_experts, self.num_experts_per_tok, self.lora_rank, self.dtype = (
            num_experts,
            num_experts_per_tok,
            lora_rank,
            dtype,
        )
        self._staging: Dict[str, torch.Tensor] = {}
        self._lora_grads: Optional[Dict[str, torch.Tensor]] = None

    def __getattr__(self, name: str) -> torch.Tensor:
        if name not in KExpertsSFTBuffer._STAGING:
            raise AttributeError(name)
        staging = self.__dict__["_staging"]
        if name not in staging:
            shape = (
                self.qlen,
                self.num_experts_per_tok if name in ("expert_ids_cpu", "weights_cpu") else self.hidden_size,
            )
            dtype = {"expert_ids_cpu": torch.int64, "weights_cpu": torch.float32}.get(name, self.dtype)
            staging[name] = torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
        return staging[name]

    @classmethod
    def get_buffer(
        cls,
        qlen: int,
        hidden_size: int,
        moe_intermediate_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        lora_rank: int,
        dtype: torch.dtype = torch.bfloat16,
    ) -> "KExpertsSFTBuffer":
        key = (qlen, hidden_size, moe_intermediate_size, num_experts, num_experts_per_tok, lora_rank, dtype)
        with cls._buffer_lock:
            buffer = cls.capture_buffers.get(key)
            if buffer is None:
                if cls.capture_bs and qlen not in cls.capture_bs:
                    for old in [k for k in cls.capture_buffers if k[0] not in cls.capture_bs]:
                        del cls.capture_buffers[old]
                buffer = cls.capture_buffers[key] = cls(*key)
            return buffer

    @classmethod
    def clear_cache(cls) -> None:
        with cls._buffer_lock:
            cls.capture_buffers.clear()

    def set_lora_grads(self, grads: Dict[str, torch.Tensor]) -> None:
        """Hold (by reference) the six gradient tensors the latest backward at these sizes wrote."""
        self._lora_grads = dict(grads)

    def get_lora_grads(self) -> Dict[str, torch.Tensor]:
        """grad_{gate,up,down}_lora_{a,b}: the tensors the latest backward at these sizes wrote, and
        before any backward six zero tensors of the LoRA shapes (in this buffer's dtype)."""
        if self._lora_grads is None:
            shapes = lora_shapes(self.num_experts, self.hidden_size, self.moe_intermediate_size, self.lora_rank)
            self._lora_grads = {
                f"grad_{name}": torch.zeros(shape, dtype=self.dtype) for name, shape in zip(LORA_NAMES, shapes)
            }
        return dict(self._lora_grads)
