"""AMXSFTMoEWrapper: every SFT method (kt_ops.core.formats.SFT_METHODS) on the kt_ops kernels. The name is kept for
compatibility; the kernels run on any x86 CPU (AMX, AVX-512, AVX2 or the reference), chosen at run
time."""

from __future__ import annotations

from typing import Optional

import torch

from ..core.formats import SFT_METHOD_FORMATS, SFT_METHODS, SKIP_LORA_METHODS, SKIP_LORA_SUFFIX
from ..core.packed import check_expert_map, pack_split, resplit_packed
from .sft import BaseSFTMoEWrapper
from ..weights.ktransformers import load_kt_layer_parts
from ..weights.loaders import BF16SafeTensorLoader, SafeTensorLoader


class AMXSFTMoEWrapper(BaseSFTMoEWrapper):
    SUPPORTED_METHODS = frozenset(SFT_METHODS + SKIP_LORA_METHODS)

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
        method: str = "AMXBF16_SFT",
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        max_cache_depth: int = 1,
        group_size: int = 128,
        zero_point: bool = True,
    ):
        if method not in self.SUPPORTED_METHODS:
            raise ValueError(f"Unsupported method: {method!r}. Supported methods: {sorted(self.SUPPORTED_METHODS)}")
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
            max_cache_depth,
        )
        self.method = method
        self.skip_lora = method.endswith(SKIP_LORA_SUFFIX)
        self.weight_format = SFT_METHOD_FORMATS[method.removesuffix(SKIP_LORA_SUFFIX)]
        # zero_point is kt-kernel's switch for the K-group family; the method name already says
        # which variant (AMXINT4_KGroup_SFT symmetric, AMXINT4_1KGroup_SFT with zero point), so it
        # is recorded, not second-guessed.
        self.group_size = group_size
        self.zero_point = zero_point
        self._make_layer(self.weight_format, group_size)
        self.gate_proj = self.up_proj = self.down_proj = None

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
        followed by load_weights(map) loads once."""
        if physical_to_logical_map_cpu is None:
            physical_to_logical_map_cpu = torch.arange(self.num_experts)
        mapping = check_expert_map(physical_to_logical_map_cpu, self.num_experts)
        if self._weights_loaded and self.gate_proj is None:
            return
        if self.gate_proj is not None:
            parts = pack_split(
                self.gate_proj, self.up_proj, self.down_proj, self.weight_format, self.group_size, self.split
            )
            # The packed copy is the only one kept.
            self.gate_proj = self.up_proj = self.down_proj = None
        elif self.weight_path:
            parts = self._load_base_weights_from_file()
        else:
            raise RuntimeError(
                "weight_path is not set and no tensors were given: call load_weights_from_tensors() "
                "first, or create the wrapper with weight_path"
            )
        self._set_parts(parts, mapping)
        self.physical_to_logical_map = mapping
        if self._lora_initialized:
            self._sync_lora(force=True)

    def _load_base_weights_from_file(self):

        kt_parts = load_kt_layer_parts(
            self.weight_path,
            self.layer_idx,
            self.weight_format,
            self.split,
            self.group_size,
            (self.num_experts, self.hidden_size, self.moe_intermediate_size),
        )
        if kt_parts is not None:
            return kt_parts
        if self.weight_format == "bf16":
            loader = BF16SafeTensorLoader(self.weight_path)
            gate, up, down = loader.load_stacked(f"model.layers.{self.layer_idx}")
            self._check_loaded_shapes(gate, up, down)
            return pack_split(gate, up, down, self.weight_format, self.group_size, self.split)
        experts = SafeTensorLoader(self.weight_path).load_packed(self.layer_idx)
        if experts.weight_format != self.weight_format:
            raise ValueError(
                f"{self.weight_path} holds layer {self.layer_idx} as {experts.weight_format}, but method "
                f"{self.method} needs {self.weight_format}; convert with python -m kt_ops.convert_weights "
                f"--method {self.method}"
            )
        got = (experts.num_experts, experts.hidden_size, experts.intermediate_size)
        want = (self.num_experts, self.hidden_size, self.moe_intermediate_size)
        if got != want:
            raise ValueError(
                f"{self.weight_path}: layer {self.layer_idx} has (num_experts, hidden_size, "
                f"intermediate_size) = {got}, the wrapper was built for {want}"
            )
        return resplit_packed(experts, self.group_size, self.split)

    def _check_loaded_shapes(self, gate, up, down) -> None:
        E, H, I = self.num_experts, self.hidden_size, self.moe_intermediate_size
        if tuple(gate.shape) != (E, I, H) or tuple(down.shape) != (E, H, I):
            raise ValueError(
                f"{self.weight_path}: layer {self.layer_idx} has experts gate {tuple(gate.shape)}, down "
                f"{tuple(down.shape)}; the wrapper was built for gate {(E, I, H)}, down {(E, H, I)}"
            )
