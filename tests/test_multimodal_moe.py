"""apply_kt on multimodal MoE models whose language model uses transformers' experts: GLM-4.5V-MoE
(glm4v_moe: the whole conditional-generation model) and Qwen3-Omni-MoE (qwen3_omni_moe: its thinker,
the language model; the full model's thinker too). Tiny configs, text-only input; logits vs eager
and a short expert-LoRA training run through stock peft."""

from __future__ import annotations

import pytest
import torch

from kt_testing import fp32_rtol, logits_of, rel_l2, token_ids

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from kt_ops.integration import apply_kt, kt_experts_modules  # noqa: E402
from kt_ops.integration.tiny import train_steps  # noqa: E402

_TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=128,
)
_VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=32,
    num_heads=2,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=64,
)


def _glm4v_moe_config():
    return transformers.Glm4vMoeConfig(
        text_config=dict(
            _TEXT,
            n_routed_experts=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [1, 1, 2],
            },
        ),
        vision_config=_VISION,
    )


def _qwen3_omni_thinker_config():
    return transformers.Qwen3OmniMoeThinkerConfig(
        text_config=dict(
            _TEXT,
            num_experts=8,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(_VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        audio_config=dict(
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=32,
            d_model=32,
            output_dim=64,
            downsample_hidden_size=16,
            num_mel_bins=16,
        ),
    )


def _eager(config):
    for c in (config, *(getattr(config, s) for s in config.sub_configs)):
        c._attn_implementation = "eager"
        c._experts_implementation = "eager"
    return config


def tiny(name, seed=0):
    """The tiny model `name` with random weights; its expert weights are bf16 numbers (what AMXBF16
    packs exactly), so kt's logits match eager's closely."""
    torch.manual_seed(seed)
    if name == "glm4v_moe":
        model = transformers.Glm4vMoeForConditionalGeneration(_eager(_glm4v_moe_config()))
    elif name == "qwen3_omni_moe_thinker":
        model = transformers.Qwen3OmniMoeThinkerForConditionalGeneration(_eager(_qwen3_omni_thinker_config()))
    else:  # the whole Qwen3-Omni (thinker + talker, audio output off): text goes through model.thinker
        config = transformers.Qwen3OmniMoeConfig(
            thinker_config=_qwen3_omni_thinker_config().to_dict(), enable_audio_output=False
        )
        _eager(config)
        _eager(config.thinker_config)
        model = transformers.Qwen3OmniMoeForConditionalGeneration(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(p.bfloat16())
    return model.eval()


def _lm(model):
    return model.thinker if hasattr(model, "thinker") else model


NAMES = ["glm4v_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe"]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_eager(name):
    ids = token_ids()
    model = tiny(name)
    eager = logits_of(_lm(model), ids)
    apply_kt(model, lora_rank=0)
    converted = kt_experts_modules(model)
    # glm4v_moe's first layer is dense (first_k_dense_replace=1)
    assert len(converted) == (1 if name == "glm4v_moe" else 2)
    assert rel_l2(logits_of(_lm(model), ids), eager) < fp32_rtol(1e-5)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ["glm4v_moe", "qwen3_omni_moe_thinker"])
def test_expert_lora_training(name):
    ids = token_ids()
    model = apply_kt(tiny(name).train(), lora_rank=4, lora_alpha=8.0)
    with pytest.warns(UserWarning, match="peft_config"):
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.q_proj")
        )
    expert_lora = [p for n, p in model.named_parameters() if ".experts." in n and "lora_" in n]
    assert expert_lora and all(p.requires_grad for p in expert_lora)
    before = [p.detach().clone() for p in expert_lora]
    losses = train_steps(model, ids, steps=4, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, expert_lora))
