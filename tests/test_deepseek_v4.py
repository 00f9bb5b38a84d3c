"""DeepSeek-V4 experts: the kernels' clamped-SiLU activation (h = silu(min(g, L)) * clamp(u, -L, L);
forward, every gradient and opcheck against the reference, with the clamps active), and apply_kt on a
tiny transformers DeepSeek-V4 model (logits vs eager on every backend, id num_experts = "no expert",
stock peft, save/load, merged export, a shared experts file); every custom gate apply_kt knows
(KNOWN_GATES: DeepSeek-V4, GLM-5-Next, HY-V4, MiniMax-M3-VL, gpt-oss, Beam) against its module."""

from __future__ import annotations

import pytest
import torch

import kt_ops
import kt_ops.ops
import test_gpt_oss as variant_tests  # the variant helpers (reference / kernel / op arguments)
from kt_testing import (
    assert_same_step,
    backward_op_call,
    compare_with_reference,
    expert_lora_params,
    fp32_rtol,
    logits_of,
    make_case,
    model_rtol,
    plain_and_kt_step,
    rel_l2,
    token_ids,
)

LIMIT = variant_tests.LIMIT


def _variant(case, seed, which=()):
    return variant_tests._variant(case, seed, "clamped_silu", which)


@pytest.mark.parametrize("which", [(), ("gate", "up", "down")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(variant_tests.CASES))
def test_clamped_silu_matches_reference(name, dtype, which):
    case = make_case(seed=91, hidden_dtype=dtype, **variant_tests.CASES[name])
    variant = _variant(case, 92, which)
    out, grads, experts = variant_tests._kernel(case, variant)
    compare_with_reference(
        case, out, grads, "bf16" if dtype == torch.bfloat16 else "tight", ref=variant_tests._reference(case, variant)
    )
    if case.T:
        # Both clamps bite somewhere (and not everywhere), or the test would not test them.
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


def test_clamped_silu_is_not_clamped_swiglu():
    # The reference's clamped SiLU: no alpha, no +1 on up; swiglu_alpha is ignored.
    g, u = torch.randn(50, dtype=torch.float64) * 2, torch.randn(50, dtype=torch.float64) * 2
    h = kt_ops.reference.gate_activation(g, u, "clamped_silu", swiglu_alpha=5.0, swiglu_limit=LIMIT)
    torch.testing.assert_close(h, torch.nn.functional.silu(g.clamp(max=LIMIT)) * u.clamp(-LIMIT, LIMIT))
    case = make_case(seed=93, **variant_tests.CASES["basic"])
    a = variant_tests._kernel(case, dict(_variant(case, 94), swiglu_alpha=1.0))[0]
    b = variant_tests._kernel(case, dict(_variant(case, 94), swiglu_alpha=3.0))[0]
    c = variant_tests._kernel(case, dict(_variant(case, 94), activation="clamped_swiglu", swiglu_alpha=1.0))[0]
    assert torch.equal(a, b) and rel_l2(a, c) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_clamped_silu(dtype):
    case = make_case(seed=95, hidden_dtype=dtype, lora_dtype=dtype, **variant_tests.CASES["dupes_minus_one_odd"])
    experts = kt_ops.pack_experts(case.gate, case.up, case.down).with_variant(**_variant(case, 96))
    op_args = variant_tests._op_args
    torch.library.opcheck(torch.ops.kt.moe_sft_forward.default, *op_args(case, experts, True, True))
    fwd = op_args(case, experts, True, False)
    _, pre, mid = torch.ops.kt.moe_sft_forward(*fwd[0], **fwd[1])
    torch.library.opcheck(torch.ops.kt.moe_sft_backward.default, *backward_op_call(case.grad_out, fwd, pre, mid))


# ------------------------------------------------------------------------------------------------
# apply_kt on a tiny transformers DeepSeek-V4 model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
if not hasattr(transformers, "DeepseekV4Config"):
    pytest.skip("this transformers has no DeepSeek-V4", allow_module_level=True)

from kt_ops.core.packed import unpack_experts  # noqa: E402
from kt_ops.integration import apply_kt, kt_experts_modules  # noqa: E402
from kt_ops.integration.tiny import train_steps  # noqa: E402

E = 4
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_deepseek_v4(dtype=torch.float32, seed=0, swiglu_limit=1.0):
    """Random tiny DeepSeek-V4: one hash-routed MoE layer (tid2eid drawn at random; transformers
    initialises it to zeros) and one top-k routed, both attention kinds, hyper-connections. The expert
    weights are bf16 numbers (what AMXBF16 packs exactly), so kt matches eager closely: this tiny model
    amplifies an error at the clamps' kinks through its layers."""
    config = transformers.DeepseekV4Config(
        vocab_size=128,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        num_experts_per_tok=2,
        n_routed_experts=E,
        n_shared_experts=1,
        max_position_embeddings=128,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe"],
        sliding_window=8,
        o_groups=2,
        o_lora_rank=16,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=4,
        swiglu_limit=swiglu_limit,
        hc_mult=2,
        num_nextn_predict_layers=0,
    )
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_((torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5).bfloat16())
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.randint(0, E, b.shape, generator=gen))
    return model.to(dtype).eval()


