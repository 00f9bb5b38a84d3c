"""kt_ops.sft's load-time artifacts: the non-expert cache of an FP8 checkpoint trained with INT8
experts (manifest, load plan, checks of what was loaded, the ranks' agreement), the routed experts'
ownership during loading (claim, device-map projection, dispatch hiding, drift detection) on a real
tiny model, and the INT8 manifest's file-size contract."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kt_ops.sft import weight_manifest
from kt_ops.sft.artifacts import (
    KT_NON_EXPERT_MANIFEST_NAME,
    KTArtifactError,
    claim_kt_routed_expert_subtrees,
    hide_kt_routed_experts_from_dispatch,
    is_kt_routed_expert_base_parameter,
    prepare_kt_non_expert_device_map,
    project_kt_routed_experts_out_of_device_map,
    resolve_kt_pretrained_artifacts,
    validate_kt_pretrained_load,
    write_kt_non_expert_cache_manifest,
)

H, I, E = 8, 16, 2  # hidden, moe intermediate, routed experts of the fake DeepSeek-V3 source


def write_json(path, payload):
    path.write_text(json.dumps(payload), encoding="utf-8")


def int8_experts(root, layers=(1,), numa=1):
    """A schema-2 INT8 directory of the right sizes (contents are bytes, never loaded here)."""
    entries = []
    for layer in layers:
        rows = I // numa
        sizes = {("gate", "quant"): rows * H, ("up", "quant"): rows * H, ("down", "quant"): H * rows}
        sizes.update({("gate", "scale"): rows * 4, ("up", "scale"): rows * 4, ("down", "scale"): H * 4})
        for n in range(numa):
            folder = root / f"_layer_{layer}" / f"_numa_{n}"
            folder.mkdir(parents=True)
            for (projection, kind), size in sizes.items():
                for e in range(E):
                    (folder / f"INT8_{projection}_{e}_{size}Byte_{kind}_.kt").write_bytes(bytes([e + 1]) * size)
        entry = weight_manifest.scan_int8_layer(root, layer, (numa, E, H, I))
        for item in entry["files"]:
            item["sha256"] = weight_manifest._sha256(root / item["path"])
        entries.append(entry)
    manifest = {"schema_version": 2, "state": "ready", "expert_weight_format": "int8"}
    manifest.update(layout=weight_manifest.INT8_WEIGHT_LAYOUT, threadpool_count=numa, expert_num=E)
    manifest.update(hidden_size=H, intermediate_size=I, layers=entries)
    write_json(root / weight_manifest.MANIFEST_NAME, manifest)
    return root


def source_and_cache(tmp_path):
    """An FP8 source checkpoint's config and index, its BF16 non-expert cache, published."""
    source, cache = tmp_path / "source", tmp_path / "cache"
    source.mkdir()
    cache.mkdir()
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "first_k_dense_replace": 1}
    config.update(n_routed_experts=E, hidden_size=H, moe_intermediate_size=I)
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    write_json(source / "config.json", config)
    write_json(source / "model.safetensors.index.json", {"metadata": {}, "weight_map": {}})
    tensors = {
        "model.embed_tokens.weight": torch.ones(4, H, dtype=torch.bfloat16),
        "model.layers.1.mlp.gate.e_score_correction_bias": torch.zeros(E),  # the one fp32 tensor
    }
    save_file(tensors, cache / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}
    write_json(cache / "model.safetensors.index.json", index)
    write_kt_non_expert_cache_manifest(cache, source)
    return source, cache, tensors


def config_of(cache, routed):
    return {"kt_expert_weight_format": "int8", "kt_non_expert_weight_path": str(cache), "kt_weight_path": str(routed)}


