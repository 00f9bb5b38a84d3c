"""The SFT-mode wrapper base: kt-kernel's forward_sft / backward / LoRA-by-reference protocol over a
KTMoELayer (its packed parts, sub-pools and GPU-expert routing), with a stack of saved forwards
(`max_cache_depth`). forward_sft and backward run the layer's parts through
kt_ops.ops.forward_parts / backward_parts, the functions the layer's own autograd uses."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import ClassVar, Dict, List, NamedTuple, Optional, Tuple

import torch

from ..core.checks import check_has_data, check_int, check_number
from ..core.formats import LORA_NAMES, lora_shapes
from ..core.host import to_host
from ..layer import LORA_DTYPES, KTMoELayer
from ..ops import backward_parts, forward_parts, split_lora
from .base import _MoEBase


class KExpertsSFTBuffer:
    """Host staging for one (qlen, sizes, dtype) combination, shared by every SFT wrapper of those
    sizes. Staging tensors (pinned when CUDA is available, so device copies can overlap) are
    allocated on first use: inputs already on the CPU never need them. The LoRA gradients of the
    latest backward are kept by reference (no copy)."""

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
        self._lora_grads = grads

    def get_lora_grads(self) -> Dict[str, torch.Tensor]:
        """The six LoRA gradients of the latest backward at these sizes."""
        if self._lora_grads is None:
            raise RuntimeError("no backward has run with this buffer yet, so it holds no LoRA gradients")
        return dict(self._lora_grads)


class _SavedForward(NamedTuple):
    hidden_states: torch.Tensor  # CPU, the dtype the kernels ran in
    expert_ids: torch.Tensor
    weights: torch.Tensor
    activations: List[Tuple[torch.Tensor, torch.Tensor]]  # (gate_up_pre, lora_mid) per sub-pool part
    device: torch.device
    dtype: torch.dtype
    thread: int  # threading.get_ident() of the forward's caller


class BaseSFTMoEWrapper(_MoEBase, ABC):
    """SFT-mode MoE experts with LoRA on gate/up/down.

    Expert ids given to forward_sft are physical slots; LoRA tensors are indexed by the same slots.
    Slots below `num_gpu_experts` belong to experts the caller runs on its GPU: they are skipped here
    (no output, zero gradient), as in inference mode.
    LoRA tensors given to init_lora_weights that are CPU, contiguous and bf16/fp32/fp64 are used in
    place (zero copy): an optimizer updating them in place changes the next forward. Others are
    converted once into a CPU copy, which every forward refreshes when the source tensor's version
    counter moved, and update_lora_weights() refreshes unconditionally; nothing goes stale silently.
    """

    def __init__(
        self,
        layer_idx: int,
        num_experts: int,
        num_experts_per_tok: int,
        hidden_size: int,
        moe_intermediate_size: int,
        num_gpu_experts: int,
        cpuinfer_threads: int,
        threadpool_count: int,
        weight_path: Optional[str],
        chunked_prefill_size: int,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        max_cache_depth: int = 1,
    ):
        self._validate_sft_config(lora_rank, lora_alpha, max_cache_depth)
        self._init_common(
            layer_idx,
            num_experts,
            num_experts_per_tok,
            hidden_size,
            moe_intermediate_size,
            num_gpu_experts,
            cpuinfer_threads,
            threadpool_count,
            weight_path,
            chunked_prefill_size,
        )
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha)
        self.lora_scaling = self.lora_alpha / lora_rank
        self.max_cache_depth = max_cache_depth
        for name in LORA_NAMES:
            setattr(self, name, None)
        self.layer: Optional[KTMoELayer] = None  # made by the subclass, which knows the weight format
        self._lora_kernel: Optional[Tuple[torch.Tensor, ...]] = None
        self._lora_versions: Tuple[int, ...] = ()
        self._lora_parts: List[Tuple[torch.Tensor, ...]] = []
        self._cache: List[_SavedForward] = []
        self._state_lock = threading.Lock()
        # SkipLoRA methods: the frozen base only (no LoRA terms, no LoRA gradients, no init_lora_weights).
        self.skip_lora = False

    @staticmethod
    def _validate_sft_config(lora_rank: int, lora_alpha: float, max_cache_depth: int) -> None:
        check_int(lora_rank, "lora_rank", 1)
        check_number(lora_alpha, "lora_alpha", positive=True)
        check_int(max_cache_depth, "max_cache_depth", 1)

    # ---- state -----------------------------------------------------------------------------------

    @property
    def _weights_loaded(self) -> bool:
        return self.layer is not None and bool(self.layer.experts_parts)

    @property
    def _lora_initialized(self) -> bool:
        return self._lora_kernel is not None

    @property
    def _cache_depth(self) -> int:
        return len(self._cache)

    @abstractmethod
    def load_weights(self, physical_to_logical_map_cpu: torch.Tensor) -> None: ...

    # ---- LoRA --------------------------------------------------------------------------------------

    def _lora_shapes(self) -> Tuple[Tuple[int, ...], ...]:
        return lora_shapes(self.num_experts, self.hidden_size, self.moe_intermediate_size, self.lora_rank)

    def init_lora_weights(
        self,
        gate_lora_a: torch.Tensor,
        gate_lora_b: torch.Tensor,
        up_lora_a: torch.Tensor,
        up_lora_b: torch.Tensor,
        down_lora_a: torch.Tensor,
        down_lora_b: torch.Tensor,
    ) -> None:
        """Keep references to the six LoRA tensors (shapes: kt_ops.core.formats.lora_shapes)."""
        sources = (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
        for name, tensor, shape in zip(LORA_NAMES, sources, self._lora_shapes()):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} shape mismatch: expected {shape}, got {tuple(tensor.shape)}")
        with self._state_lock:
            for name, tensor in zip(LORA_NAMES, sources):
                setattr(self, name, tensor)
            self._sync_lora(force=True)

    def update_lora_weights(self) -> None:
        """Re-read the LoRA tensors (after an optimizer step, or after rebinding the attributes)."""
        if not self._lora_initialized:
            raise RuntimeError("LoRA weights not initialized. Call init_lora_weights() first.")
        self.init_lora_weights(*(getattr(self, name) for name in LORA_NAMES))

    def _sync_lora(self, force: bool) -> None:
        sources = tuple(getattr(self, name) for name in LORA_NAMES)
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
            if (
                previous is not None
                and previous.dtype == dtype
                and previous.shape == source.shape
                and previous.data_ptr() != source.data_ptr()
            ):
                kernel.append(previous.copy_(source))
            else:
                kernel.append(source.to("cpu", dtype).contiguous())
        self._lora_kernel = tuple(kernel)
        self._lora_versions = versions
        self._lora_parts = split_lora(self._lora_kernel, self.split)

    # ---- compute -----------------------------------------------------------------------------------

    def _staged(self, tensor: torch.Tensor, buffer_name: str, qlen: int, dtype: torch.dtype):
        """`tensor` on the CPU; device tensors go through the (pinned) staging buffer."""
        if tensor.device.type == "cpu":
            return tensor
        buffer = KExpertsSFTBuffer.get_buffer(
            qlen,
            self.hidden_size,
            self.moe_intermediate_size,
            self.num_experts,
            self.num_experts_per_tok,
            self.lora_rank,
            dtype,
        )
        return to_host(tensor, getattr(buffer, buffer_name))

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

    def forward_sft(
        self,
        hidden_states: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        save_for_backward: bool = True,
    ) -> torch.Tensor:
        """[qlen, H] -> [qlen, H] on hidden_states' device. With save_for_backward the activations
        are pushed on the cache stack that backward() pops."""
        if not self._weights_loaded:
            raise RuntimeError("Weights not loaded. Call load_weights() first.")
        if save_for_backward and not self._lora_initialized and not self.skip_lora:
            raise RuntimeError(
                "LoRA weights not initialized. Call init_lora_weights() first, or set save_for_backward=False."
            )
        self.check_tokens(hidden_states, expert_ids, weights)
        with self._state_lock:
            if save_for_backward and len(self._cache) >= self.max_cache_depth:
                raise RuntimeError(
                    f"Forward cache full (depth={len(self._cache)}, max={self.max_cache_depth}). "
                    "Call backward() to free cache slots, or raise max_cache_depth."
                )
            qlen, device, dtype = hidden_states.shape[0], hidden_states.device, hidden_states.dtype
            x = self._staged(hidden_states, "input_cpu", qlen, dtype)
            ids = self._staged(expert_ids, "expert_ids_cpu", qlen, dtype)
            w = self._staged(weights, "weights_cpu", qlen, dtype)
            ids = self.layer.held_ids(ids)
            if save_for_backward and x is not hidden_states:
                x, ids, w = x.clone(), ids.clone(), w.clone()  # staging is reused by the next call
            lora_parts = None
            if self._lora_initialized and not self.skip_lora:
                self._sync_lora(force=False)
                lora_parts = self._lora_parts
            x, output, activations = forward_parts(
                x,
                ids,
                w,
                self.layer.experts_parts,
                lora_parts,
                self.lora_scaling,
                save_for_backward,
                self.layer.subpools,
            )
            if save_for_backward:
                self._cache.append(_SavedForward(x, ids, w, activations, device, dtype, threading.get_ident()))
        return output.to(device=device, dtype=dtype)

    def backward(
        self, grad_output: torch.Tensor, cache_idx: Optional[int] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Gradients of the saved forward `cache_idx` (default: the most recent; with forwards cached
        from several threads, the most recent of the calling thread), which is consumed.
        Returns (grad_input, grads): grads holds grad_{gate,up,down}_lora_{a,b} and `grad_weights`,
        the gradient of the routing weights [qlen, num_experts_per_tok] (float32). SkipLoRA methods
        return only `grad_weights` in grads."""
        if not self._lora_initialized and not self.skip_lora:
            raise RuntimeError("LoRA weights not initialized. Call init_lora_weights() first.")
        if not isinstance(grad_output, torch.Tensor):
            raise TypeError(f"grad_output must be a torch.Tensor, got {type(grad_output).__name__}")
        with self._state_lock:
            if not self._cache:
                raise RuntimeError("No forward cache available. Call forward_sft() with save_for_backward=True first.")
            if cache_idx is None:
                cache_idx = self._latest_forward_index()
            if isinstance(cache_idx, bool) or not isinstance(cache_idx, int) or not 0 <= cache_idx < len(self._cache):
                raise RuntimeError(
                    f"Invalid cache index {cache_idx!r}: {len(self._cache)} forward(s) are cached "
                    f"(valid: 0..{len(self._cache) - 1})"
                )
            saved = self._cache[cache_idx]
            qlen = saved.hidden_states.shape[0]
            if tuple(grad_output.shape) != (qlen, self.hidden_size):
                raise ValueError(
                    f"grad_output must have shape {(qlen, self.hidden_size)} to match the cached forward, "
                    f"got {tuple(grad_output.shape)}"
                )
            del self._cache[cache_idx]
            grad = self._staged(grad_output, "grad_output_cpu", qlen, grad_output.dtype)
            grad = grad.to(saved.hidden_states.dtype)
            lora_parts = None
            if not self.skip_lora:
                self._sync_lora(force=False)
                lora_parts = self._lora_parts
            grad_input, grad_weights, lora_grads = backward_parts(
                grad,
                saved.hidden_states,
                saved.expert_ids,
                saved.weights,
                self.layer.experts_parts,
                lora_parts,
                self.lora_scaling,
                saved.activations,
                self.layer.subpools,
            )
            if self.skip_lora:
                return grad_input.to(device=saved.device, dtype=saved.dtype), {"grad_weights": grad_weights.float()}
            grads = {f"grad_{name}": g.to(getattr(self, name).dtype) for name, g in zip(LORA_NAMES, lora_grads)}
            KExpertsSFTBuffer.get_buffer(
                qlen,
                self.hidden_size,
                self.moe_intermediate_size,
                self.num_experts,
                self.num_experts_per_tok,
                self.lora_rank,
                saved.dtype,
            ).set_lora_grads(dict(grads))
            grads["grad_weights"] = grad_weights.float()
        return grad_input.to(device=saved.device, dtype=saved.dtype), grads

    def _latest_forward_index(self) -> int:
        """The saved forward a backward without cache_idx consumes: the most recent one, or, when
        several threads have forwards cached (one wrapper shared by threads), the most recent one
        this thread saved; another thread's activations would give it wrong gradients silently."""
        if len({saved.thread for saved in self._cache}) == 1:
            return len(self._cache) - 1
        me = threading.get_ident()
        mine = [i for i, saved in enumerate(self._cache) if saved.thread == me]
        if not mine:
            raise RuntimeError(
                f"backward() without cache_idx is ambiguous: the {len(self._cache)} cached forwards come "
                "from several other threads and none from this one; pass cache_idx to say which "
                "forward this gradient belongs to"
            )
        return mine[-1]

    def clear_cache(self) -> None:
        """Drop every saved forward (e.g. after an aborted step)."""
        with self._state_lock:
            self._cache.clear()

    # ---- inference-only methods ------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        raise RuntimeError("forward() is not available in SFT mode. Use forward_sft() instead.")

    def submit_forward(self, *args, **kwargs):
        raise RuntimeError("submit_forward() is not available in SFT mode. SFT mode uses synchronous forward_sft().")

    def sync_forward(self, *args, **kwargs):
        raise RuntimeError("sync_forward() is not available in SFT mode.")

    def select_deferred_experts(self, *args, **kwargs):
        raise RuntimeError("select_deferred_experts() is not available in SFT mode.")
