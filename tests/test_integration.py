"""kt_ops.integration on tiny transformers v5 MoE models of each supported architecture."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import kt_ops  # noqa: E402
from kt_ops.integration import (  # noqa: E402
    KTExperts, apply_kt, find_moe_experts, get_peft_model, kt_experts_modules, kt_lora_parameters)
from kt_ops.integration.tiny import TINY_MODELS, tiny_model  # noqa: E402

VOCAB = 128


def _ids(batch=2, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def _run(model, ids):
    """Logits and the output of every routed-experts module (captured by forward hooks)."""
    outputs, handles = [], []
    for _, module in find_moe_experts(model):
        handles.append(module.register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone())))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, outputs


@pytest.mark.parametrize("name", TINY_MODELS)
def test_no_lora_matches_transformers_eager_fp32(name):
    model = tiny_model(name).eval()
    ids = _ids()
    ref_logits, ref_experts = _run(model, ids)
    experts_modules = [m for _, m in find_moe_experts(model)]
    apply_kt(model, lora_rank=0)
    logits, experts = _run(model, ids)

    assert model.config._experts_implementation == "kt"
    for module in experts_modules:
        # The fused weights now live only in kt_ops' packed form.
        assert "gate_up_proj" not in module._parameters and "down_proj" not in module._parameters
        assert isinstance(module.kt_experts, KTExperts) and module.kt_experts.experts is not None
    assert len(experts) == len(ref_experts) > 0
    for out, ref in zip(experts, ref_experts):
        assert ref.abs().max() > 0
        # The AMXBF16 backend packs the fp32 weights to bf16: bf16-level agreement per MoE layer.
        assert _rel(out, ref) < 1e-2
    assert _rel(logits, ref_logits) < 2e-3


@pytest.mark.parametrize("name", TINY_MODELS)
def test_no_lora_matches_transformers_eager_bf16(name):
    model = tiny_model(name, dtype=torch.bfloat16).eval()
    ids = _ids()
    ref_logits, ref_experts = _run(model, ids)
    apply_kt(model, lora_rank=0)
    logits, experts = _run(model, ids)
    assert logits.dtype == torch.bfloat16
    assert _rel(logits, ref_logits) < 0.02
    # Only the first MoE layer sees identical inputs: in bf16 a later router may flip a near-tied choice.
    assert experts[0].dtype == torch.bfloat16
    assert _rel(experts[0], ref_experts[0]) < 0.02


@pytest.mark.parametrize("name", TINY_MODELS)
def test_expert_lora_trains(name):
    model = tiny_model(name)
    apply_kt(model, lora_rank=4, lora_alpha=8.0)
    model.requires_grad_(False)
    lora = kt_lora_parameters(model)
    assert len(lora) == 6 * len(kt_experts_modules(model)) > 0
    for p in lora:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(lora, lr=1e-2)
    ids = _ids(seq=16)
    losses = []
    for step in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 1:  # B starts at zero, so A's gradient appears from the second step on
            for _, _, kt in kt_experts_modules(model):
                for pname in ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b"):
                    grad = getattr(kt, pname).grad
                    assert grad is not None and grad.abs().sum() > 0, pname
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name", TINY_MODELS)
def test_gpu_experts_give_same_logits(name):
    ids = _ids()
    all_kt = apply_kt(tiny_model(name).eval(), lora_rank=0)
    split = apply_kt(tiny_model(name).eval(), lora_rank=2, kt_num_gpu_experts=2)
    logits_all, _ = _run(all_kt, ids)
    logits_split, _ = _run(split, ids)  # LoRA B is zero: same function as no LoRA
    for _, module, kt in kt_experts_modules(split):
        assert kt.first_expert == 2 and kt.num_experts == module.num_experts - 2
        assert module.gate_up_proj.shape[0] == 2 and module.down_proj.shape[0] == 2
        assert kt.gate_lora_a.shape[0] == module.num_experts - 2
    # The two kept experts compute in fp32 in transformers, the rest in bf16 on kt.
    assert _rel(logits_split, logits_all) < 2e-3


def test_backends_and_prepacked_weights(tmp_path):
    name = "tiny-qwen3-moe"
    ids = _ids()
    model = tiny_model(name).eval()
    ref_logits, ref_experts = _run(model, ids)

    # Pre-quantize every layer the way a converter would, one file per layer.
    for qualified, module in find_moe_experts(model):
        layer = int(qualified.split("layers.")[1].split(".")[0])
        gate, up = module.gate_up_proj.detach().chunk(2, dim=1)
        packed = kt_ops.pack_experts(gate, up, module.down_proj.detach(), "int8")
        kt_ops.save_packed_experts(str(tmp_path / f"blk.{layer}.safetensors"), {layer: packed})

    int8 = apply_kt(tiny_model(name).eval(), kt_backend="AMXINT8", lora_rank=0)
    from_files = apply_kt(tiny_model(name).eval(), kt_backend="AMXINT8", kt_weight_path=str(tmp_path), lora_rank=0)
    auto = apply_kt(tiny_model(name).eval(), kt_backend="auto", kt_weight_path=str(tmp_path), lora_rank=0)
    logits_int8, experts_int8 = _run(int8, ids)
    assert all(kt.weight_format == "int8" for _, _, kt in kt_experts_modules(auto))
    assert torch.equal(_run(from_files, ids)[0], logits_int8)
    assert torch.equal(_run(auto, ids)[0], logits_int8)
    for out, ref in zip(experts_int8, ref_experts):
        assert _rel(out, ref) < 0.03
    with pytest.raises(ValueError, match="kt_backend"):
        apply_kt(tiny_model(name), kt_backend="AMXBF16", kt_weight_path=str(tmp_path))

    int4 = apply_kt(tiny_model(name).eval(), kt_backend="AMXINT4", lora_rank=0)
    _, experts_int4 = _run(int4, ids)
    for out, ref in zip(experts_int4, ref_experts):
        assert _rel(out, ref) < 0.25  # 4-bit per-row weights on 64-wide rows


def test_bad_arguments():
    model = tiny_model("tiny-mixtral")
    with pytest.raises(ValueError, match="kt_backend"):
        apply_kt(model, kt_backend="AMXFP8")
    with pytest.raises(ValueError, match="kt_num_gpu_experts"):
        apply_kt(model, kt_num_gpu_experts=-1)
    with pytest.raises(ValueError, match="kt_num_gpu_experts"):
        apply_kt(model, kt_num_gpu_experts=4)  # tiny Mixtral has 4 experts
    with pytest.raises(ValueError, match="kt_num_threads"):
        apply_kt(model, kt_num_threads=0)
    with pytest.raises(ValueError, match="lora_rank"):
        apply_kt(model, lora_rank=-2)
    with pytest.raises(TypeError, match="model"):
        apply_kt("not a model")
    with pytest.raises(ValueError, match="no transformers experts"):
        apply_kt(torch.nn.Linear(4, 4))
    with pytest.raises(FileNotFoundError, match="kt_weight_path"):
        apply_kt(model, kt_weight_path="/nonexistent/kt/weights")
    # Failed calls leave the model untouched and usable.
    assert all("gate_up_proj" in m._parameters for _, m in find_moe_experts(model))
    apply_kt(model, lora_rank=0)
    with pytest.raises(ValueError, match="already converted"):
        apply_kt(model)


def _attention_targets(name):
    if "deepseek" in name:
        return ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    return ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("order", ["apply_kt_first", "peft_first"])
@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-deepseek-v3"])
def test_peft_attention_lora_with_expert_lora(name, order):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=_attention_targets(name))
    model = tiny_model(name)
    if order == "apply_kt_first":
        apply_kt(model, lora_rank=4, lora_alpha=8.0)
        model = get_peft_model(model, config)
    else:
        model = peft.get_peft_model(model, config)
        apply_kt(model, lora_rank=4, lora_alpha=8.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expert_lora = {n for n in trainable if ".kt_experts." in n}
    attention_lora = {n for n in trainable if ".self_attn." in n and ".lora_" in n}
    assert len(expert_lora) == 6 * len(kt_experts_modules(model))
    assert attention_lora and trainable == expert_lora | attention_lora

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(seq=16)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for _, _, kt in kt_experts_modules(model):
        assert kt.gate_lora_b.abs().sum() > 0 and kt.down_lora_b.abs().sum() > 0


def test_plain_peft_freezes_expert_lora_and_helper_restores_it():
    # Documents why kt_ops.integration.get_peft_model exists: peft freezes parameters it did not create.
    import peft

    model = apply_kt(tiny_model("tiny-qwen3-moe"), lora_rank=2)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not any(p.requires_grad for p in kt_lora_parameters(wrapped))
    from kt_ops.integration import set_kt_lora_trainable

    set_kt_lora_trainable(wrapped)
    assert all(p.requires_grad for p in kt_lora_parameters(wrapped))
