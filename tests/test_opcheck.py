"""torch.library.opcheck of the registered ops (schema, fake kernel, autograd registration, AOT dispatch)."""

from __future__ import annotations

import pytest
import torch

import kt_ops
from kt_testing import backward_op_call, make_case, op_call

FORWARD = torch.ops.kt.moe_sft_forward
BACKWARD = torch.ops.kt.moe_sft_backward


CASES = {
    "basic": dict(T=6, E=3, k=2, H=16, I=8, r=2),
    "int32_minus_one": dict(T=7, E=4, k=3, H=12, I=10, r=3, ids_mode="random", neg_frac=0.3, ids_dtype=torch.int32),
    "r0": dict(T=5, E=3, k=2, H=8, I=8, r=0),
    "T0": dict(T=0, E=3, k=2, H=8, I=8, r=2),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("save", [True, False])
def test_opcheck_forward(name, save):
    case = make_case(seed=31, hidden_dtype=torch.float32, **CASES[name])
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    torch.library.opcheck(FORWARD.default, *op_call(case, p, save, False))
    if save:  # save_for_backward=False is the inference path: not differentiable by design
        torch.library.opcheck(FORWARD.default, *op_call(case, p, save, True))


@pytest.mark.parametrize("name", ["basic", "int32_minus_one", "T0"])
def test_opcheck_forward_bf16(name):
    case = make_case(seed=32, hidden_dtype=torch.bfloat16, lora_dtype=torch.bfloat16, **CASES[name])
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    torch.library.opcheck(FORWARD.default, *op_call(case, p, True, True))


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck_backward(name):
    case = make_case(seed=33, hidden_dtype=torch.float32, **CASES[name])
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    fwd = op_call(case, p, True, False)
    out, gate_up_pre, lora_mid = FORWARD(*fwd[0], **fwd[1])
    T, k, I, r = case.T, case.k, case.I, case.r
    assert gate_up_pre.shape == (2, T * k, I) and gate_up_pre.dtype == torch.float32
    assert lora_mid.shape == (3, T * k, r) and lora_mid.dtype == torch.float32
    bwd = backward_op_call(case.grad_out, fwd, gate_up_pre, lora_mid)
    torch.library.opcheck(BACKWARD.default, *bwd)
    grads = BACKWARD(*bwd[0], **bwd[1])
    assert len(grads) == 8
    for g, inp in zip(grads, (case.hidden, case.weights, *case.lora)):
        assert g.shape == inp.shape and g.dtype == inp.dtype


def test_forward_without_save_returns_empty_and_output_unchanged():
    case = make_case(seed=35, hidden_dtype=torch.float32, T=9, E=4, k=2, H=16, I=12, r=3, neg_frac=0.2)
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    args, kwargs = op_call(case, p, True, False)
    out1, gup, mid = FORWARD(*args, **kwargs)
    out2, e1, e2 = FORWARD(*args, **dict(kwargs, save_for_backward=False))
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    assert e1.numel() == 0 and e2.numel() == 0


def test_backward_without_saved_activations_is_a_clear_error():
    case = make_case(seed=36, hidden_dtype=torch.float32, T=5, E=3, k=2, H=16, I=12, r=3)
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    fwd = op_call(case, p, False, True)
    out, e1, e2 = FORWARD(*fwd[0], **fwd[1])
    args, kwargs = backward_op_call(case.grad_out, fwd, e1, e2)
    with pytest.raises(ValueError, match="save_for_backward"):
        BACKWARD(*args, **kwargs)
    # through autograd: the op documents that save_for_backward=False is not differentiable
    with pytest.raises(RuntimeError, match="save_for_backward"):
        out.sum().backward()


def test_saved_activations_fp64_dtype():
    case = make_case(seed=34, hidden_dtype=torch.float64, T=4, E=3, k=2, H=8, I=6, r=2)
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    args, kwargs = op_call(case, p, True, False)
    out, gate_up_pre, lora_mid = FORWARD(*args, **kwargs)
    assert out.dtype == torch.float64
    assert gate_up_pre.dtype == torch.float64 and gate_up_pre.shape == (2, 8, 6)
    assert lora_mid.dtype == torch.float64 and lora_mid.shape == (3, 8, 2)
