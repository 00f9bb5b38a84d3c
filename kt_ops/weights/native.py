"""Expert weights of pre-quantized HuggingFace safetensors checkpoints, for NativeMoEWrapper.

FP8 (DeepSeek-V3 style): per expert `{base}.mlp.experts.{e}.{gate,up,down}_proj.weight` in
float8_e4m3fn [N, K] with `weight_scale_inv` fp32 [ceil(N/128), ceil(K/128)], one scale per 128x128
block (w = fp8 * scale_inv). Read as kt_ops' `fp8` format the codes are kept byte for byte and each
block's scale becomes the scale of its rows' 128-wide K group (gcd(128, K) wide when 128 does not
divide K): exact, ~1.03 bytes per weight. Read as `int8_kgroup` (the inference wrapper, and SFT
backends other than fp8) each expert is dequantized in fp32 on its own and requantized with groups of
128 along K: one byte per weight like fp8, plus one fp32 scale per row and group.

RAWINT4 (compressed-tensors "pack-quantized", symmetric int4): `weight_packed` int32 [N, K/8]
holding 8 signed 4-bit values per int32, lowest nibble first; `weight_scale` [N, K/group] (bf16,
fp16 or fp32); `weight_shape` [N, K]. w = q * scale with q in [-8, 7], which is int4_kgroup's
w = (u - 8) * scale with u = q + 8: packed exactly, codes as they are.

MXFP4 (DeepSeek-V4, gpt-oss): per expert `{base}.ffn.experts.{e}.{w1,w3,w2}.weight` uint8 [N, K/2],
two E2M1 values per byte, low nibble first, and `.scale` UE8M0 [N, K/32], one power of two per 32
values (w = e2m1 * 2^(scale - 127)). Every E2M1 value is an E4M3 value, so the codes become kt_ops'
`fp8` format with group 32 and the scales its per-row group scales: exact.

`{base}` is `model.layers.{L}`, or where multimodal checkpoints put the text model's layers
(DeepSeek-V4 stores `layers.{L}` without the `model.` prefix).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch

from ..core.formats import PROJECTIONS
from ..core.packed import PackedExperts, pack_codes_split, quantize_int8_groups
from .loaders import SafeTensorLoader, candidate_bases

FP8_BLOCK = 128
MX_GROUP = 32
# E2M1 code (sign bit 3, exponent bits 2-1, mantissa bit 0) -> its value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def fp8_row_scales(key: str, weight: torch.Tensor, scale_inv: torch.Tensor, shape, group: int) -> torch.Tensor:
    """The block scales of a block-FP8 [N, K] `weight` as fp32 [N, K / group]: each row's scale per
    `group` columns (group divides 128)."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{key}.weight must be float8_e4m3fn for method FP8, got {weight.dtype}")
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(f"{key}.weight has shape {list(weight.shape)}; the wrapper was built for {list(shape)}")
    N, K = shape
    blocks = (-(-N // FP8_BLOCK), -(-K // FP8_BLOCK))
    if tuple(scale_inv.shape) != blocks:
        raise ValueError(
            f"{key}.weight_scale_inv must have shape [ceil(N/128), ceil(K/128)] = {list(blocks)}, "
            f"got {list(scale_inv.shape)}"
        )
    rows = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:N]
    return rows.repeat_interleave(FP8_BLOCK // group, 1)[:, : K // group].contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] holding two 4-bit values per byte, low nibble first -> uint8 [..., K]."""
    packed = packed.view(torch.uint8)
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def rawint4_codes(key: str, packed: torch.Tensor, shape) -> torch.Tensor:
    """kt-kernel's RAWINT4 bytes (uint8 [N, K/2], value + 8 per nibble) as int4_kgroup codes u in
    [0, 15] [N, K], w = (u - 8) * scale: the same numbers."""
    N, K = shape
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (N, K // 2):
        raise ValueError(f"{key} must be uint8 [N, K/2] = {[N, K // 2]}, got {packed.dtype} {list(packed.shape)}")
    return unpack_nibbles(packed)


def mxfp4_codes(key: str, packed: torch.Tensor, scale: torch.Tensor, shape):
    """(E4M3 bytes [N, K], fp32 scales [N, K/32]) of an MXFP4 matrix: fp8 format with group 32."""
    N, K = shape
    if packed.element_size() != 1 or tuple(packed.shape) != (N, K // 2):
        raise ValueError(
            f"{key}.weight must be one byte per two values [N, K/2] = {[N, K // 2]}, got {list(packed.shape)}"
        )
    if tuple(scale.shape) != (N, K // MX_GROUP):
        raise ValueError(f"{key}.scale must be [N, K/32] = {[N, K // MX_GROUP]}, got {list(scale.shape)}")
    e4m3 = torch.tensor(E2M1_VALUES, dtype=torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)
    codes = e4m3[unpack_nibbles(packed).long()]
    return codes, ue8m0_scales(key, scale)


def ue8m0_scales(key: str, scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 scales (uint8 or float8_e8m0fnu bytes e: 2^(e - 127)) as fp32; a bf16 / fp32 scale is taken
    as its value."""
    if scale.is_floating_point() and scale.element_size() > 1:
        return scale.float()
    exponents = scale.view(torch.uint8).to(torch.int32)
    if bool((exponents == 0xFF).any()):
        raise ValueError(f"{key}.scale holds the reserved UE8M0 code 0xff (not a number)")
    return torch.ldexp(torch.ones(exponents.shape), exponents - 127)


def dequantize_fp8(key: str, weight: torch.Tensor, scale_inv: torch.Tensor, shape=None) -> torch.Tensor:
    """w = fp8 * scale_inv per 128x128 block, in fp32 (DeepSeek-V3's block-FP8 rule)."""
    return weight.float() * fp8_row_scales(key, weight, scale_inv, weight.shape if shape is None else shape, 1)


class NativeCheckpoint:
    """The pre-quantized experts of one layer, read one expert at a time."""

    # method -> (tensor suffixes, the experts' path under the layer, gate / up / down names)
    LAYOUTS = {
        "FP8": (("weight", "weight_scale_inv"), "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
        "RAWINT4": (("weight_packed", "weight_scale"), "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
        "MXFP4": (("weight", "scale"), "ffn.experts", ("w1", "w3", "w2")),
    }

    def __init__(self, path, method: str):
        if method not in self.LAYOUTS:
            raise ValueError(f"method must be one of {sorted(self.LAYOUTS)}, got {method!r}")
        self.method = method
        self.loader = SafeTensorLoader(path)
        self.path = self.loader.path
        self._suffixes, self._experts, names = self.LAYOUTS[method]
        self._names = dict(zip(PROJECTIONS, names))

    def _base(self, layer_idx: int) -> str:
        bases = candidate_bases(f"model.layers.{layer_idx}") + [f"layers.{layer_idx}"]
        for base in bases:
            if self.loader.has_tensor(f"{base}.{self._experts}.0.{self._names['gate']}.{self._suffixes[0]}"):
                return base
        raise ValueError(
            f"{self.path} has no {self.method} experts for layer {layer_idx}: expected "
            f"model.layers.{layer_idx}.{self._experts}.{{e}}.{{{','.join(self._names.values())}}}."
            f"{{{','.join(self._suffixes)}}}"
        )

    def _expert(self, base: str, expert: int) -> Dict[str, Dict[str, torch.Tensor]]:
        prefix = f"{base}.{self._experts}.{expert}"
        keys = {f"{prefix}.{self._names[p]}.{s}": (p, s) for p in PROJECTIONS for s in self._suffixes}
        missing = [k for k in keys if not self.loader.has_tensor(k)]
        if missing:
            raise ValueError(
                f"{self.path} lacks {missing[0]!r} (layer {base}, expert {expert}); was the wrapper "
                "built with the checkpoint's num_experts?"
            )
        if self.method == "RAWINT4":
            asymmetric = f"{base}.mlp.experts.{expert}.gate_proj.weight_zero_point"
            if self.loader.has_tensor(asymmetric):
                raise ValueError(
                    f"{self.path} has {asymmetric!r}: asymmetric int4 is not supported by RAWINT4, "
                    "which reads symmetric pack-quantized int4 (no zero point)"
                )
            # optional: checked against the wrapper's shape when present
            keys.update(
                {
                    f"{base}.mlp.experts.{expert}.{p}_proj.weight_shape": (p, "weight_shape")
                    for p in PROJECTIONS
                    if self.loader.has_tensor(f"{base}.mlp.experts.{expert}.{p}_proj.weight_shape")
                }
            )
        out: Dict[str, Dict[str, torch.Tensor]] = {p: {} for p in PROJECTIONS}
        for key, tensor in self.loader.iter_tensors(keys, "cpu"):
            p, s = keys[key]
            out[p][s] = tensor
        return out

    def _fp8_codes(self, key: str, weight: torch.Tensor, scale_inv: torch.Tensor, shape):
        """(E4M3 bytes [N, K], scales [N, K / g]) with g = gcd(128, K): kt_ops' fp8 format, exactly."""
        group = math.gcd(FP8_BLOCK, shape[1])
        if group % 2:
            raise ValueError(
                f"{key}: in_features {shape[1]} is odd; the fp8 format needs an even K group "
                "(load this checkpoint with an int8 backend instead)"
            )
        return weight.view(torch.uint8), fp8_row_scales(key, weight, scale_inv, shape, group)

    def _int4_codes(self, key: str, packed: torch.Tensor, scale: torch.Tensor, shape, group_size: int):
        N, K = shape
        if packed.dtype != torch.int32 or tuple(packed.shape) != (N, K // 8):
            raise ValueError(
                f"{key}.weight_packed must be int32 [N, K/8] = {[N, K // 8]}, got {packed.dtype} {list(packed.shape)}"
            )
        if not scale.is_floating_point() or tuple(scale.shape) != (N, K // group_size):
            raise ValueError(
                f"{key}.weight_scale must be a float tensor [N, K/{group_size}] = "
                f"{[N, K // group_size]} (symmetric int4, group {group_size}), got {scale.dtype} "
                f"{list(scale.shape)}"
            )
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # lowest nibble first
        signed = torch.where(nibbles >= 8, nibbles - 16, nibbles)
        return (signed + 8).to(torch.uint8).reshape(N, K), scale.float()

    def load_layer(
        self,
        layer_idx: int,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        split: Sequence[Tuple[int, int]],
        group_size: int,
        weight_format: str = "int8_kgroup",
    ) -> List[PackedExperts]:
        """PackedExperts per intermediate range of `split` (for FP8: `weight_format` int8_kgroup,
        requantized per `group_size`, or fp8, the codes as they are with down's K group gcd(128, I);
        int4_kgroup for RAWINT4; fp8 with group 32 for MXFP4), experts in the checkpoint's (logical)
        order."""
        E, H, I = num_experts, hidden_size, intermediate_size
        base = self._base(layer_idx)
        if self.method == "FP8" and weight_format not in ("int8_kgroup", "fp8"):
            raise ValueError(f"weight_format must be 'int8_kgroup' or 'fp8' for FP8 checkpoints, got {weight_format!r}")
        fmt = {"FP8": weight_format, "RAWINT4": "int4_kgroup", "MXFP4": "fp8"}[self.method]
        if self.method == "MXFP4":
            group_size = MX_GROUP
        elif fmt == "fp8":
            group_size = math.gcd(FP8_BLOCK, I)  # down's K group: where pack_codes_split cuts its scales
        shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
        codes = {p: [] for p in PROJECTIONS}
        scales = {p: [] for p in PROJECTIONS}
        for e in range(E):
            tensors = self._expert(base, e)
            for p in PROJECTIONS:
                c, s = self._codes(
                    f"{base}.{self._experts}.{e}.{self._names[p]}", tensors[p], shapes[p], fmt, group_size
                )
                codes[p].append(c)
                scales[p].append(s)
        stacked = {p: (torch.stack(codes[p]), torch.stack(scales[p])) for p in PROJECTIONS}
        return pack_codes_split(stacked["gate"], stacked["up"], stacked["down"], fmt, group_size, split)

    def _codes(self, key: str, t: Dict[str, torch.Tensor], shape, fmt: str, group_size: int):
        """(codes, scales) of one stored matrix in `fmt`."""
        if self.method == "MXFP4":
            return mxfp4_codes(key, t["weight"], t["scale"], shape)
        if fmt == "fp8":
            return self._fp8_codes(key, t["weight"], t["weight_scale_inv"], shape)
        if self.method == "FP8":
            return quantize_int8_groups(dequantize_fp8(key, t["weight"], t["weight_scale_inv"], shape), group_size)
        if "weight_shape" in t and [int(v) for v in t["weight_shape"].tolist()] != list(shape):
            raise ValueError(
                f"{key}.weight_shape is {t['weight_shape'].tolist()}; the wrapper was built for {list(shape)}"
            )
        return self._int4_codes(key, t["weight_packed"], t["weight_scale"], shape, group_size)
