"""Putting a KTExperts into a transformers experts module, and finding it again.

install_kt_experts replaces the module's expert weights by placeholders (peft's target_parameters
sizes and places LoRA from them) and makes its holder run kt; finish_kt_conversion hooks the expert
LoRA into peft once every module is installed. kt_experts_modules / kt_expert_wrappers find the
converted modules and peft's LoRA wrappers around them.
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
from torch import nn

from .hf import KT_IMPLEMENTATION, KTExperts, find_moe_experts
from .peft_lora import (
    EXPERT_PARAMS,
    KTPeftConfigs,
    add_expert_lora_to_peft_model,
    install_kt_wrappers,
    peft_tuner,
    register_holder_hook,
    wrapper_chain,
)


def install_kt_experts(
    model: nn.Module,
    name: str,
    module: nn.Module,
    kt: KTExperts,
    keep_gate_up: Optional[torch.Tensor],
    keep_down: Optional[torch.Tensor],
    device: torch.device,
) -> str:
    """Make the transformers experts module `name` of `model` run on `kt`: its expert weights become
    one-element placeholders (peft's target_parameters sizes and places LoRA from them), the first
    experts kept on `device` (`keep_*`, None for none) become buffers, and the holder's forward is
    wrapped. Returns the peft target prefix of the module ("mlp.experts")."""
    shapes = {p: (getattr(module, p).shape, getattr(module, p).dtype) for p in EXPERT_PARAMS}
    for pname in EXPERT_PARAMS:
        delattr(module, pname)
    for pname, keep in (("gate_up_proj", keep_gate_up), ("down_proj", keep_down)):
        shape, dtype = shapes[pname]
        if keep is None:
            keep = torch.empty((0,) + tuple(shape[1:]), dtype=dtype, device=device)
        module.register_buffer("kt_gpu_" + pname, keep.to(device), persistent=False)
        module.register_parameter(pname, _placeholder(shape, dtype, device))
    if not getattr(module, "_kt_state_dict_hooks", False):
        module._register_state_dict_hook(_drop_placeholders_from_state_dict)
        module.register_load_state_dict_post_hook(_placeholders_not_missing)
        module._kt_state_dict_hooks = True
    module.kt_peft_lora = {}
    module._apply = types.MethodType(_apply_keeping_placeholders, module)
    module.kt_experts = kt
    module.config._experts_implementation = KT_IMPLEMENTATION
    if getattr(module, "has_bias", False):
        # The biases now live in kt (kt.experts), frozen like the weights; the kept experts' stay here.
        for pname in ("gate_up_proj_bias", "down_proj_bias"):
            kept = getattr(module, pname)[: kt.first_expert].detach().clone()
            delattr(module, pname)
            module.register_buffer("kt_gpu_" + pname, kept.to(device), persistent=False)

    holder_name, child = holder_of(name)
    holder = model.get_submodule(holder_name)
    register_holder_hook(holder, child)
    install_kt_wrappers(holder, child)
    return f"{holder_name.rpartition('.')[2]}.{child}"


def finish_kt_conversion(
    model: nn.Module,
    found: list[tuple[str, nn.Module]],
    kt_prefixes: tuple[str, ...],
    lora_rank: int,
    lora_alpha: float,
) -> None:
    """After every experts module of `model` is installed: hook the expert LoRA into peft (an existing
    PeftModel's adapters gain it now; a later peft.get_peft_model's LoraConfig gains it then)."""
    kt_targets = tuple(sorted(f"{prefix}.{pname}" for prefix in kt_prefixes for pname in EXPERT_PARAMS))
    # DistributedDataParallel broadcasts every parameter at start; a stride-0 placeholder cannot be
    # written, so it skips them (DDP reads this attribute of the module it wraps; peft forwards it).
    model._ddp_params_and_buffers_to_ignore = _PlaceholderNames(model)
    tuner = peft_tuner(model)
    if tuner is not None:
        # get_peft_model came first: its adapters gain the expert LoRA now.
        add_expert_lora_to_peft_model(tuner, kt_targets, lora_rank, float(lora_alpha))
        for name, _ in found:
            holder_name, child = holder_of(name)
            install_kt_wrappers(model.get_submodule(holder_name), child)
    elif lora_rank:
        # A later peft.get_peft_model stores its LoraConfig here: it gains the experts and the
        # adapters replace the kt layers' own LoRA.
        model.peft_config = KTPeftConfigs(
            kt_targets=kt_targets,
            kt_rank=lora_rank,
            kt_alpha=float(lora_alpha),
            on_lora=functools.partial(_drop_own_lora, model),
        )


class _PlaceholderNames:
    """The qualified names of the expert placeholders of `model`, computed when iterated (after any
    peft wrapping), also as seen from a PeftModel around it."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __iter__(self):
        for name, module in self.model.named_modules():
            if isinstance(getattr(module, "kt_experts", None), KTExperts):
                for pname in EXPERT_PARAMS:
                    yield f"{name}.{pname}" if name else pname
                    yield f"base_model.model.{name}.{pname}" if name else f"base_model.model.{pname}"


def _placeholder(shape, dtype: torch.dtype, device) -> nn.Parameter:
    # The base weights now live packed in kt; peft's target_parameters still needs a parameter with the
    # original shape, dtype and device to size and place the LoRA. Stride 0: one element of storage.
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)


def _apply_keeping_placeholders(self, fn, recurse=True):
    # model.to(dtype / device) would turn a stride-0 placeholder into a full-size tensor; give it the new
    # dtype and device at one element instead.
    placeholders = {n: self._parameters.pop(n) for n in EXPERT_PARAMS if n in self._parameters}
    try:
        result = type(self)._apply(self, fn, recurse)
    finally:
        for n, p in placeholders.items():
            probe = fn(torch.zeros((), dtype=p.dtype, device=p.device))
            self._parameters[n] = _placeholder(p.shape, probe.dtype, probe.device)
    return result


def _drop_placeholders_from_state_dict(module, state_dict, prefix, local_metadata):
    for pname in EXPERT_PARAMS:
        state_dict.pop(prefix + pname, None)


def _placeholders_not_missing(module, incompatible_keys):
    # Placeholders are never saved, so a state dict without them is complete.
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.rpartition(".")[2] in EXPERT_PARAMS]:
        missing.remove(key)


def holder_of(name: str) -> tuple[str, str]:
    """(name of the module holding the experts module, attribute name) with peft's `.base_layer` removed."""
    plain = name.replace(".base_layer", "")
    holder, _, child = plain.rpartition(".")
    return holder, child


def _drop_own_lora(model: nn.Module) -> None:
    for _, _, kt in kt_experts_modules(model):
        kt.drop_lora()


def kt_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module, KTExperts]]:
    """(name of the transformers experts module, that module, its KTExperts) for a converted model."""
    return [
        (name, m, m.kt_experts)
        for name, m in find_moe_experts(model)
        if isinstance(getattr(m, "kt_experts", None), KTExperts)
    ]


def kt_expert_wrappers(model: nn.Module) -> list[nn.Module]:
    """The peft ParamWrappers (expert LoRA) around the kt experts of `model`."""
    wrappers = []
    for name, _, _ in kt_experts_modules(model):
        holder_name, child = holder_of(name)
        wrappers.extend(wrapper_chain(getattr(model.get_submodule(holder_name), child))[1].values())
    return wrappers
