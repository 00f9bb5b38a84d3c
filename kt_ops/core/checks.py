"""Argument checks shared by the public entry points: each raises an exception naming the argument
and what was expected."""
from __future__ import annotations

import torch


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value}")
    return value


def check_has_data(**tensors) -> None:
    """Inputs are copied to the CPU before the kernels run; a meta tensor has no data to copy, so it
    is refused here by name instead of failing inside the copy ('Cannot copy out of meta tensor')."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (shape only, no data); kt_ops computes on real tensors: "
                             "pass a CPU (or accelerator) tensor")
