"""kt_ops.integration.from_pretrained: a model built on the meta device, non-expert weights read from
the shards, experts streamed layer by layer into the packed form; it must equal transformers'
from_pretrained followed by apply_kt."""

import os

import pytest
import torch

from kt_ops.integration import apply_kt, find_moe_experts, from_pretrained
from kt_ops.integration.tiny import tiny_model
from kt_ops.core.packed import unpack_experts
from kt_ops.weights import ktransformers as ktw


def save_sharded(model, path):
    model.save_pretrained(path, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))


def logits(model, seed=0):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def stock(path, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return apply_kt(model, **kw)


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v3"])
def test_equals_from_pretrained_then_apply_kt(tmp_path, name):
    save_sharded(tiny_model(name), tmp_path)
    ours = from_pretrained(tmp_path, kt_backend="AMXBF16", lora_rank=4, dtype=torch.float32)
    assert not any(t.is_meta for t in list(ours.parameters()) + list(ours.buffers()))
    ref = stock(tmp_path, kt_backend="AMXBF16", lora_rank=4)
    torch.testing.assert_close(logits(ours), logits(ref), rtol=0, atol=0)
    # the experts exist only packed: the float expert parameters are one-element placeholders that
    # peft's target_parameters sizes its LoRA from, as apply_kt leaves them
    for (_, mine), (_, theirs) in zip(find_moe_experts(ours), find_moe_experts(ref), strict=True):
        for pname in ("gate_up_proj", "down_proj"):
            placeholder = getattr(mine, pname)
            assert placeholder.untyped_storage().nbytes() == placeholder.element_size()
            assert placeholder.shape == getattr(theirs, pname).shape


def test_gpu_experts_stay_in_the_module(tmp_path):
    save_sharded(tiny_model("tiny-qwen3-moe"), tmp_path)
    ours = from_pretrained(tmp_path, kt_backend="AMXINT8", lora_rank=0, dtype=torch.float32, kt_num_gpu_experts=2)
    ref = stock(tmp_path, kt_backend="AMXINT8", lora_rank=0, kt_num_gpu_experts=2)
    torch.testing.assert_close(logits(ours), logits(ref), rtol=0, atol=0)


def test_kt_ops_converted_experts(tmp_path):
    from kt_ops.convert_weights import main as convert

    save_sharded(tiny_model("tiny-qwen3-moe"), tmp_path / "hf")
    convert(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "q"), "--method", "AMXINT8_SFT"])
    ours = from_pretrained(
        tmp_path / "hf", kt_backend="AMXINT8", kt_weight_path=tmp_path / "q", lora_rank=0, dtype=torch.float32
    )
    ref = stock(tmp_path / "hf", kt_backend="AMXINT8", lora_rank=0)
    torch.testing.assert_close(logits(ours), logits(ref), rtol=0, atol=0)


def test_ktransformers_int8_numa_split_experts(tmp_path):
    """LLaMA-Factory's INT8 recipe: the HF model for everything else, kt_weight_path for the experts."""
    model = tiny_model("tiny-qwen3-moe", hidden_size=128, moe_intermediate_size=128)
    save_sharded(model, tmp_path / "hf")
    (tmp_path / "kt").mkdir()
    from safetensors.torch import save_file

    want = {}
    for name, module in find_moe_experts(model):
        layer = int(name.split(".layers.")[1].split(".")[0])
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        gate, up = gate_up.chunk(2, dim=1)
        tensors = ktw.convert_layer(gate, up, down, layer, "INT8", numa_parts=2)
        save_file(tensors, str(tmp_path / "kt" / f"model-{layer:05d}.safetensors"))
        want[layer] = tensors
    ours = from_pretrained(
        tmp_path / "hf", kt_backend="AMXINT8", kt_weight_path=tmp_path / "kt", lora_rank=2, dtype=torch.float32
    )
    for name, module in find_moe_experts(ours):
        layer = module.kt_experts.layer_idx
        assert module.kt_experts.experts.weight_format == "int8_kgroup"
        gate, _, down = unpack_experts(module.kt_experts.experts)
        e, part = 3, 1
        stored = want[layer][f"blk.{layer}.ffn_down_exps.{e}.numa.{part}" + ".weight"]
        scale = want[layer][f"blk.{layer}.ffn_down_exps.{e}.numa.{part}" + ".scale"]
        ref = ktw.dequantize(stored, scale, 128, 64, "INT8")
        assert torch.equal(down[e, :, 64:], ref)
    assert torch.isfinite(logits(ours)).all()
    with pytest.raises(ValueError, match="kt_backend 'AMXINT4'"):
        from_pretrained(tmp_path / "hf", kt_backend="AMXINT4", kt_weight_path=tmp_path / "kt", dtype=torch.float32)
    # apply_kt on the whole model reads the same directory the same way
    applied = stock(tmp_path / "hf", kt_backend="AMXINT8", kt_weight_path=str(tmp_path / "kt"), lora_rank=2)
    torch.testing.assert_close(logits(applied), logits(ours), rtol=0, atol=0)
    with pytest.raises(ValueError, match="float experts"):
        stock(tmp_path / "hf", kt_backend="AMXINT8", kt_weight_path=str(tmp_path / "hf"), lora_rank=0)


def test_missing_non_expert_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model("tiny-qwen3-moe").save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        from_pretrained(tmp_path, dtype=torch.float32)


def test_device_map_dict_and_bad_values(tmp_path):
    tiny_model("tiny-qwen3-moe").save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.float32, device_map={"": "cpu", "lm_head": "cpu"})
    assert model.lm_head.weight.device.type == "cpu"
    with pytest.raises(TypeError, match="device_map"):
        from_pretrained(tmp_path, device_map=3.5)
    with pytest.raises(ValueError, match="device_map has no entry"):
        from_pretrained(tmp_path, device_map={"lm_head": "cpu"})


def test_stock_peft_on_a_loaded_model(tmp_path):
    """from_pretrained leaves the model as apply_kt does, so stock peft gives the experts LoRA."""
    peft = pytest.importorskip("peft")
    save_sharded(tiny_model("tiny-qwen3-moe"), tmp_path)
    model = from_pretrained(tmp_path, kt_backend="AMXBF16", lora_rank=4, lora_alpha=8.0, dtype=torch.float32)
    with pytest.warns(UserWarning, match="peft_config"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    config = model.peft_config["default"]
    assert sorted(config.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    expert_lora = {n: p for n, p in model.named_parameters() if ".experts." in n and "lora_" in n}
    assert expert_lora and all(p.requires_grad for p in expert_lora.values())
    model.train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    # B starts at zero, so the first gradient reaches B (through the kt kernels) and not yet A
    grads_b = [p.grad for n, p in expert_lora.items() if "lora_B" in n]
    assert grads_b and all(g is not None and g.abs().sum() > 0 for g in grads_b)
