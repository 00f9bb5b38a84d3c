"""kt-sft's model: the config's model (a built-in tiny one or a local checkpoint, streamed onto kt
when use_kt), its routed experts on kt_ops and peft's LoRA on the layers lora_target names."""

from __future__ import annotations

import os
from typing import Optional

from .config import ConfigError, kt_settings
from .data import chat_template


def load_model_and_tokenizer(config: dict, shared_experts: Optional[str] = None):
    import torch

    from ..integration.tiny import ALL_TINY_MODELS, tiny_model, tiny_tokenizer

    dtype = torch.bfloat16 if config["bf16"] else torch.float32
    name = config["model_name_or_path"]
    if name in ALL_TINY_MODELS:
        model, tokenizer = tiny_model(name, dtype=dtype, seed=config["seed"]), tiny_tokenizer()
    elif not os.path.isdir(name):
        raise ConfigError(
            f"model_name_or_path {name!r} is neither a local model directory nor one of {list(ALL_TINY_MODELS)}"
        )
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        # Vision-language MoE checkpoints (Qwen3-VL-MoE, Qwen3.5-MoE) load whole, so the weights' names
        # match; kt-sft trains their language model on text.
        model_config = AutoConfig.from_pretrained(name, local_files_only=True)
        multimodal = hasattr(model_config, "vision_config")
        if config["use_kt"] and not multimodal:
            # Bounded host memory: the float experts are never held whole; each layer's are streamed
            # from the shards (or kt_weight_path) straight into their packed form.
            from ..integration import from_pretrained

            model = from_pretrained(name, kt_settings(config), dtype=dtype, kt_shared_experts=shared_experts)
        else:
            auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
            model = auto.from_pretrained(name, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    from ..integration import llamafactory as lf

    # The template's markup tokens and stop word (as eos) must be single tokens the model can embed.
    lf.add_template_tokens(chat_template(config, tokenizer), tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def lora_targets(model, target: str):
    """The peft target_modules of lora_target: the names given, every linear layer outside the experts
    and the router / output head for 'all', None for 'none'."""
    if target == "none":
        return None
    if target == "all":
        import torch

        from ..integration import find_moe_experts

        # Every linear layer outside the routed experts and the router / output head.
        expert_names = [name for name, _ in find_moe_experts(model)]
        names = set()
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or any(name.startswith(e + ".") for e in expert_names):
                continue
            leaf = name.rsplit(".", 1)[-1]
            # LongCat-Flash's router is a module holding a `classifier` Linear.
            if leaf in ("lm_head", "gate", "router", "shared_expert_gate") or ".router." in name:
                continue
            names.add(leaf)
        return sorted(names) or None
    return [t.strip() for t in target.split(",") if t.strip()]


def _check_expert_format(model, config: dict) -> None:
    from ..integration import kt_experts_modules

    fmt = config["kt_expert_weight_format"]
    found = {kt.weight_format for _, _, kt in kt_experts_modules(model)}
    if fmt is not None and found and found != {fmt}:
        raise ConfigError(f"kt_expert_weight_format is {fmt!r} but kt_weight_path holds {sorted(found)} experts")


def _recompute_experts_in_backward(model) -> None:
    """kt_cpu_activation: recompute without decoder-layer checkpointing: each expert layer keeps only its
    inputs and runs its forward again in backward (with gradient checkpointing on, the whole decoder
    layer, experts included, is recomputed already)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from ..integration import kt_experts_modules

    for _, _, kt in kt_experts_modules(model):
        forward = kt.forward

        def recomputed(hidden_states, topk_ids, topk_weights, lora=None, _forward=forward, _kt=kt):
            # `lora`: peft's adapter factors, handed in by the experts forward when peft holds the LoRA.
            if _kt.training and torch.is_grad_enabled():
                return checkpoint(_forward, hidden_states, topk_ids, topk_weights, lora=lora, use_reentrant=False)
            return _forward(hidden_states, topk_ids, topk_weights, lora=lora)

        kt.forward = recomputed


def build_model(config: dict, shared_experts: Optional[str] = None):
    """The model with kt experts (when use_kt) wrapped by peft, and its tokenizer. `shared_experts`: the
    packed experts file the processes of this node map (kt_ops.cli.launch.shared_experts_file)."""
    import peft

    from ..integration import apply_kt, get_peft_model, kt_experts_modules, set_kt_lora_trainable, share_kt_experts

    model, tokenizer = load_model_and_tokenizer(config, shared_experts)
    if config["use_kt"]:
        if not kt_experts_modules(model):  # loaded whole (tiny or multimodal models): convert now
            apply_kt(model, kt_settings(config))
            if shared_experts is not None:
                share_kt_experts(model, shared_experts)
        _check_expert_format(model, config)
        if config["kt_cpu_activation"] == "recompute" and not config["gradient_checkpointing"]:
            _recompute_experts_in_backward(model)
    targets = lora_targets(model, config["lora_target"])
    if targets is None:
        if not config["use_kt"]:
            raise ConfigError("lora_target 'none' with use_kt false leaves nothing to train")
        model.requires_grad_(False)
        set_kt_lora_trainable(model, True)
        return model, tokenizer
    lora_config = peft.LoraConfig(
        r=config["lora_rank"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config), tokenizer
