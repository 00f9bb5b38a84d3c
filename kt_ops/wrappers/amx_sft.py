"""AMXSFTMoEWrapper: every SFT method (kt_ops.core.formats.SFT_METHODS and their *_SFT_SkipLoRA
variants) on the kt_ops kernels. The name is kept for compatibility; the kernels run on any x86 CPU
(AMX, AVX-512, AVX2 or the reference), chosen at run time.

SkipLoRA is kt-kernel's: the forward runs with the LoRA, the backward's grad_input flows through the
base weights only, and the six LoRA gradients stay zero."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional, Sequence

import torch

from ..core.formats import (
    CHECKPOINT_SFT_METHODS,
    LORA_NAMES,
    SFT_METHOD_FORMATS,
    SFT_METHODS,
    SKIP_LORA_METHODS,
    SKIP_LORA_SUFFIX,
)
from ..core.packed import check_expert_map, pack_split, resplit_packed
from ..weights.ktransformers import KTWeightDirectory, is_kt_directory, load_kt_layer_parts
from ..weights.loaders import BF16SafeTensorLoader, SafeTensorLoader
from ..weights.native import NativeCheckpoint
from .sft import BaseSFTMoEWrapper
from .sft_lora import LoRAByReference
from .sft_native import NativeWeights
from .sft_buffer import KExpertsSFTBuffer
from .sft_moe import SFTMoE
from .sft_state import supports_authoritative_optimizer_grads


class AMXSFTMoEWrapper(LoRAByReference, NativeWeights, BaseSFTMoEWrapper):
    SUPPORTED_METHODS = frozenset(SFT_METHODS + SKIP_LORA_METHODS + tuple(CHECKPOINT_SFT_METHODS))

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
        method: str = "AMXBF16_SFT",
        group_size: int = 128,
        zero_point: bool = True,
        full_weight_grad: bool = False,
        swiglu_limit: float = 0.0,
        *,
        swiglu_alpha: float = 0.0,
        gpu_experts_mask: Optional[torch.Tensor] = None,
        numa_nodes: Optional[Sequence[int]] = None,
    ):
        if method not in self.SUPPORTED_METHODS:
            raise ValueError(f"Unsupported method: {method!r}. Supported methods: {sorted(self.SUPPORTED_METHODS)}")
        weight_format = SFT_METHOD_FORMATS[method.removesuffix(SKIP_LORA_SUFFIX)]
        if full_weight_grad and (weight_format != "bf16" or method.endswith(SKIP_LORA_SUFFIX)):
            raise ValueError(
                f"full_weight_grad trains the base weights, which needs them in bf16: use method AMXBF16_SFT, "
                f"not {method}"
            )
        super().__init__(
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
            lora_rank,
            lora_alpha,
            lora_dropout,
            max_cache_depth,
            full_weight_grad,
            gpu_experts_mask=gpu_experts_mask,
            numa_nodes=numa_nodes,
            swiglu_limit=swiglu_limit,
            swiglu_alpha=swiglu_alpha,
        )
        self.method = method
        self._is_skip_lora = method.endswith(SKIP_LORA_SUFFIX)
        self.weight_format = weight_format
        if method in ("RAWINT4_SFT", "MXFP4_SFT"):
            # the checkpoint's groups of 32 along K, in every part of a split layer too
            group_size, zero_point = 32, False
            for name, size in (("hidden_size", hidden_size), ("moe_intermediate_size", moe_intermediate_size)):
                if size % (32 * (threadpool_count if name != "hidden_size" else 1)):
                    raise ValueError(f"{method} requires {name} ({size}) divisible by 32 in every sub-pool part")
        self._uses_authoritative_optimizer_grads = supports_authoritative_optimizer_grads(
            method, self.num_gpu_experts, full_weight_grad=self._full_weight_grad, lora_rank=lora_rank
        )
        # zero_point is kt-kernel's switch for the K-group family; the method name already says
        # which variant (AMXINT4_KGroup_SFT symmetric, AMXINT4_1KGroup_SFT with zero point), so it
        # is recorded, not second-guessed.
        self.group_size = group_size
        self.zero_point = zero_point
        self._make_layer(weight_format, group_size)
        self.gate_proj = self.up_proj = self.down_proj = None
        self.physical_to_logical_map = torch.arange(num_experts)
        self._lora_form: Optional[str] = None
        self._state_lock = threading.RLock()

    @property
    def skip_lora(self) -> bool:
        return self._is_skip_lora

    def _locked(self):
        lock = getattr(self, "_state_lock", None)
        return lock if lock is not None else contextlib.nullcontext()

    # ---- weights ---------------------------------------------------------------------------------

    def load_weights_from_tensors(
        self,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        physical_to_logical_map_cpu: Optional[torch.Tensor] = None,
    ) -> None:
        """Base weights [E, I, H], [E, I, H], [E, H, I] indexed by logical expert (bf16, fp16 or fp32;
        quantized online). With a map the weights are packed now and a later load_weights(map) does
        nothing; without one, load_weights(map) packs them (the specification's tensor mode)."""
        if self.method == "MXFP4_SFT":
            raise ValueError(
                "MXFP4_SFT accepts native packed E2M1 weights and UE8M0 scales only; use load_mxfp4_weights()"
            )
        E, H, I = self.num_experts, self.hidden_size, self.moe_intermediate_size
        for name, t, shape in (
            ("gate_proj", gate_proj, (E, I, H)),
            ("up_proj", up_proj, (E, I, H)),
            ("down_proj", down_proj, (E, H, I)),
        ):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} (num_experts, ...), got {tuple(t.shape)}")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        if physical_to_logical_map_cpu is not None:
            self.load_weights(physical_to_logical_map_cpu)

    def load_weights(self, physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Pack the tensors given to load_weights_from_tensors, or load layer `layer_idx` from
        `weight_path`: a HuggingFace bf16 checkpoint for AMXBF16_SFT (base key model.layers.{L}), the
        pre-quantized form written by `python -m kt_ops.convert_weights` or a KTransformers INT8/INT4
        conversion (blk.{L}) otherwise. No map means identity. Once weights are loaded (tensors packed
        or a file read) this does nothing, as in kt-kernel: load_weights_from_tensors(..., map)
        followed by load_weights(map) loads once. With full_weight_grad the tensors stay referenced
        (gate_proj, up_proj, down_proj) for init_full_weight_grad_buffers."""
        if physical_to_logical_map_cpu is None:
            physical_to_logical_map_cpu = torch.arange(self.num_experts)
        mapping = check_expert_map(physical_to_logical_map_cpu, self.num_experts)
        if self._weights_loaded and self.gate_proj is None:
            return
        if self.gate_proj is not None:
            parts = pack_split(
                self.gate_proj, self.up_proj, self.down_proj, self.weight_format, self.group_size, self.split
            )
            if not self._full_weight_grad:  # the packed copy is the only one kept
                self.gate_proj = self.up_proj = self.down_proj = None
        elif self.weight_path:
            parts = self._load_base_weights_from_file()
        else:
            raise RuntimeError(
                "weight_path is not set and no tensors were given: call load_weights_from_tensors() "
                "first, or create the wrapper with weight_path"
            )
        self._install(parts, mapping)

    def _install(self, parts, mapping: torch.Tensor) -> None:
        """Use the packed `parts` (logical experts) in `mapping`'s physical order, with a fresh moe."""
        self._set_parts(parts, mapping)
        self.physical_to_logical_map = mapping
        self.moe = SFTMoE(self.layer, self.lora_scaling, self.max_cache_depth, self.layer_idx)
        self.moe.skip_lora_backward = self._is_skip_lora
        self.moe.logical_of = mapping
        self._cache_depth = 0
        self._weights_loaded = True
        if self._lora_initialized:
            self.update_lora_weights()

    def _load_base_weights_from_file(self):
        method = self.method.removesuffix(SKIP_LORA_SUFFIX)
        fmt = SFT_METHOD_FORMATS[method]
        prequantized = fmt != "bf16" and self.layer_idx in _prequantized_layers(self.weight_path)
        if method in _CHECKPOINT_LAYOUTS and not prequantized:
            # the model's own checkpoint, its codes kept as they are (kt-kernel reads only MXFP4 so)
            checkpoint = NativeCheckpoint(self.weight_path, _CHECKPOINT_LAYOUTS[method])
            E, H, I = self.num_experts, self.hidden_size, self.moe_intermediate_size
            return checkpoint.load_layer(self.layer_idx, E, H, I, self.split, self.group_size, weight_format=fmt)
        if fmt != "bf16" and not prequantized:
            raise RuntimeError(
                f"{self.method} reads layer {self.layer_idx} from pre-quantized .kt files (a KTransformers "
                f"conversion: _layer_{{L}}/_numa_{{N}}/*.kt or blk.{{L}}.* safetensors) or kt_ops' converted "
                f"files (python -m kt_ops.convert_weights --method {self.method}); {self.weight_path} has neither "
                "for this layer"
            )
        shape = (self.num_experts, self.hidden_size, self.moe_intermediate_size)
        kt_parts = load_kt_layer_parts(self.weight_path, self.layer_idx, fmt, self.split, self.group_size, shape)
        if kt_parts is not None:
            return kt_parts
        if fmt == "bf16":
            loader = BF16SafeTensorLoader(self.weight_path)
            gate, up, down = loader.load_stacked(f"model.layers.{self.layer_idx}")
            self._check_loaded_shapes(gate, up, down)
            if self._full_weight_grad:
                self.gate_proj, self.up_proj, self.down_proj = gate, up, down
            return pack_split(gate, up, down, fmt, self.group_size, self.split)
        experts = SafeTensorLoader(self.weight_path).load_packed(self.layer_idx)
        if experts.weight_format != fmt:
            raise ValueError(
                f"{self.weight_path} holds layer {self.layer_idx} as {experts.weight_format}, but method "
                f"{self.method} needs {fmt}; convert with python -m kt_ops.convert_weights --method {self.method}"
            )
        got = (experts.num_experts, experts.hidden_size, experts.intermediate_size)
        if got != shape:
            raise ValueError(
                f"{self.weight_path}: layer {self.layer_idx} has (num_experts, hidden_size, "
                f"intermediate_size) = {got}, the wrapper was built for {shape}"
            )
        return resplit_packed(experts, self.group_size, self.split)

    def _check_loaded_shapes(self, gate, up, down) -> None:
        E, H, I = self.num_experts, self.hidden_size, self.moe_intermediate_size
        if tuple(gate.shape) != (E, I, H) or tuple(down.shape) != (E, H, I):
            raise ValueError(
                f"{self.weight_path}: layer {self.layer_idx} has experts gate {tuple(gate.shape)}, down "
                f"{tuple(down.shape)}; the wrapper was built for gate {(E, I, H)}, down {(E, H, I)}"
            )

    def update_base_weights(self) -> None:
        """Repack the base weights from gate_proj_buf / up_proj_buf / down_proj_buf (full
        fine-tuning, after an optimizer step); a no-op in LoRA mode."""
        if not self._weights_loaded:
            raise RuntimeError("Weights not loaded. Call load_weights() first.")
        if not self._full_weight_grad:
            return
        if self.gate_proj_buf is None:
            raise RuntimeError("Base weight buffers not initialized. Call init_full_weight_grad_buffers() first.")
        with self._locked():
            parts = pack_split(
                self.gate_proj_buf.detach(),
                self.up_proj_buf.detach(),
                self.down_proj_buf.detach(),
                self.weight_format,
                self.group_size,
                self.split,
            )
            self._set_parts(parts, self.physical_to_logical_map)
            self._base_weights_dirty = False

    def init_full_weight_grad_buffers(self, gate_proj, up_proj, down_proj) -> None:
        super().init_full_weight_grad_buffers(gate_proj, up_proj, down_proj)
        # the Parameters are now the base weights; the tensors they were made from are not needed
        self.gate_proj = self.up_proj = self.down_proj = None

    # ---- tasks (kt-kernel's task construction) ----------------------------------------------------

    def _make_forward_task(self, buffer, save_for_backward: bool):
        if save_for_backward and self._cache_depth >= self.max_cache_depth:
            raise RuntimeError(
                f"Forward cache full (depth={self._cache_depth}, max={self.max_cache_depth}). "
                "Call backward() to free cache slots, or raise max_cache_depth."
            )
        if self._full_weight_grad and self._base_weights_dirty:
            self.update_base_weights()
        return self.moe.forward_sft_task(buffer, save_for_backward, self._lora_initialized, threading.get_ident())

    def _make_backward_task(self, buffer, accumulate_optimizer_grads: bool = False, optimizer_grad_scale: float = 1.0):
        if self._is_skip_lora:
            return self.moe.backward_task(
                buffer.grad_output_cpu, buffer.grad_input_cpu, 0, 0, 0, 0, 0, 0, buffer.grad_weights, 0, 0, 0
            )
        full = self._full_weight_grad
        if full and getattr(self, "gate_proj_buf", None) is not None and hasattr(self.moe, "base_weights"):
            self.moe.base_weights = (
                self.gate_proj_buf.detach(),
                self.up_proj_buf.detach(),
                self.down_proj_buf.detach(),
            )
        args = (
            buffer.grad_output_cpu,
            buffer.grad_input_cpu,
            *(getattr(self, f"grad_{name}") if self.lora_rank > 0 else 0 for name in LORA_NAMES),
            buffer.grad_weights,
            *(
                getattr(self, name) if full and getattr(self, name) is not None else 0
                for name in ("grad_gate_proj_buf", "grad_up_proj_buf", "grad_down_proj_buf")
            ),
        )
        if self._uses_authoritative_optimizer_grads or accumulate_optimizer_grads or optimizer_grad_scale != 1.0:
            return self.moe.backward_task(*args, bool(accumulate_optimizer_grads), float(optimizer_grad_scale))
        return self.moe.backward_task(*args)

    # ---- compute (one caller at a time per wrapper) -----------------------------------------------

    def forward(self, hidden_states, expert_ids, weights, save_for_backward=True, output_device=None):
        with self._locked():
            return super().forward(hidden_states, expert_ids, weights, save_for_backward, output_device)

    def forward_sft(
        self,
        hidden_states: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        save_for_backward: bool = True,
    ) -> torch.Tensor:
        """The specification's forward: [qlen, H] -> [qlen, H] on hidden_states' device and in its
        dtype; with save_for_backward the forward is kept for backward(), which then answers in
        the specification's form. Without LoRA initialized (and without saving) the base alone runs."""
        if not self._weights_loaded:
            raise RuntimeError("Weights not loaded. Call load_weights() first.")
        if save_for_backward and not self._lora_initialized and not self._is_skip_lora and self.lora_rank > 0:
            raise RuntimeError(
                "LoRA weights not initialized. Call init_lora_weights() first, or set save_for_backward=False."
            )
        self.check_tokens(hidden_states, expert_ids, weights)
        with self._locked():
            qlen = hidden_states.shape[0]
            buffer = self._get_buffer(qlen)
            self._copy_inputs_to_buffer(buffer, hidden_states, expert_ids, weights, qlen)
            buffer.form = "spec"
            self.cpu_infer.submit(self._make_forward_task(buffer, save_for_backward))
            self.cpu_infer.sync()
            if save_for_backward:
                self._cache_depth += 1
            return buffer.output_cpu.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def _select_backward(self, grad_output, cache_idx) -> None:
        if self.lora_rank > 0 and not self._lora_initialized and not self._is_skip_lora:
            raise RuntimeError("LoRA weights not initialized. Call init_lora_weights() first.")
        if not isinstance(grad_output, torch.Tensor):
            raise TypeError(f"grad_output must be a torch.Tensor, got {type(grad_output).__name__}")
        if self.moe is None:
            raise RuntimeError("No forward cache available. Call forward(save_for_backward=True) first.")
        saved = self.moe.select_backward(cache_idx)
        if tuple(grad_output.shape) != (saved.hidden_states.shape[0], self.hidden_size):
            raise ValueError(
                f"grad_output must have shape {(saved.hidden_states.shape[0], self.hidden_size)} to match the "
                f"cached forward, got {tuple(grad_output.shape)}"
            )
        call = self._get_buffer(grad_output.shape[0])
        call.form, call.device, call.io_dtype = saved.form, saved.device, saved.dtype

    def backward(self, grad_output, output_device=None, optimizer_grad_scale=1.0, cache_idx: Optional[int] = None):
        """kt-kernel 0.7's backward (see BaseSFTMoEWrapper.backward); `cache_idx` picks an older saved
        forward (default: the latest, or the calling thread's latest when several threads saved
        some)."""
        with self._locked():
            self._select_backward(grad_output, cache_idx)
            return super().backward(grad_output, output_device, optimizer_grad_scale)

    def submit_backward_async(self, grad_output, output_device=None, optimizer_grad_scale=1.0):
        with self._locked():
            self._select_backward(grad_output, None)
            return super().submit_backward_async(grad_output, output_device, optimizer_grad_scale)

    def _return_grads(self, buffer, qlen, output_device):
        grad_input, grad_weights = super()._return_grads(buffer, qlen, output_device)
        if buffer.form != "spec":
            return grad_input, grad_weights
        # the specification's form: grad_input on the forward's device and in its dtype, the six
        # LoRA gradient tensors by reference, and the routing weights' gradient
        grads = {f"grad_{name}": getattr(self, f"grad_{name}") for name in LORA_NAMES}
        if any(g is None for g in grads.values()):  # SkipLoRA without init_lora_weights
            grads = {f"grad_{n}": torch.zeros(s) for n, s in zip(LORA_NAMES, self._lora_shapes())}
        KExpertsSFTBuffer.get_buffer(
            qlen,
            self.hidden_size,
            self.moe_intermediate_size,
            self.num_experts,
            self.num_experts_per_tok,
            self.lora_rank,
            buffer.io_dtype,
        ).set_lora_grads(grads)
        grads["grad_weights"] = grad_weights
        return grad_input.to(device=buffer.device, dtype=buffer.io_dtype), grads


# SFT method -> NativeCheckpoint layout of the HuggingFace checkpoint it reads when weight_path has
# no pre-quantized files for the layer
_CHECKPOINT_LAYOUTS = {"AMXFP8_SFT": "FP8", "RAWINT4_SFT": "RAWINT4", "MXFP4_SFT": "MXFP4"}


def _prequantized_layers(path) -> list:
    """The layers of pre-quantized experts at `path` (KTransformers' or kt_ops' converted form)."""
    if path is None or not os.path.exists(path):
        return []
    if is_kt_directory(path):
        return KTWeightDirectory(path).layers()
    try:
        return SafeTensorLoader(path).layers()
    except (FileNotFoundError, ValueError):
        return []
