"""NativeWeights: kt-kernel 0.7's loaders of frozen quantized bases into an SFT wrapper (a mixin of
AMXSFTMoEWrapper), each kept code for code (kt_ops.weights.native has the formats):

- load_block_fp8_weights (AMXFP8_SFT): per-expert E4M3 weights with 128x128 block scales -> fp8;
- load_rawint4_weights (RAWINT4_SFT): signed group-32 int4, two values per byte -> int4_kgroup g32;
- load_mxfp4_weights (MXFP4_SFT): E2M1 values with UE8M0 scales per 32 -> fp8 with group 32.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

from ..core.formats import PROJECTIONS
from ..core.packed import check_expert_map, pack_codes_split
from ..weights.native import FP8_BLOCK, MX_GROUP, fp8_row_scales, mxfp4_codes, rawint4_codes


class NativeWeights:
    def _matrix_shapes(self):
        I, H = self.moe_intermediate_size, self.hidden_size
        return {"gate": (I, H), "up": (I, H), "down": (H, I)}

    def _require_method(self, method: str, loader: str) -> None:
        if self.method != method:
            raise ValueError(f"{loader}() requires method {method}, got {self.method!r}")

    def _install_codes(self, codes: Dict[str, list], scales: Dict[str, list], fmt: str, group: int, mapping) -> None:
        mapping = check_expert_map(torch.arange(self.num_experts) if mapping is None else mapping, self.num_experts)
        stacked = [(torch.stack(codes[p]), torch.stack(scales[p])) for p in PROJECTIONS]
        self._install(pack_codes_split(*stacked, fmt, group, self.split), mapping)

    def load_block_fp8_weights(self, weights, physical_to_logical_map_cpu=None) -> None:
        """`weights`: BlockFP8ExpertWeights (gate_proj / up_proj / down_proj: one float8_e4m3fn [N, K]
        per expert; *_scale: their fp32 [N/128, K/128] block scales). Kept as kt_ops' fp8 format."""
        self._require_method("AMXFP8_SFT", "load_block_fp8_weights")
        if tuple(weights.block_size) != (FP8_BLOCK, FP8_BLOCK):
            raise ValueError(f"AMXFP8_SFT requires block_size=(128, 128), got {weights.block_size}")
        shapes = self._matrix_shapes()
        codes: Dict[str, list] = {p: [] for p in PROJECTIONS}
        scales: Dict[str, list] = {p: [] for p in PROJECTIONS}
        for p in PROJECTIONS:
            matrices, blocks = getattr(weights, f"{p}_proj"), getattr(weights, f"{p}_scale")
            _check_count(p, matrices, blocks, self.num_experts)
            group = math.gcd(FP8_BLOCK, shapes[p][1])
            for e, (w, s) in enumerate(zip(matrices, blocks)):
                if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != shapes[p] or w.device.type != "cpu":
                    raise ValueError(
                        f"{p} expert {e} must be a CPU float8_e4m3fn {shapes[p]}, got {w.dtype} {tuple(w.shape)}"
                    )
                codes[p].append(w.view(torch.uint8))
                scales[p].append(fp8_row_scales(f"{p} expert {e}", w, s.float(), shapes[p], group))
        self._install_codes(
            codes, scales, "fp8", math.gcd(FP8_BLOCK, self.moe_intermediate_size), physical_to_logical_map_cpu
        )

    def load_rawint4_weights(self, weights, physical_to_logical_map_cpu=None) -> None:
        """`weights`: RAWINT4ExpertWeights (*_proj uint8 [E, N, K/2], two +8-offset values per byte;
        *_scale [E, N, K/32]), kept as int4_kgroup with group 32."""
        self._require_method("RAWINT4_SFT", "load_rawint4_weights")
        if int(weights.group_size) != MX_GROUP:
            raise ValueError(f"RAWINT4 SFT requires group_size=32, got {weights.group_size}")
        shapes = self._matrix_shapes()
        codes: Dict[str, list] = {p: [] for p in PROJECTIONS}
        scales: Dict[str, list] = {p: [] for p in PROJECTIONS}
        for p in PROJECTIONS:
            packed, scale = getattr(weights, f"{p}_proj"), getattr(weights, f"{p}_scale")
            N, K = shapes[p]
            if tuple(scale.shape) != (self.num_experts, N, K // MX_GROUP) or not scale.is_floating_point():
                raise ValueError(f"{p} RAWINT4 scale must be a float [{self.num_experts}, {N}, {K // MX_GROUP}]")
            if packed.shape[0] != self.num_experts:
                raise ValueError(f"{p} RAWINT4 weight must hold {self.num_experts} experts, got {packed.shape[0]}")
            for e in range(self.num_experts):
                codes[p].append(rawint4_codes(f"{p} expert {e}", packed[e], shapes[p]))
                scales[p].append(scale[e].float())
        self._install_codes(codes, scales, "int4_kgroup", MX_GROUP, physical_to_logical_map_cpu)

    def load_mxfp4_weights(self, weights: Dict[str, Sequence[torch.Tensor]], physical_to_logical_map_cpu=None) -> None:
        """`weights`: {'gate', 'up', 'down': one uint8 [N, K/2] of E2M1 pairs per expert; 'gate_scale',
        'up_scale', 'down_scale': their UE8M0 (or bf16 power-of-two) scales [N, K/32]} (kt-kernel's
        staged form), kept as fp8 with group 32. The weights are immutable once loaded."""
        self._require_method("MXFP4_SFT", "load_mxfp4_weights")
        if self._weights_loaded:
            raise RuntimeError("MXFP4_SFT weights are immutable and already loaded")
        shapes = self._matrix_shapes()
        codes: Dict[str, List[torch.Tensor]] = {p: [] for p in PROJECTIONS}
        scales: Dict[str, List[torch.Tensor]] = {p: [] for p in PROJECTIONS}
        for p in PROJECTIONS:
            _check_count(p, weights[p], weights[f"{p}_scale"], self.num_experts)
            for e, (packed, scale) in enumerate(zip(weights[p], weights[f"{p}_scale"])):
                c, s = mxfp4_codes(f"{p} expert {e}", packed, scale, shapes[p])
                if not bool(torch.isfinite(s).all()):
                    raise ValueError(f"{p} expert {e} has a non-finite scale")
                codes[p].append(c)
                scales[p].append(s)
        self._install_codes(codes, scales, "fp8", MX_GROUP, physical_to_logical_map_cpu)


def _check_count(name: str, matrices, scales, num_experts: int) -> None:
    if len(matrices) != num_experts or len(scales) != num_experts:
        raise ValueError(
            f"{name} tensors must contain {num_experts} experts, got weights={len(matrices)}, scales={len(scales)}"
        )
