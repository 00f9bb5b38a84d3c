"""LoRAByReference: an SFT wrapper's LoRA tensors and gradient buffers, kept by reference (a mixin of
AMXSFTMoEWrapper). kt-kernel 0.7 hands over six LoRA tensors and six gradient buffers, which the
backward writes; the specification's call hands over the six tensors only, and the wrapper keeps six
gradient tensors of its own."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..core.formats import LORA_NAMES, lora_shapes
from ..layer import LORA_DTYPES


class LoRAByReference:
    def _locked(self):
        lock = getattr(self, "_state_lock", None)
        return lock if lock is not None else contextlib.nullcontext()

    def _lora_shapes(self):
        return lora_shapes(self.num_experts, self.hidden_size, self.moe_intermediate_size, self.lora_rank)

    def init_lora_weights(
        self,
        gate_lora_a: torch.Tensor,
        gate_lora_b: torch.Tensor,
        up_lora_a: torch.Tensor,
        up_lora_b: torch.Tensor,
        down_lora_a: torch.Tensor,
        down_lora_b: torch.Tensor,
        grad_gate_lora_a: Optional[torch.Tensor] = None,
        grad_gate_lora_b: Optional[torch.Tensor] = None,
        grad_up_lora_a: Optional[torch.Tensor] = None,
        grad_up_lora_b: Optional[torch.Tensor] = None,
        grad_down_lora_a: Optional[torch.Tensor] = None,
        grad_down_lora_b: Optional[torch.Tensor] = None,
    ) -> None:
        """Keep references to the six LoRA tensors (shapes: kt_ops.core.formats.lora_shapes), and
        to six gradient buffers (kt-kernel 0.7) that backward writes, or, without them (the
        specification's call), to six buffers of its own. With buffers the tensors are registered by
        reference, so each must be a contiguous CPU tensor (bf16, fp32 or fp64) and its buffer of
        the same shape and dtype; when all six are nn.Parameters of a wrapper that keeps
        authoritative gradients, each buffer becomes its Parameter's gradient. Without buffers any
        float tensor is accepted (copied for the kernels when it has to be, see SFTMoE)."""
        lora = (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
        grads = (grad_gate_lora_a, grad_gate_lora_b, grad_up_lora_a, grad_up_lora_b, grad_down_lora_a)
        grads += (grad_down_lora_b,)
        given = sum(g is not None for g in grads)
        if given not in (0, 6):
            raise ValueError(f"init_lora_weights needs all six gradient buffers or none, got {given}")
        shapes = self._lora_shapes()
        for name, tensor, shape in zip(LORA_NAMES, lora, shapes):
            _check_lora(name, tensor, shape, by_reference=given == 6)
        if given:
            for name, tensor, grad in zip(LORA_NAMES, lora, grads):
                _check_grad_buffer(name, tensor, grad)
        else:
            grads = tuple(torch.zeros(t.shape, dtype=t.dtype) for t in lora)
        with self._locked():
            self._register_lora_parameters(lora, grads, given == 6)
            for name, tensor, grad in zip(LORA_NAMES, lora, grads):
                setattr(self, name, tensor)
                setattr(self, f"grad_{name}", grad)
            self._lora_form = "0.7" if given else "spec"
            self._lora_initialized = True
            if self._weights_loaded and self.moe is not None:
                self.update_lora_weights()

    def _register_lora_parameters(self, lora, grads, by_reference: bool) -> None:
        if not (by_reference and getattr(self, "_uses_authoritative_optimizer_grads", False)):
            return
        parameters = sum(isinstance(t, torch.nn.Parameter) for t in lora)
        if parameters not in (0, len(lora)):
            raise ValueError("authoritative LoRA ownership requires all six weights to be nn.Parameters, or none")
        if parameters:
            for name, tensor, grad in zip(LORA_NAMES, lora, grads):
                self.register_authoritative_optimizer_grad(f"lora.{name}", tensor, grad)

    def update_lora_weights(self) -> None:
        """Re-read the LoRA tensors (after an optimizer step, or after rebinding the attributes)."""
        if not self._weights_loaded:
            raise RuntimeError("Weights not loaded. Call load_weights() first.")
        if not self._lora_initialized:
            if self.lora_rank <= 0:
                return  # full fine-tuning without LoRA
            raise RuntimeError("LoRA weights not initialized. Call init_lora_weights() first.")
        self.moe.update_lora_weights(*(getattr(self, name) for name in LORA_NAMES))

    @property
    def _lora_kernel(self):
        """The LoRA tensors the kernels read (the sources themselves when zero copy)."""
        return None if self.moe is None else self.moe.lora_kernel


def _check_lora(name: str, tensor, shape, by_reference: bool) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} shape mismatch: expected {shape}, got {tuple(tensor.shape)}")
    if by_reference:
        if tensor.device.type != "cpu" or tensor.dtype not in LORA_DTYPES:
            raise ValueError(f"{name} must be a CPU bf16, fp32 or fp64 tensor, got {tensor.dtype} on {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is registered by reference, with its gradient buffer")


def _check_grad_buffer(name: str, tensor: torch.Tensor, grad) -> None:
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad_{name} must be a torch.Tensor, got {type(grad).__name__}")
    if grad.shape != tensor.shape or grad.dtype != tensor.dtype or grad.device.type != "cpu":
        raise ValueError(
            f"grad_{name} must be a CPU tensor shaped and typed like {name} {tuple(tensor.shape)} {tensor.dtype}, "
            f"got {tuple(grad.shape)} {grad.dtype} on {grad.device}"
        )
    if not grad.is_contiguous():
        raise ValueError(f"grad_{name} must be contiguous: backward writes it in place")
