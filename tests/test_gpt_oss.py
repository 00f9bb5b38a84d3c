"""gpt-oss experts: the kernels' clamped-SwiGLU variant with per-expert biases (forward and every
gradient against the reference, opcheck), and apply_kt on a tiny transformers gpt-oss model."""

from __future__ import annotations

import pytest
import torch

import kt_ops
import kt_ops.ops
from kt_ops import reference
from kt_testing import (
    assert_same_step,
    backward_op_call,
    compare_with_reference,
    expert_lora_params,
    grads_of,
    isa_rounds_activations,
    logits_of,
    make_case,
    model_rtol,
    op_call,
    plain_and_kt_step,
    randomize_lora_b,
    rel_l2,
    single_torch_thread,
    token_ids,
)

# A small limit so that the clamps are active for a good share of the O(1) pre-activations.
LIMIT, ALPHA = 0.6, 1.702


def _biases(case, seed, which=("gate", "up", "down")):
    gen = torch.Generator().manual_seed(seed)
    E, H, I = case.E, case.H, case.I
    shapes = {"gate": (E, I), "up": (E, I), "down": (E, H)}
    return {
        f"{name}_bias": (0.5 * torch.randn(*shapes[name], generator=gen)) if name in which else None for name in shapes
    }


def _variant(case, seed, activation="clamped_swiglu", which=("gate", "up", "down")):
    return dict(_biases(case, seed, which), activation=activation, swiglu_alpha=ALPHA, swiglu_limit=LIMIT)


def _grad_inputs(hidden, weights, lora):
    return [t.detach().clone().requires_grad_(True) for t in (hidden, weights, *lora)]


def _reference(case, variant, compute_dtype=torch.float64):
    with single_torch_thread():
        cd = compute_dtype
        leaves = _grad_inputs(case.hidden.to(cd), case.weights.to(cd), [t.to(cd) for t in case.lora])
        out = reference.moe_sft_reference(
            leaves[0],
            case.ids,
            leaves[1],
            case.gate,
            case.up,
            case.down,
            *leaves[2:],
            case.scaling,
            compute_dtype=cd,
            **variant,
        )
        grads = grads_of(out, leaves, case.grad_out.to(out.dtype))
        grads = [torch.zeros_like(l) if g is None else g for g, l in zip(grads, leaves)]
    return out.detach(), grads


def _kernel(case, variant):
    experts = kt_ops.pack_experts(case.gate, case.up, case.down).with_variant(**variant)
    leaves = _grad_inputs(case.hidden, case.weights, case.lora)
    out = kt_ops.ops.moe_sft(leaves[0], case.ids, leaves[1], experts, tuple(leaves[2:]), case.scaling)
    return out.detach(), grads_of(out, leaves, case.grad_out), experts


CASES = {
    "basic": dict(T=9, E=4, k=2, H=32, I=24, r=4),
    "dupes_minus_one_odd": dict(T=11, E=3, k=3, H=20, I=13, r=3, ids_mode="random", neg_frac=0.25),
    "wide": dict(T=5, E=2, k=2, H=72, I=80, r=2),
    "r0": dict(T=6, E=3, k=2, H=16, I=16, r=0),
}


