"""kt_ops.integration.from_pretrained on the architectures whose expert checkpoints differ from the
common layouts: DeepSeek-V4 (per-expert `ffn.experts.{E}.w1/w2/w3`, clamped SiLU), gpt-oss (fused
[E, H, 2I] with gate/up interleaved, expert biases, clamped SwiGLU), Llama-4 (fused [E, H, 2I] under
`feed_forward.experts`, experts called per choice) and LongCat-Flash (per-expert, with gate/up rows
for its identity experts that are no experts). Each is saved with save_pretrained and must load,
streamed, into exactly what transformers' from_pretrained + apply_kt gives: the same packed experts,
biases and activation, the same LoRA parameters, the same logits."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from kt_ops.integration import apply_kt, from_pretrained, kt_experts_modules  # noqa: E402
from kt_testing import spy_on_from_pretrained  # noqa: E402
from test_deepseek_v4 import tiny_deepseek_v4  # noqa: E402
from test_gpt_oss import tiny_gpt_oss  # noqa: E402
from test_llama4_longcat import tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUILDERS = {
    "deepseek_v4": tiny_deepseek_v4,
    "gpt_oss": tiny_gpt_oss,
    "llama4": lambda: tiny("llama4"),
    "longcat": lambda: tiny("longcat"),
}
_PACKED_FIELDS = ("gate", "up", "down", "gate_scale", "up_scale", "down_scale")


def _logits(model):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same_lora(ours, ref):
    """Both models' LoRA parameters: same names and shapes; then set to the same random values so
    the logits compare the LoRA's layout too."""
    mine = {n: p for n, p in ours.named_parameters() if "lora" in n}
    theirs = {n: p for n, p in ref.named_parameters() if "lora" in n}
    assert mine and {n: p.shape for n, p in mine.items()} == {n: p.shape for n, p in theirs.items()}
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in sorted(mine):
            value = torch.randn(mine[name].shape, generator=gen) * 0.1
            mine[name].copy_(value)
            theirs[name].copy_(value)


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize(
    "kt_backend, gpu_experts, dtype",
    [("AMXBF16", 0, torch.float32), ("AMXINT8", 1, torch.float32), ("AMXINT4", 0, torch.bfloat16)],
)
def test_streamed_equals_from_pretrained_then_apply_kt(arch, kt_backend, gpu_experts, dtype, tmp_path):
    # Small shards: a layer's experts (and a fused tensor's neighbours) land in different files. The
    # checkpoint is fp32; loaded as bf16, transformers rounds the experts first and keeps its
    # _keep_in_fp32_modules (DeepSeek-V4's norms, hyper-connections) in fp32: so must the loader.
    BUILDERS[arch]().save_pretrained(tmp_path, max_shard_size="40KB")
    ours = from_pretrained(tmp_path, kt_backend=kt_backend, lora_rank=4, kt_num_gpu_experts=gpu_experts, dtype=dtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    apply_kt(ref, kt_backend=kt_backend, lora_rank=4, kt_num_gpu_experts=gpu_experts)
    ref.eval()
    assert not any(t.is_meta for t in list(ours.parameters()) + list(ours.buffers()))
    theirs = dict(ref.state_dict())
    assert {n: t.dtype for n, t in ours.state_dict().items() if "lora" not in n} == {
        n: t.dtype for n, t in theirs.items() if "lora" not in n
    }
    pairs = list(zip(kt_experts_modules(ours), kt_experts_modules(ref), strict=True))
    assert pairs
    for (name, module, mine), (ref_name, ref_module, theirs) in pairs:
        assert name == ref_name and mine.weight_format == theirs.weight_format
        for field in _PACKED_FIELDS:
            a, b = getattr(mine.experts, field), getattr(theirs.experts, field)
            assert (a is None and b is None) or torch.equal(a, b), f"{name} {field}"
        assert mine.experts.variant().keys() == theirs.experts.variant().keys()
        for key, value in mine.experts.variant().items():
            other = theirs.experts.variant()[key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
        for buffer in ("kt_gpu_gate_up_proj", "kt_gpu_down_proj"):
            assert torch.equal(getattr(module, buffer), getattr(ref_module, buffer)), buffer
    variant = pairs[0][0][2].experts.variant()
    if arch == "gpt_oss":
        assert variant["activation"] == "clamped_swiglu" and variant["gate_bias"].abs().sum() > 0
    if arch == "deepseek_v4":
        assert variant["activation"] == "clamped_silu" and variant["swiglu_limit"] == 1.0
    _same_lora(ours, ref)
    torch.testing.assert_close(_logits(ours), _logits(ref), rtol=0, atol=0)


def test_longcat_identity_rows_are_not_experts(tmp_path):
    # LongCat's checkpoint has gate/up (no down) for its identity experts 4 and 5; they are ignored,
    # while a real expert missing a projection is still an error.
    from safetensors.torch import load_file, save_file

    tiny("longcat").save_pretrained(tmp_path)
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    assert "model.layers.0.mlp.experts.4.up_proj.weight" in tensors
    assert "model.layers.0.mlp.experts.4.down_proj.weight" not in tensors
    del tensors["model.layers.0.mlp.experts.3.down_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"experts missing projections \{3: \['down_proj'\]\}"):
        from_pretrained(tmp_path, lora_rank=0)


@pytest.mark.parametrize("arch", ["deepseek_v4", "gpt_oss"])
def test_kt_sft_streams_a_local_checkpoint(arch, tmp_path, monkeypatch):
    # (Llama-4 and LongCat-Flash: tests/test_llama4_longcat.py::test_kt_sft_trains_a_local_checkpoint.)
    pytest.importorskip("yaml")
    from kt_ops import cli
    from kt_ops.integration.tiny import tiny_tokenizer

    model_dir = tmp_path / arch
    BUILDERS[arch]().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    calls = spy_on_from_pretrained(monkeypatch)
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    config = {
        "model_name_or_path": str(model_dir),
        "dataset": os.path.join(examples, "data", "alpaca_tiny.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "lora_rank": 4,
        "lora_alpha": 8,
        "cutoff_len": 48,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.01,
        "lr_scheduler_type": "constant",
        "max_steps": 3,
        "torch_num_threads": 1,
        "lora_target": "q_proj" if arch == "gpt_oss" else "q_b_proj",
    }
    summary = cli.train(config)
    assert calls == [str(model_dir)]
    assert summary["losses"][-1] < summary["losses"][0]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
