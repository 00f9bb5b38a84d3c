"""kt-sft (kt_ops.cli): config validation and short SFT / DPO runs on the shipped tiny examples."""

from __future__ import annotations

import csv
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("yaml")

from kt_ops import cli  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path, **overrides):
    config = {
        "model_name_or_path": "tiny-qwen3-moe",
        "dataset": os.path.join(EXAMPLES, "data", "alpaca_tiny.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "lora_rank": 4,
        "lora_alpha": 8,
        "cutoff_len": 48,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 0.01,
        "lr_scheduler_type": "constant",
        "max_steps": 4,
        "torch_num_threads": 1,
    }
    config.update(overrides)
    return config


def test_unknown_and_bad_keys(tmp_path):
    with pytest.raises(cli.ConfigError, match=r"unknown config keys \['lora_rnak'\]; valid keys: .*lora_rank"):
        cli.load_config(_config(tmp_path, lora_rnak=8))
    with pytest.raises(cli.ConfigError, match="stage must be one of"):
        cli.load_config(_config(tmp_path, stage="ppo"))
    with pytest.raises(cli.ConfigError, match="use_kt must be true or false"):
        cli.load_config(_config(tmp_path, use_kt="yes"))
    with pytest.raises(cli.ConfigError, match="max_steps must be an integer"):
        cli.load_config(_config(tmp_path, max_steps=2.5))
    with pytest.raises(cli.ConfigError, match="missing required config keys \\['dataset'\\]"):
        cli.load_config({k: v for k, v in _config(tmp_path).items() if k != "dataset"})
    with pytest.raises(cli.ConfigError, match="model_name_or_path"):
        cli.train(_config(tmp_path, model_name_or_path=str(tmp_path / "no-such-model")))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("- a list\n- not a mapping\n")
    assert cli.main(["train", str(bad_yaml)]) == 2


def test_shipped_example_configs_are_valid():
    for name in sorted(os.listdir(EXAMPLES)):
        if name.endswith(".yaml"):
            config = cli.load_config(os.path.join(EXAMPLES, name))
            assert cli.load_rows(config), name
            assert config["use_kt"] is True


def test_sft_run_writes_adapter_config_and_loss_curve(tmp_path):
    from kt_ops.integration import load_kt_adapter

    config = _config(tmp_path, kt_num_gpu_experts=1, gradient_checkpointing=True)
    summary = cli.train(config)
    out = tmp_path / "run"
    for name in ("adapter_model.safetensors", "adapter_config.json", "kt_sft_config.yaml", "loss.csv"):
        assert (out / name).is_file(), name
    losses = summary["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses)

    # The saved adapter restores into a freshly built model of the same config.
    fresh, _ = cli.build_model(cli.load_config(config))

    def expert_b():
        return [p.detach().clone() for n, p in fresh.named_parameters() if ".experts." in n and "lora_B" in n]

    before = expert_b()
    load_kt_adapter(fresh, str(out))
    after = expert_b()
    assert before and all(b.abs().sum() == 0 for b in before) and all(a.abs().sum() > 0 for a in after)


def test_dpo_run_from_yaml(tmp_path):
    pytest.importorskip("trl")
    import yaml

    with open(os.path.join(EXAMPLES, "tiny_deepseek_v3_dpo.yaml")) as f:
        config = yaml.safe_load(f)
    config.update(
        dataset=os.path.join(EXAMPLES, "data", "dpo_tiny.jsonl"), output_dir=str(tmp_path / "dpo"), max_steps=3
    )
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", str(path)]) == 0
    with open(tmp_path / "dpo" / "loss.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert losses[0] == pytest.approx(0.6931, abs=0.01) and losses[-1] < losses[0]
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()


def test_stage_and_dataset_mismatch(tmp_path):
    with pytest.raises(cli.ConfigError, match="stage dpo needs preference records"):
        cli.train(_config(tmp_path, stage="dpo"))
    with pytest.raises(cli.ConfigError, match="stage sft needs alpaca or text records"):
        cli.train(_config(tmp_path, dataset=os.path.join(EXAMPLES, "data", "dpo_tiny.jsonl")))


def test_sft_from_a_local_model_directory(tmp_path, monkeypatch):
    import kt_ops.integration
    from kt_ops.integration import kt_experts_modules
    from kt_ops.integration.tiny import tiny_model, tiny_tokenizer

    # A local checkpoint loads with bounded memory (from_pretrained), never whole and then converted.
    loads = []
    real_from_pretrained = kt_ops.integration.from_pretrained
    monkeypatch.setattr(
        kt_ops.integration,
        "from_pretrained",
        lambda *a, **kw: loads.append(a[1].kt_backend) or real_from_pretrained(*a, **kw),
    )
    monkeypatch.setattr(kt_ops.integration, "apply_kt", lambda *a, **kw: pytest.fail("apply_kt on a whole model"))

    model_dir = tmp_path / "tiny-mixtral"
    tiny_model("tiny-mixtral").save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    config = _config(
        tmp_path, model_name_or_path=str(model_dir), lora_target="q_proj,v_proj", kt_backend="AMXINT8", max_steps=3
    )
    model, _ = cli.build_model(cli.load_config(config))
    layers = kt_experts_modules(model)
    assert len(layers) == 2 and all(kt.weight_format == "int8" for _, _, kt in layers)
    assert loads == ["AMXINT8"]
    summary = cli.train(config)
    assert summary["losses"][-1] < summary["losses"][0]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_checkpoint_resumes_to_the_same_adapter(tmp_path):
    """A run stopped after a checkpoint and resumed from it ends where the uninterrupted run ends:
    the checkpoint holds Trainer's state and peft's adapter, expert LoRA included."""
    from safetensors.torch import load_file

    whole = cli.train(_config(tmp_path / "whole", max_steps=4, save_steps=2))
    ckpt = os.path.join(whole["output_dir"], "checkpoint-2")
    assert os.path.isfile(os.path.join(ckpt, "optimizer.pt"))
    resumed = cli.train(_config(tmp_path / "resumed", max_steps=4, save_steps=2, resume_from_checkpoint=ckpt))
    final_whole = load_file(os.path.join(whole["output_dir"], "adapter_model.safetensors"))
    final_resumed = load_file(os.path.join(resumed["output_dir"], "adapter_model.safetensors"))
    assert final_whole.keys() == final_resumed.keys() and any(".experts." in k for k in final_whole)
    for key in final_whole:
        torch.testing.assert_close(final_resumed[key], final_whole[key], rtol=1e-4, atol=1e-6, msg=key)
    with pytest.raises(cli.ConfigError, match="resume_from_checkpoint"):
        cli.train(_config(tmp_path / "bad", resume_from_checkpoint=str(tmp_path / "nope")))


def test_bf16_run_trains(tmp_path):
    import math

    summary = cli.train(_config(tmp_path, bf16=True, max_steps=3, learning_rate=0.02))
    assert len(summary["losses"]) == 3 and all(math.isfinite(loss) for loss in summary["losses"])
    assert summary["losses"][-1] < summary["losses"][0]
