"""Names shared by every layer: weight formats, the methods that select them, LoRA tensors."""

from __future__ import annotations

from typing import Tuple

# bf16; int8 symmetric per row; int4 symmetric per row; int4_1 per row with zero point (scale, min);
# int4_kgroup / int4_1_kgroup / int8_kgroup: the same per group of `group_size` along K; fp8: float8
# E4M3 codes with one fp32 scale per row and group (DeepSeek-V3's block-FP8 experts kept as they are)
# (kt_ops_csrc/kernels/quant.h holds the bit layouts).
WEIGHT_FORMATS = ("bf16", "int8", "int4", "int4_1", "int4_kgroup", "int4_1_kgroup", "int8_kgroup", "fp8")
GROUPED_FORMATS = ("int4_kgroup", "int4_1_kgroup", "int8_kgroup", "fp8")

# SFT method names (kt-kernel's) name the weight format; every one runs on every CPU (the kernel ISA
# is chosen at run time).
SFT_METHODS = (
    "AMXBF16_SFT",
    "AMXINT8_SFT",
    "AMXINT4_SFT",
    "AMXINT4_1_SFT",
    "AMXINT4_KGroup_SFT",
    "AMXINT4_1KGroup_SFT",
    "AMXFP8_SFT",
)
# kt-kernel's SkipLoRA variants: the frozen base's forward and backward (grad_input and the routing
# weights' gradient) without any LoRA term; init_lora_weights is not needed.
SKIP_LORA_SUFFIX = "_SkipLoRA"
SKIP_LORA_METHODS = tuple(m + SKIP_LORA_SUFFIX for m in SFT_METHODS)
# kt-kernel 0.7's SFT methods named after the checkpoint they train on: INT8 .kt experts, RAWINT4
# (compressed-tensors int4, group 32, kept code for code as int4_kgroup) and MXFP4 (E2M1 codes with a
# power-of-two scale per 32, exactly representable as fp8 codes with group 32).
CHECKPOINT_SFT_METHODS = {"INT8_SFT": "int8", "RAWINT4_SFT": "int4_kgroup", "MXFP4_SFT": "fp8"}
# Method (or plain format name) -> weight format, for everything that trains.
_SFT_FORMATS = ("bf16", "int8", "int4", "int4_1", "int4_kgroup", "int4_1_kgroup", "fp8")
SFT_METHOD_FORMATS = {
    **dict(zip(SFT_METHODS, _SFT_FORMATS)),
    **CHECKPOINT_SFT_METHODS,
    **{fmt: fmt for fmt in WEIGHT_FORMATS},
}
# weight format -> the SFT method that packs float experts into it
FORMAT_SFT_METHODS = dict(zip(_SFT_FORMATS, SFT_METHODS))

# kt_backend (kt-kernel's and LLaMA-Factory's name: the method without "_SFT", or the method itself)
# -> weight format. "auto" is resolved by core.settings.KTSettings.
KT_BACKENDS = {
    **{m.removesuffix("_SFT"): f for m, f in zip(SFT_METHODS, _SFT_FORMATS)},
    **dict(zip(SFT_METHODS, _SFT_FORMATS)),
}
# LLaMA-Factory's kt_expert_weight_format -> the kt_backend computing it.
FORMAT_BACKENDS = {"bf16": "AMXBF16", "int8": "AMXINT8", "int4": "AMXINT4", "fp8": "AMXFP8"}

# Inference methods quantized online (or read from kt_ops' own converted files); FP8, RAWINT4, MXFP4 and BF16
# read native Hugging Face checkpoints, LLAMAFILE reads GGUF.
INFERENCE_FORMATS = {"AMXINT4": "int4", "AMXINT8": "int8", "MOE_INT4": "int4", "MOE_INT8": "int8"}
INFERENCE_METHODS = (*INFERENCE_FORMATS, "RAWINT4", "FP8", "MXFP4", "BF16", "LLAMAFILE")
# kt-kernel 0.7.2's method names that kt_ops does not compute (they are refused with the list of the
# supported ones): checkpoint formats without a reader here, and a SYCL device backend.
KT_KERNEL_ONLY_METHODS = ("FP8_PERCHANNEL", "GPTQ_INT4", "SYCL_GPTQ_INT4", "NVFP4", "MXFP8")

PROJECTIONS = ("gate", "up", "down")

# The six LoRA tensors of an expert layer, in the order the op takes them.
LORA_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")


def lora_shapes(num_experts: int, hidden_size: int, intermediate_size: int, rank: int) -> Tuple[Tuple[int, ...], ...]:
    """Shapes of the LORA_NAMES tensors: A maps the projection's input to the rank, B the rank to its output."""
    E, H, I, r = num_experts, hidden_size, intermediate_size, rank
    return (E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r)
