"""The Conv3d of Qwen vision-language models' patch embedding, as kt-kernel 0.7 runs it under torch
2.9 (`kt_kernel.sft.conv3d_compat`): a convolution whose stride equals its kernel, without padding,
dilation or groups, is a linear map of each non-overlapping patch, which kt-kernel computes with
unfold + linear on those torch versions. The replacement is per module instance (torch.nn.Conv3d
itself is never changed) and all-or-nothing: a model with one Conv3d outside that form is refused
before any module is touched. On other torch versions nothing is patched.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, List

import torch
import torch.nn.functional as F

# Qwen VLM model types whose vision tower embeds patches with a Conv3d
_QWEN_VLM_TYPES = frozenset(("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"))
_PATCHED = "_kt_conv3d_compatible"

__all__ = ["is_vlm_conv3d_compatible", "patch_vlm_conv3d"]


def _requires_conv3d_patch() -> bool:
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) == (2, 9)


def _is_qwen_vlm(config: Any) -> bool:
    return getattr(config, "model_type", None) in _QWEN_VLM_TYPES and getattr(config, "vision_config", None) is not None


def _unsupported(module: torch.nn.Conv3d) -> List[str]:
    """What keeps `module` from being a patch-wise linear map."""
    problems = []
    if tuple(module.stride) != tuple(module.kernel_size):
        problems.append(f"stride={module.stride} != kernel_size={module.kernel_size}")
    if isinstance(module.padding, str) or any(p != 0 for p in module.padding):
        problems.append(f"padding={module.padding} != 0")
    if any(d != 1 for d in module.dilation):
        problems.append(f"dilation={module.dilation} != 1")
    if module.groups != 1:
        problems.append(f"groups={module.groups} != 1")
    return problems


def _patchwise_forward(module: torch.nn.Conv3d, inputs: torch.Tensor) -> torch.Tensor:
    """The convolution as one linear map over the [C * kd * kh * kw] patches (autograd as usual)."""
    kd, kh, kw = module.kernel_size
    patches = inputs.unfold(2, kd, kd).unfold(3, kh, kh).unfold(4, kw, kw)  # [B, C, D, H, W, kd, kh, kw]
    batch, depth, height, width = patches.shape[0], *patches.shape[2:5]
    rows = patches.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, module.in_channels * kd * kh * kw)
    out = F.linear(rows, module.weight.reshape(module.out_channels, -1), module.bias)
    return out.view(batch, depth, height, width, module.out_channels).permute(0, 4, 1, 2, 3)


def patch_vlm_conv3d(model: Any) -> List[str]:
    """Give each Conv3d of a Qwen VLM the patch-wise forward (torch 2.9 only); the names of the
    modules now patched (already patched ones included), [] when nothing applies. Raises
    RuntimeError naming every Conv3d outside the supported form, patching none."""
    if not _requires_conv3d_patch() or not _is_qwen_vlm(getattr(model, "config", None)):
        return []
    convs = [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, torch.nn.Conv3d)]
    refused = [f"{name}: {', '.join(problems)}" for name, m in convs if (problems := _unsupported(m))]
    if refused:
        raise RuntimeError("the KT Conv3D fallback does not support: " + "; ".join(refused))
    for _, module in convs:
        if not getattr(module, _PATCHED, False):
            module.forward = MethodType(_patchwise_forward, module)
            setattr(module, _PATCHED, True)
    model._kt_vlm_conv3d_compatible = bool(convs)
    return [name for name, _ in convs]


def is_vlm_conv3d_compatible(model: Any) -> bool:
    """True off torch 2.9; there, whether the model has Conv3d modules and every one is patched."""
    if not _requires_conv3d_patch():
        return True
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    return bool(convs) and all(getattr(m, _PATCHED, False) for m in convs)
