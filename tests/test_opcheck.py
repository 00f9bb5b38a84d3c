"""torch.library.opcheck of the registered ops (schema, fake kernel, autograd registration, AOT dispatch)."""

from __future__ import annotations

import pytest
import torch

import kt_ops
from kt_testing import make_case


def _forward_args(case, p, save, requires_grad):
    hidden = case.hidden.detach().clone().requires_grad_(requires_grad)
    weights = case.weights.detach().clone().requires_grad_(requires_grad)
    lora = [t.detach().clone().requires_grad_(requires_grad) for t in case.lora]
    return (
        hidden, case.ids, weights, p.gate, p.up, p.down, p.gate_scale, p.up_scale, p.down_scale,
        p.weight_format, p.intermediate_size, *lora, case.scaling, save,
    )


CASES = {
    "basic": dict(T=6, E=3, k=2, H=16, I=8, r=2),
    "int32_minus_one": dict(T=7, E=4, k=3, H=12, I=10, r=3, ids_mode="random", neg_frac=0.3,
                            ids_dtype=torch.int32),
    "r0": dict(T=5, E=3, k=2, H=8, I=8, r=0),
    "T0": dict(T=0, E=3, k=2, H=8, I=8, r=2),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("save", [True, False])
def test_opcheck_forward(name, save):
    case = make_case(seed=31, hidden_dtype=torch.float32, **CASES[name])
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    torch.library.opcheck(torch.ops.kt.moe_sft_forward.default, _forward_args(case, p, save, False))
    if save:  # save_for_backward=False is the inference path: not differentiable by design
        torch.library.opcheck(torch.ops.kt.moe_sft_forward.default, _forward_args(case, p, save, True))


@pytest.mark.parametrize("name", ["basic", "int32_minus_one", "T0"])
def test_opcheck_forward_bf16(name):
    case = make_case(seed=32, hidden_dtype=torch.bfloat16, lora_dtype=torch.bfloat16, **CASES[name])
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    torch.library.opcheck(torch.ops.kt.moe_sft_forward.default, _forward_args(case, p, True, True))


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck_backward(name):
    case = make_case(seed=33, hidden_dtype=torch.float32, **CASES[name])
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    fwd_args = _forward_args(case, p, True, False)
    out, gate_up_pre, lora_mid = torch.ops.kt.moe_sft_forward(*fwd_args)
    T, k, I, r = case.T, case.k, case.I, case.r
    assert gate_up_pre.shape == (2, T * k, I) and gate_up_pre.dtype == torch.float32
    assert lora_mid.shape == (3, T * k, r) and lora_mid.dtype == torch.float32
    bwd_args = (case.grad_out,) + fwd_args[:-1] + (gate_up_pre, lora_mid)
    torch.library.opcheck(torch.ops.kt.moe_sft_backward.default, bwd_args)
    grads = torch.ops.kt.moe_sft_backward(*bwd_args)
    assert len(grads) == 8
    for g, inp in zip(grads, (case.hidden, case.weights, *case.lora)):
        assert g.shape == inp.shape and g.dtype == inp.dtype


def test_forward_without_save_returns_empty_and_output_unchanged():
    case = make_case(seed=35, hidden_dtype=torch.float32, T=9, E=4, k=2, H=16, I=12, r=3, neg_frac=0.2)
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    fa = _forward_args(case, p, True, False)
    out1, gup, mid = torch.ops.kt.moe_sft_forward(*fa)
    out2, e1, e2 = torch.ops.kt.moe_sft_forward(*(fa[:-1] + (False,)))
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    assert e1.numel() == 0 and e2.numel() == 0


def test_backward_without_saved_activations_is_a_clear_error():
    case = make_case(seed=36, hidden_dtype=torch.float32, T=5, E=3, k=2, H=16, I=12, r=3)
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    fa = _forward_args(case, p, False, True)
    out, e1, e2 = torch.ops.kt.moe_sft_forward(*fa)
    with pytest.raises(ValueError, match="save_for_backward"):
        torch.ops.kt.moe_sft_backward(case.grad_out, *[a.detach() if isinstance(a, torch.Tensor) else a
                                                        for a in fa[:-1]], e1, e2)
    # through autograd: the op documents that save_for_backward=False is not differentiable
    with pytest.raises(RuntimeError, match="save_for_backward"):
        out.sum().backward()


def test_saved_activations_fp64_dtype():
    case = make_case(seed=34, hidden_dtype=torch.float64, T=4, E=3, k=2, H=8, I=6, r=2)
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    out, gate_up_pre, lora_mid = torch.ops.kt.moe_sft_forward(*_forward_args(case, p, True, False))
    assert out.dtype == torch.float64
    assert gate_up_pre.dtype == torch.float64 and gate_up_pre.shape == (2, 8, 6)
    assert lora_mid.dtype == torch.float64 and lora_mid.shape == (3, 8, 2)
