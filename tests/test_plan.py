"""kt-sft plan: memory figures from config.json alone (no weights), checked against hand counts."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from kt_ops import cli  # noqa: E402
from kt_ops.plan import plan_from_config  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _config(model, **extra):
    return cli.load_config(
        {"model_name_or_path": model, "dataset": "identity", "output_dir": "/tmp/unused", **extra}, quiet=True
    )


def test_plan_deepseek_v3_671b_from_config_json_only(tmp_path, capsys):
    model_dir = tmp_path / "DeepSeek-V3"
    model_dir.mkdir()
    shutil.copy(os.path.join(DATA, "deepseek_v3_671b_config.json"), model_dir / "config.json")
    plan = plan_from_config(_config(str(model_dir), bf16=True, cutoff_len=2048, per_device_train_batch_size=1))
    H, I, E, moe_layers = 7168, 2048, 256, 61 - 3
    assert (plan.moe_layers, plan.experts, plan.hidden_size, plan.expert_intermediate) == (moe_layers, E, H, I)
    assert plan.expert_params == moe_layers * E * 3 * H * I  # 653.9 B of the 671 B
    assert 660e9 < plan.expert_params + plan.other_params < 690e9
    # bf16 packs 2 bytes per weight (no scales); int8 ~1 byte plus fp32 row scales; int4 about half of int8.
    assert plan.packed_bytes["bf16"] == 2 * plan.expert_params
    assert plan.expert_params < plan.packed_bytes["int8"] < 1.01 * plan.expert_params
    assert 0.45 < plan.packed_bytes["int4"] / plan.packed_bytes["int8"] < 0.55
    assert plan.tokens == 2048
    report = plan.report()
    assert "fits: no" in report  # 1.2 TiB of bf16 experts: not on this machine
    assert "config.json only, no weights read" in report and "int4" in report
    assert cli.main(["plan", str(_write_yaml(tmp_path, model_dir))]) == 0
    assert "host RAM for the packed routed experts" in capsys.readouterr().out


def _write_yaml(tmp_path, model_dir):
    import yaml

    path = tmp_path / "plan.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(model_dir),
                "dataset": "identity",
                "output_dir": str(tmp_path / "out"),
                "kt_config": {"kt_expert_weight_format": "int8"},
            }
        )
    )
    return path


def test_plan_tiny_model_matches_the_built_model():
    from kt_ops.integration import apply_kt, kt_experts_modules
    from kt_ops.integration.tiny import tiny_model

    plan = plan_from_config(_config("tiny-qwen3-moe", kt_backend="AMXINT8"))
    assert plan.weight_format == "int8" and "fits: yes" in plan.report()
    model = apply_kt(tiny_model("tiny-qwen3-moe"), kt_backend="AMXINT8")
    assert plan.packed_bytes["int8"] == sum(kt.experts.nbytes() for _, _, kt in kt_experts_modules(model))
    lora = sum(p.numel() for _, _, kt in kt_experts_modules(model) for p in kt.lora_parameters())
    # the experts' float parameters are one-element placeholders of the full shape (peft sizes LoRA from them)
    placeholders = sum(
        p.numel() for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
    )
    assert plan.other_params == sum(p.numel() for p in model.parameters()) - lora - placeholders


def test_plan_deepseek_v3_on_4_and_8_gpus_with_and_without_fsdp2(tmp_path, capsys):
    from kt_ops.plan import GiB, per_gpu, several_gpus

    model_dir = tmp_path / "DeepSeek-V3"
    model_dir.mkdir()
    shutil.copy(os.path.join(DATA, "deepseek_v3_671b_config.json"), model_dir / "config.json")
    config = _config(str(model_dir), bf16=True, cutoff_len=2048, per_device_train_batch_size=1)
    plan = plan_from_config(dict(config, kt_expert_weight_format="int8"), all_formats=False)
    assert list(plan.packed_bytes) == ["int8"]
    # FSDP2's units: 61 decoder layers, and the root (embeddings, final norm, head) gathered from
    # forward to backward; every non-expert parameter is in one of them
    assert len([u for u in plan.unit_params if u]) == 61 and sum(plan.unit_params.values()) == plan.other_params
    assert plan.unit_params[""] >= 2 * 129280 * 7168
    assert sum(plan.unit_lora.values()) == plan.lora_params
    for gpus in (4, 8):
        plain, sharded = per_gpu(plan, gpus, False), per_gpu(plan, gpus, True)
        assert plain["non-expert weights"] == plan.other_bytes  # ~32 GiB of bf16 on every GPU: DDP
        assert sharded["non-expert weights"] == -(-plan.other_bytes // gpus)
        assert sharded["LoRA weights, grads, Adam"] == -(-plan.lora_bytes // gpus)
        assert plain["activations"] == sharded["activations"]
        report = several_gpus(plan, gpus, 1, 80 * GiB, 1536 * GiB)
        # 86 GiB a GPU without FSDP2; 30 GiB (4 GPUs) and 20 GiB (8 GPUs) with it
        assert "fits a 80.0 GiB GPU                        no            yes" in report, report
    assert sum(per_gpu(plan, 8, True).values()) < 24 * GiB < sum(per_gpu(plan, 4, True).values())
    assert "training yes, loading yes" in several_gpus(plan, 8, 1, 80 * GiB, 1536 * GiB)
    assert "training yes, loading no" in several_gpus(plan, 8, 1, 80 * GiB, 1024 * GiB)
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump({"model_name_or_path": "tiny-qwen3-moe", "dataset": "identity", "output_dir": "out"})
    )
    assert cli.main(["plan", str(path), "--gpus", "8", "--nodes", "2", "--gpu-memory", "80"]) == 0
    assert "2 node(s) x 8 GPU(s): 16 processes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["plan", str(path), "--gpus", "0"])
    assert "expected a positive int, got '0'" in capsys.readouterr().err