def test_non_expert_cache_plan_and_loaded_model(tmp_path):
    source, cache, tensors = source_and_cache(tmp_path)
    routed = int8_experts(tmp_path / "routed")
    plan = resolve_kt_pretrained_artifacts(config_of(cache, routed), source)
    assert plan.weight_path == str(cache) and plan.routed_weight_path == str(routed)
    assert plan.weight_keys == set(tensors) and plan.manifest["version"] == 2
    with pytest.raises(KTArtifactError, match="already exists"):
        write_kt_non_expert_cache_manifest(cache, source)
    assert resolve_kt_pretrained_artifacts({"kt_expert_weight_format": "int8"}, source) is None

    class Loaded(torch.nn.Module):
        def __init__(self, extra=()):
            super().__init__()
            self.config = type("Config", (), {"name_or_path": str(cache), "_name_or_path": str(cache)})()
            self.names = list(tensors) + list(extra)

        def state_dict(self):
            return dict.fromkeys(self.names)

    info = {"missing_keys": ["model.layers.1.mlp.experts.gate_up_proj"], "unexpected_keys": []}
    model = Loaded(extra=["model.layers.1.mlp.experts.down_proj"])  # routed experts are KT's
    assert validate_kt_pretrained_load(plan, info, model) is plan
    assert model.config.name_or_path == str(source) and model._kt_pretrained_load_plan is plan
    with pytest.raises(KTArtifactError, match="did not load exactly"):
        validate_kt_pretrained_load(plan, {"missing_keys": ["model.norm.weight"]}, Loaded())
    with pytest.raises(KTArtifactError, match="differ from the cache"):
        validate_kt_pretrained_load(plan, {}, Loaded(extra=["model.norm.weight"]))


def test_cache_and_experts_are_checked_against_their_records(tmp_path):
    source, cache, _ = source_and_cache(tmp_path)
    routed = int8_experts(tmp_path / "routed")
    config = config_of(cache, routed)
    with pytest.raises(KTArtifactError, match="explicit quantization_config"):
        resolve_kt_pretrained_artifacts(config, source, object())
    shard = cache / "model-00001-of-00001.safetensors"
    original = shard.read_bytes()
    shard.write_bytes(original[:-2] + bytes([original[-2] ^ 1]) + original[-1:])  # same size, one bit
    with pytest.raises(KTArtifactError, match="SHA256 mismatch"):
        resolve_kt_pretrained_artifacts(config, source)
    shard.write_bytes(original)
    kt_file = next(routed.rglob("*.kt"))
    kt_file.write_bytes(b"\0" * kt_file.stat().st_size)
    with pytest.raises(KTArtifactError, match="SHA256 mismatch"):
        resolve_kt_pretrained_artifacts(config, source)
    write_json(source / "config.json", {"model_type": "deepseek_v3"})
    with pytest.raises(KTArtifactError, match="changed since the cache was made"):
        resolve_kt_pretrained_artifacts(config, source)


def test_a_cache_holding_routed_or_fp8_tensors_is_refused(tmp_path):
    source, cache, tensors = source_and_cache(tmp_path)
    (cache / KT_NON_EXPERT_MANIFEST_NAME).unlink()
    bad = {**tensors, "model.layers.1.mlp.experts.0.gate_proj.weight": torch.ones(I, H, dtype=torch.bfloat16)}
    save_file(bad, cache / "model-00001-of-00001.safetensors")
    write_json(
        cache / "model.safetensors.index.json",
        {"metadata": {}, "weight_map": dict.fromkeys(bad, "model-00001-of-00001.safetensors")},
    )
    with pytest.raises(KTArtifactError, match="routed, quantized or MTP tensor"):
        write_kt_non_expert_cache_manifest(cache, source)
    save_file({"model.norm.weight": torch.ones(H)}, cache / "model-00001-of-00001.safetensors")  # fp32, not BF16
    write_json(
        cache / "model.safetensors.index.json",
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}},
    )
    with pytest.raises(KTArtifactError, match="not BF16"):
        write_kt_non_expert_cache_manifest(cache, source)


