"""kt_ops.sft, kt-kernel 0.7's SFT package, on a tiny Qwen3-MoE (fused experts): KTConfig, wrapping,
fused expert LoRA against plain torch autograd over the same model, the activation policies
(retained, recomputed under gradient checkpointing, the CPU output reused by the recompute),
training steps with the optimizer protocol, full-weight training and its checkpoint, and the
adapter bundle. Tiny models, CPU (the layers' "GPU" side runs on the CPU too)."""

from __future__ import annotations

import copy

from safetensors.torch import load_file

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from kt_ops.integration.tiny import tiny_model  # noqa: E402
from kt_ops.reference import moe_sft_reference  # noqa: E402
from kt_ops.sft import (  # noqa: E402
    KTActivationPolicy,
    KTConfig,
    get_kt_trainable_params,
    kt_adapt_peft_lora,
    load_kt_adapter_artifacts,
    save_kt_adapter_artifacts,
    update_kt_lora_pointers,
    wrap_moe_layers_with_kt_wrapper,
)
from kt_ops.sft.checkpoint import load_full_weight_checkpoint, save_full_weight_checkpoint  # noqa: E402
from kt_ops.sft.dist_utils import get_activation_checkpoint_context_fn  # noqa: E402
from kt_testing import rel_l2, rel_mae, token_ids  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:the process's CPUInfer already exists"),
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
]

RANK, ALPHA = 4, 8.0
RETAIN = {"cpu": "retain", "gpu": "retain"}


@pytest.fixture(autouse=True)
def no_kt_environment(monkeypatch):
    """KTConfig reads ACCELERATE_KT_* defaults: none of the runner's may leak in. It also sizes
    OpenMP (OMP_NUM_THREADS and torch's team): one thread, restored afterwards."""
    import os

    for name in list(os.environ):
        if name.startswith("ACCELERATE_KT_") or name.startswith("KT_SFT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ACCELERATE_KT_OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def bf16_experts_model(seed=0, **overrides):
    """A tiny fp32 Qwen3-MoE whose expert weights are bf16 numbers (what the CPU kernels hold)."""
    model = tiny_model("tiny-qwen3-moe", seed=seed, **overrides)
    with torch.no_grad():
        for layer in model.model.layers:
            for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                w.copy_(w.bfloat16().float())
    return model


def kt_model(policy=RETAIN, **config):
    """(the KT model with its fused expert LoRA, a plain copy made before wrapping)."""
    model = bf16_experts_model()
    plain = copy.deepcopy(model)
    cfg = KTConfig(
        kt_backend="AMXBF16",
        kt_num_threads=1,
        kt_lora_rank=RANK,
        kt_lora_alpha=ALPHA,
        kt_activation_policy=policy,
        **config,
    )
    wrappers = wrap_moe_layers_with_kt_wrapper(model, cfg)
    assert model._kt_wrappers is wrappers and len(wrappers) == len(model.model.layers)
    result = kt_adapt_peft_lora(model)
    assert result.adapted_layers == len(wrappers)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero (the LoRA adds nothing): give it values
        for wrapper in wrappers:
            for b in wrapper._fused_expert_lora_params[1::2]:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    return model, plain


def with_torch_lora(plain, kt):
    """`plain` with each expert block computed by the reference op with a copy of `kt`'s LoRA (fp32
    leaves), so torch.autograd gives the gradients kt_ops.sft should give; returns the leaves."""
    leaves = []
    for layer, wrapper in zip(plain.model.layers, kt._kt_wrappers):
        lora = [p.detach().float().clone().requires_grad_() for p in wrapper._fused_expert_lora_params]
        leaves.append(lora)
        experts = layer.mlp.experts

        def forward(hidden, top_k_index, top_k_weights, experts=experts, lora=lora):
            gate, up = experts.gate_up_proj.chunk(2, dim=1)
            return moe_sft_reference(
                hidden, top_k_index, top_k_weights, gate, up, experts.down_proj, *lora, ALPHA / RANK
            )

        experts.forward = forward
    return leaves


def step_grads(model, ids):
    """(loss, the expert LoRA gradients in layer order) of one backward."""
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), [[p.grad.clone() for p in w._fused_expert_lora_params] for w in model._kt_wrappers]


# ---- KTConfig ---------------------------------------------------------------------------------------


