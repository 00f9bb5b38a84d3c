"""KTMoELayer: routed experts with LoRA as an nn.Module (base weights frozen and packed on the CPU).

It is the one front-end over the ops: the Hugging Face integration's KTExperts is one, and the
kt-kernel-compatible wrappers (kt_ops.wrappers) hold one. It owns what every caller needs between
the model and the kernels: the experts split into parts over the process's NUMA sub-pools
(`threadpool_count`), the routed ids of the experts computed elsewhere set to -1, inputs copied to
the CPU and the output returned to their device, and the LoRA (its own or one given per call).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .core.checks import check_has_data, check_int, check_number
from .core.formats import LORA_NAMES, SFT_METHOD_FORMATS, lora_shapes
from .core.host import to_host
from .core.packed import PackedExperts, intermediate_split, pack_split, resplit_packed
from .core.runtime import get_num_threads, set_num_threads
from .core.subpools import Subpools, place_parts, process_subpools
from .ops import moe_sft

LORA_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


class KTMoELayer(nn.Module):
    """y = sum_j w[t, j] * Expert_{ids[t, j]}(x[t]), each expert a SiLU-gated MLP with LoRA on gate,
    up and down. Inputs may live on any device; the computation runs on the CPU and the output returns
    to the input's device. Base weights are not parameters: they are packed once by
    `load_weights_from_tensors` and never trained (and not part of state_dict).

    Expert j here is expert `first_expert + j` of the model: routed ids below `first_expert` belong
    to experts kept elsewhere (a GPU) and add nothing here, as do ids whose `gpu_experts_mask` entry
    is set. `threadpool_count` > 1 splits the intermediate dimension into that many parts, run at
    once on `subpools`: by default the process's (kt_ops.core.subpools.process_subpools); None runs
    them one after another on the calling thread's pool. `lora_enabled = False` computes the frozen
    experts only."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        method: str = "AMXBF16_SFT",
        num_threads: Optional[int] = None,
        lora_dtype: torch.dtype = torch.bfloat16,
        group_size: int = 128,
        threadpool_count: int = 1,
        first_expert: int = 0,
        subpools: Union[Subpools, None, str] = "process",
    ):
        super().__init__()
        self.num_experts = check_int(num_experts, "num_experts", 1)
        self.hidden_size = check_int(hidden_size, "hidden_size", 1)
        self.intermediate_size = check_int(intermediate_size, "intermediate_size", 1)
        self.lora_rank = check_int(lora_rank, "lora_rank", 0)
        self.lora_alpha = check_number(lora_alpha, "lora_alpha")
        if method not in SFT_METHOD_FORMATS:
            raise ValueError(f"Unknown method {method!r}; supported: {sorted(SFT_METHOD_FORMATS)}")
        if lora_dtype not in LORA_DTYPES:
            raise TypeError(f"lora_dtype must be torch.bfloat16, torch.float32 or torch.float64, got {lora_dtype}")
        self.method = method
        self.weight_format = SFT_METHOD_FORMATS[method]
        self.group_size = group_size
        self.lora_scaling = self.lora_alpha / self.lora_rank if self.lora_rank else 0.0
        self.lora_enabled = bool(self.lora_rank)
        self.first_expert = check_int(first_expert, "first_expert", 0)
        self.gpu_experts_mask: Optional[torch.Tensor] = None
        if num_threads is not None:
            set_num_threads(num_threads)
        self.split = intermediate_split(
            intermediate_size, check_int(threadpool_count, "threadpool_count", 1), self.weight_format, group_size
        )
        if subpools == "process":
            subpools = process_subpools(threadpool_count, max(1, get_num_threads() // threadpool_count))
        self.subpools: Optional[Subpools] = subpools
        # One PackedExperts per part of `split` (one part: the whole layer).
        self.experts_parts: List[PackedExperts] = []

        if self.lora_rank:
            shapes = lora_shapes(self.num_experts, self.hidden_size, self.intermediate_size, self.lora_rank)
            for name, shape in zip(LORA_NAMES, shapes):
                self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=lora_dtype)))
            self.reset_lora_parameters()

    @property
    def experts(self) -> Optional[PackedExperts]:
        """The packed experts (None before loading) of a layer in one part."""
        if len(self.experts_parts) > 1:
            raise RuntimeError(
                f"the experts of this layer are split into {len(self.experts_parts)} parts over "
                "sub-pools (threadpool_count); see experts_parts"
            )
        return self.experts_parts[0] if self.experts_parts else None

    @experts.setter
    def experts(self, experts: PackedExperts) -> None:
        """Use `experts` (already packed), split into this layer's parts when threadpool_count > 1."""
        if not isinstance(experts, PackedExperts):
            raise TypeError(f"experts must be a PackedExperts, got {type(experts).__name__}")
        got = (experts.num_experts, experts.hidden_size, experts.intermediate_size)
        want = (self.num_experts, self.hidden_size, self.intermediate_size)
        if got != want:
            raise ValueError(
                f"experts have (num_experts, hidden_size, intermediate_size) = {got}; this layer is {want}"
            )
        self.set_parts(resplit_packed(experts, self.group_size, self.split))

    def set_parts(self, parts: Sequence[PackedExperts]) -> None:
        """Use packed `parts` (one per range of `split`), each part's weights placed on its sub-pool's
        NUMA node."""
        self.experts_parts = place_parts(self.subpools, parts)

    def set_variant(self, **variant) -> None:
        """The expert MLP's variant (PackedExperts.with_variant: biases, activation) on the loaded
        experts. An activation acts on each intermediate element alone, so every part takes it as it
        is; biases need the experts in one part (each part would add the whole down bias)."""
        biases = [name for name in ("gate_bias", "up_bias", "down_bias") if variant.get(name) is not None]
        if biases and len(self.experts_parts) != 1:
            raise ValueError(
                f"set_variant needs the experts loaded in one part, not {len(self.experts_parts)}: experts "
                "with biases cannot be split over sub-pools; use threadpool_count=1"
            )
        self.experts_parts = [part.with_variant(**variant) for part in self.experts_parts]

    def reset_lora_parameters(self) -> None:
        """A like peft's kaiming-uniform(a=sqrt(5)) per expert (bound 1/sqrt(in_features)), B zero."""
        with torch.no_grad():
            for name in LORA_NAMES:
                param = getattr(self, name)
                if name.endswith("_a"):
                    bound = 1.0 / math.sqrt(param.shape[2])
                    param.uniform_(-bound, bound)
                else:
                    param.zero_()

    def load_weights_from_tensors(
        self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor
    ) -> None:
        """Pack [E, I, H], [E, I, H], [E, H, I] base weights; the caller may free its copies afterwards."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        expected = {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)}
        for name, t in zip(expected, (gate_proj, up_proj, down_proj)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{name} must have shape {expected[name]} for this layer, got {tuple(t.shape)}")
        self.set_parts(pack_split(gate_proj, up_proj, down_proj, self.weight_format, self.group_size, self.split))

    def lora_parameters(self) -> Optional[tuple]:
        return tuple(getattr(self, name) for name in LORA_NAMES) if self.lora_rank else None

    def held_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """The routed ids as slots of this layer's experts: -1 for the experts computed elsewhere
        (below first_expert, or set in gpu_experts_mask)."""
        if self.first_expert:
            topk_ids = torch.where(topk_ids >= self.first_expert, topk_ids - self.first_expert, -1)
        mask = self.gpu_experts_mask
        if mask is not None and mask.any():
            topk_ids = torch.where(mask[topk_ids.clamp(0, mask.numel() - 1).long()], -1, topk_ids)
        return topk_ids

    def forward(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        lora: Optional[Sequence[torch.Tensor]] = None,
        lora_scaling: Optional[float] = None,
    ) -> torch.Tensor:
        """`lora`: six tensors (gate_a, gate_b, up_a, up_b, down_a, down_b) over this layer's experts,
        used instead of its own LoRA, with `lora_scaling` (default the layer's)."""
        if not self.experts_parts:
            raise RuntimeError("KTMoELayer: base weights are not loaded; call load_weights_from_tensors() first")
        check_has_data(hidden_states=hidden_states, topk_ids=topk_ids, topk_weights=topk_weights)
        if lora is None and self.lora_enabled:
            lora = self.lora_parameters()
        scaling = self.lora_scaling if lora_scaling is None else lora_scaling
        if lora is None:
            scaling = 0.0
        if lora is not None:
            lora = tuple(to_host(t) for t in lora)
        parts = self.experts_parts[0] if len(self.experts_parts) == 1 else self.experts_parts
        output = moe_sft(
            to_host(hidden_states),
            self.held_ids(to_host(topk_ids)),
            to_host(topk_weights),
            parts,
            lora,
            scaling,
            self.subpools,
        )
        # Tensor.to, which autograd follows back, returns the output to the inputs' device.
        return output.to(hidden_states.device)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, lora_rank={self.lora_rank}, "
            f"lora_alpha={self.lora_alpha}, method={self.method}, loaded={bool(self.experts_parts)}"
            + (f", first_expert={self.first_expert}" if self.first_expert else "")
            + (f", parts={len(self.split)}" if len(self.split) > 1 else "")
        )