def test_ranks_agree_or_all_fail(tmp_path, monkeypatch):
    """Under torch.distributed another rank's failure is raised here too, naming the rank; a rank
    other than 0 checks the structure without reading the large files through."""
    from kt_ops.sft import artifacts

    source, cache, _ = source_and_cache(tmp_path)
    routed = int8_experts(tmp_path / "routed")

    class TwoRanks:
        def __init__(self, other):
            self.other = other

        def all_gather_object(self, gathered, value):
            gathered[0], gathered[1] = value, self.other or value

    monkeypatch.setattr(artifacts, "_distributed_validation_context", lambda: (TwoRanks(None), 1, 2))
    hashed = []
    real = artifacts._sha256_file
    monkeypatch.setattr(artifacts, "_sha256_file", lambda p: hashed.append(str(p)) or real(p))
    monkeypatch.setattr(weight_manifest, "_sha256", lambda p: hashed.append(str(p)) or real(p))
    assert resolve_kt_pretrained_artifacts(config_of(cache, routed), source).weight_path == str(cache)
    assert not [p for p in hashed if p.endswith((".safetensors", ".kt"))]
    failing = TwoRanks(("rank 0: KTArtifactError: corrupt routed weights", None))
    monkeypatch.setattr(artifacts, "_distributed_validation_context", lambda: (failing, 1, 2))
    with pytest.raises(KTArtifactError, match="rank 0: KTArtifactError: corrupt routed weights"):
        resolve_kt_pretrained_artifacts(config_of(cache, routed), source)


# ---- routed-expert ownership while loading ----------------------------------------------------------


def meta_qwen3_moe():
    from transformers import AutoModelForCausalLM

    from kt_ops.integration.tiny import tiny_config

    config = tiny_config("tiny-qwen3-moe")
    config.architectures = ["Qwen3MoeForCausalLM"]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_claimed_experts_stay_out_of_the_device_map_and_dispatch():
    pytest.importorskip("transformers")
    model = meta_qwen3_moe()
    paths = claim_kt_routed_expert_subtrees(model)
    assert paths == ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")
    assert claim_kt_routed_expert_subtrees(model) == paths  # idempotent
    experts = model.model.layers[0].mlp.experts
    assert all(is_kt_routed_expert_base_parameter(p) for p in experts.parameters())
    assert not is_kt_routed_expert_base_parameter(model.model.layers[0].mlp.gate.weight)
    original = experts.gate_up_proj
    with project_kt_routed_experts_out_of_device_map(model):
        assert experts.gate_up_proj.numel() == 0 and experts.gate_up_proj.device.type == "meta"
    assert experts.gate_up_proj is original
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, paths[0]: "cpu", f"{paths[1]}.down_proj": "disk"}
    assert prepare_kt_non_expert_device_map(model, device_map) == {"model.embed_tokens": 0, "model.layers.0": 0}
    with pytest.raises(KTArtifactError, match="offloaded real tensors"):
        prepare_kt_non_expert_device_map(model, {"model.embed_tokens": "cpu"})
    with pytest.raises(RuntimeError, match="inside"):
        with hide_kt_routed_experts_from_dispatch(model):
            assert model.model.layers[0].mlp.experts is not experts
            raise RuntimeError("inside")
    assert model.model.layers[0].mlp.experts is experts
    model.model.layers[1].mlp.experts = type(experts)(model.config)  # a different module: the claim broke
    with pytest.raises(KTArtifactError, match="no longer the claimed module"):
        prepare_kt_non_expert_device_map(model, device_map)
    plain = torch.nn.Linear(2, 2)
    assert claim_kt_routed_expert_subtrees(plain) == () and prepare_kt_non_expert_device_map(plain, {"": 0}) == {"": 0}


def test_int8_manifest_file_sizes_follow_from_the_model(tmp_path):
    routed = int8_experts(tmp_path / "routed", numa=2)
    args = dict(layer_indices=[1], numa_count=2, expert_num=E, hidden_size=H, intermediate_size=I)
    assert weight_manifest.validate_persistent_int8_weights(routed, **args).file_count == 2 * 3 * 2 * E
    with pytest.raises(ValueError, match="hidden_size mismatch"):
        weight_manifest.validate_persistent_int8_weights(routed, **{**args, "hidden_size": 2 * H})
    with pytest.raises(ValueError, match="must be divisible"):
        weight_manifest.validate_persistent_int8_weights(routed, **{**args, "numa_count": 3})
    (routed / "stray.txt").write_text("x")
    with pytest.raises(ValueError, match="root entries differ"):
        weight_manifest.validate_persistent_int8_weights(routed, **args)
