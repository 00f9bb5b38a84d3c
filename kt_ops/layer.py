"""KTMoELayer: routed experts with LoRA as an nn.Module (base weights frozen and packed on the CPU)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import _C
from .core.checks import check_has_data
from .core.formats import LORA_NAMES, SFT_METHOD_FORMATS, lora_shapes
from .core.packed import PackedExperts, pack_experts
from .ops import moe_sft

def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class KTMoELayer(nn.Module):
    """y = sum_j w[t, j] * Expert_{ids[t, j]}(x[t]), each expert a SiLU-gated MLP with LoRA on gate,
    up and down. Inputs may live on any device; the computation runs on the CPU and the output returns
    to the input's device. Base weights are not parameters: they are packed once by
    `load_weights_from_tensors` and never trained (and not part of state_dict)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, lora_rank: int = 16,
                 lora_alpha: float = 32.0, method: str = "AMXBF16_SFT", num_threads: Optional[int] = None,
                 lora_dtype: torch.dtype = torch.bfloat16, group_size: int = 128):
        super().__init__()
        self.num_experts = _positive_int(num_experts, "num_experts")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.intermediate_size = _positive_int(intermediate_size, "intermediate_size")
        self.lora_rank = _positive_int(lora_rank, "lora_rank", minimum=0)
        if method not in SFT_METHOD_FORMATS:
            raise ValueError(f"Unknown method {method!r}; supported: {sorted(SFT_METHOD_FORMATS)}")
        if lora_dtype not in (torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"lora_dtype must be torch.bfloat16, torch.float32 or torch.float64, got {lora_dtype}")
        if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool):
            raise TypeError(f"lora_alpha must be a number, got {lora_alpha!r}")
        self.method = method
        self.weight_format = SFT_METHOD_FORMATS[method]
        self.group_size = group_size
        self.lora_alpha = float(lora_alpha)
        self.lora_scaling = self.lora_alpha / self.lora_rank if self.lora_rank else 0.0
        if num_threads is not None:
            _C.set_num_threads(_positive_int(num_threads, "num_threads"))
        self.experts: Optional[PackedExperts] = None

        if self.lora_rank:
            shapes = lora_shapes(self.num_experts, self.hidden_size, self.intermediate_size, self.lora_rank)
            for name, shape in zip(LORA_NAMES, shapes):
                self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=lora_dtype)))
            self.reset_lora_parameters()

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

    def load_weights_from_tensors(self, gate_proj: torch.Tensor, up_proj: torch.Tensor,
                                  down_proj: torch.Tensor) -> None:
        """Pack [E, I, H], [E, I, H], [E, H, I] base weights; the caller may free its copies afterwards."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        expected = {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)}
        for name, t in zip(expected, (gate_proj, up_proj, down_proj)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected[name]:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape {expected[name]} for this layer, got {got}")
        self.experts = pack_experts(gate_proj, up_proj, down_proj, self.weight_format, self.group_size)

    def lora_parameters(self) -> Optional[tuple]:
        return tuple(getattr(self, name) for name in LORA_NAMES) if self.lora_rank else None

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        if self.experts is None:
            raise RuntimeError("KTMoELayer: base weights are not loaded; call load_weights_from_tensors() first")
        check_has_data(hidden_states=hidden_states, topk_ids=topk_ids, topk_weights=topk_weights)
        device = hidden_states.device
        cpu = torch.device("cpu")
        lora = self.lora_parameters()
        if lora is not None:
            lora = tuple(t.to(cpu) for t in lora)
        output = moe_sft(hidden_states.to(cpu), topk_ids.to(cpu), topk_weights.to(cpu), self.experts, lora,
                         self.lora_scaling)
        return output.to(device)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, lora_rank={self.lora_rank}, "
                f"lora_alpha={self.lora_alpha}, method={self.method}, loaded={self.experts is not None}")
