"""Argument checks shared by the public entry points. Each names the argument and what was expected,
and the kind of mistake picks the exception: a value of the wrong type raises TypeError, a value of
the right type outside what is allowed raises ValueError."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch


def check_int(value, name: str, minimum: int, optional: bool = False) -> Optional[int]:
    """`value` if it is an int (not a bool) >= minimum, or None when `optional`."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value}")
    return value


def check_number(value, name: str, positive: bool = False, optional: bool = False) -> Optional[float]:
    """`value` as a float if it is a finite int or float (not a bool), > 0 when `positive`."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{' or None' if optional else ''}, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_path(value, name: str) -> Optional[str]:
    """`value` as a str path, or None."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path or None, got {type(value).__name__}")
    return os.fspath(value)


def check_choice(value, name: str, choices) -> str:
    """`value` if it is one of the strings `choices`."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {sorted(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_has_data(**tensors) -> None:
    """Inputs are copied to the CPU before the kernels run; a meta tensor has no data to copy, so it
    is refused here by name instead of failing inside the copy ('Cannot copy out of meta tensor')."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(
                f"{name} is a meta tensor (shape only, no data); kt_ops computes on real tensors: "
                "pass a CPU (or accelerator) tensor"
            )
