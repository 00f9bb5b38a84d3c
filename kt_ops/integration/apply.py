"""apply_kt: a transformers MoE model's routed experts on kt_ops, in place."""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import nn

from ..core.packed import most_parts, split_unit
from ..core.runtime import set_num_threads
from ..core.settings import KTSettings
from ..weights.sources import ExpertSource
from .custom_experts import adopt_custom_experts, install_custom_forward
from .hf import (
    LAYER_INDEX,
    KTExperts,
    check_convertible,
    expert_dims,
    expert_variant,
    expert_weights,
    find_moe_experts,
    register_kt_implementation,
)
from .install import finish_kt_conversion, install_kt_experts
from .peft_lora import peft_tuner

# The K-group formats' group along K (kt_ops' default, and DeepSeek's block-FP8 block).
GROUP_SIZE = 128


def new_kt_experts(
    settings: KTSettings,
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    weight_format: str,
    layer_idx: Optional[int],
    first_expert: int = 0,
    lora_rank: Optional[int] = None,
    lora_dtype: torch.dtype = torch.float32,
) -> KTExperts:
    """An empty KTExperts for `num_experts` experts (from the model's expert `first_expert` on) under
    `settings`; `lora_rank` overrides the settings' (0 when peft holds the expert LoRA). A layer too
    small to split kt_threadpool_count ways runs in fewer parts."""
    parts = most_parts(intermediate_size, settings.kt_threadpool_count, weight_format, GROUP_SIZE)
    if parts < settings.kt_threadpool_count:
        warnings.warn(
            f"kt_threadpool_count={settings.kt_threadpool_count}, but layer {layer_idx}'s intermediate size "
            f"{intermediate_size} splits into at most {parts} part(s) in {weight_format} (whole kernel "
            f"panels of {split_unit(weight_format, GROUP_SIZE)} rows); it runs in {parts}"
        )
    return KTExperts(
        num_experts,
        hidden_size,
        intermediate_size,
        lora_rank=settings.lora_rank if lora_rank is None else lora_rank,
        lora_alpha=settings.alpha,
        method=weight_format,
        lora_dtype=lora_dtype,
        group_size=GROUP_SIZE,
        first_expert=first_expert,
        layer_idx=layer_idx,
        threadpool_count=parts,
    )


def set_variant(kt: KTExperts, module: nn.Module) -> None:
    """The module's expert biases and custom gate (the files hold weights only) on kt's experts."""
    variant = expert_variant(module, kt.first_expert)
    if variant:
        kt.set_variant(**variant)


def layer_index(name: str) -> Optional[int]:
    """The decoder layer a module belongs to (`...layers.{L}...`), None when the name tells none."""
    match = LAYER_INDEX.search(name + ".")
    return int(match.group(1)) if match else None


def _convertible_experts(model: nn.Module, settings: KTSettings) -> list:
    """(name, module, layer index) of every experts module, each checked for kt."""
    adopt_custom_experts(model)  # Llama-4, LongCat-Flash: experts transformers does not dispatch
    found = find_moe_experts(model)
    if not found:
        raise ValueError(
            f"apply_kt: {type(model).__name__} has no transformers experts module "
            "(a module decorated with @use_experts_implementation holding gate_up_proj/down_proj)"
        )
    already = [name for name, m in found if hasattr(m, "kt_experts")]
    if already:
        raise ValueError(f"apply_kt: the model is already converted (e.g. {already[0]}.kt_experts exists)")
    layers = []
    for name, module in found:
        check_convertible(name, module)
        if settings.kt_num_gpu_experts >= module.num_experts:
            raise ValueError(
                f"kt_num_gpu_experts ({settings.kt_num_gpu_experts}) must be smaller than the number of "
                f"experts of {name} ({module.num_experts})"
            )
        layer = layer_index(name)
        if settings.kt_weight_path is not None and layer is None:
            raise ValueError(f"apply_kt: cannot tell the layer index of {name} to look it up in kt_weight_path")
        layers.append((name, module, layer))
    return layers


def _weight_source(settings: KTSettings) -> Optional[ExpertSource]:
    """The pre-quantized experts of kt_weight_path, or None to pack the model's own."""
    path = settings.kt_weight_path
    if path is None:
        return None
    if not os.path.exists(path):
        raise FileNotFoundError(f"kt_weight_path {path!r} does not exist")
    source = ExpertSource(path)
    if not source.is_quantized_source():
        raise ValueError(
            f"kt_weight_path {source.path} holds float experts (a Hugging Face checkpoint); apply_kt "
            "packs the model's own experts, so pass kt_weight_path only for converted experts "
            "(kt_ops.convert_weights, KTransformers) or a block-FP8 checkpoint"
        )
    return source


