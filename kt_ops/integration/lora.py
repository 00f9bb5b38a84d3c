"""Expert LoRA alongside peft: trainability and switching it off.

peft (>= 0.18) decides what `get_peft_model` leaves trainable by visiting its own tuner layers, so
it freezes the kt expert LoRA of a model converted by `apply_kt` beforehand. `get_peft_model` here is
peft's, followed by re-enabling the expert LoRA; converting after wrapping needs nothing extra.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .hf import kt_experts_modules


def kt_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert LoRA parameters of every kt experts layer in `model` (empty when lora_rank=0)."""
    params = []
    for _, _, kt in kt_experts_modules(model):
        params.extend(kt.lora_parameters() or ())
    return params


def set_kt_lora_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Make the expert LoRA of every kt layer trainable or frozen (frozen on purpose: no warning)."""
    if not isinstance(trainable, bool):
        raise TypeError(f"trainable must be a bool, got {trainable!r}")
    for _, _, kt in kt_experts_modules(model):
        kt.lora_frozen_on_purpose = not trainable
        for param in kt.lora_parameters() or ():
            param.requires_grad_(trainable)


def get_peft_model(model: nn.Module, peft_config, *args, **kwargs):
    """`peft.get_peft_model(model, peft_config, ...)` keeping the kt expert LoRA trainable (unless the
    config is in inference mode)."""
    import peft

    wrapped = peft.get_peft_model(model, peft_config, *args, **kwargs)
    if not getattr(peft_config, "inference_mode", False):
        set_kt_lora_trainable(wrapped, True)
    return wrapped


@contextlib.contextmanager
def disable_kt_lora(model: nn.Module) -> Iterator[None]:
    """Within the block the kt experts compute without their LoRA (the base model's experts). Pair it
    with peft's `model.disable_adapter()` for a reference pass of the whole base model."""
    layers = [kt for _, _, kt in kt_experts_modules(model)]
    previous = [kt.lora_enabled for kt in layers]
    try:
        for kt in layers:
            kt.lora_enabled = False
        yield
    finally:
        for kt, state in zip(layers, previous):
            kt.lora_enabled = state
