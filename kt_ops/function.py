"""KTMoEFunction: the MoE expert op as a torch.autograd.Function, for code that composes Functions.

It runs the same two ops as `kt_ops.ops.moe_sft` through the same op-call adapter; `KTMoELayer` uses
`moe_sft` (the registered autograd formula), which torch.compile traces as a single op.
"""

from __future__ import annotations

import torch

from .core.packed import PackedExperts
from .ops import backward_op, forward_op


class KTMoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden_states,
        topk_ids,
        topk_weights,
        experts: PackedExperts,
        gate_lora_a,
        gate_lora_b,
        up_lora_a,
        up_lora_b,
        down_lora_a,
        down_lora_b,
        lora_scaling,
    ):
        loras = (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
        output, gate_up_pre, lora_mid = forward_op(
            hidden_states, topk_ids, topk_weights, experts, loras, lora_scaling, True
        )
        ctx.save_for_backward(hidden_states, topk_ids, topk_weights, *loras, gate_up_pre, lora_mid)
        ctx.experts = experts  # frozen base weights, never modified in place
        ctx.lora_scaling = float(lora_scaling)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, topk_ids, topk_weights, *rest = ctx.saved_tensors
        loras, (gate_up_pre, lora_mid) = rest[:6], rest[6:]
        needs = ctx.needs_input_grad
        grads = backward_op(
            grad_output,
            hidden_states,
            topk_ids,
            topk_weights,
            ctx.experts,
            loras,
            ctx.lora_scaling,
            gate_up_pre,
            lora_mid,
            lora_grads=any(needs[4:10]),
        )
        lora_grads = [g if need else None for g, need in zip(grads[2:], needs[4:10])]
        return (grads[0] if needs[0] else None, None, grads[1] if needs[2] else None, None, *lora_grads, None)