def _convert(
    model: nn.Module,
    name: str,
    module: nn.Module,
    layer: Optional[int],
    settings: KTSettings,
    source: Optional[ExpertSource],
    lora_rank: int,
    lora_dtype: torch.dtype,
) -> str:
    """Put one experts module on kt; returns its peft target prefix."""
    E, N = module.num_experts, settings.kt_num_gpu_experts
    H, I = expert_dims(module)
    if source is not None:  # pre-quantized experts hold the CPU experts only
        packed = source.packed_layer(layer, E - N, H, I, settings.weight_format)
        kt = new_kt_experts(
            settings,
            E - N,
            H,
            I,
            settings.format_of_stored(packed.weight_format, source.path),
            layer,
            N,
            lora_rank,
            lora_dtype,
        )
        kt.experts = packed
    else:
        kt = new_kt_experts(settings, E - N, H, I, settings.weight_format, layer, N, lora_rank, lora_dtype)
        gate, up, down = expert_weights(module)
        kt.load_weights_from_tensors(gate[N:], up[N:], down[N:])
    set_variant(kt, module)
    # LoRA lives where the layer's activations do, so the optimizer steps it with the rest.
    device = module.gate_up_proj.device
    kt.to(device)
    keep_gate_up = module.gate_up_proj[:N].detach().clone() if N else None
    keep_down = module.down_proj[:N].detach().clone() if N else None
    # install_kt_experts releases the originals now (before the next layer), so a layer's experts exist once.
    prefix = install_kt_experts(model, name, module, kt, keep_gate_up, keep_down, device)
    install_custom_forward(model, name, module)
    return prefix


def apply_kt(
    model: nn.Module, settings: Optional[KTSettings] = None, *, lora_dtype: torch.dtype = torch.float32, **kt_settings
) -> nn.Module:
    """Run the routed experts of a transformers v5 MoE model (DeepSeek-V2/V3/V4, Qwen2/3-MoE, Mixtral,
    gpt-oss, and other models whose experts use `@use_experts_implementation` with SiLU gating, gpt-oss'
    clamped SwiGLU or DeepSeek-V4's clamped SiLU, with or without expert biases; Llama-4 and
    LongCat-Flash) on kt_ops, in place.

    The settings are a `KTSettings` and/or its fields as keywords on top (kt_backend, kt_num_threads,
    kt_threadpool_count, kt_tp_enabled, kt_num_gpu_experts, kt_weight_path, lora_rank, lora_alpha,
    ...; kt_ops.core.settings documents them). Each experts module's weights are packed into a
    `KTExperts` child (`<experts>.kt_experts`) one layer at a time and the originals are released, so
    the model never holds a layer's experts twice. The first `kt_num_gpu_experts` experts of every
    layer stay in the module (on its device) and the rest go to kt; their outputs are summed.
    `kt_weight_path` supplies pre-quantized experts instead of packing (kt_ops.weights.sources.
    ExpertSource: a kt_ops converted file or directory, a KTransformers converted directory, or a
    block-FP8 checkpoint: kept as fp8 codes with an fp8 backend, requantized to int8_kgroup otherwise).

    Expert LoRA (`lora_rank` > 0) is a peft LoRA adapter on the experts' `gate_up_proj` / `down_proj`
    (peft's `target_parameters` format), computed inside the kt kernels. On a `PeftModel` every LoRA
    adapter gains it now; on a plain model the experts carry their own LoRA until stock
    `peft.get_peft_model` / `PeftModel.from_pretrained` wraps the model, whose LoRA configs then gain
    the experts. A config that already targets the experts is used as it is. Returns `model`."""
    settings = KTSettings.of(settings, **kt_settings)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = _convertible_experts(model, settings)
    register_kt_implementation()
    if settings.kt_num_threads is not None:
        set_num_threads(settings.kt_num_threads)
    source = _weight_source(settings)
    lora_rank = 0 if peft_tuner(model) is not None else settings.lora_rank
    prefixes = {
        _convert(model, name, module, layer, settings, source, lora_rank, lora_dtype) for name, module, layer in layers
    }
    finish_kt_conversion(
        model,
        [(name, module) for name, module, _ in layers],
        tuple(sorted(prefixes)),
        settings.lora_rank,
        settings.alpha,
    )
    return model
