"""kt-kernel 0.7's SFT backends (`kt_kernel.sft.backend`): their names, the kt_ops SFT method each
one runs, the weight layouts kt-kernel records in its manifests, and what each quantized base allows
(frozen-base LoRA, every expert on the CPU, ...), which KTConfig checks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

INT8_BACKEND, FP8_BACKEND, RAWINT4_BACKEND, MXFP4_BACKEND = "INT8", "FP8", "RAWINT4", "MXFP4"
INT8_WEIGHT_LAYOUT = "kt-int8-n32-k64-vnni-v1"
FP8_WEIGHT_LAYOUT = "block-e4m3-128x128"
RAWINT4_WEIGHT_LAYOUT = "compressed-tensors-rawint4-g32-v1"
MXFP4_WEIGHT_LAYOUT = "mxfp4-e2m1-ue8m0-g32"
RAWINT4_GROUP_SIZE = 32
MXFP4_GROUP_SIZE = 32

EXPERT_WEIGHT_FORMATS = ("bf16", "int8", "fp8", "rawint4", "mxfp4")
# kt_backend (lower case) -> (its hardware-neutral name, the SFT method computing it). The AMX names
# of int8 / fp8 / the group-32 int4 are kt-kernel's deprecated spellings of INT8 / FP8 / RAWINT4.
SFT_BACKENDS: Dict[str, Tuple[str, str]] = {
    "amxbf16": ("AMXBF16", "AMXBF16_SFT"),
    "int8": ("INT8", "AMXINT8_SFT"),
    "amxint8": ("INT8", "AMXINT8_SFT"),
    "fp8": ("FP8", "AMXFP8_SFT"),
    "amxfp8": ("FP8", "AMXFP8_SFT"),
    "rawint4": ("RAWINT4", "RAWINT4_SFT"),
    "amxint4_kgroup": ("RAWINT4", "RAWINT4_SFT"),
    "mxfp4": ("MXFP4", "MXFP4_SFT"),
    "amxint4": ("AMXINT4", "AMXINT4_SFT"),
    "amxbf16_skiplora": ("AMXBF16_SkipLoRA", "AMXBF16_SFT_SkipLoRA"),
    "amxint8_skiplora": ("AMXINT8_SkipLoRA", "AMXINT8_SFT_SkipLoRA"),
    "amxint4_skiplora": ("AMXINT4_SkipLoRA", "AMXINT4_SFT_SkipLoRA"),
}
DEPRECATED_BACKENDS = {"amxint8": "INT8", "amxfp8": "FP8", "amxint4_kgroup": "RAWINT4"}
FORMAT_BACKENDS = {"bf16": "AMXBF16", "int8": "INT8", "fp8": "FP8", "rawint4": "RAWINT4", "mxfp4": "MXFP4"}
# SFT method -> the weight format kt_ops' KTSettings names it by (kt_backend's KT_BACKENDS key)
SETTINGS_BACKENDS = {
    "AMXBF16_SFT": "AMXBF16",
    "AMXINT8_SFT": "AMXINT8",
    "AMXFP8_SFT": "AMXFP8",
    "AMXINT4_SFT": "AMXINT4",
    "RAWINT4_SFT": "AMXINT4_KGroup",
}


def is_int8_sft_method(method: str) -> bool:
    return str(method) in ("INT8_SFT", "AMXINT8_SFT")


def is_fp8_sft_method(method: str) -> bool:
    return str(method) in ("AMXFP8_SFT", "FP8_SFT")


def is_rawint4_sft_method(method: str) -> bool:
    return str(method) in ("RAWINT4_SFT", "AMXINT4_KGroup_SFT")


def is_mxfp4_sft_method(method: str) -> bool:
    return str(method) == "MXFP4_SFT"


def _frozen_base_lora(config, name: str, backend: str) -> None:
    """What every frozen quantized base needs: its own backend, LoRA only, every routed expert
    (and its LoRA) on the CPU."""
    if config.kt_backend != backend:
        raise ValueError(f"{name} SFT requires kt_backend='auto' or kt_backend={backend!r}")
    if config.kt_train_mode != "lora" or config.kt_full_weight_grad:
        raise ValueError(f"{name} SFT supports frozen-base LoRA only; Full and Hybrid are not supported")
    if int(config.kt_num_gpu_experts or 0):
        raise ValueError(f"{name} SFT requires kt_num_gpu_experts=0")
    if config.kt_use_lora_experts:
        raise ValueError(f"{name} SFT does not support GPU LoRA experts; use pure expert LoRA")


def _check_int8(config) -> None:
    _frozen_base_lora(config, "INT8", "INT8")
    if not config.kt_share_backward_bb:
        raise ValueError("INT8 SFT requires kt_share_backward_bb=true")
    if config.kt_expert_checkpoint_path:
        raise ValueError("INT8 SFT requires pre-quantized .kt weights; kt_expert_checkpoint_path is not supported")
    if not config.kt_weight_path:
        raise ValueError("INT8 SFT requires kt_weight_path pointing to pre-quantized .kt weights")


def _check_fp8(config) -> None:
    _frozen_base_lora(config, "FP8", "FP8")
    if not config.kt_lora_rank or int(config.kt_lora_rank) <= 0:
        raise ValueError("FP8 SFT requires kt_lora_rank > 0")
    if not config.kt_share_backward_bb:
        raise ValueError("FP8 SFT requires kt_share_backward_bb=true")
    if config.kt_weight_lifecycle != "persistent":
        raise ValueError("FP8 SFT requires kt_weight_lifecycle='persistent'")


def _check_rawint4(config) -> None:
    _frozen_base_lora(config, "RAWINT4", "RAWINT4")
    if int(config.kt_lora_rank or 0) <= 0:
        raise ValueError("RAWINT4 SFT requires kt_lora_rank > 0")
    if float(config.kt_lora_dropout or 0.0):
        raise ValueError("RAWINT4 SFT requires kt_lora_dropout=0")
    if config.effective_threadpool_count not in (1, 2):
        raise ValueError(
            f"RAWINT4 SFT supports TP1/TP2 only; effective threadpool_count={config.effective_threadpool_count}"
        )
    if config.kt_share_backward_bb:
        raise ValueError(
            "RAWINT4 SFT computes backward directly from packed weights; kt_share_backward_bb must be false"
        )
    if config.kt_expert_checkpoint_path:
        raise ValueError(
            "RAWINT4 SFT reads packed experts from the source checkpoint; kt_expert_checkpoint_path is not supported"
        )
    if config.kt_weight_lifecycle != "persistent":
        raise ValueError("RAWINT4 SFT requires kt_weight_lifecycle='persistent'")


def _check_mxfp4(config) -> None:
    if config.kt_skip_expert_loading is None:
        config.kt_skip_expert_loading = True
    if config.kt_train_mode != "lora" or config.kt_full_weight_grad or int(config.kt_lora_rank or 0) <= 0:
        raise ValueError("MXFP4 SFT supports frozen-base LoRA only with kt_lora_rank > 0")
    if config.kt_num_gpu_experts or config.kt_use_lora_experts:
        raise ValueError("MXFP4 SFT requires all routed experts and their LoRA on CPU")
    if config.kt_share_backward_bb:
        raise ValueError("MXFP4 SFT is transpose-free; kt_share_backward_bb must be false")
    if config.kt_lora_dropout:
        raise ValueError("MXFP4 SFT requires kt_lora_dropout=0")
    if config.kt_weight_lifecycle != "persistent" or config.kt_expert_checkpoint_path:
        raise ValueError("MXFP4 SFT requires a persistent native checkpoint at kt_weight_path")
    if not config.kt_weight_path:
        raise ValueError("MXFP4 SFT requires kt_weight_path")
    if not config.kt_skip_expert_loading:
        raise ValueError("MXFP4 SFT requires kt_skip_expert_loading=true")
    if config.effective_threadpool_count not in (1, 2):
        raise ValueError("MXFP4 SFT supports CPU TP1/TP2 only")


_FORMAT_CHECKS = {"int8": _check_int8, "fp8": _check_fp8, "rawint4": _check_rawint4, "mxfp4": _check_mxfp4}


def normalize_sft_backend(backend: str, *, expert_weight_format: Optional[str]) -> str:
    """The hardware-neutral name of a kt_backend: 'auto' picks the one of the expert weight format
    (AMXBF16 for bf16 or none); the deprecated AMX spellings warn and map to their new names."""
    lower = str(backend).strip().lower()
    if lower == "auto":
        return FORMAT_BACKENDS.get(expert_weight_format, "AMXBF16")
    if lower not in SFT_BACKENDS:
        raise ValueError(f"unknown kt_backend {backend!r}; expected one of {sorted(['auto', *SFT_BACKENDS])}")
    if lower in DEPRECATED_BACKENDS:
        warnings.warn(
            f"kt_backend={backend!r} is deprecated; use kt_backend='auto' or kt_backend={DEPRECATED_BACKENDS[lower]!r}",
            FutureWarning,
            stacklevel=3,
        )
    return SFT_BACKENDS[lower][0]


def check_format_rules(config) -> None:
    """Raise ValueError when a KTConfig asks its expert weight format for what it cannot do."""
    check = _FORMAT_CHECKS.get(config.kt_expert_weight_format)
    if check is not None:
        check(config)


@dataclass(frozen=True)
class SFTRuntime:
    """Which kernel computes a weight format here (kt-kernel's *Runtime): the ISA kt_ops picked at
    run time (every ISA computes every format), the kernel family and the weight layout."""

    cpu_variant: str
    kernel: str
    weight_layout: str


INT8Runtime = FP8Runtime = RAWINT4Runtime = MXFP4Runtime = SFTRuntime


INT8_KERNEL, FP8_KERNEL = "kt_ops-int8", "kt_ops-fp8"


def _runtime(kernel: str, layout: str) -> SFTRuntime:
    from ..core.runtime import get_isa

    return SFTRuntime(cpu_variant=get_isa(), kernel=kernel, weight_layout=layout)


def get_int8_runtime() -> SFTRuntime:
    return _runtime(INT8_KERNEL, INT8_WEIGHT_LAYOUT)


def get_fp8_runtime() -> SFTRuntime:
    return _runtime(FP8_KERNEL, FP8_WEIGHT_LAYOUT)


def get_rawint4_runtime() -> SFTRuntime:
    return _runtime("kt_ops-int4-kgroup-g32", RAWINT4_WEIGHT_LAYOUT)


def get_mxfp4_runtime() -> SFTRuntime:
    return _runtime("kt_ops-fp8-g32", MXFP4_WEIGHT_LAYOUT)


INT8_SFT_METHOD, FP8_SFT_METHOD, RAWINT4_SFT_METHOD, MXFP4_SFT_METHOD = (
    "INT8_SFT",
    "AMXFP8_SFT",
    "RAWINT4_SFT",
    "MXFP4_SFT",
)