def _with_experts_of(model, kt_model):
    """`model` with each experts module's weights replaced by the kernels' (dequantized) ones of kt_model."""
    with torch.no_grad():
        modules = dict(model.named_modules())
        for name, _, kt in kt_experts_modules(kt_model):
            gate, up, down = unpack_experts(kt.experts)
            modules[name].gate_up_proj.copy_(torch.cat([gate, up], dim=1))
            modules[name].down_proj.copy_(down)
    return model


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("backend,tol", [("AMXBF16", 1e-5), ("AMXINT8", 2e-2), ("AMXINT4", 2e-2)])
def test_apply_kt_logits_match_eager(backend, tol):
    tol = fp32_rtol(tol)
    ids = token_ids()
    model = apply_kt(tiny_deepseek_v4(), kt_backend=backend, lora_rank=0)
    converted = kt_experts_modules(model)
    assert len(converted) == 2
    for _, _, kt in converted:
        assert kt.experts.activation == "clamped_silu" and kt.experts.swiglu_limit == 1.0
    # eager transformers with the weights the kernels hold (bf16 exact; int8 / int4 dequantized, and
    # those kernels quantize the activations too)
    eager = logits_of(_with_experts_of(tiny_deepseek_v4(), model), ids)
    got = logits_of(model, ids)
    assert rel_l2(got, eager) < tol
    # The clamped activation matters at this tolerance: plain SiLU is far off.
    for _, _, kt in converted:
        kt.experts = kt.experts.with_variant(activation="silu")
    assert rel_l2(logits_of(model, ids), eager) > 1e-2


@pytest.mark.usefixtures("one_torch_thread")
def test_bf16_model_logits_match_eager():
    ids = token_ids()
    eager = logits_of(tiny_deepseek_v4(torch.bfloat16), ids)
    got = logits_of(apply_kt(tiny_deepseek_v4(torch.bfloat16), lora_rank=0), ids)
    assert rel_l2(got, eager) < 2e-2


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("num_gpu_experts", [0, 1])
def test_id_num_experts_means_no_expert(num_gpu_experts):
    # transformers' experts skip id num_experts (their one_hot has num_experts + 1 classes); so does kt.
    model = tiny_deepseek_v4()
    experts = model.model.layers[1].mlp.experts
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 64, generator=gen)
    ids = torch.randint(0, E + 1, (16, 2), generator=gen)
    ids[0] = E
    ids[1, 0] = E
    weights = torch.rand(16, 2, generator=gen)
    assert (ids == E).sum() >= 3
    eager = experts(x, ids, weights)
    apply_kt(model, lora_rank=0, kt_num_gpu_experts=num_gpu_experts)
    with torch.no_grad():
        got = experts(x, ids, weights)
    assert torch.equal(got[0], torch.zeros(64))
    assert rel_l2(got, eager) < fp32_rtol(1e-5)


