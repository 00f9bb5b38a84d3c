"""Two pieces of SFT-wrapper state that kt-kernel 0.7 defines as protocols, each a mixin of
BaseSFTMoEWrapper:

- AuthoritativeGrads: the optimizer gradient of a registered Parameter is a buffer the backward
  writes in place (kt-kernel's "authoritative optimizer grads"). The buffer is published as
  `Parameter.grad` after a backward (the optimizer window is then "open") and withdrawn after the
  optimizer step (release, "closed"). A backward into a closed window overwrites the buffer; one into
  an open window adds to it, which is gradient accumulation across micro-batches. A failed backward
  closes the window, so the next one starts the buffers afresh.
- CheckpointCache: one forward output kept between an activation checkpoint's first forward and its
  recompute (READY), so the recompute reuses it instead of running the experts again; any mismatch
  poisons it for good (POISONED), since its contents can no longer be trusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Tuple, Union

import torch

from ..core.formats import SFT_METHOD_FORMATS, SKIP_LORA_SUFFIX

# The formats whose frozen bases support authoritative LoRA gradients (kt-kernel 0.7's table);
# bf16 also supports them for the base weights of full fine-tuning.
_FROZEN_BASE_AUTHORITATIVE = ("int8", "int8_kgroup", "fp8", "int4_kgroup")


def supports_authoritative_optimizer_grads(
    method: str, num_gpu_experts: int, *, full_weight_grad: bool = False, lora_rank: int = 1
) -> bool:
    """Whether an SFT method keeps its optimizer gradients in its own buffers (kt-kernel 0.7's rule):
    every routed expert on the CPU, and bf16 (LoRA and base weights), or a frozen quantized base with
    LoRA (int8, fp8, and the group-32 int4 and fp4 of RAWINT4 / MXFP4). SkipLoRA methods compute no
    LoRA gradient and never do."""
    if int(num_gpu_experts) != 0 or method.endswith(SKIP_LORA_SUFFIX):
        return False
    fmt = SFT_METHOD_FORMATS.get(method)
    if fmt == "bf16":
        return True
    return (
        (fmt in _FROZEN_BASE_AUTHORITATIVE and method != "AMXINT4_KGroup_SFT")
        and not bool(full_weight_grad)
        and int(lora_rank) > 0
    )


def _grad_metadata(tensor: torch.Tensor) -> tuple:
    """What must not change about a registered gradient buffer: dtype, layout, device, shape,
    strides, offset and storage (the backward writes through it)."""
    return (
        tensor.dtype,
        tensor.layout,
        tensor.device,
        tuple(tensor.shape),
        tuple(tensor.stride()),
        int(tensor.storage_offset()),
        int(tensor.data_ptr()),
    )


@dataclass(frozen=True)
class AuthoritativeGrad:
    """One Parameter and the buffer the backward writes its gradient into."""

    name: str
    parameter: torch.nn.Parameter
    grad_view: torch.Tensor
    metadata: tuple


class AuthoritativeGrads:
    """Mixin: the registered Parameters' gradients live in backward-written buffers (module doc)."""

    _uses_authoritative_optimizer_grads: bool = False

    def _init_authoritative_optimizer_grads(self) -> None:
        self._authoritative_optimizer_grads: list = []
        self._authoritative_grad_submission_pending = False
        self._authoritative_grad_pending_accumulate = False

    @property
    def authoritative_optimizer_grads(self) -> Tuple[AuthoritativeGrad, ...]:
        return tuple(self._authoritative_optimizer_grads)

    def register_authoritative_optimizer_grad(
        self, name: str, parameter: torch.nn.Parameter, grad_view: torch.Tensor
    ) -> None:
        """Make `grad_view` the only gradient `parameter` ever gets (a no-op for wrappers that do
        not keep authoritative gradients). The window starts closed: Parameter.grad is None."""
        if not self._uses_authoritative_optimizer_grads:
            return
        if not isinstance(parameter, torch.nn.Parameter):
            raise TypeError(f"{name}: parameter must be an nn.Parameter, got {type(parameter).__name__}")
        if not isinstance(grad_view, torch.Tensor):
            raise TypeError(f"{name}: grad_view must be a torch.Tensor, got {type(grad_view).__name__}")
        if parameter.shape != grad_view.shape:
            raise ValueError(
                f"{name}: parameter and grad_view shapes differ: {tuple(parameter.shape)} != {tuple(grad_view.shape)}"
            )
        if parameter.dtype != grad_view.dtype or parameter.device != grad_view.device:
            raise ValueError(
                f"{name}: parameter and grad_view dtype or device differ: {parameter.dtype}/{parameter.device} "
                f"!= {grad_view.dtype}/{grad_view.device}"
            )
        for entry in self._authoritative_optimizer_grads:
            if entry.parameter is parameter:
                raise RuntimeError(f"{name}: the parameter is already registered as {entry.name}")
            if entry.grad_view is grad_view:
                raise RuntimeError(f"{name}: the grad view is already registered as {entry.name}")
        parameter.grad = None
        self._authoritative_optimizer_grads.append(
            AuthoritativeGrad(name, parameter, grad_view, _grad_metadata(grad_view))
        )

    def validate_authoritative_optimizer_grad_state(self) -> str:
        """'empty' (nothing registered), 'closed' (no Parameter.grad set) or 'open' (every one is
        its buffer); anything else raises."""
        entries = self._authoritative_optimizer_grads if self._uses_authoritative_optimizer_grads else []
        if not entries:
            return "empty"
        aliased = 0
        for entry in entries:
            if _grad_metadata(entry.grad_view) != entry.metadata:
                raise RuntimeError(
                    f"{entry.name}: authoritative grad view metadata changed; the backward writes through the "
                    "registered buffer, which must not be replaced or resized"
                )
            p, g = entry.parameter, entry.grad_view
            if p.shape != g.shape or p.dtype != g.dtype or p.device != g.device:
                raise RuntimeError(f"{entry.name}: the parameter no longer matches its authoritative grad view")
            if p.grad is entry.grad_view:
                aliased += 1
            elif p.grad is not None:
                raise RuntimeError(
                    f"{entry.name}: Parameter.grad was externally replaced; it must be None or the registered "
                    "authoritative grad view"
                )
        if aliased == 0:
            return "closed"
        if aliased == len(entries):
            return "open"
        raise RuntimeError(
            "Mixed authoritative optimizer-gradient state: some Parameter.grad are None while others alias "
            "their gradient buffers"
        )

    def _prepare_authoritative_optimizer_grad_write(self, optimizer_grad_scale: float) -> bool:
        """Start a backward's write; True when it adds to the buffers (the window is open)."""
        if self._authoritative_grad_submission_pending:
            raise RuntimeError("An authoritative optimizer-gradient backward submission is already pending")
        check_grad_scale(optimizer_grad_scale)
        accumulate = self.validate_authoritative_optimizer_grad_state() == "open"
        self._authoritative_grad_submission_pending = True
        self._authoritative_grad_pending_accumulate = accumulate
        return accumulate

    def _publish_authoritative_optimizer_grads(self) -> None:
        """After a successful backward: every Parameter.grad is its buffer (the window is open)."""
        if not self._authoritative_grad_submission_pending:
            raise RuntimeError("No authoritative optimizer-gradient backward submission is pending")
        expected = "open" if self._authoritative_grad_pending_accumulate else "closed"
        try:
            state = self.validate_authoritative_optimizer_grad_state()
            if state not in ("empty", expected):
                raise RuntimeError(
                    f"Authoritative optimizer-gradient state changed during the backward: expected {expected}, "
                    f"got {state}"
                )
            for entry in self._authoritative_optimizer_grads:
                entry.parameter.grad = entry.grad_view
        except Exception:
            self._abort_authoritative_optimizer_grad_write()
            raise
        self._authoritative_grad_submission_pending = False
        self._authoritative_grad_pending_accumulate = False

    def _abort_authoritative_optimizer_grad_write(self) -> None:
        # A failed backward may have written part of the buffers: closing the window makes the
        # next backward overwrite them all.
        for entry in self._authoritative_optimizer_grads:
            entry.parameter.grad = None
        self._authoritative_grad_submission_pending = False
        self._authoritative_grad_pending_accumulate = False

    def release_authoritative_optimizer_grads(self) -> None:
        """Close the window after the optimizer step (the buffers keep their values)."""
        if not self._uses_authoritative_optimizer_grads:
            return
        if self._authoritative_grad_submission_pending:
            raise RuntimeError("Cannot release authoritative gradients while a backward is pending")
        self.validate_authoritative_optimizer_grad_state()
        for entry in self._authoritative_optimizer_grads:
            entry.parameter.grad = None


def check_grad_scale(optimizer_grad_scale) -> float:
    scale = float(optimizer_grad_scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"optimizer_grad_scale must be finite and positive, got {optimizer_grad_scale}")
    return scale


class CheckpointCacheState(str, Enum):
    EMPTY = "EMPTY"
    READY = "READY"
    POISONED = "POISONED"


def _raise_if_poisoned(cache) -> None:
    # a function, not a method: kt-kernel's tests lend these methods to a class of their own
    if cache._checkpoint_cache_state is CheckpointCacheState.POISONED:
        detail = f": {cache._checkpoint_cache_error}" if cache._checkpoint_cache_error else ""
        raise RuntimeError(f"Checkpoint forward cache is poisoned{detail}")


class CheckpointCache:
    """Mixin: the forward output kept for an activation checkpoint's recompute (module doc)."""

    def _init_checkpoint_cache(self) -> None:
        self._checkpoint_cache_state = CheckpointCacheState.EMPTY
        self._checkpoint_cache_error: Optional[str] = None
        self._checkpoint_output_cpu: Optional[torch.Tensor] = None
        self._checkpoint_output_qlen = 0

    @property
    def checkpoint_cache_state(self) -> CheckpointCacheState:
        return self._checkpoint_cache_state

    @property
    def _kt_has_cached_forward(self) -> bool:
        return self._checkpoint_cache_state is CheckpointCacheState.READY

    def poison_checkpoint_output(self, error: Union[BaseException, str]) -> None:
        self._checkpoint_output_cpu = None
        self._checkpoint_output_qlen = 0
        self._checkpoint_cache_state = CheckpointCacheState.POISONED
        self._checkpoint_cache_error = str(error)

    def validate_checkpoint_output(self, qlen: int) -> None:
        _raise_if_poisoned(self)
        if self._checkpoint_cache_state is not CheckpointCacheState.READY or self._checkpoint_output_cpu is None:
            raise RuntimeError("No cached checkpoint forward output is available.")
        if int(qlen) != self._checkpoint_output_qlen:
            error = RuntimeError(
                f"Cached checkpoint qlen mismatch: cached={self._checkpoint_output_qlen}, requested={qlen}"
            )
            self.poison_checkpoint_output(error)
            raise error

    def validate_checkpoint_cache_empty(self) -> None:
        _raise_if_poisoned(self)
        if self._checkpoint_cache_state is not CheckpointCacheState.EMPTY or self._checkpoint_output_cpu is not None:
            error = RuntimeError("Checkpoint forward cache is still live before a new first forward")
            self.poison_checkpoint_output(error)
            raise error

    def cache_checkpoint_output(self, output_cpu: torch.Tensor, qlen: int) -> None:
        try:
            _raise_if_poisoned(self)
            if self._checkpoint_cache_state is not CheckpointCacheState.EMPTY:
                raise RuntimeError("Cannot replace a live checkpoint forward cache before backward consumes it")
            if output_cpu.device.type != "cpu":
                raise ValueError("the checkpointed CPU expert output must reside on the CPU")
            if output_cpu.shape[0] < qlen:
                raise ValueError(f"the checkpointed output is shorter than qlen: {output_cpu.shape[0]} < {qlen}")
            cached = output_cpu[:qlen].contiguous()
        except Exception as error:
            self.poison_checkpoint_output(error)
            raise
        self._checkpoint_output_cpu = cached
        self._checkpoint_output_qlen = int(qlen)
        self._checkpoint_cache_error = None
        self._checkpoint_cache_state = CheckpointCacheState.READY

    def get_checkpoint_output(self, qlen: int, output_device: Optional[torch.device] = None) -> torch.Tensor:
        self.validate_checkpoint_output(qlen)
        output = self._checkpoint_output_cpu
        try:
            return output if output_device is None else output.to(device=output_device, non_blocking=True)
        except Exception as error:
            self.poison_checkpoint_output(error)
            raise

    def clear_checkpoint_output(self) -> None:
        """Forget the cached output; a poisoned cache stays poisoned."""
        self._checkpoint_output_cpu = None
        self._checkpoint_output_qlen = 0
        if self._checkpoint_cache_state is not CheckpointCacheState.POISONED:
            self._checkpoint_cache_state = CheckpointCacheState.EMPTY
            self._checkpoint_cache_error = None
