"""KTMoELayer / KTMoEFunction / pack_experts, and their integration with torch:
torch.compile, activation checkpointing, Python threads, thread counts."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import kt_ops
import kt_ops.ops
from kt_testing import (
    LORA_NAMES,
    assert_all_same,
    assert_rel_mae,
    assert_same,
    compare_with_reference,
    comparison_mode,
    make_case,
    run_ops,
    run_reference,
)

E, H, I, R = 4, 32, 24, 4


def make_layer(case=None, lora_rank=R, lora_dtype=torch.float32, alpha=8.0, seed=0, **kw):
    """A loaded layer with random nonzero LoRA B; returns (layer, case)."""
    case = case or make_case(
        seed=seed,
        T=10,
        E=E,
        k=2,
        H=H,
        I=I,
        r=lora_rank,
        neg_frac=0.1,
        scaling=alpha / max(lora_rank, 1),
        lora_dtype=lora_dtype,
    )
    layer = kt_ops.KTMoELayer(
        case.E, case.H, case.I, lora_rank=lora_rank, lora_alpha=alpha, lora_dtype=lora_dtype, **kw
    )
    layer.load_weights_from_tensors(case.gate, case.up, case.down)
    if lora_rank > 0:
        with torch.no_grad():
            for name, t in zip(LORA_NAMES, case.lora):
                getattr(layer, name).copy_(t)
    return layer, case


def layer_fwd_bwd(layer, hidden, ids, weights, grad_out):
    hidden = hidden.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    params = [getattr(layer, n) for n in LORA_NAMES if getattr(layer, n, None) is not None]
    out = layer(hidden, ids, weights)
    grads = torch.autograd.grad(out, [hidden, weights, *params], grad_out)
    return out.detach(), list(grads)


# ----------------------------------------------------------------------------- construction


def test_layer_parameters_and_init():
    layer = kt_ops.KTMoELayer(E, H, I, lora_rank=R, lora_alpha=32.0)
    assert layer.lora_scaling == pytest.approx(32.0 / R)
    shapes = {
        "gate_lora_a": (E, R, H),
        "gate_lora_b": (E, I, R),
        "up_lora_a": (E, R, H),
        "up_lora_b": (E, I, R),
        "down_lora_a": (E, R, I),
        "down_lora_b": (E, H, R),
    }
    params = dict(layer.named_parameters())
    assert set(params) == set(shapes), sorted(params)
    for name, shape in shapes.items():
        p = params[name]
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad
        assert tuple(p.shape) == shape and p.dtype == torch.bfloat16, name
        if name.endswith("_b"):
            assert torch.all(p == 0), f"{name} must be initialised to zeros"
        else:
            assert torch.isfinite(p).all() and p.abs().max() > 0, f"{name} must be kaiming-uniform, not zero"
            fan_in = shape[2]
            assert p.abs().max().item() <= 1.01 * math.sqrt(6.0 / fan_in), f"{name} exceeds a kaiming bound"
            assert p.float().std() > 0
    # Base weights are frozen: never parameters.
    assert all("lora" in n for n in params)


def test_layer_lora_dtype_and_rank_zero():
    layer = kt_ops.KTMoELayer(E, H, I, lora_rank=2, lora_alpha=4.0, lora_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    layer0 = kt_ops.KTMoELayer(E, H, I, lora_rank=0)
    assert len(list(layer0.parameters())) == 0
    for name in LORA_NAMES:
        assert name not in dict(layer0.named_parameters())


def test_layer_unknown_method():
    with pytest.raises(ValueError) as info:
        kt_ops.KTMoELayer(E, H, I, method="NOPE_METHOD")
    assert "AMXBF16_SFT" in str(info.value), str(info.value)


def test_layer_forward_before_load():
    layer = kt_ops.KTMoELayer(E, H, I, lora_rank=R)
    case = make_case(seed=1, T=3, E=E, k=2, H=H, I=I, r=R)
    with pytest.raises(RuntimeError, match="load_weights"):
        layer(case.hidden, case.ids, case.weights)


def test_layer_init_output_equals_base_only_reference():
    """With B = 0 (fresh init) the LoRA term vanishes: output = base MLP."""
    layer = kt_ops.KTMoELayer(E, H, I, lora_rank=R, lora_alpha=16.0, lora_dtype=torch.float32)
    case = make_case(seed=2, T=8, E=E, k=2, H=H, I=I, r=R, zero_lora_b=True)
    layer.load_weights_from_tensors(case.gate, case.up, case.down)
    out = layer(case.hidden, case.ids, case.weights)
    ref, _ = run_reference(case, with_grads=False)
    compare_with_reference(case, out.detach(), None, "tight", ref=(ref, None))


@pytest.mark.parametrize("lora_dtype,hidden_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_layer_matches_reference(isa, lora_dtype, hidden_dtype):
    layer, case = make_layer(lora_dtype=lora_dtype, seed=3)
    case.hidden = case.hidden.to(hidden_dtype)
    case.grad_out = case.grad_out.to(hidden_dtype)
    out, grads = layer_fwd_bwd(layer, case.hidden, case.ids, case.weights, case.grad_out)
    compare_with_reference(case, out, grads, "tight" if hidden_dtype == torch.float32 else "bf16")
    # .backward() accumulates into the parameters' .grad as usual
    out = layer(case.hidden, case.ids, case.weights)
    (out.float() * case.grad_out.float()).sum().backward()
    for name, g in zip(LORA_NAMES, grads[2:]):
        pg = getattr(layer, name).grad
        assert pg is not None and pg.dtype == lora_dtype, name
        assert_rel_mae(name, pg, g.double(), 1e-2)


def test_layer_rank_zero_forward_backward():
    layer, case = make_layer(lora_rank=0, seed=4)
    out, grads = layer_fwd_bwd(layer, case.hidden, case.ids, case.weights, case.grad_out)
    ref_out, ref_grads = run_reference(case)
    compare_with_reference(case, out, None, "tight", ref=(ref_out, None))
    if comparison_mode(case, "tight") == "bf16":  # the ISA in use rounds activations to bf16
        assert_rel_mae("grad hidden_states", grads[0], ref_grads[0], 0.02)
        assert_rel_mae("grad topk_weights", grads[1], ref_grads[1], 0.02)
    else:
        torch.testing.assert_close(grads[0].double(), ref_grads[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grads[1].double(), ref_grads[1], rtol=1e-4, atol=1e-4)


def test_layer_equals_ops():
    layer, case = make_layer(seed=5)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    out_l, grads_l = layer_fwd_bwd(layer, case.hidden, case.ids, case.weights, case.grad_out)
    out_o, grads_o = run_ops(case, experts)
    assert_same("output", out_l, out_o)
    assert_all_same(["hidden", "weights", *LORA_NAMES], grads_l, grads_o)


# ----------------------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pack_unpack_roundtrip(dtype):
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(3, 5, 7, generator=gen).to(dtype)
    u = torch.randn(3, 5, 7, generator=gen).to(dtype)
    d = torch.randn(3, 7, 5, generator=gen).to(dtype)
    p = kt_ops.pack_experts(g, u, d)
    assert isinstance(p, kt_ops.PackedExperts)
    assert p.weight_format == "bf16"
    assert (p.num_experts, p.hidden_size, p.intermediate_size) == (3, 7, 5)
    assert p.gate_scale is None and p.up_scale is None and p.down_scale is None
    for blob in (p.gate, p.up, p.down):
        assert blob.dtype == torch.uint8 and blob.dim() == 2 and blob.shape[0] == 3
        assert blob.shape[1] >= 5 * 7 * 2
    g2, u2, d2 = kt_ops.unpack_experts(p)
    for a, b in ((g2, g), (u2, u), (d2, d)):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        assert torch.equal(a, b.to(torch.bfloat16))


def test_pack_experts_bad_inputs():
    g = torch.randn(3, 5, 7)
    with pytest.raises(ValueError, match="weight_format"):
        kt_ops.pack_experts(g, g, g.transpose(1, 2), weight_format="int3")
    with pytest.raises(ValueError):
        kt_ops.pack_experts(g, g, g)  # down must be [E, H, I]
    with pytest.raises(ValueError):
        kt_ops.pack_experts(g, g[:2], g.transpose(1, 2))
    with pytest.raises(ValueError):
        kt_ops.pack_experts(g[0], g[0], g[0].t())
    with pytest.raises(TypeError):
        gi = g.to(torch.int32)
        kt_ops.pack_experts(gi, gi, gi.transpose(1, 2))


# ----------------------------------------------------------------------------- KTMoEFunction


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_function_apply_equals_layer(lora_dtype):
    layer, case = make_layer(lora_dtype=lora_dtype, seed=7)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    out_l, grads_l = layer_fwd_bwd(layer, case.hidden, case.ids, case.weights, case.grad_out)
    hidden = case.hidden.detach().clone().requires_grad_(True)
    weights = case.weights.detach().clone().requires_grad_(True)
    lora = [getattr(layer, n).detach().clone().requires_grad_(True) for n in LORA_NAMES]
    out_f = kt_ops.KTMoEFunction.apply(hidden, case.ids, weights, experts, *lora, layer.lora_scaling)
    grads_f = torch.autograd.grad(out_f, [hidden, weights, *lora], case.grad_out)
    assert_same("output", out_f.detach(), out_l)
    assert_all_same(["hidden", "weights", *LORA_NAMES], grads_f, grads_l)


# ----------------------------------------------------------------------------- torch.compile


class Block(torch.nn.Module):
    """A small module around KTMoELayer: a linear pre-projection, the MoE, a residual."""

    def __init__(self, layer):
        super().__init__()
        self.moe = layer
        self.proj = torch.nn.Linear(H, H, bias=False)

    def forward(self, x, ids, w):
        y = self.moe(self.proj(x), ids, w)
        return x + y


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    layer, case = make_layer(seed=8)
    torch.manual_seed(0)
    block = Block(layer)

    def step(x, ids, w):
        return block(x, ids, w)

    compiled = torch.compile(step, fullgraph=True, backend=backend)

    def fwd_bwd(fn):
        block.zero_grad(set_to_none=True)
        x = case.hidden.detach().clone().requires_grad_(True)
        w = case.weights.detach().clone().requires_grad_(True)
        out = fn(x, case.ids, w)
        (out * case.grad_out).sum().backward()
        return out.detach(), [x.grad, w.grad] + [p.grad.clone() for _, p in sorted(block.named_parameters())]

    out_e, grads_e = fwd_bwd(step)
    for _ in range(2):  # second call reuses the compiled graph
        out_c, grads_c = fwd_bwd(compiled)
        torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_torch_compile_ops_fullgraph_int32_and_minus_one():
    torch._dynamo.reset()
    case = make_case(seed=9, T=9, E=5, k=3, H=24, I=16, r=3, ids_mode="random", neg_frac=0.2, ids_dtype=torch.int32)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)

    def f(hidden, ids, weights, *lora):
        return kt_ops.ops.moe_sft(hidden, ids, weights, experts, tuple(lora), case.scaling).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().clone().requires_grad_(True) for t in (case.hidden, case.weights, *case.lora)]
    out_e = f(leaves[0], case.ids, *leaves[1:])
    g_e = torch.autograd.grad(out_e.sum(), leaves)
    out_c = compiled(leaves[0], case.ids, *leaves[1:])
    g_c = torch.autograd.grad(out_c.sum(), leaves)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- checkpointing


def test_activation_checkpointing_same_grads():
    layer, case = make_layer(seed=10)
    torch.manual_seed(0)
    block = Block(layer)

    def run(use_ckpt):
        block.zero_grad(set_to_none=True)
        x = case.hidden.detach().clone().requires_grad_(True)
        w = case.weights.detach().clone().requires_grad_(True)
        if use_ckpt:
            out = checkpoint(block, x, case.ids, w, use_reentrant=False)
        else:
            out = block(x, case.ids, w)
        (out * case.grad_out).sum().backward()
        return [out.detach(), x.grad, w.grad] + [p.grad.clone() for _, p in sorted(block.named_parameters())]

    plain = run(False)
    ckpt = run(True)
    assert_all_same(["output", "hidden", "weights"] + [n for n, _ in sorted(block.named_parameters())], ckpt, plain)


# ----------------------------------------------------------------------------- threads


def test_two_python_threads_match_serial():
    layer, _ = make_layer(seed=11)
    cases = [make_case(seed=100 + i, T=16, E=E, k=2, H=H, I=I, r=R, neg_frac=0.1) for i in range(6)]
    serial = [layer_fwd_bwd(layer, c.hidden, c.ids, c.weights, c.grad_out) for c in cases]
    results = [None] * len(cases)
    errors = []
    barrier = threading.Barrier(2)

    def worker(indices):
        try:
            barrier.wait()
            for _ in range(3):
                for i in indices:
                    results[i] = layer_fwd_bwd(
                        layer, cases[i].hidden, cases[i].ids, cases[i].weights, cases[i].grad_out
                    )
                    assert_same(f"case {i} output", results[i][0], serial[i][0])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(list(range(j, len(cases), 2)),)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, ((out_s, grads_s), (out_t, grads_t)) in enumerate(zip(serial, results)):
        assert_same(f"case {i} output", out_t, out_s)
        assert_all_same([f"case {i} {n}" for n in ["hidden", "weights", *LORA_NAMES]], grads_t, grads_s)


def test_num_threads_one_vs_two_identical(isa):
    # big enough that one expert's rows and columns are split over several tasks/threads
    case = make_case(seed=12, T=150, E=6, k=3, H=136, I=144, r=8, ids_mode="hot", neg_frac=0.1)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    kt_ops.set_num_threads(1)
    assert kt_ops.get_num_threads() == 1
    out1, grads1 = run_ops(case, experts)
    kt_ops.set_num_threads(2)
    assert kt_ops.get_num_threads() == 2
    assert kt_ops.cpu_info()["num_threads"] == 2
    out2, grads2 = run_ops(case, experts)
    assert_same("output", out2, out1)
    assert_all_same(["hidden", "weights", *LORA_NAMES], grads2, grads1)


def test_frozen_lora_gets_no_gradient_and_the_rest_is_unchanged():
    """Autograd asks the backward op for LoRA gradients only when a LoRA tensor needs one: a frozen
    adapter (training something else through the experts) skips that work, and the input and
    routing-weight gradients stay bit-identical."""
    layer, case = make_layer()
    _, trained = layer_fwd_bwd(layer, case.hidden, case.ids, case.weights, case.grad_out)
    for name in LORA_NAMES:
        getattr(layer, name).requires_grad_(False)
    hidden = case.hidden.detach().clone().requires_grad_(True)
    weights = case.weights.detach().clone().requires_grad_(True)
    out = layer(hidden, case.ids, weights)
    out.backward(case.grad_out)
    assert_all_same(["hidden", "weights"], [hidden.grad, weights.grad], trained[:2])
    assert all(getattr(layer, name).grad is None for name in LORA_NAMES)


def test_backward_op_skips_lora_gradients_on_request():
    layer, case = make_layer()
    loras = tuple(getattr(layer, name).detach() for name in LORA_NAMES)
    out, gate_up_pre, lora_mid = kt_ops.ops.forward_op(
        case.hidden, case.ids, case.weights, layer.experts, loras, layer.lora_scaling, True
    )
    args = (
        case.grad_out,
        case.hidden,
        case.ids,
        case.weights,
        layer.experts,
        loras,
        layer.lora_scaling,
        gate_up_pre,
        lora_mid,
    )
    full = kt_ops.ops.backward_op(*args)
    skipped = kt_ops.ops.backward_op(*args, lora_grads=False)
    assert_all_same(["hidden", "weights"], skipped[:2], full[:2])
    for name, grad, reference in zip(LORA_NAMES, skipped[2:], full[2:]):
        assert grad.shape == reference.shape, name
        assert not grad.any(), f"{name}: computed although lora_grads=False"
        assert reference.any(), f"{name}: the full backward should have a nonzero gradient here"
