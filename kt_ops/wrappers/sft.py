"""The SFT-mode wrapper base: kt-kernel 0.7's protocol over a KTMoELayer (its packed parts, sub-pools
and GPU-expert mask), which the wrapper's `moe` (sft_moe.SFTMoE) computes with.

kt-kernel 0.7: forward / submit_forward + sync_forward (the work runs on the CPUInfer thread) and
backward / submit_backward_async + sync_backward return (grad_input, grad_weights); the LoRA
gradients go into the six buffers given to init_lora_weights (and the base-weight gradients of full
fine-tuning into grad_*_proj_buf), overwritten or accumulated (sft_state.AuthoritativeGrads) and
scaled by optimizer_grad_scale. The specification's forward_sft + backward return (grad_input,
{grad_*: the six gradient tensors, grad_weights}). A backward consumes a saved forward
(`max_cache_depth` of them), and answers in the form of the API that made it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence, Tuple

import torch

from ..core.checks import check_has_data, check_int, check_number
from .base import _MoEBase
from .sft_buffer import KExpertsSFTBuffer
from .sft_moe import SFTCall
from .sft_state import (
    AuthoritativeGrads,
    CheckpointCache,
    CheckpointCacheState,
    supports_authoritative_optimizer_grads,
    check_grad_scale,
)

__all__ = [
    "BaseSFTMoEWrapper",
    "KExpertsSFTBuffer",
    "CheckpointCacheState",
    "supports_authoritative_optimizer_grads",
]


class BaseSFTMoEWrapper(AuthoritativeGrads, CheckpointCache, _MoEBase, ABC):
    """SFT-mode MoE experts with LoRA on gate/up/down (or, with full_weight_grad, trainable base
    weights). Expert ids are physical slots; LoRA tensors are indexed by the same slots. Experts
    computed on the caller's GPU (num_gpu_experts, gpu_experts_mask) are skipped: no output, zero
    gradient.

    Subclasses make the tasks (_make_forward_task, _make_backward_task) and load weights; this class
    runs kt-kernel 0.7's forward / backward lifecycle over them."""

    def __init__(
        self,
        layer_idx: int,
        num_experts: int,
        num_experts_per_tok: int,
        hidden_size: int,
        moe_intermediate_size: int,
        num_gpu_experts,
        cpuinfer_threads: int,
        threadpool_count: int,
        weight_path: Optional[str],
        chunked_prefill_size: int,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.0,
        max_cache_depth: int = 1,
        full_weight_grad: bool = False,
        *,
        gpu_experts_mask: Optional[torch.Tensor] = None,
        numa_nodes: Optional[Sequence[int]] = None,
        swiglu_limit: float = 0.0,
        swiglu_alpha: float = 0.0,
    ):
        self._validate_sft_config(lora_rank, lora_alpha, lora_dropout, max_cache_depth, full_weight_grad)
        self._init_common(
            layer_idx,
            num_experts,
            num_experts_per_tok,
            hidden_size,
            moe_intermediate_size,
            gpu_experts_mask,
            cpuinfer_threads,
            threadpool_count,
            weight_path,
            chunked_prefill_size,
            numa_nodes,
            num_gpu_experts,
            swiglu_limit,
            swiglu_alpha,
        )
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.lora_scaling = self.lora_alpha / lora_rank if lora_rank > 0 else 0.0
        self.max_cache_depth = max_cache_depth
        self._full_weight_grad = bool(full_weight_grad)
        for name in _LORA_ATTRS + _GRAD_ATTRS + _BASE_ATTRS:
            setattr(self, name, None)
        self._weights_loaded = False
        self._lora_initialized = False
        self._cache_depth = 0
        self._is_skip_lora = False
        self._base_weights_dirty = False
        self._uses_authoritative_optimizer_grads = False
        self._init_authoritative_optimizer_grads()
        self.reuse_checkpoint_forward = False
        self._init_checkpoint_cache()
        self._backward_repack_pending = False
        self._pending_buffer = None
        self._async_bwd_qlen = None
        self.moe = None
        self._call = SFTCall()

    @staticmethod
    def _validate_sft_config(
        lora_rank: int, lora_alpha: float, lora_dropout: float, max_cache_depth: int, full_weight_grad: bool = False
    ) -> None:
        check_int(lora_rank, "lora_rank", 0)
        if not full_weight_grad and lora_rank <= 0:
            raise ValueError(
                f"lora_rank must be positive in LoRA mode, got {lora_rank}; set full_weight_grad=True "
                "(kt_train_mode='full') to train the base weights without LoRA"
            )
        if lora_rank > 0:
            check_number(lora_alpha, "lora_alpha", positive=True)
        dropout = check_number(lora_dropout, "lora_dropout")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if dropout:
            raise ValueError(f"lora_dropout must be 0: the kt_ops kernels apply no LoRA dropout, got {lora_dropout}")
        check_int(max_cache_depth, "max_cache_depth", 1)

    # ---- what subclasses provide -----------------------------------------------------------------

    @abstractmethod
    def _make_forward_task(self, buffer, save_for_backward: bool): ...

    @abstractmethod
    def _make_backward_task(
        self, buffer, accumulate_optimizer_grads: bool = False, optimizer_grad_scale: float = 1.0
    ): ...

    @abstractmethod
    def load_weights(self, physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None: ...

    @abstractmethod
    def init_lora_weights(self, *lora: torch.Tensor, **named: torch.Tensor) -> None: ...

    @abstractmethod
    def update_lora_weights(self) -> None: ...

    @abstractmethod
    def update_base_weights(self) -> None: ...

    # ---- buffers (one SFTCall per wrapper: its tensors of the call in flight) ----------------------

    def _get_buffer(self, qlen: int) -> SFTCall:
        self._call.qlen = qlen
        return self._call

    def _validate_forward_inputs(self, hidden_states, expert_ids, weights) -> None:
        if not self._weights_loaded:
            raise RuntimeError("Weights not loaded. Call load_weights() or load_weights_from_tensors() first.")
        if self.lora_rank > 0 and not self._lora_initialized and not self._is_skip_lora:
            raise RuntimeError("LoRA weights not initialized. Call init_lora_weights() first.")
        self.check_tokens(hidden_states, expert_ids, weights)

    def check_tokens(self, hidden_states, expert_ids, weights) -> None:
        check_has_data(hidden_states=hidden_states, expert_ids=expert_ids, weights=weights)
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must have shape [qlen, hidden_size={self.hidden_size}], "
                f"got {tuple(hidden_states.shape)}"
            )
        qlen = hidden_states.shape[0]
        for name, t in (("expert_ids", expert_ids), ("weights", weights)):
            if tuple(t.shape) != (qlen, self.num_experts_per_tok):
                raise ValueError(
                    f"{name} must have shape [qlen={qlen}, num_experts_per_tok={self.num_experts_per_tok}], "
                    f"got {tuple(t.shape)}"
                )

    def _copy_inputs_to_buffer(self, buffer: SFTCall, hidden_states, expert_ids, weights, qlen: int):
        """The call's inputs on the CPU (CPU tensors are used as they are; a device tensor is copied
        into pinned memory of this call's own, so a task still queued never reads a reused buffer)."""
        buffer.form = "0.7"
        buffer.device = hidden_states.device
        buffer.io_dtype = hidden_states.dtype
        buffer.input_cpu = _host(hidden_states.detach())
        buffer.expert_ids_cpu = self.layer.held_ids(_host(expert_ids))
        buffer.weights_cpu = _host(weights.detach())
        return hidden_states.device

    def _copy_grad_output_to_cpu(self, buffer: SFTCall, grad_output: torch.Tensor, qlen: int) -> None:
        buffer.grad_output_cpu = _host(grad_output.detach())
        buffer.grad_input_cpu = torch.empty((qlen, self.hidden_size), dtype=buffer.io_dtype)
        buffer.grad_weights = torch.empty((qlen, self.num_experts_per_tok), dtype=torch.float32)

    def _return_output(self, buffer: SFTCall, qlen: int, output_device: Optional[torch.device]):
        output = buffer.output_cpu
        return output if output_device is None else output.to(device=output_device, non_blocking=True)

    def _return_grads(self, buffer: SFTCall, qlen: int, output_device: Optional[torch.device]):
        grad_input, grad_weights = buffer.grad_input_cpu, buffer.grad_weights
        if output_device is not None:
            grad_input = grad_input.to(device=output_device, non_blocking=True)
            grad_weights = grad_weights.to(device=output_device, non_blocking=True)
        return grad_input, grad_weights

    # ---- forward ---------------------------------------------------------------------------------

    def _wait_for_pending_backward_repack(self) -> None:
        if getattr(self, "_backward_repack_pending", False):
            self.wait_backward_repack()

    def forward(
        self,
        hidden_states: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        save_for_backward: bool = True,
        output_device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        """[qlen, H] -> [qlen, H] (on output_device, else the CPU), kept for backward when
        save_for_backward."""
        self.submit_forward(hidden_states, expert_ids, weights, save_for_backward)
        return self.sync_forward(output_device)

    def submit_forward(
        self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, save_for_backward=True
    ) -> None:
        """Queue the forward on the CPUInfer thread and return at once; sync_forward() collects it."""
        self._validate_forward_inputs(hidden_states, expert_ids, weights)
        qlen = hidden_states.shape[0]
        buffer = self._get_buffer(qlen)
        self._copy_inputs_to_buffer(buffer, hidden_states, expert_ids, weights, qlen)
        task = self._make_forward_task(buffer, save_for_backward)
        self._pending_buffer, self._pending_save_for_backward, self._pending_qlen = buffer, save_for_backward, qlen
        self._wait_for_pending_backward_repack()
        self.cpu_infer.submit(task)

    def sync_forward(self, output_device: Optional[torch.device] = None) -> torch.Tensor:
        """The output of the pending submit_forward (on output_device, else the CPU)."""
        buffer = getattr(self, "_pending_buffer", None)
        if buffer is None:
            raise RuntimeError("No pending forward. Call submit_forward() first.")
        save, qlen = self._pending_save_for_backward, self._pending_qlen
        self._pending_buffer = None
        self.cpu_infer.sync()
        if save:
            self._cache_depth += 1
        return self._return_output(buffer, qlen, output_device)

    # ---- backward --------------------------------------------------------------------------------

    def _backward_task(self, buffer, optimizer_grad_scale: float):
        """(the task, whether it writes authoritative gradients): kt-kernel's task signatures, the
        scaled tail only where it is needed."""
        use_authoritative = self._uses_authoritative_optimizer_grads
        if use_authoritative:
            accumulate = self._prepare_authoritative_optimizer_grad_write(optimizer_grad_scale)
            try:
                task = self._make_backward_task(
                    buffer, accumulate_optimizer_grads=accumulate, optimizer_grad_scale=optimizer_grad_scale
                )
            except Exception:
                self._abort_authoritative_optimizer_grad_write()
                raise
        elif optimizer_grad_scale != 1.0:
            task = self._make_backward_task(
                buffer, accumulate_optimizer_grads=False, optimizer_grad_scale=optimizer_grad_scale
            )
        else:
            task = self._make_backward_task(buffer)
        return task, use_authoritative

    def _start_backward(self, grad_output, optimizer_grad_scale):
        if self._cache_depth <= 0:
            raise RuntimeError("No forward cache available. Call forward(save_for_backward=True) first.")
        if self._uses_authoritative_optimizer_grads and self._authoritative_grad_submission_pending:
            raise RuntimeError("An authoritative optimizer-gradient backward submission is already pending")
        if getattr(self, "_async_bwd_qlen", None) is not None:
            raise RuntimeError("A backward is already pending; call sync_backward() first")
        if not isinstance(grad_output, torch.Tensor):
            raise TypeError(f"grad_output must be a torch.Tensor, got {type(grad_output).__name__}")
        scale = check_grad_scale(optimizer_grad_scale)
        qlen = grad_output.shape[0]
        buffer = self._get_buffer(qlen)
        self._copy_grad_output_to_cpu(buffer, grad_output, qlen)
        task, use_authoritative = self._backward_task(buffer, scale)
        return qlen, buffer, task, use_authoritative

    def _fail_backward(self, use_authoritative: bool) -> None:
        if use_authoritative:
            self._abort_authoritative_optimizer_grad_write()
            # the task may have consumed the saved forward: a retry needs a fresh forward
            self._cache_depth = max(0, self._cache_depth - 1)

    def backward(
        self,
        grad_output: torch.Tensor,
        output_device: Optional[torch.device] = None,
        optimizer_grad_scale: float = 1.0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the latest saved forward: (grad_input, grad_weights) for a forward /
        submit_forward, (grad_input, {grad_*}) for the specification's forward_sft."""
        qlen, buffer, task, use_authoritative = self._start_backward(grad_output, optimizer_grad_scale)
        try:
            self._wait_for_pending_backward_repack()
            self.cpu_infer.submit(task)
        except Exception:
            self._fail_backward(use_authoritative)
            raise
        return self._collect_backward(qlen, buffer, output_device, use_authoritative)

    def _collect_backward(self, qlen, buffer, output_device, use_authoritative: bool):
        """Waits for the submitted backward and returns its gradients, publishing the optimizer's
        authoritative ones; on failure the optimizer window is given back (_fail_backward)."""
        try:
            self.cpu_infer.sync()
            result = self._return_grads(buffer, qlen, output_device)
            if use_authoritative:
                self._publish_authoritative_optimizer_grads()
        except Exception:
            self._fail_backward(use_authoritative)
            raise
        self._cache_depth -= 1
        return result

    def submit_backward_async(
        self,
        grad_output: torch.Tensor,
        output_device: Optional[torch.device] = None,
        optimizer_grad_scale: float = 1.0,
    ) -> None:
        """Queue the backward and return at once; sync_backward() collects it."""
        qlen, _, task, use_authoritative = self._start_backward(grad_output, optimizer_grad_scale)
        try:
            self._wait_for_pending_backward_repack()
            self.cpu_infer.submit(task)
        except Exception:
            if use_authoritative:
                try:
                    self.cpu_infer.sync()
                except Exception:  # the submit's own error is the one to report
                    pass
            self._fail_backward(use_authoritative)
            self._async_bwd_qlen = None
            raise
        self._async_bwd_qlen, self._async_bwd_output_device = qlen, output_device
        self._async_bwd_uses_authoritative = use_authoritative

    def sync_backward(self):
        """The result of the pending submit_backward_async (as backward returns it)."""
        qlen = getattr(self, "_async_bwd_qlen", None)
        if qlen is None:
            raise RuntimeError("No pending backward. Call submit_backward_async() first.")
        self._async_bwd_qlen = None
        return self._collect_backward(
            qlen, self._get_buffer(qlen), self._async_bwd_output_device, self._async_bwd_uses_authoritative
        )

    # ---- kt-kernel's backward repack (its C++ re-lays out weights for backward ahead of time; the
    # kt_ops kernels read the forward's panels, so there is nothing to prepare unless the moe says so)

    def submit_backward_repack(self) -> None:
        if not getattr(self, "_weights_loaded", False) or getattr(self, "moe", None) is None:
            return
        if hasattr(self.moe, "submit_backward_repack"):
            self.moe.submit_backward_repack()
            self._backward_repack_pending = True

    def wait_backward_repack(self) -> None:
        if getattr(self, "_weights_loaded", False) and getattr(self, "moe", None) is not None:
            if hasattr(self.moe, "wait_backward_repack"):
                self.moe.wait_backward_repack()
        self._backward_repack_pending = False

    # ---- full fine-tuning -------------------------------------------------------------------------

    def init_full_weight_grad_buffers(
        self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor
    ) -> None:
        """The base weights as optimizer-visible bf16 Parameters (gate_proj_buf [E, I, H], up_proj_buf,
        down_proj_buf [E, H, I], logical experts) and their gradient buffers grad_*_proj_buf, which
        backward writes; after an optimizer step update_base_weights() repacks them."""
        E, I, H = self.num_experts, self.moe_intermediate_size, self.hidden_size
        for name, t, shape in (("gate_proj", gate_proj, (E, I, H)), ("up_proj", up_proj, (E, I, H))):
            _check_weight(name, t, shape)
        _check_weight("down_proj", down_proj, (E, H, I))
        params = [
            torch.nn.Parameter(t.detach().to("cpu", torch.bfloat16).contiguous(), requires_grad=True)
            for t in (gate_proj, up_proj, down_proj)
        ]
        self.gate_proj_buf, self.up_proj_buf, self.down_proj_buf = params
        self.grad_gate_proj_buf = torch.zeros((E, I, H), dtype=torch.bfloat16)
        self.grad_up_proj_buf = torch.zeros((E, I, H), dtype=torch.bfloat16)
        self.grad_down_proj_buf = torch.zeros((E, H, I), dtype=torch.bfloat16)
        for name in ("gate_proj", "up_proj", "down_proj"):
            self.register_authoritative_optimizer_grad(
                f"base.{name}", getattr(self, f"{name}_buf"), getattr(self, f"grad_{name}_buf")
            )

    # ---- the specification's API -----------------------------------------------------------------

    def clear_cache(self) -> None:
        """Drop every saved forward (e.g. after an aborted step)."""
        if self.moe is not None:
            self.moe.saved.clear()
        self._cache_depth = 0

    def reset_cache(self) -> None:
        self.clear_cache()

    def select_deferred_experts(self, *args, **kwargs):
        raise RuntimeError("select_deferred_experts() is not available in SFT mode.")


_LORA_ATTRS = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")
_GRAD_ATTRS = tuple(f"grad_{name}" for name in _LORA_ATTRS)
_BASE_ATTRS = ("gate_proj_buf", "up_proj_buf", "down_proj_buf", "grad_gate_proj_buf", "grad_up_proj_buf")
_BASE_ATTRS += ("grad_down_proj_buf",)


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU; from a device through pinned memory of its own."""
    if tensor.device.type == "cpu":
        return tensor
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
    pinned.copy_(tensor)
    return pinned


def _check_weight(name: str, t, shape) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (num_experts, ...), got {tuple(t.shape)}")
