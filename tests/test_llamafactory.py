"""LLaMA-Factory compatibility of kt-sft: its KT example configs run unmodified (model path, output
dir and pre-converted expert path aside) against local tiny models of their architectures; its keys,
defaults, dataset registry and templates keep their meaning."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
yaml = pytest.importorskip("yaml")

from kt_ops import cli  # noqa: E402
from kt_ops.integration import llamafactory as lf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
LF_CONFIGS = os.path.join(ROOT, "tests", "data", "llamafactory")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# LLaMA-Factory's example -> the tiny model of its architecture.
ARCHITECTURES = {
    "deepseek_v2_lora_sft_kt.yaml": "tiny-deepseek-v2",
    "deepseek_v3_lora_sft_kt.yaml": "tiny-deepseek-v3",
    "deepseek_v3_int8_lora_sft_kt.yaml": "tiny-deepseek-v3",
    "qwen3moe_lora_sft_kt.yaml": "tiny-qwen3-moe",
    "qwen3_5moe_lora_sft_kt.yaml": "tiny-qwen3_5-moe",
    "qwen3vlmoe_lora_sft_kt.yaml": "tiny-qwen3-vl-moe",
}


def _tiny_model_dir(name: str, directory) -> str:
    from kt_ops.integration.tiny import tiny_model, tiny_tokenizer

    path = str(directory / name)
    tiny_model(name).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_every_shipped_example_is_covered():
    assert sorted(f for f in os.listdir(LF_CONFIGS) if f.endswith(".yaml")) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("example", sorted(ARCHITECTURES))
def test_llamafactory_example_runs_unmodified(example, tmp_path, monkeypatch, capsys):
    with open(os.path.join(LF_CONFIGS, example)) as f:
        config = yaml.safe_load(f)
    config["model_name_or_path"] = _tiny_model_dir(ARCHITECTURES[example], tmp_path)
    config["output_dir"] = str(tmp_path / "out")
    if "kt_weight_path" in config:  # pre-converted routed experts of the model, in the format the config names
        from kt_ops.weights.convert import convert_checkpoint

        convert_checkpoint(config["model_name_or_path"], str(tmp_path / "experts"), "AMXINT8_SFT")
        config["kt_weight_path"] = str(tmp_path / "experts")
    path = tmp_path / example
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(EXAMPLES)  # LLaMA-Factory resolves dataset_dir (default data/) from the working directory
    threads = config.get("kt_config", {}).get("kt_num_threads")
    if threads is not None and threads > len(os.sched_getaffinity(0)):
        with pytest.warns(UserWarning, match=f"kt_num_threads={threads} exceeds"):
            summary = cli.train(str(path))
    else:
        summary = cli.train(str(path))
    out = capsys.readouterr().out
    for key in ("ddp_timeout", "overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers"):
        assert f"kt-sft: {key} has no effect" in out, key
    assert summary["steps"] >= 2 and math.isfinite(summary["train_loss"]), summary
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "loss.png").is_file()  # plot_loss: true
    resolved = yaml.safe_load((tmp_path / "out" / "kt_sft_config.yaml").read_text())
    assert resolved["lora_alpha"] == config.get("lora_alpha", 2 * config["lora_rank"])
    if threads is not None:
        assert resolved["kt_num_threads"] == min(threads, len(os.sched_getaffinity(0)))
    assert resolved["kt_backend"] == ("AMXINT8" if "int8" in example else "AMXBF16")


def test_kt_config_block_and_top_level_spelling_agree(tmp_path):
    base = {"model_name_or_path": "tiny-qwen3-moe", "dataset": "identity", "output_dir": str(tmp_path)}
    nested = cli.load_config({**base, "kt_config": {"kt_expert_weight_format": "int8", "kt_backend": "auto"}})
    flat = cli.load_config({**base, "kt_expert_weight_format": "int8", "kt_backend": "auto"})
    assert nested == flat and nested["kt_backend"] == "AMXINT8"
    with pytest.raises(cli.ConfigError, match="kt_backend is 'AMXBF16' at the top level but 'AMXINT8'"):
        cli.load_config({**base, "kt_backend": "AMXBF16", "kt_config": {"kt_backend": "AMXINT8"}})
    with pytest.raises(cli.ConfigError, match=r"unknown kt_config keys \['kt_lora_rank'\]; valid kt_config keys"):
        cli.load_config({**base, "kt_config": {"kt_lora_rank": 8}})
    with pytest.raises(cli.ConfigError, match="computes 'bf16' experts but kt_expert_weight_format is 'int4'"):
        cli.load_config({**base, "kt_backend": "AMXBF16", "kt_expert_weight_format": "int4"})
    assert cli.load_config({**base, "kt_expert_weight_format": "fp8"})["kt_backend"] == "AMXFP8"
    with pytest.raises(cli.ConfigError, match=r"unknown config keys \['kt_foo'\]; valid keys: .*kt_cpu_activation"):
        cli.load_config({**base, "kt_foo": 1})


def test_llamafactory_defaults(tmp_path):
    config = cli.load_config(
        {"model_name_or_path": "tiny-qwen3-moe", "dataset": "identity", "output_dir": str(tmp_path), "lora_rank": 4}
    )
    assert config["lora_alpha"] == 8.0 and config["lora_dropout"] == 0.0
    assert config["gradient_checkpointing"] is True and config["kt_cpu_activation"] == "recompute"
    assert (config["cutoff_len"], config["num_train_epochs"], config["lr_scheduler_type"]) == (2048, 3.0, "linear")
    off = cli.load_config(
        {
            "model_name_or_path": "tiny-qwen3-moe",
            "dataset": "identity",
            "output_dir": str(tmp_path),
            "disable_gradient_checkpointing": True,
        }
    )
    assert off["gradient_checkpointing"] is False and off["kt_cpu_activation"] == "retain"
    with pytest.raises(cli.ConfigError, match="report_to must be none or tensorboard"):
        cli.load_config(
            {
                "model_name_or_path": "tiny-qwen3-moe",
                "dataset": "identity",
                "output_dir": str(tmp_path),
                "report_to": "wandb",
            }
        )


def test_registry_alpaca_sharegpt_columns_identity_and_max_samples(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.json").write_text(
        json.dumps(
            [
                {
                    "q": "Who are you?",
                    "ctx": "",
                    "a": "I am {{name}} by {{author}}.",
                    "sys": "Be brief.",
                    "hist": [["hi", "hello"]],
                },
                {"q": "Second?", "ctx": "more", "a": "Yes."},
            ]
        )
    )
    (data / "chat.jsonl").write_text(
        json.dumps(
            {
                "msgs": [{"r": "system", "c": "S"}, {"r": "u", "c": "<image>Q1"}, {"r": "b", "c": "A1"}],
                "pics": ["x.jpg"],
            }
        )
        + "\n"
    )
    (data / "dataset_info.json").write_text(
        json.dumps(
            {
                "qa": {
                    "file_name": "qa.json",
                    "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "hist"},
                },
                "chat": {
                    "file_name": "chat.jsonl",
                    "formatting": "sharegpt",
                    "columns": {"messages": "msgs", "images": "pics"},
                    "tags": {"role_tag": "r", "content_tag": "c", "user_tag": "u", "assistant_tag": "b"},
                },
            }
        )
    )
    specs = lf.resolve_datasets("qa, chat", str(data))
    qa = lf.load_rows(specs[0], identity={"name": "Kiwi", "author": "kt"})
    assert qa[0]["system"] == "Be brief." and qa[0]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Kiwi by kt."},
    ]
    assert qa[1]["messages"][0]["content"] == "Second?\nmore"
    assert len(lf.load_rows(specs[0], max_samples=1)) == 1
    with pytest.warns(UserWarning, match="images/videos are not used"):
        chat = lf.load_rows(specs[1])
    assert chat == [
        {"system": "S", "messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]}
    ]
    with pytest.raises(lf.DataError, match=r"dataset 'nope' is not in .*dataset_info.json \(it lists \['chat', 'qa'\]"):
        lf.resolve_datasets("nope", str(data))


def test_templates_mask_prompts_and_learn_every_answer():
    from kt_ops.integration.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    template = lf.get_template("qwen3", tok)
    lf.add_template_tokens(template, tok)
    assert tok.eos_token == "<|im_end|>" and len(tok) <= 128
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2?"},
        {"role": "assistant", "content": "two"},
    ]
    ex = lf.encode_conversation(template, messages, None, tok, 2048)
    learned = tok.decode([i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100])
    assert learned == "<think>\n\n</think>\n\nyo<|im_end|>\n<think>\n\n</think>\n\ntwo<|im_end|>\n"
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # deepseek3: bos first, eos closes each answer; no template: the tokenizer's chat template.
    tok = tiny_tokenizer()
    template = lf.get_template("deepseek3", tok)
    lf.add_template_tokens(template, tok)
    ex = lf.encode_conversation(template, messages[:2], None, tok, 2048)
    assert tok.decode(ex["input_ids"]) == "<s><｜User｜>hi<｜Assistant｜>yo</s>"
    assert tok.decode([i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100]) == "yo</s>"
    tok = tiny_tokenizer()
    ex = lf.encode_conversation(lf.get_template(None, tok), messages[:2], None, tok, 2048)
    assert tok.decode(ex["input_ids"]) == "hi\nyo</s>"
    assert tok.decode([i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100]) == "yo</s>"
    with pytest.raises(lf.DataError, match="template 'nope' is not known"):
        lf.get_template("nope", tok)


def test_kt_cpu_activation_recompute_runs_the_experts_again_in_backward(tmp_path, monkeypatch):
    from kt_ops.integration import kt_lora_parameters
    from kt_ops.layer import KTMoELayer

    counted = []
    forward = KTMoELayer.forward
    monkeypatch.setattr(KTMoELayer, "forward", lambda self, *a, **kw: counted.append(1) or forward(self, *a, **kw))
    calls = []
    base = {
        "model_name_or_path": "tiny-qwen3-moe",
        "dataset": "identity",
        "output_dir": str(tmp_path),
        "disable_gradient_checkpointing": True,
    }
    for policy in ("retain", "recompute"):
        model, _ = cli.build_model(cli.load_config({**base, "kt_cpu_activation": policy}))
        model.train()
        counted.clear()
        ids = torch.randint(4, 90, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        calls.append(len(counted))
        grads = [p.grad for p in kt_lora_parameters(model)]
        assert grads and all(g is not None for g in grads)
    assert calls[1] == 2 * calls[0], calls


def test_main_example_scores_its_training_answers(tmp_path, capsys):
    """The main job's pieces on a two-step run: the entropy floor is reported and score compares the
    greedy answer to each of the 16 shipped questions with the data (memorising them takes the full
    run of scripts/main.sh)."""
    with open(os.path.join(EXAMPLES, "tiny_qwen3_moe_sft.yaml")) as f:
        config = yaml.safe_load(f)
    config.update(max_steps=2, output_dir=str(tmp_path / "out"), dataset_dir=os.path.join(EXAMPLES, "data"))
    summary = cli.train(config)
    assert 2.0 < summary["unigram_entropy"] < 4.5
    result = cli.score(config, show=1)
    assert result["total"] == 16 and 0 <= result["exact"] <= 16
    assert result["rows"][0][:2] == ("hi", "Hello! I am Kiwi. How can I help?")
    assert "training answers reproduced exactly" in capsys.readouterr().out


def test_report_to_tensorboard_needs_its_package(tmp_path, monkeypatch):
    import importlib.util

    config = cli.load_config(
        {
            "model_name_or_path": "tiny-qwen3-moe",
            "dataset": "identity",
            "output_dir": str(tmp_path),
            "report_to": ["tensorboard"],
        }
    )
    assert config["report_to"] == ["tensorboard"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(cli.ConfigError, match="report_to tensorboard needs the tensorboard package"):
        cli.check_report_to(config)


@pytest.mark.parametrize("name", ["tiny-qwen3_5-moe", "tiny-qwen3-vl-moe"])
def test_vision_language_moe_experts_on_kt_match_transformers(name):
    """Qwen3.5-MoE and Qwen3-VL-MoE: kt_ops's experts (bf16-packed, no LoRA) give transformers' eager logits
    to bf16 rounding of the expert weights."""
    from kt_ops.integration import apply_kt, kt_experts_modules
    from kt_ops.integration.tiny import tiny_model

    model = tiny_model(name).eval()
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        apply_kt(model, lora_rank=0)
        logits = model(input_ids=ids).logits
    assert len(kt_experts_modules(model)) == (4 if "3_5" in name else 2)
    assert ((logits - reference).norm() / reference.norm()).item() < 1e-2
