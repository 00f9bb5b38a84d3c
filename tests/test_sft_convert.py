"""kt_ops.sft.convert_kt_to_sglang_adapter: a KT adapter (fused expert LoRA beside PEFT's files) as a
per-expert PEFT adapter, merged or split, through the function and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kt_ops.sft import convert_kt_to_sglang_adapter as converter

E, H, I, R = 2, 5, 7, 3


def kt_adapter(path, rank=R, with_peft=True):
    path.mkdir()
    gen = torch.Generator().manual_seed(0)
    shapes = {"gate_lora_a": (E, rank, H), "gate_lora_b": (E, I, rank), "up_lora_a": (E, rank, H)}
    shapes.update(up_lora_b=(E, I, rank), down_lora_a=(E, rank, I), down_lora_b=(E, H, rank))
    fused = {f"layers.1.experts.{n}": torch.randn(s, generator=gen).bfloat16() for n, s in shapes.items()}
    save_file(fused, str(path / converter.FUSED_EXPERT_LORA_FILE))
    if with_peft:
        q = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(rank, H)}
        save_file(q, str(path / converter.ADAPTER_MODEL_FILE))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 6, "target_modules": ["q_proj"]}
        (path / converter.ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    return fused


def test_command_line_converts_merges_and_splits(tmp_path, capsys):
    fused = kt_adapter(tmp_path / "kt")
    argv = [str(tmp_path / "kt"), str(tmp_path / "out"), "--base-model", "/models/base"]
    argv += ["--expert-output-dir", str(tmp_path / "experts"), "--nonexpert-output-dir", str(tmp_path / "rest")]
    assert converter.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["tensor_count"], summary["rank"], summary["lora_alpha"]) == (E * 6 + 1, R, 6)
    merged = load_file(str(tmp_path / "out" / converter.ADAPTER_MODEL_FILE))
    for e in range(E):
        key = f"model.layers.1.mlp.experts.{e}.down_proj.lora_B.weight"
        assert (
            torch.equal(merged[key], fused["layers.1.experts.down_lora_b"][e]) and merged[key].dtype == torch.bfloat16
        )
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in merged
    config = json.loads((tmp_path / "out" / converter.ADAPTER_CONFIG_FILE).read_text())
    assert config["target_modules"] == ["q_proj", "gate_proj", "up_proj", "down_proj"]
    assert (config["r"], config["base_model_name_or_path"]) == (R, "/models/base")
    experts = load_file(str(tmp_path / "experts" / converter.ADAPTER_MODEL_FILE))
    rest = load_file(str(tmp_path / "rest" / converter.ADAPTER_MODEL_FILE))
    assert set(experts) | set(rest) == set(merged) and len(rest) == 1
    with pytest.raises(FileExistsError, match="not empty"):
        converter.main(argv[:4])
    assert converter.main(argv[:4] + ["--overwrite"]) == 0


def test_bad_inputs_are_named(tmp_path):
    kt_adapter(tmp_path / "kt", with_peft=False)
    convert = converter.convert_kt_to_sglang_adapter
    with pytest.raises(ValueError, match="pass --lora-alpha"):
        convert(tmp_path / "kt", tmp_path / "out", base_model_name_or_path="b")
    with pytest.raises(ValueError, match="ancestor/descendant"):
        convert(tmp_path / "kt", tmp_path / "kt" / "out", base_model_name_or_path="b", lora_alpha=2)
    save_file(
        {"layers.0.experts.gate_lora_c": torch.zeros(1, 1, 1)}, str(tmp_path / "kt" / "fused_expert_lora.safetensors")
    )
    with pytest.raises(ValueError, match="Unsupported KT fused expert LoRA tensor"):
        convert(tmp_path / "kt", tmp_path / "out", base_model_name_or_path="b", lora_alpha=2)
