"""Optional helpers for the expert LoRA. With stock peft they are not needed: the expert LoRA is a
peft adapter (see `peft_lora`), so `peft.get_peft_model`, `disable_adapter()` and
`print_trainable_parameters()` cover it. They remain for models used without peft, whose kt
experts carry their own LoRA, and for code written against the earlier API.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..core.checks import check_bool
from .install import kt_expert_wrappers, kt_experts_modules
from .peft_lora import KTPeftConfigs, keep_adding_experts


def kt_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert LoRA parameters of `model`: the kt layers' own, or every peft adapter's on the experts."""
    params = []
    for _, _, kt in kt_experts_modules(model):
        params.extend(kt.lora_parameters() or ())
    for wrapper in kt_expert_wrappers(model):
        params.extend(p for n, p in wrapper.named_parameters() if "lora_" in n and "base_layer" not in n)
    return params


def set_kt_lora_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Make the expert LoRA trainable or frozen (frozen on purpose: no warning). On a peft model this
    covers the active adapters, as peft's own set_adapter does."""
    check_bool(trainable, "trainable")
    for _, _, kt in kt_experts_modules(model):
        kt.lora_frozen_on_purpose = not trainable
        for param in kt.lora_parameters() or ():
            param.requires_grad_(trainable)
    for wrapper in kt_expert_wrappers(model):
        for adapter in wrapper.active_adapters:
            for layers in (wrapper.lora_A, wrapper.lora_B):
                if adapter in layers:
                    layers[adapter].requires_grad_(trainable)


def get_peft_model(model: nn.Module, peft_config, *args, **kwargs):
    """`peft.get_peft_model`, with the expert LoRA apply_kt set up added to `peft_config` first.

    Stock peft finds it through the model's `peft_config` (peft_lora.KTPeftConfigs) and warns that
    the model already has one; here peft gets a config that already targets the experts and a model
    without that attribute, and the peft model's config store adds the experts to later adapters."""
    import peft

    hook = getattr(model, "peft_config", None)
    if not isinstance(hook, KTPeftConfigs) or len(hook):
        return peft.get_peft_model(model, peft_config, *args, **kwargs)
    del model.peft_config
    hook.add_experts(peft_config)
    peft_model = peft.get_peft_model(model, peft_config, *args, **kwargs)
    keep_adding_experts(peft_model.base_model, hook)
    return peft_model


@contextlib.contextmanager
def disable_kt_lora(model: nn.Module) -> Iterator[None]:
    """Within the block the kt experts compute without LoRA (the base model's experts); the rest of
    the model is untouched. peft's `model.disable_adapter()` switches off every adapter, experts included."""
    layers = [kt for _, _, kt in kt_experts_modules(model)]
    wrappers = kt_expert_wrappers(model)
    previous = [kt.lora_enabled for kt in layers]
    previous_wrappers = [w._disable_adapters for w in wrappers]
    try:
        for kt in layers:
            kt.lora_enabled = False
        for w in wrappers:
            w._disable_adapters = True
        yield
    finally:
        for kt, state in zip(layers, previous):
            kt.lora_enabled = state
        for w, state in zip(wrappers, previous_wrappers):
            w._disable_adapters = state
