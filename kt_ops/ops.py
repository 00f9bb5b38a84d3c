"""The Python face of the kt ops: packing, fake (meta) kernels and the autograd formula.

The schemas live in kt_ops_csrc/ops.cpp. `moe_sft_forward` is functional: besides the output it
returns the tensors backward needs (`gate_up_pre` = pre-activations g and u per routed pair,
`lora_mid` = the rank-r products x.Ag^T, x.Au^T, h.Ad^T per pair), so autograd, torch.compile and
activation checkpointing see every piece of state.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _C  # noqa: F401  (loads the library that defines torch.ops.kt)
from .core.checks import check_has_data
from .core.formats import LORA_NAMES, lora_shapes
from .core.packed import PackedExperts

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
                          lora_scaling, save_for_backward, gate_bias=None, up_bias=None, down_bias=None,
                          activation="silu", swiglu_alpha=1.702, swiglu_limit=7.0):
    _check_same_device(hidden_states, gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias, topk_ids=topk_ids,
                       topk_weights=topk_weights, gate_weight=gate_weight,
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
                           lora_scaling, gate_up_pre, lora_mid, lora_grads=True, gate_bias=None, up_bias=None,
                           down_bias=None, activation="silu", swiglu_alpha=1.702, swiglu_limit=7.0):
    _check_same_device(hidden_states, gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias,
                       grad_output=grad_output, topk_ids=topk_ids, topk_weights=topk_weights,
                       gate_weight=gate_weight, up_weight=up_weight, down_weight=down_weight, gate_scale=gate_scale,
                       up_scale=up_scale, down_scale=down_scale, gate_lora_a=gate_lora_a, gate_lora_b=gate_lora_b,
                       up_lora_a=up_lora_a, up_lora_b=up_lora_b, down_lora_a=down_lora_a, down_lora_b=down_lora_b,
                       gate_up_pre=gate_up_pre, lora_mid=lora_mid)
    loras = (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
    return (torch.empty_like(hidden_states, memory_format=torch.contiguous_format),
            torch.empty_like(topk_weights, memory_format=torch.contiguous_format),
            *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in loras))


# The op-call adapter: the only code that knows the order of the op schemas' arguments. Everything
# else passes PackedExperts and the six LoRA tensors (LORA_NAMES order) to these two functions.
# Both schemas: (..., the 8 expert arguments, the 6 LoRA tensors, ..., then the 6 variant arguments).
def _expert_args(experts: PackedExperts) -> tuple:
    return (experts.gate, experts.up, experts.down, experts.gate_scale, experts.up_scale, experts.down_scale,
            experts.weight_format, experts.intermediate_size)


def _variant_args(experts: PackedExperts) -> tuple:
    return (experts.gate_bias, experts.up_bias, experts.down_bias, experts.activation,
            float(experts.swiglu_alpha), float(experts.swiglu_limit))


def _experts_from_args(hidden_size: int, gate, up, down, gate_scale, up_scale, down_scale, weight_format,
                       intermediate_size, gate_bias, up_bias, down_bias, activation, swiglu_alpha,
                       swiglu_limit) -> PackedExperts:
    return PackedExperts(gate, up, down, gate_scale, up_scale, down_scale, weight_format, gate.shape[0],
                         hidden_size, intermediate_size, gate_bias, up_bias, down_bias, activation, swiglu_alpha,
                         swiglu_limit)


_NUM_EXPERT_ARGS = 8
_FORWARD_LORA_POSITIONS = slice(3 + _NUM_EXPERT_ARGS, 3 + _NUM_EXPERT_ARGS + 6)
_NUM_VARIANT_ARGS = 6
_FORWARD_VARIANT_POSITIONS = slice(_FORWARD_LORA_POSITIONS.stop + 2,  # after lora_scaling, save_for_backward
                                   _FORWARD_LORA_POSITIONS.stop + 2 + _NUM_VARIANT_ARGS)
_NUM_FORWARD_ARGS = _FORWARD_VARIANT_POSITIONS.stop


def forward_op(hidden_states, topk_ids, topk_weights, experts: PackedExperts, loras: Sequence[torch.Tensor],
               lora_scaling: float, save_for_backward: bool):
    """kt::moe_sft_forward: (output, gate_up_pre, lora_mid); the last two are empty unless
    save_for_backward, and are what backward_op needs besides the forward's inputs."""
    return torch.ops.kt.moe_sft_forward(hidden_states, topk_ids, topk_weights, *_expert_args(experts), *loras,
                                        float(lora_scaling), bool(save_for_backward), *_variant_args(experts))