def test_ktconfig_defaults_environment_and_named_errors(monkeypatch, tmp_path):
    cfg = KTConfig(kt_expert_weight_format="int8", kt_weight_path=str(tmp_path))
    assert cfg.kt_backend == "INT8" and cfg.sft_method == "AMXINT8_SFT"
    with pytest.raises(ValueError, match="kt_weight_path"):
        KTConfig(kt_expert_weight_format="int8")
    assert cfg.kt_activation_policy == KTActivationPolicy("recompute", "recompute")
    monkeypatch.setenv("ACCELERATE_KT_LORA_RANK", "8")
    monkeypatch.setenv("ACCELERATE_KT_MAX_CACHE_DEPTH", "3")
    cfg = KTConfig()
    assert (cfg.kt_backend, cfg.kt_lora_rank, cfg.kt_lora_alpha, cfg.kt_max_cache_depth) == ("AMXBF16", 8, 16.0, 3)
    # on/off variables read as kt_ops.environment_flag reads them, and a value it does not know is named
    monkeypatch.setenv("ACCELERATE_KT_TP_ENABLED", "On")
    assert KTConfig().kt_tp_enabled is True
    monkeypatch.setenv("ACCELERATE_KT_TP_ENABLED", "maybe")
    with pytest.raises(ValueError, match="ACCELERATE_KT_TP_ENABLED must be one of"):
        KTConfig()
    monkeypatch.delenv("ACCELERATE_KT_TP_ENABLED")
    assert KTConfig(kt_lora_rank=2).kt_lora_alpha == 4.0
    settings = KTConfig(kt_lora_rank=2, kt_tp_enabled=True, kt_threadpool_count=2).to_settings()
    assert (settings.lora_rank, settings.lora_alpha, settings.kt_threadpool_count) == (2, 4.0, 2)
    assert KTConfig.from_object({"kt_lora_rank": 2, "enabled": True}).kt_lora_rank == 2
    with pytest.raises(ValueError, match="kt_expert_weight_format must be one of"):
        KTConfig(kt_expert_weight_format="nf4")
    with pytest.raises(ValueError, match="conflicts with kt_backend"):
        KTConfig(kt_backend="AMXBF16", kt_expert_weight_format="int8")
    with pytest.raises(TypeError, match=r"Unknown KTConfig fields: \['kt_lora_rnak'\]"):
        KTConfig.from_object({"kt_lora_rnak": 2})
    with pytest.raises(ValueError, match="kt_train_mode must be one of"):
        KTConfig(kt_train_mode="qlora")


# ---- the wrapped model against plain torch --------------------------------------------------------


def test_fused_expert_lora_matches_torch_autograd_and_trains():
    """Loss and every expert LoRA gradient of the KT model equal plain torch autograd over the same
    model with the same LoRA (within the CPU kernels' bf16 rounding); SGD steps through kt-kernel's
    optimizer protocol (step, update_kt_lora_pointers) lower the loss."""
    model, plain = kt_model()
    leaves = with_torch_lora(plain, model)
    ids = token_ids(seed=2)
    loss, grads = step_grads(model, ids)
    want = plain(ids, labels=ids).loss
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-3 * want.item()
    for layer_grads, layer_leaves in zip(grads, leaves):
        for got, leaf in zip(layer_grads, layer_leaves):
            assert rel_mae(got, leaf.grad) < 0.03
    params = get_kt_trainable_params(model)
    assert all(p.grad is not None for p in params)
    optimizer = torch.optim.SGD(params, lr=0.5)
    losses = [loss.item()]
    for _ in range(3):
        optimizer.step()
        update_kt_lora_pointers(model)  # the backends re-read the LoRA; the gradient windows close
        assert all(p.grad is None for p in params)
        out = model(ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("cpu", ["recompute", "retain"])
def test_gradient_checkpointing_gives_the_retained_gradients(cpu):
    """Under non-reentrant gradient checkpointing with the KT context_fn, the CPU experts run again
    in the recompute (cpu=recompute) or their first output is reused (cpu=retain): either way the
    loss and gradients are those of the plain retained run."""
    ids = token_ids(seed=3)
    retained, _ = kt_model()
    want_loss, want = step_grads(retained, ids)
    model, _ = kt_model(policy={"cpu": cpu, "gpu": "recompute"})
    context_fn = get_activation_checkpoint_context_fn()
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn}
    )
    model.train()
    loss, grads = step_grads(model, ids)
    assert torch.equal(loss, want_loss)
    for a, b in zip(sum(grads, []), sum(want, [])):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="requires non-reentrant gradient checkpointing"):
        model.gradient_checkpointing_disable()
        model(ids, labels=ids).loss.backward()


# ---- full-weight training ---------------------------------------------------------------------------


