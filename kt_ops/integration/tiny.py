"""Tiny randomly initialised MoE models of each supported architecture, built from configs (no
download), for tests, examples and smoke runs of a fine-tuning setup."""

from __future__ import annotations

import copy
from typing import Optional

import torch

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
_MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    first_k_dense_replace=1,
    n_shared_experts=1,
)

TINY_MODELS = ("tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral", "tiny-deepseek-v2", "tiny-deepseek-v3")
# Vision-language MoE models (a tiny vision tower is built too; kt-sft trains their language model).
# Kept apart from TINY_MODELS, whose tests compare text-only models parameter by parameter.
TINY_MULTIMODAL_MODELS = ("tiny-qwen3_5-moe", "tiny-qwen3-vl-moe")
ALL_TINY_MODELS = TINY_MODELS + TINY_MULTIMODAL_MODELS
_TINY_VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=32,
    num_heads=2,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=64,
    num_position_embeddings=16,
)


# name -> (transformers config class, its fields)
_TINY_CONFIGS = {
    "tiny-qwen3-moe": (
        "Qwen3MoeConfig",
        dict(
            _COMMON,
            intermediate_size=48,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            norm_topk_prob=True,
        ),
    ),
    "tiny-qwen2-moe": (
        "Qwen2MoeConfig",
        dict(
            _COMMON,
            intermediate_size=48,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "tiny-mixtral": ("MixtralConfig", dict(_COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    # group-limited routing with a scaling factor, as in DeepSeek-V2.
    "tiny-deepseek-v2": (
        "DeepseekV2Config",
        dict(
            _COMMON,
            **_MLA,
            intermediate_size=48,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            q_lora_rank=None,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.0,
        ),
    ),
    "tiny-deepseek-v3": (
        "DeepseekV3Config",
        dict(
            _COMMON,
            **_MLA,
            intermediate_size=48,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            q_lora_rank=32,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
    ),
    # Qwen3.5-MoE: gated-delta-net linear attention in three of four layers, a gated shared expert,
    # and a vision tower (built, unused by text training).
    "tiny-qwen3_5-moe": (
        "Qwen3_5MoeConfig",
        dict(
            text_config=dict(
                _COMMON,
                num_hidden_layers=4,
                layer_types=["linear_attention"] * 3 + ["full_attention"],
                head_dim=16,
                linear_conv_kernel_dim=4,
                linear_key_head_dim=16,
                linear_value_head_dim=16,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=2,
            ),
            vision_config=_TINY_VISION,
        ),
    ),
    "tiny-qwen3-vl-moe": (
        "Qwen3VLMoeConfig",
        dict(
            text_config=dict(
                _COMMON,
                intermediate_size=48,
                moe_intermediate_size=32,
                num_local_experts=8,
                num_experts_per_tok=2,
                head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            ),
            vision_config=dict(_TINY_VISION, deepstack_visual_indexes=[0]),
        ),
    ),
}


def tiny_config(name: str, **overrides):
    """The transformers config of tiny model `name` (one of ALL_TINY_MODELS); `overrides` replace fields."""
    import transformers

    if name not in _TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {ALL_TINY_MODELS}")
    class_name, fields = _TINY_CONFIGS[name]
    # a copy: a config may keep (and change) the dicts it is given
    config = getattr(transformers, class_name)(**{**copy.deepcopy(fields), **overrides})
    for c in (config, getattr(config, "text_config", None)):
        if c is not None:
            c._attn_implementation = "eager"
            c._experts_implementation = "eager"
    return config


def tiny_model(name: str, dtype: torch.dtype = torch.float32, seed: Optional[int] = 0, **overrides):
    """A tiny `AutoModelForCausalLM` of architecture `name` with random weights (seeded)."""
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    config = tiny_config(name, **overrides)
    if getattr(config, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII (99 ids, fits the tiny models' vocab of
    128), built in memory so examples and tests need nothing from the Hub."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    for code in list(range(32, 127)) + [ord("\n")]:
        vocab.setdefault(chr(code), len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One piece per character, newlines included ("." alone would leave "\n\n" as one unknown piece).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    # A plain "prompt + answer" template so chat-formatted data (trl's DPO/SFT) needs no Hub template.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] != 'assistant' %}{{ '\\n' }}{% endif %}{% endfor %}"
    )
    return tokenizer


def train_steps(model: torch.nn.Module, input_ids: torch.Tensor, steps: int = 4, lr: float = 1e-2) -> list:
    """The losses of `steps` AdamW steps of causal-LM training on `input_ids` over the model's trainable
    parameters: the smallest check that gradients reach and move what should train."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
