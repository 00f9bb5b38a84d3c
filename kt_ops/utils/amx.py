"""AMXMoEWrapper: inference-mode experts (AMXINT4, AMXINT8, and the generic MOE_INT4 / MOE_INT8
names) on the kt_ops kernels, with no LoRA and nothing saved for backward."""
from __future__ import annotations

from typing import Optional

import torch

from ..experts_base import (BaseMoEWrapper, _check_expert_map, _permute_packed, forward_parts,
                            intermediate_split, no_lora, pack_split, resplit_packed)
from ..ops import PackedExperts

INFERENCE_FORMATS = {"AMXINT4": "int4", "AMXINT8": "int8", "MOE_INT4": "int4", "MOE_INT8": "int8"}


class AMXMoEWrapper(BaseMoEWrapper):
    """Expert ids below `num_gpu_experts` (or where `gpu_experts_mask` is set) belong to experts the
    caller runs on its GPU: the CPU skips them and adds nothing for them."""

    SUPPORTED_METHODS = frozenset(INFERENCE_FORMATS)

    def __init__(self, layer_idx: int, num_experts: int, num_experts_per_tok: int, hidden_size: int,
                 moe_intermediate_size: int, num_gpu_experts: int, cpuinfer_threads: int, threadpool_count: int,
                 weight_path: Optional[str], chunked_prefill_size: int, cpu_save: bool = False,
                 max_deferred_experts_per_token: Optional[int] = None, method: str = "AMXINT4"):
        if method not in self.SUPPORTED_METHODS:
            raise ValueError(f"Unsupported method: {method!r}. Supported methods: {sorted(self.SUPPORTED_METHODS)}")
        super().__init__(layer_idx, num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size,
                         num_gpu_experts, cpuinfer_threads, threadpool_count, weight_path, chunked_prefill_size,
                         cpu_save, max_deferred_experts_per_token)
        self.method = method
        self.weight_format = INFERENCE_FORMATS[method]
        self.split = intermediate_split(moe_intermediate_size, threadpool_count, self.weight_format, 128)
        self.gpu_experts_mask = torch.arange(num_experts) < num_gpu_experts
        self.experts_parts = []
        self._full: Optional[PackedExperts] = None
        self._in_flight = []

    def load_weights_from_tensors(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                                  physical_to_logical_map_cpu: torch.Tensor) -> None:
        """Quantize [E, I, H], [E, I, H], [E, H, I] logical-expert weights online. With cpu_save the
        quantized form is also written to `weight_path`, so the next start loads it."""
        mapping = _check_expert_map(physical_to_logical_map_cpu, self.num_experts)
        parts = pack_split(gate_proj, up_proj, down_proj, self.weight_format, 128, self.split)
        if self.cpu_save:
            from ..packed_io import save_packed_experts
            if not self.weight_path:
                raise ValueError("cpu_save=True needs weight_path: the quantized experts are written there")
            full = parts[0] if len(parts) == 1 else None
            if full is None:
                from ..ops import pack_experts
                full = pack_experts(gate_proj, up_proj, down_proj, self.weight_format)
            save_packed_experts(self.weight_path, {self.layer_idx: full}, overwrite=True)
        self.experts_parts = [_permute_packed(part, mapping) for part in parts]

    def load_weights(self, physical_to_logical_map_cpu: torch.Tensor) -> None:
        """Load layer `layer_idx` of the pre-quantized form at `weight_path`."""
        from ..loaders import SafeTensorLoader

        mapping = _check_expert_map(physical_to_logical_map_cpu, self.num_experts)
        if not self.weight_path:
            raise RuntimeError("weight_path is not set: call load_weights_from_tensors() instead, or create the "
                               "wrapper with weight_path")
        experts = SafeTensorLoader(self.weight_path).load_packed(self.layer_idx)
        if experts.weight_format != self.weight_format:
            raise ValueError(f"{self.weight_path} holds layer {self.layer_idx} as {experts.weight_format}; method "
                             f"{self.method} needs {self.weight_format}")
        parts = resplit_packed(experts, 128, self.split)
        self.experts_parts = [_permute_packed(part, mapping) for part in parts]

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                cuda_stream=None) -> torch.Tensor:
        self.submit_forward(hidden_states, topk_ids, topk_weights, cuda_stream)
        return self.sync_forward(hidden_states, cuda_stream)

    def submit_forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       cuda_stream=None) -> None:
        """Start the experts on the CPUInfer thread and return at once; sync_forward collects."""
        if not self.experts_parts:
            raise RuntimeError("Weights not loaded. Call load_weights() first.")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2 \
                or hidden_states.shape[1] != self.hidden_size:
            raise ValueError(f"hidden_states must be a [qlen, {self.hidden_size}] tensor")
        x, ids, w = (t.to("cpu") for t in (hidden_states, topk_ids, topk_weights))
        if self.gpu_experts_mask.any():
            ids = torch.where(self.gpu_experts_mask[ids.clamp(0, self.num_experts - 1).long()], -1, ids)
        self._in_flight.append(self.cpu_infer.submit(self._compute, x, ids, w))

    def sync_forward(self, hidden_states: torch.Tensor, cuda_stream=None) -> torch.Tensor:
        """The output of the oldest submitted forward, on hidden_states' device."""
        if not self._in_flight:
            raise RuntimeError("sync_forward() without a pending submit_forward()")
        output = self._in_flight.pop(0).result()
        return output.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def _compute(self, x, ids, w) -> torch.Tensor:
        chunks = []
        for start in range(0, max(x.shape[0], 1), self.chunked_prefill_size):
            end = start + self.chunked_prefill_size
            xc = x[start:end]
            _, out, _ = forward_parts(xc, ids[start:end], w[start:end], self.experts_parts,
                                      no_lora(self.num_experts, self.hidden_size, self.split, xc), 0.0, False)
            chunks.append(out)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
