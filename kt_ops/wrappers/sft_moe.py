"""SFTMoE: the compute object behind an SFT wrapper, in the place of kt-kernel's C++ MoE (its
`moe` attribute). It holds the layer (packed parts, sub-pools, GPU-expert mask), the LoRA the kernels
read, and the stack of saved forwards, and makes the tasks the wrapper queues on the CPUInfer thread:
`forward_sft_task` and `backward_task`, the latter with kt-kernel's argument list (gradient buffers
as tensors, 0 for the ones not wanted).

Forward and backward run kt_ops.ops.forward_parts / backward_parts, the functions the layer's own
autograd uses; the base-weight gradients of full fine-tuning, which the kernels do not compute, come
from kt_ops.reference.base_weight_grads over the activations the forward op saved.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from ..layer import LORA_DTYPES, KTMoELayer
from ..ops import backward_parts, forward_parts, part_ranges, split_lora
from ..reference import base_weight_grads


class SFTCall:
    """One wrapper's tensors of the call in flight, kt-kernel's buffer attributes: the forward's
    inputs and output, the backward's output gradient, input gradient and routing-weight gradient,
    and which API made the forward ('spec': forward_sft; '0.7': forward / submit_forward)."""

    def __init__(self):
        self.qlen = 0
        self.form = "0.7"
        self.device = torch.device("cpu")
        self.io_dtype = torch.bfloat16
        self.input_cpu = self.expert_ids_cpu = self.weights_cpu = self.output_cpu = None
        self.grad_output_cpu = self.grad_input_cpu = self.grad_weights = None


class SavedForward(NamedTuple):
    hidden_states: torch.Tensor  # CPU, the dtype the kernels ran in
    expert_ids: torch.Tensor  # with the GPU experts' slots set to -1
    weights: torch.Tensor
    activations: List[Tuple[torch.Tensor, torch.Tensor]]  # (gate_up_pre, lora_mid) per part
    thread: int  # threading.get_ident() of the caller that submitted the forward
    form: str  # the API that made it (SFTCall.form)
    device: torch.device  # the caller's inputs' device and dtype
    dtype: torch.dtype


class StageProfile:
    """Wall time per stage of one layer's tasks, under kt-kernel's profile keys
    (`wrapper.<stage>.total_ns` / `.calls`, `wrapper.tokens`), read by kt_ops.sft.profiler. Stages:
    forward.total, backward.total and, with full fine-tuning, backward.base_weight_grad. Off unless
    KT_SFT_PROFILE=1 when the layer's weights are loaded (timing then costs two clock reads a stage)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._stats: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str, tokens: int = 0):
        if not self.enabled:
            yield
            return
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self._stats[f"wrapper.{name}.total_ns"] += time.perf_counter_ns() - start
            self._stats[f"wrapper.{name}.calls"] += 1
            self._stats["wrapper.tokens"] += tokens

    def stats(self, reset: bool) -> Dict[str, float]:
        out = {"wrapper.enabled": float(self.enabled), "wrapper.tokens": 0.0, **self._stats}
        if reset:
            self._stats.clear()
        return out

    def reset(self) -> None:
        self._stats.clear()


