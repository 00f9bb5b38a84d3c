"""Expert LoRA as a stock peft adapter: either order of apply_kt / peft.get_peft_model, peft's own
target_parameters format read and written both ways against plain transformers + peft, Trainer
checkpoints, trl DPO, and the merged export. Tiny models, CPU. gpt-oss: tests/test_gpt_oss.py."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from kt_ops.integration import (  # noqa: E402
    apply_kt,
    export_merged,
    kt_experts_modules,
    kt_lora_parameters,
    load_kt_adapter,
    save_kt_adapter,
)
from kt_ops.integration.install import kt_expert_wrappers  # noqa: E402
from kt_ops.integration.tiny import tiny_model  # noqa: E402
from kt_testing import logits_of, randomize_lora_b, rel_l2, token_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHS = ["tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-mixtral"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _attention(name):
    return ["q_a_proj", "o_proj"] if "deepseek" in name else ["q_proj", "v_proj"]


def _expert_lora_names(model):
    return sorted(n for n, p in model.named_parameters() if ".experts." in n and ".lora_" in n)


def _expert_lora_numel(base_config, r, num_moe_layers):
    cfg = base_config
    E = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None) or cfg.num_local_experts
    H = cfg.hidden_size
    I = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    per_layer = r * E * H + 2 * I * r * E + r * E * I + H * r * E
    return per_layer * num_moe_layers


@pytest.mark.parametrize("order", ["apply_kt_first", "peft_first"])
@pytest.mark.parametrize("name", ARCHS)
def test_stock_peft_in_either_order(tmp_path, name, order):
    ids = token_ids()
    base_logits = logits_of(apply_kt(tiny_model(name).eval(), lora_rank=0), ids)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=_attention(name))
    model = tiny_model(name)
    if order == "apply_kt_first":
        apply_kt(model, lora_rank=4, lora_alpha=8.0)
        with pytest.warns(UserWarning, match="peft_config"):  # peft notes the config store apply_kt set up
            model = peft.get_peft_model(model, config)
    else:
        model = peft.get_peft_model(model, config)
        apply_kt(model, lora_rank=4, lora_alpha=8.0)

    # The config describes the experts (so the saved adapter loads anywhere) with apply_kt's rank.
    saved_config = model.peft_config["default"]
    assert sorted(saved_config.target_parameters) == sorted(EXPERT_TARGETS)
    assert 4 in saved_config.rank_pattern.values() and 8.0 in saved_config.alpha_pattern.values()
    # Trainable, and counted by peft.
    expert_lora = _expert_lora_names(model)
    num_layers = len(kt_experts_modules(model))
    assert len(expert_lora) == 4 * num_layers > 0  # A and B of two wrapped parameters per layer
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in expert_lora)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(params[n].numel() for n in expert_lora) == _expert_lora_numel(model.config, 4, num_layers)
    assert kt_lora_parameters(model) and all(p.requires_grad for p in kt_lora_parameters(model))

    # Training moves the expert LoRA.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: params[n].detach().clone() for n in expert_lora}
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(before[n], params[n]) for n in expert_lora if "lora_B" in n)
    randomize_lora_b(model)
    model.eval()
    tuned = logits_of(model, ids)

    # disable_adapter switches the expert LoRA off with the rest: the base model exactly.
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), base_logits)
    assert rel_l2(tuned, base_logits) > 1e-2

    # save_pretrained + PeftModel.from_pretrained(apply_kt(base)) restore it bit-exactly.
    model.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        assert sorted(json.load(f)["target_parameters"]) == sorted(EXPERT_TARGETS)
    fresh = apply_kt(tiny_model(name).eval(), lora_rank=4, lora_alpha=8.0)
    with pytest.warns(UserWarning, match="peft_config"):
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(logits_of(loaded, ids), tuned)
    ours, theirs = peft.get_peft_model_state_dict(model), peft.get_peft_model_state_dict(loaded)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_add_set_delete_adapter_switch_expert_lora():
    name = "tiny-qwen3-moe"
    ids = token_ids()
    model = apply_kt(tiny_model(name).eval(), lora_rank=4, lora_alpha=8.0)
    with pytest.warns(UserWarning, match="peft_config"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    wrappers = kt_expert_wrappers(model)
    assert wrappers and all(set(w.lora_A) == {"default", "second"} for w in wrappers)
    # the second adapter's experts use apply_kt's rank too
    assert all(w.r["second"] == 4 for w in wrappers)
    randomize_lora_b(model)
    first = logits_of(model, ids)
    model.set_adapter("second")
    second = logits_of(model, ids)
    # Only the experts' share of "second" differs from "default" in structure; compare with the
    # experts of "second" off: switching must have changed the experts too.
    assert not torch.equal(first, second)
    with torch.no_grad():
        for w in wrappers:
            w.lora_B["second"].weight.zero_()
    no_expert_second = logits_of(model, ids)
    assert not torch.equal(second, no_expert_second)
    model.set_adapter("default")
    assert torch.equal(logits_of(model, ids), first)
    model.delete_adapter("second")
    assert all(set(w.lora_A) == {"default"} for w in kt_expert_wrappers(model))
    assert torch.equal(logits_of(model, ids), first)


def _target_parameters_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=EXPERT_TARGETS)


@pytest.mark.parametrize("name", ARCHS)
def test_target_parameters_gradients_match_plain_peft(name):
    # The same peft adapter on the plain model and on the kt model: same logits (bf16-packed base
    # weights: bf16-level agreement) and the same gradients for every LoRA parameter.
    ids = token_ids()
    results = []
    for convert in (False, True):
        model = tiny_model(name)
        if convert:
            apply_kt(model, lora_rank=0)
        torch.manual_seed(7)
        model = peft.get_peft_model(model, _target_parameters_config())
        randomize_lora_b(model)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    (plain_logits, plain_grads), (kt_logits, kt_grads) = results
    assert rel_l2(kt_logits, plain_logits) < 5e-3
    assert plain_grads.keys() == kt_grads.keys()
    assert len([n for n in plain_grads if ".experts." in n]) >= 4
    for n in plain_grads:
        assert plain_grads[n].norm() > 0, n
        assert rel_l2(kt_grads[n], plain_grads[n]) < 2e-2, n


@pytest.mark.parametrize("name", ARCHS)
def test_target_parameters_adapter_loads_both_ways(tmp_path, name):
    ids = token_ids()
    # kt -> plain transformers + peft
    kt_model = peft.get_peft_model(apply_kt(tiny_model(name), lora_rank=0), _target_parameters_config())
    opt = torch.optim.AdamW([p for p in kt_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        kt_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    randomize_lora_b(kt_model)
    kt_model.eval()
    kt_model.save_pretrained(tmp_path / "from_kt")
    plain = peft.PeftModel.from_pretrained(tiny_model(name).eval(), tmp_path / "from_kt")
    assert rel_l2(logits_of(plain, ids), logits_of(kt_model, ids)) < 5e-3

    # plain transformers + peft -> kt
    torch.manual_seed(11)
    plain = peft.get_peft_model(tiny_model(name), _target_parameters_config())
    randomize_lora_b(plain, seed=5)
    plain.eval()
    plain.save_pretrained(tmp_path / "from_plain")
    loaded = peft.PeftModel.from_pretrained(apply_kt(tiny_model(name).eval(), lora_rank=0), tmp_path / "from_plain")
    assert rel_l2(logits_of(loaded, ids), logits_of(plain, ids)) < 5e-3
    # nothing was materialised: the experts' weights stay placeholders of one element
    for _, module, _ in kt_experts_modules(loaded):
        assert module.gate_up_proj.untyped_storage().nbytes() <= 8


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-mixtral"])
def test_per_expert_layout_round_trip(tmp_path, name):
    # save_kt_adapter's per-expert layout (read by convert_moe_lora) restores peft's fused adapter exactly.
    ids = token_ids()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    model = apply_kt(tiny_model(name).eval(), lora_rank=2, lora_alpha=4.0)
    with pytest.warns(UserWarning, match="peft_config"):
        model = peft.get_peft_model(model, config)
    randomize_lora_b(model)
    tuned = logits_of(model, ids)
    save_kt_adapter(model, tmp_path)
    from safetensors.torch import load_file

    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    proj = "w1" if name == "tiny-mixtral" else "gate_proj"
    assert any(f".experts.3.{proj}.lora_A.weight" in k for k in keys)
    fresh = apply_kt(tiny_model(name).eval(), lora_rank=2, lora_alpha=4.0)
    with pytest.warns(UserWarning, match="peft_config"):
        fresh = peft.get_peft_model(fresh, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    load_kt_adapter(fresh, tmp_path)
    assert torch.equal(logits_of(fresh.eval(), ids), tuned)


def _sft_dataset(n=8, seq=16):
    import datasets

    rows = [{"input_ids": token_ids(1, seq, seed=i)[0].tolist()} for i in range(n)]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    return datasets.Dataset.from_list(rows)


def _trainer(model, out, max_steps, save_steps=None):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        lr_scheduler_type="constant",
        disable_tqdm=True,
        data_seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=_sft_dataset())


def _kt_peft_model(name="tiny-qwen3-moe"):
    model = apply_kt(tiny_model(name), lora_rank=4, lora_alpha=8.0)
    with pytest.warns(UserWarning, match="peft_config"):
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))


def test_trainer_checkpoint_resumes_exactly(tmp_path):
    full = _kt_peft_model()
    _trainer(full, tmp_path / "full", max_steps=4).train()
    part = _kt_peft_model()
    _trainer(part, tmp_path / "part", max_steps=4, save_steps=2).train()
    checkpoint = tmp_path / "part" / "checkpoint-2"
    from safetensors.torch import load_file

    saved = set(load_file(checkpoint / "adapter_model.safetensors"))
    assert any(".experts." in k for k in saved)
    resumed = _kt_peft_model()
    _trainer(resumed, tmp_path / "part", max_steps=4).train(resume_from_checkpoint=str(checkpoint))
    ours, theirs = peft.get_peft_model_state_dict(full), peft.get_peft_model_state_dict(resumed)
    assert any(".experts." in k for k in ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("wrap", ["model", "trainer"])
def test_trl_dpo_without_precomputed_reference(tmp_path, wrap):
    trl = pytest.importorskip("trl")
    import datasets

    from kt_ops.integration.tiny import tiny_tokenizer

    if wrap == "model":
        model, peft_config = _kt_peft_model(), None
    else:  # trl wraps the model; its reference pass then runs with adapters disabled
        model = apply_kt(tiny_model("tiny-qwen3-moe"), lora_rank=4, lora_alpha=8.0)
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    tokenizer = tiny_tokenizer()
    rows = [{"prompt": f"q{i}: 1+{i}=", "chosen": f" {1 + i}", "rejected": f" {i + 7}"} for i in range(4)]
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        max_length=32,
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on the config store apply_kt set up
        trainer = trl.DPOTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            peft_config=peft_config,
            train_dataset=datasets.Dataset.from_list(rows),
        )
    model = trainer.model
    # For a peft model trl's reference is a frozen copy "ref" of the adapter: it holds the experts' LoRA too.
    expert_lora = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n and ".lora_" in n}
    assert any(".default." in n for n in expert_lora)
    assert any(".ref." in n for n in expert_lora) == (wrap == "model")
    trainer.train()
    params = dict(model.named_parameters())
    for n, before in expert_lora.items():
        assert torch.equal(before, params[n]) == (".ref." in n), n
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("name", ARCHS)
def test_merged_export_loads_in_plain_transformers(tmp_path, name):
    from transformers import AutoModelForCausalLM

    ids = token_ids()
    model = tiny_model(name, dtype=torch.bfloat16)
    apply_kt(model, lora_rank=4, lora_alpha=8.0, kt_num_gpu_experts=1)
    with pytest.warns(UserWarning, match="peft_config"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=_attention(name)))
    randomize_lora_b(model)
    model.eval()
    kt_logits = logits_of(model, ids)
    files = export_merged(model, tmp_path, max_shard_size=64 * 1024)
    assert (tmp_path / "model.safetensors.index.json").exists() and len(files) > 4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert plain.config._experts_implementation != "kt"
    with pytest.raises(AttributeError):
        plain.model.layers[1].mlp.experts.kt_experts
    merged_logits = logits_of(plain, ids)
    with model.disable_adapter():
        base_logits = logits_of(model, ids)
    assert rel_l2(merged_logits, kt_logits) < 0.03 < rel_l2(base_logits, kt_logits)


def test_export_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no kt experts"):
        export_merged(tiny_model("tiny-qwen3-moe"), tmp_path)
    model = apply_kt(tiny_model("tiny-qwen3-moe"), lora_rank=0)
    with pytest.raises(TypeError, match="dtype"):
        export_merged(model, tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="max_shard_size"):
        export_merged(model, tmp_path, max_shard_size=0)


def test_merge_and_unload_points_to_export():
    model = peft.get_peft_model(apply_kt(tiny_model("tiny-qwen3-moe"), lora_rank=0), _target_parameters_config())
    model(input_ids=token_ids())  # the first forward routes peft's wrappers through kt
    with pytest.raises(NotImplementedError, match="export_merged"):
        model.merge_and_unload()


def test_load_kt_adapter_wraps_a_model_without_peft(tmp_path):
    # The per-expert layout with attention LoRA loads into apply_kt(base) alone: load_kt_adapter
    # wraps it with peft for the attention modules (the "needs a pre-wrapped model" trap).
    ids = token_ids()
    model = apply_kt(tiny_model("tiny-deepseek-v3").eval(), lora_rank=4, lora_alpha=8.0)
    with pytest.warns(UserWarning, match="peft_config"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    randomize_lora_b(model)
    tuned = logits_of(model.eval(), ids)
    save_kt_adapter(model, tmp_path)
    fresh = apply_kt(tiny_model("tiny-deepseek-v3").eval(), lora_rank=4, lora_alpha=8.0)
    loaded = load_kt_adapter(fresh, tmp_path)
    assert isinstance(loaded, peft.PeftModel)
    assert torch.equal(logits_of(loaded.eval(), ids), tuned)


def test_kt_sft_export_command(tmp_path):
    import yaml
    from transformers import AutoModelForCausalLM

    from kt_ops import cli

    config = {
        "model_name_or_path": "tiny-qwen3-moe",
        "dataset": os.path.join(os.path.dirname(__file__), "..", "examples", "data", "alpaca_tiny.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "lora_rank": 4,
        "lora_alpha": 8,
        "cutoff_len": 48,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "bf16": True,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", str(path)]) == 0
    assert cli.main(["export", str(path)]) == 0
    merged = tmp_path / "run" / "merged"
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
    model, _ = cli.build_model(cli.load_config(str(path)))
    load_kt_adapter(model, str(tmp_path / "run"))
    ids = token_ids()
    assert rel_l2(logits_of(plain, ids), logits_of(model.eval(), ids)) < 0.03
    assert (merged / "tokenizer_config.json").is_file()


def test_moving_the_model_keeps_placeholders_small():
    model = apply_kt(tiny_model("tiny-mixtral"), lora_rank=0)
    model.to(torch.bfloat16)
    for _, module, _ in kt_experts_modules(model):
        assert module.gate_up_proj.dtype == torch.bfloat16 and module.gate_up_proj.untyped_storage().nbytes() == 2
        assert module.down_proj.shape == (module.num_experts, module.hidden_dim, module.intermediate_dim)
    assert model(input_ids=token_ids()).logits.dtype == torch.bfloat16


def test_ddp_skips_placeholders_of_a_peft_model():
    # DistributedDataParallel reads _ddp_params_and_buffers_to_ignore from the module it wraps (peft
    # forwards the attribute) and must not broadcast into the stride-0 placeholders.
    model = _kt_peft_model()
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    placeholders = {n for n, p in model.named_parameters() if n.rpartition(".")[2] in ("gate_up_proj", "down_proj")}
    assert placeholders and placeholders <= ignored
    assert not any("lora_" in n for n in ignored)


def test_expert_lora_of_a_bf16_model_trains_in_fp32_in_either_order():
    for order in ("apply_kt_first", "peft_first"):
        model = tiny_model("tiny-qwen3-moe", dtype=torch.bfloat16)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
        if order == "apply_kt_first":
            with pytest.warns(UserWarning, match="peft_config"):
                model = peft.get_peft_model(apply_kt(model, lora_rank=4), config)
        else:
            model = peft.get_peft_model(model, config)
            apply_kt(model, lora_rank=4)
        expert = [p for n, p in model.named_parameters() if ".experts." in n and ".lora_" in n]
        assert expert and all(p.dtype == torch.float32 for p in expert), order
        model(input_ids=token_ids(), labels=token_ids()).loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in expert), order
