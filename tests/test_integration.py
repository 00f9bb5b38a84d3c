"""kt_ops.integration on tiny transformers v5 MoE models of each supported architecture."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import kt_ops  # noqa: E402
from kt_ops.integration import (  # noqa: E402
    KTExperts,
    apply_kt,
    find_moe_experts,
    get_peft_model,
    kt_experts_modules,
    kt_lora_parameters,
)
from kt_ops.integration.peft_lora import adapter_factors  # noqa: E402
from kt_ops.integration.tiny import TINY_MODELS, tiny_model, train_steps  # noqa: E402
from kt_testing import rel_l2, token_ids  # noqa: E402


def _expert_wrappers_of(model, layer_idx):
    from kt_ops.integration.install import holder_of
    from kt_ops.integration.peft_lora import wrapper_chain

    for name, _, kt in kt_experts_modules(model):
        if kt.layer_idx == layer_idx:
            holder, child = holder_of(name)
            return wrapper_chain(getattr(model.get_submodule(holder), child))[1]
    raise KeyError(layer_idx)


def _expert_wrapper(model, param):
    return _expert_wrappers_of(model, kt_experts_modules(model)[0][2].layer_idx)[param]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    ids = token_ids()
    ref_logits, ref_experts = _run(model, ids)
    experts_modules = [m for _, m in find_moe_experts(model)]
    apply_kt(model, lora_rank=0)
    logits, experts = _run(model, ids)

    assert model.config._experts_implementation == "kt"
    for module in experts_modules:
        # The fused weights now live only in kt_ops' packed form; what peft sees is a one-element placeholder.
        for placeholder in (module.gate_up_proj, module.down_proj):
            assert placeholder.untyped_storage().nbytes() <= 8 and not placeholder.requires_grad
        assert "gate_up_proj" not in module.state_dict()
        assert isinstance(module.kt_experts, KTExperts) and module.kt_experts.experts is not None
    assert len(experts) == len(ref_experts) > 0
    for out, ref in zip(experts, ref_experts):
        assert ref.abs().max() > 0
        # The AMXBF16 backend packs the fp32 weights to bf16: bf16-level agreement per MoE layer.
        assert rel_l2(out, ref) < 1e-2
    assert rel_l2(logits, ref_logits) < 2e-3


@pytest.mark.parametrize("name", TINY_MODELS)
def test_no_lora_matches_transformers_eager_bf16(name):
    model = tiny_model(name, dtype=torch.bfloat16).eval()
    ids = token_ids()
    ref_logits, ref_experts = _run(model, ids)
    apply_kt(model, lora_rank=0)
    logits, experts = _run(model, ids)
    assert logits.dtype == torch.bfloat16
    assert rel_l2(logits, ref_logits) < 0.02
    # Only the first MoE layer sees identical inputs: in bf16 a later router may flip a near-tied choice.
    assert experts[0].dtype == torch.bfloat16
    assert rel_l2(experts[0], ref_experts[0]) < 0.02


@pytest.mark.parametrize("name", TINY_MODELS)
def test_backward_matches_transformers_eager(name):
    # Gradients of everything outside the experts (routers included: they get theirs through the
    # routing weights kt_ops differentiates) agree with transformers' eager experts.
    ids = token_ids()
    grads = []
    for convert in (False, True):
        model = tiny_model(name)
        if convert:
            apply_kt(model, lora_rank=0)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if ".experts." not in n})
    eager, kt = grads
    assert set(eager) == set(kt)
    routers = [n for n in eager if n.endswith("mlp.gate.weight") or n.endswith("block_sparse_moe.gate.weight")]
    assert routers
    for n in eager:
        assert kt[n] is not None, n
        if eager[n].norm() > 0:
            assert rel_l2(kt[n], eager[n]) < 1e-2, n


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
    ids = token_ids(seq=16)
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
    ids = token_ids()
    all_kt = apply_kt(tiny_model(name).eval(), lora_rank=0)
    split = apply_kt(tiny_model(name).eval(), lora_rank=2, kt_num_gpu_experts=2)
    logits_all, _ = _run(all_kt, ids)
    logits_split, _ = _run(split, ids)  # LoRA B is zero: same function as no LoRA
    for _, module, kt in kt_experts_modules(split):
        assert kt.first_expert == 2 and kt.num_experts == module.num_experts - 2
        assert module.kt_gpu_gate_up_proj.shape[0] == 2 and module.kt_gpu_down_proj.shape[0] == 2
        assert kt.gate_lora_a.shape[0] == module.num_experts - 2
    # The two kept experts compute in fp32 in transformers, the rest in bf16 on kt.
    assert rel_l2(logits_split, logits_all) < 2e-3


def test_backends_and_prepacked_weights(tmp_path):
    name = "tiny-qwen3-moe"
    ids = token_ids()
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
        assert rel_l2(out, ref) < 0.03
    with pytest.raises(ValueError, match="kt_backend"):
        apply_kt(tiny_model(name), kt_backend="AMXBF16", kt_weight_path=str(tmp_path))

    int4 = apply_kt(tiny_model(name).eval(), kt_backend="AMXINT4", lora_rank=0)
    _, experts_int4 = _run(int4, ids)
    for out, ref in zip(experts_int4, ref_experts):
        assert rel_l2(out, ref) < 0.25  # 4-bit per-row weights on 64-wide rows


def test_bad_arguments():
    model = tiny_model("tiny-mixtral")
    with pytest.raises(ValueError, match="kt_backend"):
        apply_kt(model, kt_backend="AMXFP4")
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
    with pytest.raises(TypeError, match="kt_tp_enabled"):
        apply_kt(model, kt_tp_enabled="yes")
    # Failed calls leave the model untouched and usable.
    assert all("gate_up_proj" in m._parameters for _, m in find_moe_experts(model))
    with pytest.warns(UserWarning, match="kt_tp_enabled"):
        apply_kt(model, lora_rank=0, kt_tp_enabled=True)
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
    expert_lora = {n for n in trainable if ".experts." in n and ".lora_" in n}
    attention_lora = {n for n in trainable if ".self_attn." in n and ".lora_" in n}
    assert len(expert_lora) == 4 * len(kt_experts_modules(model))  # A and B on gate_up_proj and down_proj
    assert attention_lora and trainable == expert_lora | attention_lora

    losses = train_steps(model, token_ids(seq=16), steps=4, lr=1e-2)
    assert losses[-1] < losses[0], losses
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n)


def test_frozen_own_expert_lora_warns_unless_intended():
    # A model trained without peft: its kt experts hold their own LoRA, which the optional helper
    # (un)freezes; training it frozen by accident warns once.
    from kt_ops.integration import set_kt_lora_trainable

    model = apply_kt(tiny_model("tiny-qwen3-moe"), lora_rank=2)
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    ids = token_ids()
    with pytest.warns(UserWarning, match="expert LoRA is frozen"):
        model(input_ids=ids, labels=ids).loss.backward()
    set_kt_lora_trainable(model)
    assert all(p.requires_grad for p in kt_lora_parameters(model))
    with pytest.raises(TypeError, match="trainable"):
        set_kt_lora_trainable(model, "yes")

    quiet = apply_kt(tiny_model("tiny-qwen3-moe"), lora_rank=2)
    quiet.requires_grad_(False)
    quiet.lm_head.requires_grad_(True)
    set_kt_lora_trainable(quiet, False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(input_ids=ids, labels=ids).loss.backward()


def test_disable_kt_lora_gives_base_experts():
    from kt_ops.integration import disable_kt_lora

    ids = token_ids()
    base = apply_kt(tiny_model("tiny-mixtral").eval(), lora_rank=0)
    tuned = apply_kt(tiny_model("tiny-mixtral").eval(), lora_rank=2)
    with torch.no_grad():
        for _, _, kt in kt_experts_modules(tuned):
            kt.gate_lora_b.normal_()
    base_logits = _run(base, ids)[0]
    assert not torch.allclose(_run(tuned, ids)[0], base_logits)
    with disable_kt_lora(tuned):
        assert torch.equal(_run(tuned, ids)[0], base_logits)
    assert all(kt.lora_enabled for _, _, kt in kt_experts_modules(tuned))


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v2"])
def test_adapter_round_trip(tmp_path, name):
    import json

    import peft
    from safetensors import safe_open

    from kt_ops.integration import load_kt_adapter, save_kt_adapter

    def build():
        model = apply_kt(tiny_model(name), lora_rank=4, lora_alpha=8.0, kt_num_gpu_experts=1)
        return get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))

    model = build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(seq=16)
    for _ in range(2):  # B leaves zero, so the round trip carries real values
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    save_kt_adapter(model, str(tmp_path))

    mixtral = name == "tiny-mixtral"
    block, (gate, up, down) = (
        ("block_sparse_moe", ("w1", "w3", "w2")) if mixtral else ("mlp", ("gate_proj", "up_proj", "down_proj"))
    )
    layer = 1 if "deepseek" in name else 0  # DeepSeek's first layer is dense here
    _, module, kt = kt_experts_modules(model)[0]
    H, I = module.hidden_dim, module.intermediate_dim
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        prefix = f"base_model.model.model.layers.{layer}.{block}.experts"
        # Expert 0 stays in transformers (kt_num_gpu_experts=1); peft's adapter covers it too.
        assert f"{prefix}.0.{gate}.lora_A.weight" in keys
        assert tuple(f.get_tensor(f"{prefix}.1.{gate}.lora_A.weight").shape) == (4, H)
        assert tuple(f.get_tensor(f"{prefix}.1.{gate}.lora_B.weight").shape) == (I, 4)
        assert tuple(f.get_tensor(f"{prefix}.1.{up}.lora_B.weight").shape) == (I, 4)
        assert tuple(f.get_tensor(f"{prefix}.1.{down}.lora_A.weight").shape) == (4, I)
        assert tuple(f.get_tensor(f"{prefix}.1.{down}.lora_B.weight").shape) == (H, 4)
        _, down_b, _ = adapter_factors(_expert_wrapper(model, "down_proj"), "default")
        assert torch.equal(f.get_tensor(f"{prefix}.2.{down}.lora_B.weight"), down_b[2].detach())
        assert any(".self_attn.o_proj.lora_A.weight" in k for k in keys)
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert config.r == 2 and config.lora_alpha == 4
    import re

    expert_module = f"model.layers.{layer}.{block}.experts.3.{down}"
    assert re.fullmatch(config.target_modules, expert_module)
    assert re.fullmatch(config.target_modules, f"model.layers.{layer}.self_attn.o_proj")
    assert not re.fullmatch(config.target_modules, f"model.layers.{layer}.self_attn.q_proj")
    assert any(re.match(rf"(.*\.)?({p})$", expert_module) for p in config.rank_pattern)
    assert set(config.rank_pattern.values()) == {4} and set(config.alpha_pattern.values()) == {8.0}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"

    fresh = build()
    load_kt_adapter(fresh, str(tmp_path))
    trained = dict(model.named_parameters())
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[n]), n
    model.eval()
    fresh.eval()
    assert torch.equal(_run(fresh, ids)[0], _run(model, ids)[0])

    other_rank = get_peft_model(
        apply_kt(tiny_model(name), lora_rank=8, kt_num_gpu_experts=1),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]),
    )
    with pytest.raises(ValueError, match="shape"):
        load_kt_adapter(other_rank, str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_kt_adapter(fresh, str(tmp_path / "missing"))


def test_adapter_of_plain_model_without_peft(tmp_path):
    from kt_ops.integration import load_kt_adapter, save_kt_adapter

    model = apply_kt(tiny_model("tiny-qwen2-moe"), lora_rank=2, lora_alpha=4.0)
    with torch.no_grad():
        for p in kt_lora_parameters(model):
            p.normal_()
    save_kt_adapter(model, str(tmp_path))
    fresh = apply_kt(tiny_model("tiny-qwen2-moe"), lora_rank=2, lora_alpha=4.0)
    load_kt_adapter(fresh, str(tmp_path))
    for a, b in zip(kt_lora_parameters(model), kt_lora_parameters(fresh)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no LoRA"):
        save_kt_adapter(apply_kt(tiny_model("tiny-qwen2-moe"), lora_rank=0), str(tmp_path / "x"))


def test_hf_trainer_with_accumulation_and_checkpointing(tmp_path):
    import peft
    from transformers import Trainer, TrainingArguments

    model = apply_kt(tiny_model("tiny-qwen3-moe"), lora_rank=4, lora_alpha=8.0)
    model = get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    rows = token_ids(batch=4, seq=16, seed=3)
    data = [{"input_ids": rows[i % 4], "labels": rows[i % 4]} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        max_steps=5,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    optimized = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in kt_lora_parameters(model))
    before = [p.detach().clone() for p in kt_lora_parameters(model)]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    assert all(not torch.equal(a, b) for a, b in zip(before, kt_lora_parameters(model)))


def test_trl_dpo(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import peft

    from kt_ops.integration.tiny import tiny_tokenizer

    model = apply_kt(tiny_model("tiny-deepseek-v3"), lora_rank=4, lora_alpha=8.0)
    model = get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_b_proj", "o_proj"]))
    rows = [{"prompt": f"Q{i}: 2+{i}=", "chosen": str(2 + i), "rejected": "no"} for i in range(8)]
    # Precomputed reference log-probs still work (a live reference pass: test_integration_peft.py).
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        precompute_ref_log_probs=True,
        beta=0.5,
        max_length=32,
    )
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tiny_tokenizer()
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(0.6931, abs=0.01)  # policy == reference at the start
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if ".experts." in n and ".lora_B.default." in n)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_adapter_loads_with_stock_peft_in_checkpoint_layout(tmp_path, name):
    # A model laid out like the original checkpoints (one nn.Linear per expert projection) takes the
    # saved directory through plain peft.PeftModel.from_pretrained, with the expert rank and scaling.
    import peft
    from torch import nn

    from kt_ops.integration import save_kt_adapter

    model = get_peft_model(
        apply_kt(tiny_model(name), lora_rank=4, lora_alpha=8.0),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]),
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    save_kt_adapter(model, str(tmp_path))

    block, projections = (
        ("block_sparse_moe", ("w1", "w3", "w2"))
        if name == "tiny-mixtral"
        else ("mlp", ("gate_proj", "up_proj", "down_proj"))
    )
    _, module, _ = kt_experts_modules(model)[0]
    H, I, E = module.hidden_dim, module.intermediate_dim, module.num_experts

    def expert():
        e = nn.Module()
        for proj, (fan_in, fan_out) in zip(projections, ((H, I), (H, I), (I, H))):
            setattr(e, proj, nn.Linear(fan_in, fan_out, bias=False))
        return e

    def layer():
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.o_proj = nn.Linear(H, H, bias=False)
        moe = nn.Module()
        moe.experts = nn.ModuleList(expert() for _ in range(E))
        setattr(layer, block, moe)
        return layer

    unfused = nn.Module()
    unfused.model = nn.Module()
    unfused.model.layers = nn.ModuleList(layer() for _ in range(2))
    loaded = peft.PeftModel.from_pretrained(unfused, str(tmp_path))

    for _, module, kt in kt_experts_modules(model):
        layer_idx = kt.layer_idx
        experts = getattr(loaded.base_model.model.model.layers[layer_idx], block).experts
        wrappers = _expert_wrappers_of(model, layer_idx)
        gate_up_a, gate_up_b, scaling = adapter_factors(wrappers["gate_up_proj"], "default")
        down_a, down_b, _ = adapter_factors(wrappers["down_proj"], "default")
        for e in range(E):
            # gate and up share the fused A; B splits at the intermediate size.
            expected = ((gate_up_a[e], gate_up_b[e, :I]), (gate_up_a[e], gate_up_b[e, I:]), (down_a[e], down_b[e]))
            for proj, (a, b) in zip(projections, expected):
                lin = getattr(experts[e], proj)
                assert lin.r["default"] == 4 and lin.scaling["default"] == pytest.approx(scaling)
                assert torch.equal(lin.lora_A["default"].weight, a.detach())
                assert torch.equal(lin.lora_B["default"].weight, b.detach())
    o_proj = loaded.base_model.model.model.layers[0].self_attn.o_proj
    assert o_proj.r["default"] == 2 and o_proj.scaling["default"] == pytest.approx(2.0)