@pytest.mark.parametrize(
    "activation,which",
    [("clamped_swiglu", ("gate", "up", "down")), ("clamped_swiglu", ()), ("silu", ("gate", "up", "down"))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_variant_matches_reference(name, dtype, activation, which):
    case = make_case(seed=71, hidden_dtype=dtype, **CASES[name])
    variant = _variant(case, 72, activation, which)
    out, grads, experts = _kernel(case, variant)
    compare_with_reference(
        case, out, grads, "bf16" if dtype == torch.bfloat16 else "tight", ref=_reference(case, variant)
    )
    if activation == "clamped_swiglu" and case.T:
        # The test means something only if both clamps bite somewhere (and not everywhere).
        _, pre, _ = kt_ops.ops.forward_op(
            case.hidden,
            case.ids,
            case.weights,
            experts,
            kt_ops.ops.lora_inputs(experts, case.lora, case.hidden),
            case.scaling,
            True,
        )
        routed = case.ids.reshape(-1) >= 0
        g, u = pre[0][routed], pre[1][routed]
        assert 0 < (g > LIMIT).float().mean() < 0.9 and 0 < (u.abs() > LIMIT).float().mean() < 0.9


def test_no_variant_is_bit_identical_to_default_silu():
    """Explicit defaults (no bias, silu) take the path existing callers take, bit for bit."""
    case = make_case(seed=73, **CASES["basic"])
    plain = kt_ops.pack_experts(case.gate, case.up, case.down)
    out_a, grads_a, _ = _kernel(case, {})
    out_b, grads_b, _ = _kernel(case, dict(activation="silu", gate_bias=None))
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert plain.variant() == kt_ops.pack_experts(case.gate, case.up, case.down).variant()


def _op_args(case, experts, save, requires_grad):
    """(args, kwargs) of the forward op on the case, by name."""
    return op_call(case, experts, save, requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_variant(dtype):
    case = make_case(seed=74, hidden_dtype=dtype, lora_dtype=dtype, **CASES["dupes_minus_one_odd"])
    experts = kt_ops.pack_experts(case.gate, case.up, case.down).with_variant(**_variant(case, 75))
    torch.library.opcheck(torch.ops.kt.moe_sft_forward.default, *_op_args(case, experts, True, True))
    torch.library.opcheck(torch.ops.kt.moe_sft_forward.default, *_op_args(case, experts, False, False))
    fwd = _op_args(case, experts, True, False)
    _, pre, mid = torch.ops.kt.moe_sft_forward(*fwd[0], **fwd[1])
    torch.library.opcheck(torch.ops.kt.moe_sft_backward.default, *backward_op_call(case.grad_out, fwd, pre, mid))


def test_gate_up_pre_holds_biased_pre_activations():
    case = make_case(seed=76, **CASES["basic"])
    variant = _variant(case, 77)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    loras = kt_ops.ops.lora_inputs(experts, case.lora, case.hidden)
    _, pre_plain, _ = kt_ops.ops.forward_op(case.hidden, case.ids, case.weights, experts, loras, case.scaling, True)
    _, pre, _ = kt_ops.ops.forward_op(
        case.hidden, case.ids, case.weights, experts.with_variant(**variant), loras, case.scaling, True
    )
    ids = case.ids.reshape(-1)
    torch.testing.assert_close(pre[0] - pre_plain[0], variant["gate_bias"][ids], rtol=0, atol=1e-5)
    torch.testing.assert_close(pre[1] - pre_plain[1], variant["up_bias"][ids], rtol=0, atol=1e-5)


def test_bad_variant_errors_name_the_argument():
    case = make_case(seed=78, **CASES["basic"])
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    with pytest.raises(ValueError, match="down_bias must have shape"):
        experts.with_variant(down_bias=torch.zeros(case.E, case.I))
    with pytest.raises(ValueError, match="activation must be one of"):
        experts.with_variant(activation="gelu")
    with pytest.raises(ValueError, match="swiglu_limit must be > 0"):
        experts.with_variant(activation="clamped_swiglu", swiglu_limit=0.0)
    with pytest.raises(TypeError, match="gate_bias must be float32"):
        experts.with_variant(gate_bias=torch.zeros(case.E, case.I, dtype=torch.int32))
    # The op checks too, for callers that bypass PackedExperts.
    args, kwargs = _op_args(case, experts, False, False)
    with pytest.raises(ValueError, match="gate_bias must have shape"):
        torch.ops.kt.moe_sft_forward(*args, **dict(kwargs, gate_bias=torch.zeros(case.E, case.I + 1)))
    with pytest.raises(ValueError, match="activation must be 'silu', 'clamped_swiglu' or 'clamped_silu'"):
        torch.ops.kt.moe_sft_forward(*args, **dict(kwargs, gate_bias=None, activation="relu"))


# ------------------------------------------------------------------------------------------------
# apply_kt on a tiny transformers gpt-oss model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from kt_ops.integration import apply_kt, kt_experts_modules  # noqa: E402
from kt_ops.integration.tiny import train_steps  # noqa: E402

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_gpt_oss(dtype=torch.float32, seed=0, swiglu_limit=1.0):
    """Random tiny gpt-oss; the biases are drawn nonzero (transformers initialises them to zero) and the
    limit is small, so that biases and both clamps show in the logits."""
    config = transformers.GptOssConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        sliding_window=8,
        swiglu_limit=swiglu_limit,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")):
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-2] ** -0.5)
            elif name.endswith("_proj_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(dtype).eval()


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 2e-2)])
def test_apply_kt_logits_match_eager(dtype, tol):
    if dtype == torch.bfloat16 and isa_rounds_activations():
        # Each op agrees with avx2 to ~2e-3 here, but in an all-bf16 model the bf16-rounded layer-0
        # output flips some of layer 1's top-k choices, which moves the logits by ~0.15: not a bar
        # a kernel could be held to. The fp32 model covers this ISA, the op tests cover bf16 inputs.
        pytest.skip("bf16 model on an ISA that rounds activations to bf16: routing flips between layers")
    ids = token_ids()
    model = tiny_gpt_oss(dtype)
    eager = logits_of(model, ids)
    apply_kt(model, lora_rank=0)
    converted = kt_experts_modules(model)
    assert len(converted) == 2
    for _, module, kt in converted:
        assert kt.experts.activation == "clamped_swiglu" and kt.experts.swiglu_limit == 1.0
        assert not hasattr(module, "gate_up_proj_bias")  # the biases moved into kt with the weights
    got = logits_of(model, ids)
    assert rel_l2(got, eager) < tol
    # The biases matter at this tolerance: without them the logits are far off.
    for _, _, kt in converted:
        kt.experts = kt.experts.with_variant(gate_bias=None, up_bias=None, down_bias=None)
    assert rel_l2(logits_of(model, ids), eager) > 10 * tol


