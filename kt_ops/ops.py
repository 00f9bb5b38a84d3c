"""The Python face of the kt ops: packing, fake (meta) kernels and the autograd formula.

The schemas live in kt_ops_csrc/ops.cpp. `moe_sft_forward` is functional: besides the output it
returns the tensors backward needs (`gate_up_pre` = pre-activations g and u per routed pair,
`lora_mid` = the rank-r products x.Ag^T, x.Au^T, h.Ad^T per pair), so autograd, torch.compile and
activation checkpointing see every piece of state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from . import _C  # noqa: F401  (loads the library that defines torch.ops.kt)

# bf16; int8 symmetric per row; int4 symmetric per row; int4_1 per row with zero point (scale, min);
# int4_kgroup / int4_1_kgroup: the same per group of `group_size` along K (kt_ops_csrc/kernels/quant.h).
WEIGHT_FORMATS = ("bf16", "int8", "int4", "int4_1", "int4_kgroup", "int4_1_kgroup", "int8_kgroup")
GROUPED_FORMATS = ("int4_kgroup", "int4_1_kgroup", "int8_kgroup")


@dataclass(frozen=True)
class PackedExperts:
    """Frozen base weights of E experts in a kernel layout (uint8 blobs, one row per expert)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_scale: Optional[torch.Tensor]
    up_scale: Optional[torch.Tensor]
    down_scale: Optional[torch.Tensor]
    weight_format: str
    num_experts: int
    hidden_size: int
    intermediate_size: int

    def nbytes(self) -> int:
        tensors = (self.gate, self.up, self.down, self.gate_scale, self.up_scale, self.down_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_expert_tensor(t: torch.Tensor, name: str, shape: Sequence[int], layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")


def pack_experts(gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                 weight_format: str = "bf16", group_size: int = 128) -> PackedExperts:
    """Pack (quantize) [E, I, H], [E, I, H], [E, H, I] expert weights of any float dtype into
    `weight_format`; `group_size` applies to the K-group formats and must divide H and I."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if weight_format in GROUPED_FORMATS and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise TypeError(f"group_size must be an int, got {group_size!r}")
    if not isinstance(gate_proj, torch.Tensor) or gate_proj.dim() != 3:
        raise ValueError("gate_proj must be a 3-D tensor [num_experts, intermediate_size, hidden_size]")
    E, I, H = gate_proj.shape
    _check_expert_tensor(gate_proj, "gate_proj", (E, I, H), "[num_experts, intermediate_size, hidden_size]")
    _check_expert_tensor(up_proj, "up_proj", (E, I, H), "[num_experts, intermediate_size, hidden_size]")
    _check_expert_tensor(down_proj, "down_proj", (E, H, I), "[num_experts, hidden_size, intermediate_size]")
    if weight_format in GROUPED_FORMATS:
        for name, size in (("hidden_size", H), ("intermediate_size", I)):
            if group_size < 2 or group_size % 2 or size % group_size:
                raise ValueError(f"group_size {group_size} must be even and divide {name} ({size}) for "
                                 f"weight_format {weight_format!r}; e.g. 32, 64 or 128")
    packed = {}
    with torch.no_grad():
        for name, t in (("gate", gate_proj), ("up", up_proj), ("down", down_proj)):
            blob, scales = torch.ops.kt.pack_weights(t.detach().cpu(), weight_format, int(group_size))
            packed[name], packed[name + "_scale"] = blob, (scales if weight_format != "bf16" else None)
    return PackedExperts(**packed, weight_format=weight_format, num_experts=E, hidden_size=H, intermediate_size=I)


def pack_experts_from_codes(gate: Tuple[torch.Tensor, torch.Tensor], up: Tuple[torch.Tensor, torch.Tensor],
                            down: Tuple[torch.Tensor, torch.Tensor], weight_format: str) -> PackedExperts:
    """Experts that are already quantized (e.g. GGUF Q8_0 / Q4_0 / Q4_1 blocks), packed exactly:
    each argument is (codes, scales) for [E, N, K] weights. Codes are integers: int8 formats hold
    w = code * scale with code in [-128, 127]; 4-bit formats hold u in [0, 15] with
    w = (u - 8) * scale (symmetric) or w = u * scale + min (zero point). Scales are [E, N, groups] or,
    with a zero point, [E, N, groups, 2] = (scale, min); groups is 1 for the per-row formats and K /
    group_size (even group size) for the K-group ones. Scales may be negative."""
    if weight_format not in WEIGHT_FORMATS or weight_format == "bf16":
        raise ValueError(f"weight_format must be a quantized format {WEIGHT_FORMATS[1:]}, got {weight_format!r}")
    packed = {}
    for name, pair in (("gate", gate), ("up", up), ("down", down)):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"{name} must be a (codes, scales) tuple")
        packed[name], packed[name + "_scale"] = torch.ops.kt.pack_codes(pair[0], pair[1], weight_format)
    E, I, H = gate[0].shape
    if tuple(up[0].shape) != (E, I, H) or tuple(down[0].shape) != (E, H, I):
        raise ValueError(f"codes must be gate [E, I, H], up [E, I, H], down [E, H, I]; got {tuple(gate[0].shape)}, "
                         f"{tuple(up[0].shape)}, {tuple(down[0].shape)}")
    return PackedExperts(**packed, weight_format=weight_format, num_experts=E, hidden_size=H, intermediate_size=I)


def unpack_experts(experts: PackedExperts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bf16 weights the kernels actually compute with (dequantized for quantized formats), as
    [E, I, H], [E, I, H], [E, H, I]."""
    unpack = torch.ops.kt.unpack_weights
    H, I, fmt = experts.hidden_size, experts.intermediate_size, experts.weight_format
    return (unpack(experts.gate, experts.gate_scale, fmt, I, H), unpack(experts.up, experts.up_scale, fmt, I, H),
            unpack(experts.down, experts.down_scale, fmt, H, I))


def _accumulation_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden_states.dtype == torch.float64 else torch.float32


def _check_same_device(hidden_states: torch.Tensor, **tensors) -> None:
    # The fake kernel also serves meta tensors: a meta tensor among CPU ones must not silently
    # yield an uninitialised CPU result.
    for name, t in tensors.items():
        if t is not None and t.device != hidden_states.device:
            raise ValueError(f"kt_ops: {name} must be on the device of hidden_states ({hidden_states.device}), "
                             f"got {t.device}")


@torch.library.register_fake("kt::moe_sft_forward")
def _moe_sft_forward_fake(hidden_states, topk_ids, topk_weights, gate_weight, up_weight, down_weight,
                          gate_scale, up_scale, down_scale, weight_format, intermediate_size,
                          gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b,
                          lora_scaling, save_for_backward):
    _check_same_device(hidden_states, topk_ids=topk_ids, topk_weights=topk_weights, gate_weight=gate_weight,
                       up_weight=up_weight, down_weight=down_weight, gate_scale=gate_scale, up_scale=up_scale,
                       down_scale=down_scale, gate_lora_a=gate_lora_a, gate_lora_b=gate_lora_b,
                       up_lora_a=up_lora_a, up_lora_b=up_lora_b, down_lora_a=down_lora_a, down_lora_b=down_lora_b)
    T, H = hidden_states.shape
    pairs = T * topk_ids.shape[1]
    rank = gate_lora_a.shape[1]
    acc = _accumulation_dtype(hidden_states)
    output = hidden_states.new_empty((T, H))
    if save_for_backward:
        return (output, hidden_states.new_empty((2, pairs, intermediate_size), dtype=acc),
                hidden_states.new_empty((3, pairs, rank), dtype=acc))
    return output, hidden_states.new_empty((0,), dtype=acc), hidden_states.new_empty((0,), dtype=acc)


@torch.library.register_fake("kt::moe_sft_backward")
def _moe_sft_backward_fake(grad_output, hidden_states, topk_ids, topk_weights, gate_weight, up_weight,
                           down_weight, gate_scale, up_scale, down_scale, weight_format, intermediate_size,
                           gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b,
                           lora_scaling, gate_up_pre, lora_mid):
    _check_same_device(hidden_states, grad_output=grad_output, topk_ids=topk_ids, topk_weights=topk_weights,
                       gate_weight=gate_weight, up_weight=up_weight, down_weight=down_weight, gate_scale=gate_scale,
                       up_scale=up_scale, down_scale=down_scale, gate_lora_a=gate_lora_a, gate_lora_b=gate_lora_b,
                       up_lora_a=up_lora_a, up_lora_b=up_lora_b, down_lora_a=down_lora_a, down_lora_b=down_lora_b,
                       gate_up_pre=gate_up_pre, lora_mid=lora_mid)
    loras = (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
    return (torch.empty_like(hidden_states, memory_format=torch.contiguous_format),
            torch.empty_like(topk_weights, memory_format=torch.contiguous_format),
            *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in loras))




# Positions in the moe_sft_forward schema; the autograd formula returns one gradient per input.
_NUM_FORWARD_INPUTS = 19
_LORA_SLICE = slice(11, 17)


def _backward_from_saved(grad_output, saved, weight_format, intermediate_size, lora_scaling):
    """moe_sft_backward on what forward saved; returns grads for hidden, topk_weights and 6 LoRA."""
    (hidden_states, topk_ids, topk_weights, gate_weight, up_weight, down_weight, gate_scale, up_scale,
     down_scale, *rest) = saved
    loras, (gate_up_pre, lora_mid) = rest[:6], rest[6:]
    if grad_output is None:
        grad_output = torch.zeros_like(hidden_states)
    return torch.ops.kt.moe_sft_backward(
        grad_output, hidden_states, topk_ids, topk_weights, gate_weight, up_weight, down_weight,
        gate_scale, up_scale, down_scale, weight_format, intermediate_size, *loras, lora_scaling,
        gate_up_pre, lora_mid)


def _setup_context(ctx, inputs, output):
    (hidden_states, topk_ids, topk_weights, gate_weight, up_weight, down_weight, gate_scale, up_scale,
     down_scale, weight_format, intermediate_size, *rest) = inputs
    loras, lora_scaling, save_for_backward = rest[:6], rest[6], rest[7]
    _, gate_up_pre, lora_mid = output
    ctx.save_for_backward(hidden_states, topk_ids, topk_weights, gate_weight, up_weight, down_weight,
                          gate_scale, up_scale, down_scale, *loras, gate_up_pre, lora_mid)
    ctx.weight_format = weight_format
    ctx.intermediate_size = intermediate_size
    ctx.lora_scaling = lora_scaling
    ctx.saved_activations = save_for_backward


def _autograd_backward(ctx, grad_output, _grad_gate_up_pre, _grad_lora_mid):
    if not ctx.saved_activations:
        raise RuntimeError("kt::moe_sft_forward was called with save_for_backward=False, so it cannot be "
                           "differentiated; call it with save_for_backward=True (kt_ops.ops.moe_sft does)")
    grads = _backward_from_saved(grad_output, ctx.saved_tensors, ctx.weight_format, ctx.intermediate_size,
                                 ctx.lora_scaling)
    result = [None] * _NUM_FORWARD_INPUTS
    result[0], result[2] = grads[0], grads[1]
    result[_LORA_SLICE] = grads[2:]
    return tuple(result)


torch.library.register_autograd("kt::moe_sft_forward", _autograd_backward, setup_context=_setup_context)


def check_has_data(**tensors) -> None:
    """Inputs are copied to the CPU before the kernels run; a meta tensor has no data to copy, so it
    is refused here by name instead of failing inside the copy ('Cannot copy out of meta tensor')."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (shape only, no data); kt_ops computes on real tensors: "
                             "pass a CPU (or accelerator) tensor")


def _check_cpu_inputs(tensors: dict) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {t.device} "
                             "(KTMoELayer moves inputs to the CPU for you)")


def lora_inputs(experts: PackedExperts, lora: Optional[Sequence[torch.Tensor]], like: torch.Tensor):
    """The six LoRA tensors for the op; rank-0 placeholders when `lora` is None."""
    if lora is not None:
        if len(lora) != 6:
            raise ValueError(f"lora must hold 6 tensors (gate_a, gate_b, up_a, up_b, down_a, down_b), got {len(lora)}")
        return tuple(lora)
    E, H, I = experts.num_experts, experts.hidden_size, experts.intermediate_size
    dtype = torch.float32 if like.dtype == torch.bfloat16 else like.dtype
    shapes = ((E, 0, H), (E, I, 0), (E, 0, H), (E, I, 0), (E, 0, I), (E, H, 0))
    return tuple(like.new_zeros(shape, dtype=dtype) for shape in shapes)


def moe_sft(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            experts: PackedExperts, lora: Optional[Sequence[torch.Tensor]], lora_scaling: float) -> torch.Tensor:
    """Differentiable MoE experts with LoRA: [T, H] -> [T, H]. `lora` = (gate_a, gate_b, up_a, up_b,
    down_a, down_b) or None for no LoRA. Activations are saved only when a gradient is needed."""
    check_has_data(hidden_states=hidden_states, topk_ids=topk_ids, topk_weights=topk_weights)
    loras = lora_inputs(experts, lora, hidden_states)
    _check_cpu_inputs({"hidden_states": hidden_states, "topk_ids": topk_ids, "topk_weights": topk_weights,
                       **dict(zip(("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a",
                                   "down_lora_b"), loras))})
    if hidden_states.dim() != 2 or hidden_states.shape[1] != experts.hidden_size:
        raise ValueError(f"hidden_states must have shape [num_tokens, {experts.hidden_size}] to match the experts' "
                         f"hidden_size, got {tuple(hidden_states.shape)}")
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden_states, topk_weights, *loras))
    output, _, _ = torch.ops.kt.moe_sft_forward(
        hidden_states, topk_ids, topk_weights, experts.gate, experts.up, experts.down, experts.gate_scale,
        experts.up_scale, experts.down_scale, experts.weight_format, experts.intermediate_size, *loras,
        float(lora_scaling), needs_grad)
    return output