def test_full_weight_training_and_its_checkpoint_round_trip(tmp_path):
    """kt_train_mode='full': the experts' base weights are the optimizer's Parameters (bf16), their
    gradients match torch autograd, a step changes the model, and the saved KT full-weight checkpoint
    restores the stepped experts in a fresh model."""
    model = bf16_experts_model()
    plain = copy.deepcopy(model)
    cfg = dict(kt_backend="AMXBF16", kt_num_threads=1, kt_lora_rank=0, kt_train_mode="full")
    wrap_moe_layers_with_kt_wrapper(model, KTConfig(kt_activation_policy=RETAIN, **cfg))
    kt_adapt_peft_lora(model)
    params = get_kt_trainable_params(model)
    assert len(params) == 3 * len(model._kt_wrappers) and all(p.dtype == torch.bfloat16 for p in params)
    ids = token_ids(seed=4)
    loss = model(ids, labels=ids).loss
    loss.backward()
    plain.requires_grad_(False)
    for layer in plain.model.layers:
        layer.mlp.experts.requires_grad_(True)
    want = plain(ids, labels=ids).loss
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-3 * want.item()
    for layer, wrapper in zip(plain.model.layers, model._kt_wrappers):
        backend = wrapper.wrapper
        gate, up = layer.mlp.experts.gate_up_proj.grad.chunk(2, dim=1)
        for got, ref in ((backend.grad_gate_proj_buf, gate), (backend.grad_up_proj_buf, up)):
            assert rel_mae(got, ref) < 0.03
        assert rel_mae(backend.grad_down_proj_buf, layer.mlp.experts.down_proj.grad) < 0.03
    torch.optim.SGD(params, lr=5.0).step()
    update_kt_lora_pointers(model)  # the bases are repacked before the next forward
    with torch.no_grad():
        stepped = model(ids).logits
    assert rel_l2(stepped, plain(ids).logits) > 1e-3
    assert save_full_weight_checkpoint(model._kt_wrappers, str(tmp_path))
    fresh = bf16_experts_model()
    wrap_moe_layers_with_kt_wrapper(
        fresh, KTConfig(kt_activation_policy=RETAIN, kt_expert_checkpoint_path=str(tmp_path), **cfg)
    )
    kt_adapt_peft_lora(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, stepped)
    reloaded = bf16_experts_model()
    wrap_moe_layers_with_kt_wrapper(reloaded, KTConfig(kt_activation_policy=RETAIN, **cfg))
    kt_adapt_peft_lora(reloaded)
    assert load_full_weight_checkpoint(reloaded._kt_wrappers, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, stepped)


# ---- the adapter bundle -----------------------------------------------------------------------------


def peft_kt_model():
    model, _ = kt_model()
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"]))
    return peft_model


def test_adapter_artifacts_round_trip_and_refuse_a_changed_file(tmp_path):
    """PEFT's files plus fused_expert_lora.safetensors and the manifest: a fresh KT model loading
    the bundle computes the trained model's logits; a file changed after the save is refused."""
    trained = peft_kt_model()
    ids = token_ids(seed=5)
    trained.save_pretrained(str(tmp_path))
    manifest = save_kt_adapter_artifacts(trained, str(tmp_path))
    assert manifest is not None and (tmp_path / "fused_expert_lora.safetensors").is_file()
    with torch.no_grad():
        want = trained(ids).logits
    fresh = bf16_experts_model(seed=0)
    wrap_moe_layers_with_kt_wrapper(
        fresh,
        KTConfig(
            kt_backend="AMXBF16", kt_num_threads=1, kt_lora_rank=RANK, kt_lora_alpha=ALPHA, kt_activation_policy=RETAIN
        ),
    )
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    assert load_kt_adapter_artifacts(loaded, str(tmp_path)).payload["status"] == "ready"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    from kt_ops.sft.convert_kt_to_sglang_adapter import convert_kt_to_sglang_adapter

    summary = convert_kt_to_sglang_adapter(tmp_path, tmp_path.parent / "sglang", base_model_name_or_path="base")
    per_expert = load_file(str(tmp_path.parent / "sglang" / "adapter_model.safetensors"))
    gate_a = trained.base_model.model._kt_wrappers[1]._fused_expert_lora_params[0]
    assert torch.equal(per_expert["model.layers.1.mlp.experts.3.gate_proj.lora_A.weight"], gate_a[3])
    assert (summary["rank"], summary["lora_alpha"]) == (RANK, ALPHA)  # one rank for SGLang, as kt-kernel requires
    (tmp_path / "fused_expert_lora.safetensors").write_bytes(b"changed")
    from kt_ops.sft import KTArtifactError

    with pytest.raises(KTArtifactError, match="size mismatch|SHA256 mismatch"):
        load_kt_adapter_artifacts(loaded, str(tmp_path))