def backward_op(grad_output, hidden_states, topk_ids, topk_weights, experts: PackedExperts,
                loras: Sequence[torch.Tensor], lora_scaling: float, gate_up_pre, lora_mid, lora_grads: bool = True):
    """kt::moe_sft_backward: (grad hidden_states, grad topk_weights, six LoRA grads). With
    lora_grads=False the LoRA gradients are not computed (zeros are returned in their place)."""
    if grad_output is None:
        grad_output = torch.zeros_like(hidden_states)
    return torch.ops.kt.moe_sft_backward(grad_output, hidden_states, topk_ids, topk_weights, *_expert_args(experts),
                                         *loras, float(lora_scaling), gate_up_pre, lora_mid, bool(lora_grads),
                                         *_variant_args(experts))


def _setup_context(ctx, inputs, output):
    hidden_states, topk_ids, topk_weights = inputs[:3]
    tensors, (weight_format, intermediate_size) = inputs[3:9], inputs[9:11]
    lora_scaling, save_for_backward = inputs[_FORWARD_LORA_POSITIONS.stop:_FORWARD_VARIANT_POSITIONS.start]
    gate_bias, up_bias, down_bias, *activation = inputs[_FORWARD_VARIANT_POSITIONS]
    _, gate_up_pre, lora_mid = output
    # The base weights go through save_for_backward too, so saved-tensor hooks (offloading,
    # checkpointing) and torch.compile see every tensor backward reads.
    ctx.save_for_backward(hidden_states, topk_ids, topk_weights, *tensors, *inputs[_FORWARD_LORA_POSITIONS],
                          gate_up_pre, lora_mid, gate_bias, up_bias, down_bias)
    ctx.weight_format, ctx.intermediate_size = weight_format, intermediate_size
    ctx.activation = tuple(activation)
    ctx.lora_scaling = lora_scaling
    ctx.saved_activations = save_for_backward
    # The saved activations are outputs only so that save_for_backward sees them; without this,
    # autograd hands backward a zero-filled gradient as large as gate_up_pre (tens of MB of fresh
    # pages every training step).
    ctx.mark_non_differentiable(gate_up_pre, lora_mid)
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_output, _grad_gate_up_pre, _grad_lora_mid):
    if not ctx.saved_activations:
        raise RuntimeError("kt::moe_sft_forward was called with save_for_backward=False, so it cannot be "
                           "differentiated; call it with save_for_backward=True (kt_ops.ops.moe_sft does)")
    if grad_output is None:  # the layer's output did not reach the loss
        return (None,) * _NUM_FORWARD_ARGS
    hidden_states, topk_ids, topk_weights, *rest = ctx.saved_tensors
    loras, (gate_up_pre, lora_mid), biases = rest[6:12], rest[12:14], rest[14:]
    experts = _experts_from_args(hidden_states.shape[1], *rest[:6], ctx.weight_format, ctx.intermediate_size,
                                 *biases, *ctx.activation)
    needs = ctx.needs_input_grad
    grads = backward_op(grad_output, hidden_states, topk_ids, topk_weights, experts, loras, ctx.lora_scaling,
                        gate_up_pre, lora_mid, lora_grads=any(needs[_FORWARD_LORA_POSITIONS]))
    result = [None] * _NUM_FORWARD_ARGS
    result[0] = grads[0] if needs[0] else None
    result[2] = grads[1] if needs[2] else None
    result[_FORWARD_LORA_POSITIONS] = [g if need else None for g, need in zip(grads[2:], needs[_FORWARD_LORA_POSITIONS])]
    return tuple(result)


torch.library.register_autograd("kt::moe_sft_forward", _autograd_backward, setup_context=_setup_context)


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
    dtype = torch.float32 if like.dtype == torch.bfloat16 else like.dtype
    shapes = lora_shapes(experts.num_experts, experts.hidden_size, experts.intermediate_size, 0)
    return tuple(like.new_zeros(shape, dtype=dtype) for shape in shapes)


def moe_sft(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            experts: PackedExperts, lora: Optional[Sequence[torch.Tensor]], lora_scaling: float) -> torch.Tensor:
    """Differentiable MoE experts with LoRA: [T, H] -> [T, H]. `lora` = (gate_a, gate_b, up_a, up_b,
    down_a, down_b) or None for no LoRA. Activations are saved only when a gradient is needed."""
    check_has_data(hidden_states=hidden_states, topk_ids=topk_ids, topk_weights=topk_weights)
    loras = lora_inputs(experts, lora, hidden_states)
    _check_cpu_inputs({"hidden_states": hidden_states, "topk_ids": topk_ids, "topk_weights": topk_weights,
                       **dict(zip(LORA_NAMES, loras))})
    if hidden_states.dim() != 2 or hidden_states.shape[1] != experts.hidden_size:
        raise ValueError(f"hidden_states must have shape [num_tokens, {experts.hidden_size}] to match the experts' "
                         f"hidden_size, got {tuple(hidden_states.shape)}")
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden_states, topk_weights, *loras))
    output, _, _ = forward_op(hidden_states, topk_ids, topk_weights, experts, loras, lora_scaling, needs_grad)
    return output
