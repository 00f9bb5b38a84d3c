"""torch.autograd.gradcheck in float64 through the C++ op (kt_ops.ops.moe_sft).

fp64 hidden always runs the portable reference kernel, so these tests do not
depend on the selected ISA. Base weights are bf16 (exactly representable).
"""

from __future__ import annotations

import pytest
import torch

import kt_ops
import kt_ops.ops
from kt_testing import make_case

CASES = {
    "basic": dict(T=4, E=3, k=2, H=8, I=6, r=2),
    "minus_one_dup_int32": dict(T=5, E=3, k=3, H=7, I=5, r=2, ids_mode="random", neg_frac=0.3, ids_dtype=torch.int32),
    "r1_odd": dict(T=3, E=2, k=2, H=5, I=3, r=1),
    "r0": dict(T=4, E=3, k=2, H=6, I=4, r=0),
    "same_expert": dict(T=5, E=3, k=1, H=6, I=4, r=2, ids_mode="same"),
    "T1": dict(T=1, E=2, k=2, H=6, I=4, r=3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_cpp_op_fp64(name):
    case = make_case(seed=21, hidden_dtype=torch.float64, **CASES[name])
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    inputs = [t.detach().clone().requires_grad_(True) for t in (case.hidden, case.weights, *case.lora)]

    def f(hidden, weights, *lora):
        return kt_ops.ops.moe_sft(hidden, case.ids, weights, experts, tuple(lora), case.scaling)

    out = f(*inputs)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_cpp_op_fp64_via_function():
    case = make_case(seed=22, hidden_dtype=torch.float64, T=4, E=3, k=2, H=6, I=5, r=2, neg_frac=0.2)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    inputs = [t.detach().clone().requires_grad_(True) for t in (case.hidden, case.weights, *case.lora)]

    def f(hidden, weights, *lora):
        return kt_ops.KTMoEFunction.apply(hidden, case.ids, weights, experts, *lora, case.scaling)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_raw_op_fp64():
    """Through torch.ops.kt.moe_sft_forward's registered autograd (save_for_backward=True)."""
    case = make_case(seed=23, hidden_dtype=torch.float64, T=4, E=3, k=2, H=6, I=5, r=2)
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    inputs = [t.detach().clone().requires_grad_(True) for t in (case.hidden, case.weights, *case.lora)]

    def f(hidden, weights, *lora):
        args, kwargs = kt_ops.ops.forward_call(hidden, case.ids, weights, p, lora, case.scaling, True)
        return torch.ops.kt.moe_sft_forward(*args, **kwargs)[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_saved_activations_are_not_differentiable_outputs():
    """gate_up_pre / lora_mid are outputs only so that backward can read them: autograd must not
    track them, or every training step would allocate and zero a gradient as large as gate_up_pre."""
    case = make_case(seed=24, hidden_dtype=torch.float32, T=4, E=3, k=2, H=6, I=5, r=2)
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    hidden = case.hidden.clone().requires_grad_(True)
    lora = [t.clone().requires_grad_(True) for t in case.lora]
    args, kwargs = kt_ops.ops.forward_call(hidden, case.ids, case.weights, p, lora, case.scaling, True)
    output, gate_up_pre, lora_mid = torch.ops.kt.moe_sft_forward(*args, **kwargs)
    assert output.requires_grad
    assert not gate_up_pre.requires_grad and not lora_mid.requires_grad
    output.sum().backward()
    assert hidden.grad is not None and all(t.grad is not None for t in lora)