# ---- ephemeral INT8 weights and the profile ---------------------------------------------------------


def write_int8_staging(model, staging):
    """KTransformers' unmerged INT8 files (_layer_L/_numa_0/INT8_*.kt) of the model's experts."""
    from kt_ops.weights.ktransformers import WEIGHT_KEY, convert_layer

    staging.mkdir(mode=0o700)
    for index, layer in enumerate(model.model.layers):
        gate, up = layer.mlp.experts.gate_up_proj.detach().chunk(2, dim=1)
        for key, t in convert_layer(gate, up, layer.mlp.experts.down_proj.detach(), index, "INT8", 1).items():
            _, projection, expert, part, kind = WEIGHT_KEY.fullmatch(key).groups()
            folder = staging / f"_layer_{index}" / f"_numa_{part}"
            folder.mkdir(parents=True, exist_ok=True)
            size = t.numel() * t.element_size()
            t.numpy().tofile(
                folder / f"INT8_{projection}_{expert}_{size}Byte_{'quant' if kind == 'weight' else 'scale'}_.kt"
            )


def test_ephemeral_int8_weights_are_deleted_as_their_layers_load(tmp_path, monkeypatch):
    """kt_weight_lifecycle='ephemeral': a published INT8 run is checked, each layer's files deleted
    once it is loaded, and the run's directory removed; the model computes with what was loaded."""
    from kt_ops.sft import ephemeral

    monkeypatch.setattr(ephemeral, "_EPHEMERAL_BASE", tmp_path)
    model = bf16_experts_model(moe_intermediate_size=64)  # kt-kernel's INT8 layout: K a multiple of 64
    plain = copy.deepcopy(model)
    write_int8_staging(model, tmp_path / "kt-int8-pytest-run.staging")
    experts = model.model.layers[0].mlp.experts
    E, I, H = experts.num_experts, experts.intermediate_dim, experts.hidden_dim
    geometry = dict(numa_count=1, expert_num=E, hidden_size=H, intermediate_size=I)
    layers = list(range(len(model.model.layers)))
    ready = ephemeral.publish_ephemeral_int8_weights(
        tmp_path / "kt-int8-pytest-run.staging", run_id="pytest-run", layer_indices=layers, **geometry
    )
    assert ready == tmp_path / "kt-int8-pytest-run" and (ready / ephemeral.MANIFEST_NAME).is_file()
    cfg = KTConfig(
        kt_expert_weight_format="int8",
        kt_weight_path=str(ready),
        kt_weight_lifecycle="ephemeral",
        kt_num_threads=1,
        kt_lora_rank=RANK,
        kt_activation_policy=RETAIN,
    )
    wrap_moe_layers_with_kt_wrapper(model, cfg)
    assert not ready.exists()
    kt_adapt_peft_lora(model)  # B = 0: the LoRA adds nothing yet
    ids = token_ids(seed=6)
    with torch.no_grad():
        assert rel_l2(model(ids).logits, plain(ids).logits) < 0.02  # int8 weights
    with pytest.raises(ValueError, match="run_id"):
        ephemeral.validate_ephemeral_run_id("../escape")


def test_profile_records_each_layers_stages(monkeypatch):
    from kt_ops.sft import collect_kt_sft_profile, format_kt_sft_profile, reset_kt_sft_profile

    monkeypatch.setenv("KT_SFT_PROFILE", "1")
    model, _ = kt_model()
    ids = token_ids(seed=7)
    model(ids, labels=ids).loss.backward()
    profile = collect_kt_sft_profile(model)
    assert profile["enabled"] and sorted(profile["layers"]) == [0, 1]
    stats = profile["layers"][0]
    assert stats["wrapper.forward.total.calls"] == 1 and stats["wrapper.backward.total.calls"] == 1
    assert stats["wrapper.tokens"] == ids.numel() and stats["wrapper.forward.total.total_ns"] > 0
    table = format_kt_sft_profile(profile)
    assert "forward.total" in table and "backward.total" in table
    reset_kt_sft_profile(model)
    assert "wrapper.forward.total.calls" not in collect_kt_sft_profile(model)["layers"][0]
    monkeypatch.delenv("KT_SFT_PROFILE")
    assert not collect_kt_sft_profile(kt_model()[0])["enabled"]
