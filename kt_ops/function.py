"""KTMoEFunction: the MoE expert op as a torch.autograd.Function, for code that composes Functions.

It runs the same two ops as `kt_ops.ops.moe_sft` and shares its backward; `KTMoELayer` uses
`moe_sft` (the registered autograd formula), which torch.compile traces as a single op.
"""
from __future__ import annotations

import torch

from .ops import PackedExperts, _backward_from_saved


class KTMoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, topk_ids, topk_weights, experts: PackedExperts, gate_lora_a, gate_lora_b,
                up_lora_a, up_lora_b, down_lora_a, down_lora_b, lora_scaling):
        loras = (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
        output, gate_up_pre, lora_mid = torch.ops.kt.moe_sft_forward(
            hidden_states, topk_ids, topk_weights, experts.gate, experts.up, experts.down, experts.gate_scale,
            experts.up_scale, experts.down_scale, experts.weight_format, experts.intermediate_size, *loras,
            float(lora_scaling), True)
        ctx.save_for_backward(hidden_states, topk_ids, topk_weights, experts.gate, experts.up, experts.down,
                              experts.gate_scale, experts.up_scale, experts.down_scale, *loras, gate_up_pre,
                              lora_mid)
        ctx.weight_format = experts.weight_format
        ctx.intermediate_size = experts.intermediate_size
        ctx.lora_scaling = float(lora_scaling)
        ctx.mark_non_differentiable(topk_ids)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        grads = _backward_from_saved(grad_output, ctx.saved_tensors, ctx.weight_format, ctx.intermediate_size,
                                     ctx.lora_scaling)
        return (grads[0], None, grads[1], None, *grads[2:], None)