@pytest.mark.usefixtures("one_torch_thread")
def test_peft_gradients_match_plain_peft():
    # The same stock-peft LoRA (attention and target_parameters on the experts) on plain transformers
    # and on the kt model: same logits and every LoRA gradient.
    ids = token_ids()
    plain, kt, _ = plain_and_kt_step(tiny_deepseek_v4, ids, ["self_attn.q_b_proj"], EXPERT_TARGETS)
    assert_same_step(plain, kt, logits_tol=fp32_rtol(1e-4), grads_tol=model_rtol(1e-3))


@pytest.mark.usefixtures("one_torch_thread")
def test_training_save_load_and_export(tmp_path):
    from kt_ops.integration import export_merged

    ids = token_ids()
    model = apply_kt(tiny_deepseek_v4(), lora_rank=4, lora_alpha=8.0)
    with pytest.warns(UserWarning, match="peft_config"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["self_attn.q_b_proj"]))
    expert_lora = expert_lora_params(model)
    before = [p.detach().clone() for p in expert_lora]
    model.train()
    losses = train_steps(model, ids, steps=4, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, expert_lora))
    model.eval()
    tuned = logits_of(model, ids)
    with model.disable_adapter():
        assert rel_l2(logits_of(model, ids), tuned) > 1e-3
    model.save_pretrained(tmp_path / "adapter")
    # back into a fresh kt model: bit-exact
    with pytest.warns(UserWarning, match="peft_config"):
        loaded = peft.PeftModel.from_pretrained(
            apply_kt(tiny_deepseek_v4(), lora_rank=4, lora_alpha=8.0), tmp_path / "adapter"
        )
    assert torch.equal(logits_of(loaded, ids), tuned)
    # into plain transformers + peft (no kt_ops)
    plain = peft.PeftModel.from_pretrained(tiny_deepseek_v4(), tmp_path / "adapter")
    assert rel_l2(logits_of(plain, ids), tuned) < fp32_rtol(1e-4)
    # merged export: a plain transformers checkpoint with the LoRA folded in
    export_merged(model, tmp_path / "merged", dtype=torch.float32)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert rel_l2(logits_of(merged, ids), tuned) < fp32_rtol(1e-4)


@pytest.mark.usefixtures("one_torch_thread")
def test_shared_experts_file_keeps_the_clamps(tmp_path):
    # share_kt_experts maps the packed weights from a file; the activation stays the module's.
    from kt_ops.integration import share_kt_experts

    ids = token_ids()
    model = apply_kt(tiny_deepseek_v4(), lora_rank=0)
    before = logits_of(model, ids)
    share_kt_experts(model, tmp_path / "experts.safetensors")
    assert all(
        kt.experts.activation == "clamped_silu" and kt.experts.swiglu_limit == 1.0
        for _, _, kt in kt_experts_modules(model)
    )
    assert torch.equal(logits_of(model, ids), before)


@pytest.mark.parametrize("key", sorted(__import__("kt_ops.integration.hf", fromlist=["KNOWN_GATES"]).KNOWN_GATES))
def test_known_gates_are_their_modules_apply_gate(key):
    # Each known custom gate equals what the kernels compute for its variant fields (the reference's
    # gate_activation), with the clamps active.
    import importlib

    from kt_ops.integration.hf import fuse_gate_up, known_gate

    model_type, class_name = key
    cls = getattr(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"), class_name)
    module = cls.__new__(cls)
    torch.nn.Module.__init__(module)
    module.act_fn = torch.nn.SiLU()
    module.is_concatenated = model_type != "gpt_oss"
    module.alpha = module.swiglu_alpha = 1.702
    module.limit = module.swiglu_limit = LIMIT
    gen = torch.Generator().manual_seed(97)
    g, u = torch.randn(40, 24, generator=gen), torch.randn(40, 24, generator=gen)
    assert 0 < (g > LIMIT).float().mean() < 0.9
    fields = known_gate(module)
    expected = module._apply_gate(fuse_gate_up(module, g, u, dim=-1))
    torch.testing.assert_close(kt_ops.reference.gate_activation(g, u, **fields), expected)