@pytest.mark.usefixtures("one_torch_thread")
def test_target_parameters_gradients_match_plain_peft():
    # The same peft adapter on plain transformers and on the kt model: same logits and gradients
    # (peft's LoRA on the interleaved, transposed gate_up_proj mapped onto gate and up correctly).
    ids = token_ids()
    plain, kt, _ = plain_and_kt_step(tiny_gpt_oss, ids, ["q_proj"], EXPERT_TARGETS)
    assert_same_step(plain, kt, logits_tol=5e-3, grads_tol=model_rtol(2e-2))


@pytest.mark.usefixtures("one_torch_thread")
def test_training_steps_and_adapter_round_trips(tmp_path):
    ids = token_ids()
    model = apply_kt(tiny_gpt_oss(), lora_rank=4, lora_alpha=8.0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    expert_lora_params(model)
    model.train()
    losses = train_steps(model, ids, steps=4, lr=1e-2)
    assert losses[-1] < losses[0]
    model.eval()
    tuned = logits_of(model, ids)
    model.save_pretrained(tmp_path)
    # back into a fresh kt model: bit-exact
    loaded = peft.PeftModel.from_pretrained(apply_kt(tiny_gpt_oss(), lora_rank=4, lora_alpha=8.0), tmp_path)
    assert torch.equal(logits_of(loaded, ids), tuned)
    # into plain transformers + peft (no kt_ops): the same model up to bf16 packing
    plain = peft.PeftModel.from_pretrained(tiny_gpt_oss(), tmp_path)
    assert rel_l2(logits_of(plain, ids), tuned) < 5e-3


@pytest.mark.usefixtures("one_torch_thread")
def test_gpu_kept_experts(tmp_path):
    # The first experts stay in the module (its own biases and clamped SwiGLU), the rest run on kt:
    # logits and every LoRA gradient as plain transformers + peft, and the merged export.
    from kt_ops.integration import export_merged

    ids = token_ids()
    (plain_logits, plain_grads), (kt_logits, kt_grads), model = plain_and_kt_step(
        tiny_gpt_oss, ids, ["q_proj"], EXPERT_TARGETS, kt_num_gpu_experts=1
    )
    assert rel_l2(kt_logits, plain_logits) < 5e-3
    for n in plain_grads:
        assert rel_l2(kt_grads[n], plain_grads[n]) < model_rtol(2e-2), n
    model.eval()
    export_merged(model, tmp_path, dtype=torch.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert rel_l2(logits_of(plain, ids), logits_of(model, ids)) < 5e-3


@pytest.mark.usefixtures("one_torch_thread")
def test_merged_export_loads_in_plain_transformers(tmp_path):
    from kt_ops.integration import export_merged

    ids = token_ids()
    model = apply_kt(tiny_gpt_oss(torch.bfloat16), lora_rank=4, lora_alpha=8.0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    randomize_lora_b(model)
    model.eval()
    kt_logits = logits_of(model, ids)
    export_merged(model, tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    merged_logits = logits_of(plain, ids)
    with model.disable_adapter():
        base_logits = logits_of(model, ids)
    assert rel_l2(merged_logits, kt_logits) < 0.03 < rel_l2(base_logits, kt_logits)


@pytest.mark.usefixtures("one_torch_thread")
def test_per_expert_layout_round_trip(tmp_path):
    # save_kt_adapter's per-expert layout splits the interleaved fused LoRA into gate and up and back.
    from kt_ops.integration import load_kt_adapter, save_kt_adapter

    ids = token_ids()
    model = apply_kt(tiny_gpt_oss(), lora_rank=2, lora_alpha=4.0)
    with pytest.warns(UserWarning, match="peft_config"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    randomize_lora_b(model)
    tuned = logits_of(model.eval(), ids)
    save_kt_adapter(model, tmp_path)
    fresh = apply_kt(tiny_gpt_oss(), lora_rank=2, lora_alpha=4.0)
    with pytest.warns(UserWarning, match="peft_config"):
        fresh = peft.get_peft_model(fresh, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    load_kt_adapter(fresh, tmp_path)
    assert torch.equal(logits_of(fresh.eval(), ids), tuned)
    # The per-expert gate / up B are the even / odd rows of peft's fused gate_up B (its output order).
    from safetensors.torch import load_file

    from kt_ops.integration.install import kt_expert_wrappers
    from kt_ops.integration.peft_lora import adapter_factors

    saved = load_file(tmp_path / "adapter_model.safetensors")
    wrapper = next(w for w in kt_expert_wrappers(model) if w.parameter_name == "gate_up_proj")
    _, fused_b, _ = adapter_factors(wrapper, "default")
    for proj, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
        key = next(k for k in saved if ".layers.0." in k and f".experts.1.{proj}.lora_B" in k)
        torch.testing.assert_close(saved[key].float(), fused_b[1, rows].float(), rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["clamped_swiglu", "clamped_silu"])
def test_torch_compile_fullgraph_with_variant(activation):
    torch._dynamo.reset()
    case = make_case(seed=79, **CASES["basic"])
    layer = kt_ops.KTMoELayer(case.E, case.H, case.I, lora_rank=case.r, lora_alpha=2.0 * case.r, method="AMXBF16_SFT")
    layer.load_weights_from_tensors(case.gate, case.up, case.down)
    layer.experts = layer.experts.with_variant(**_variant(case, 80, activation))
    with torch.no_grad():
        for name, t in zip(("gate_lora_b", "up_lora_b", "down_lora_b"), case.lora[1::2]):
            getattr(layer, name).copy_(t)

    def fwd_bwd(fn):
        layer.zero_grad(set_to_none=True)
        x = case.hidden.clone().requires_grad_(True)
        out = fn(x, case.ids, case.weights)
        out.backward(case.grad_out)
        return out.detach(), x.grad, layer.gate_lora_b.grad, layer.down_lora_a.grad

    eager = fwd_bwd(layer)
    compiled = fwd_bwd(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert eager[1].norm() > 0 and eager[2].norm() > 0


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("order", ["apply_kt_first", "peft_first"])
def test_stock_peft_in_either_order(tmp_path, order):
    ids = token_ids()
    base_logits = logits_of(apply_kt(tiny_gpt_oss(), lora_rank=0), ids)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = tiny_gpt_oss()
    if order == "apply_kt_first":
        apply_kt(model, lora_rank=4, lora_alpha=8.0)
        with pytest.warns(UserWarning, match="peft_config"):
            model = peft.get_peft_model(model, config)
    else:
        model = peft.get_peft_model(model, config)
        apply_kt(model, lora_rank=4, lora_alpha=8.0)
    assert sorted(model.peft_config["default"].target_parameters) == sorted(EXPERT_TARGETS)
    expert_lora = expert_lora_params(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for p in expert_lora]
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(b, p) for b, p in zip(before, expert_lora))
    randomize_lora_b(model)
    model.eval()
    tuned = logits_of(model, ids)
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), base_logits)
    assert rel_l2(tuned, base_logits) > 1e-2
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="peft_config"):
        loaded = peft.PeftModel.from_pretrained(apply_kt(tiny_gpt_oss(), lora_rank=4, lora_alpha=8.0), tmp_path)
    assert torch.equal(logits_of(loaded, ids), tuned)


def test_splitting_experts_with_a_variant_is_refused():
    from kt_ops.core.packed import resplit_packed

    case = make_case(seed=81, **CASES["basic"])
    experts = kt_ops.pack_experts(case.gate, case.up, case.down).with_variant(**_variant(case, 82))
    with pytest.raises(ValueError, match="cannot be split over sub-pools"):
        resplit_packed(experts, 128, [(0, 12), (12, 24)])
