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

`{base}` is `model.layers.{L}`, or where multimodal checkpoints put the text model's layers.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch

from ..core.formats import PROJECTIONS
from ..core.packed import PackedExperts, pack_codes_split, quantize_int8_groups
from .loaders import SafeTensorLoader, candidate_bases

FP8_BLOCK = 128


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


def dequantize_fp8(key: str, weight: torch.Tensor, scale_inv: torch.Tensor, shape=None) -> torch.Tensor:
    """w = fp8 * scale_inv per 128x128 block, in fp32 (DeepSeek-V3's block-FP8 rule)."""
    return weight.float() * fp8_row_scales(key, weight, scale_inv, weight.shape if shape is None else shape, 1)


class NativeCheckpoint:
    """The pre-quantized experts of one layer, read one expert at a time."""

    def __init__(self, path, method: str):
        if method not in ("FP8", "RAWINT4"):
            raise ValueError(f"method must be 'FP8' or 'RAWINT4', got {method!r}")
        self.method = method
        self.loader = SafeTensorLoader(path)
        self.path = self.loader.path
        self._suffixes = ("weight", "weight_scale_inv") if method == "FP8" else ("weight_packed", "weight_scale")

    def _base(self, layer_idx: int) -> str:
        for base in candidate_bases(f"model.layers.{layer_idx}"):
            if self.loader.has_tensor(f"{base}.mlp.experts.0.gate_proj.{self._suffixes[0]}"):
                return base
        raise ValueError(
            f"{self.path} has no {self.method} experts for layer {layer_idx}: expected "
            f"model.layers.{layer_idx}.mlp.experts.{{e}}.{{gate,up,down}}_proj."
            f"{{{','.join(self._suffixes)}}}"
        )

    def _expert(self, base: str, expert: int) -> Dict[str, Dict[str, torch.Tensor]]:
        keys = {f"{base}.mlp.experts.{expert}.{p}_proj.{s}": (p, s) for p in PROJECTIONS for s in self._suffixes}
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
        int4_kgroup for RAWINT4), experts in the checkpoint's (logical) order."""
        E, H, I = num_experts, hidden_size, intermediate_size
        base = self._base(layer_idx)
        if self.method == "FP8" and weight_format not in ("int8_kgroup", "fp8"):
            raise ValueError(f"weight_format must be 'int8_kgroup' or 'fp8' for FP8 checkpoints, got {weight_format!r}")
        fmt = weight_format if self.method == "FP8" else "int4_kgroup"
        if fmt == "fp8":
            group_size = math.gcd(FP8_BLOCK, I)  # down's K group: where pack_codes_split cuts its scales
        shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
        codes = {p: [] for p in PROJECTIONS}
        scales = {p: [] for p in PROJECTIONS}
        for e in range(E):
            tensors = self._expert(base, e)
            for p in PROJECTIONS:
                key = f"{base}.mlp.experts.{e}.{p}_proj"
                t = tensors[p]
                if fmt == "fp8":
                    c, s = self._fp8_codes(key, t["weight"], t["weight_scale_inv"], shapes[p])
                elif self.method == "FP8":
                    c, s = quantize_int8_groups(
                        dequantize_fp8(key, t["weight"], t["weight_scale_inv"], shapes[p]), group_size
                    )
                else:
                    if "weight_shape" in t and [int(v) for v in t["weight_shape"].tolist()] != list(shapes[p]):
                        raise ValueError(
                            f"{key}.weight_shape is {t['weight_shape'].tolist()}; the wrapper was "
                            f"built for {list(shapes[p])}"
                        )
                    c, s = self._int4_codes(key, t["weight_packed"], t["weight_scale"], shapes[p], group_size)
                codes[p].append(c)
                scales[p].append(s)
        stacked = {p: (torch.stack(codes[p]), torch.stack(scales[p])) for p in PROJECTIONS}
        return pack_codes_split(stacked["gate"], stacked["up"], stacked["down"], fmt, group_size, split)