class SFTMoE:
    def __init__(self, layer: KTMoELayer, lora_scaling: float, max_cache_depth: int, layer_idx: Optional[int] = None):
        self.layer = layer
        self.layer_idx = layer_idx
        self.profile = StageProfile(os.environ.get("KT_SFT_PROFILE", "0") == "1")
        self.lora_scaling = lora_scaling
        self.max_cache_depth = max_cache_depth
        self.saved: List[SavedForward] = []
        self._selected: Optional[int] = None
        self._lock = threading.Lock()
        self._lora_sources: Optional[Tuple[torch.Tensor, ...]] = None
        self._lora_kernel: Optional[Tuple[torch.Tensor, ...]] = None
        self._lora_versions: Tuple[int, ...] = ()
        self._lora_parts: List[tuple] = []
        self.skip_lora_backward = False  # kt-kernel's SkipLoRA: backward through the base weights only
        self.base_weights: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # full fine-tuning
        self.logical_of: Optional[torch.Tensor] = None  # physical slot -> logical expert (base_weights' order)

    # ---- profile (kt-kernel's C++ MoE methods) ------------------------------------------------------

    def get_profile_stats(self, reset: bool = False) -> Dict[str, float]:
        stats = {"tp_count": float(len(self.layer.experts_parts)), **self.profile.stats(reset)}
        if self.layer_idx is not None:
            stats["layer_idx"] = float(self.layer_idx)
        return stats

    def reset_profile_stats(self) -> None:
        self.profile.reset()

    # ---- LoRA ------------------------------------------------------------------------------------

    def update_lora_weights(self, *lora: torch.Tensor) -> None:
        """Read these six tensors (zero copy when CPU, contiguous and of a kernel dtype; otherwise a
        copy refreshed whenever the source's version counter moves)."""
        with self._lock:
            self._lora_sources = tuple(lora)
            self._sync_lora(force=True)

    def clear_lora(self) -> None:
        with self._lock:
            self._lora_sources = self._lora_kernel = None
            self._lora_parts = []

    def _sync_lora(self, force: bool) -> None:
        sources = self._lora_sources
        versions = tuple(t._version for t in sources)
        if not force and versions == self._lora_versions:
            return
        kernel = []
        for i, source in enumerate(sources):
            source = source.detach()
            if source.device.type == "cpu" and source.is_contiguous() and source.dtype in LORA_DTYPES:
                kernel.append(source)
                continue
            dtype = source.dtype if source.dtype in LORA_DTYPES else torch.float32
            previous = self._lora_kernel[i] if self._lora_kernel is not None else None
            if previous is not None and previous.dtype == dtype and previous.shape == source.shape:
                kernel.append(previous.copy_(source))
            else:
                kernel.append(source.to("cpu", dtype).contiguous())
        self._lora_kernel = tuple(kernel)
        self._lora_versions = versions
        self._lora_parts = split_lora(self._lora_kernel, self.layer.split)

    def lora_parts(self) -> Optional[List[tuple]]:
        """The LoRA of each part as the kernels read it now (None without LoRA)."""
        with self._lock:
            if self._lora_sources is None:
                return None
            self._sync_lora(force=False)
            return self._lora_parts

    @property
    def lora_kernel(self) -> Optional[Tuple[torch.Tensor, ...]]:
        return self._lora_kernel

    # ---- forward ---------------------------------------------------------------------------------

    def forward_sft_task(self, call: SFTCall, save_for_backward: bool, use_lora: bool, thread: int):
        """The task computing call's output (kept for backward when save_for_backward)."""

        tokens = call.qlen

        def task():
            with self.profile.stage("forward.total", tokens):
                compute()

        def compute():
            lora_parts = self.lora_parts() if use_lora else None
            x, output, activations = forward_parts(
                call.input_cpu,
                call.expert_ids_cpu,
                call.weights_cpu,
                self.layer.experts_parts,
                lora_parts,
                self.lora_scaling,
                save_for_backward,
                self.layer.subpools,
            )
            call.output_cpu = output.to(call.io_dtype)
            if save_for_backward:
                with self._lock:
                    self.saved.append(
                        SavedForward(
                            x,
                            call.expert_ids_cpu,
                            call.weights_cpu,
                            activations,
                            thread,
                            call.form,
                            call.device,
                            call.io_dtype,
                        )
                    )

        return task

    # ---- backward --------------------------------------------------------------------------------

    def select_backward(self, cache_idx: Optional[int]) -> SavedForward:
        """Choose the saved forward the next backward_task consumes: `cache_idx`, else the latest
        (when forwards of several threads are saved, the calling thread's latest, since another
        thread's activations would give it wrong gradients silently)."""
        with self._lock:
            if not self.saved:
                raise RuntimeError("No forward cache available. Call forward(save_for_backward=True) first.")
            if cache_idx is None:
                cache_idx = self._latest_index()
            if isinstance(cache_idx, bool) or not isinstance(cache_idx, int) or not 0 <= cache_idx < len(self.saved):
                raise RuntimeError(
                    f"Invalid cache index {cache_idx!r}: {len(self.saved)} forward(s) are cached "
                    f"(valid: 0..{len(self.saved) - 1})"
                )
            self._selected = cache_idx
            return self.saved[cache_idx]

    def _latest_index(self) -> int:
        if len({saved.thread for saved in self.saved}) == 1:
            return len(self.saved) - 1
        me = threading.get_ident()
        mine = [i for i, saved in enumerate(self.saved) if saved.thread == me]
        if not mine:
            raise RuntimeError(
                f"backward() without cache_idx is ambiguous: the {len(self.saved)} cached forwards come "
                "from several other threads and none from this one; pass cache_idx to say which "
                "forward this gradient belongs to"
            )
        return mine[-1]

    def _take_selected(self) -> SavedForward:
        with self._lock:
            index = len(self.saved) - 1 if self._selected is None else self._selected
            self._selected = None
            return self.saved.pop(index)

    def backward_task(
        self,
        grad_output: torch.Tensor,
        grad_input: torch.Tensor,
        grad_gate_lora_a,
        grad_gate_lora_b,
        grad_up_lora_a,
        grad_up_lora_b,
        grad_down_lora_a,
        grad_down_lora_b,
        grad_weights: torch.Tensor,
        grad_gate_proj=0,
        grad_up_proj=0,
        grad_down_proj=0,
        accumulate_optimizer_grads: bool = False,
        optimizer_grad_scale: float = 1.0,
    ):
        """The task computing the gradients of the selected saved forward (kt-kernel's argument
        list): grad_input and grad_weights are written, and each gradient buffer given (0: not
        wanted) is overwritten, or added to with accumulate_optimizer_grads, scaled by
        optimizer_grad_scale."""
        lora_buffers = (grad_gate_lora_a, grad_gate_lora_b, grad_up_lora_a, grad_up_lora_b, grad_down_lora_a)
        lora_buffers += (grad_down_lora_b,)
        base_buffers = (grad_gate_proj, grad_up_proj, grad_down_proj)
        want_lora = any(isinstance(t, torch.Tensor) for t in lora_buffers)
        want_base = any(isinstance(t, torch.Tensor) for t in base_buffers)
        scale, accumulate = float(optimizer_grad_scale), bool(accumulate_optimizer_grads)

        def write(buffer, value):
            if not isinstance(buffer, torch.Tensor):
                return
            value = value * scale if scale != 1.0 else value
            buffer.add_(value) if accumulate else buffer.copy_(value)

        def task():
            with self.profile.stage("backward.total"):
                compute()

        def compute():
            saved = self._take_selected()
            grad = grad_output.to(saved.hidden_states.dtype)
            lora_parts = self.lora_parts()
            grad_x, grad_w, lora_grads = self._backward(grad, saved, lora_parts, want_lora)
            grad_input.copy_(grad_x)
            grad_weights.copy_(grad_w)
            for buffer, value in zip(lora_buffers, lora_grads or ()):
                write(buffer, value)
            if want_base:
                with self.profile.stage("backward.base_weight_grad"):
                    for buffer, value in zip(base_buffers, self._base_grads(grad, saved, lora_parts)):
                        write(buffer, value)

        return task

    def _backward(self, grad, saved: SavedForward, lora_parts, want_lora: bool):
        activations = saved.activations
        if self.skip_lora_backward:
            # kt-kernel's SkipLoRA: the forward ran with LoRA, the gradient flows back through the
            # base weights only (the saved pre-activations stay the LoRA forward's) and no LoRA
            # gradient is computed.
            lora_parts, want_lora = None, False
            activations = [(pre, mid[..., :0]) for pre, mid in activations]
        return backward_parts(
            grad,
            saved.hidden_states,
            saved.expert_ids,
            saved.weights,
            self.layer.experts_parts,
            lora_parts,
            self.lora_scaling,
            activations,
            self.layer.subpools,
            lora_grads=want_lora,
        )

    def _base_grads(self, grad, saved: SavedForward, lora_parts) -> List[torch.Tensor]:
        """dW of gate/up/down in the order of `base_weights` (logical experts)."""
        _, _, down = self.base_weights
        physical_down = down[self.logical_of]
        E, H, I = physical_down.shape
        grads = [torch.zeros((E, I, H)), torch.zeros((E, I, H)), torch.zeros((E, H, I))]
        for p, (lo, hi) in enumerate(part_ranges(self.layer.experts_parts)):
            experts = self.layer.experts_parts[p]
            dg, du, dd = base_weight_grads(
                grad,
                saved.hidden_states,
                saved.expert_ids,
                saved.weights,
                saved.activations[p][0],
                physical_down[:, :, lo:hi],
                None if lora_parts is None else (lora_parts[p][4], lora_parts[p][5]),
                self.lora_scaling,
                experts.activation,
                experts.swiglu_alpha,
                experts.swiglu_limit,
            )
            grads[0][:, lo:hi] = dg
            grads[1][:, lo:hi] = du
            grads[2][:, :, lo:hi] = dd
        logical = []
        for physical in grads:
            out = torch.empty_like(physical)
            out[self.logical_of] = physical  # physical slot e holds logical expert logical_of[e]
            logical.append(out)
        return logical
