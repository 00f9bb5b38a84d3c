"""PackedExperts, the frozen expert weights in the kernels' layout, and the pure functions on it."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _C  # noqa: F401  (defines torch.ops.kt.pack_weights / pack_codes / unpack_weights)
from .formats import GROUPED_FORMATS, WEIGHT_FORMATS


@dataclass(frozen=True)
class PackedExperts:
    """Frozen base weights of E experts in a kernel layout (uint8 blobs, one row per expert)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_scale: Optional[torch.Tensor]
    up_scale: Optional[torch.Tensor]
    down_scale: Optional[torch.Tensor]
    weight_format: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    # The expert MLP's variant (see with_variant): optional per-expert biases, frozen like the weights
    # (gate/up [E, I] added to the pre-activations, down [E, H] to each expert's output), and the gate
    # activation: "silu" (h = silu(g) * u), "clamped_swiglu" (gpt-oss: g' = min(g, limit),
    # u' = clamp(u, -limit, limit), h = (u' + 1) * g' * sigmoid(alpha * g')) or "clamped_silu"
    # (DeepSeek-V4: the same clamps, h = silu(g') * u'; swiglu_alpha unused).
    gate_bias: Optional[torch.Tensor] = None
    up_bias: Optional[torch.Tensor] = None
    down_bias: Optional[torch.Tensor] = None
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self):
        check_variant(
            self.num_experts,
            self.hidden_size,
            self.intermediate_size,
            self.gate_bias,
            self.up_bias,
            self.down_bias,
            self.activation,
            self.swiglu_alpha,
            self.swiglu_limit,
        )

    def nbytes(self) -> int:
        tensors = (
            self.gate,
            self.up,
            self.down,
            self.gate_scale,
            self.up_scale,
            self.down_scale,
            self.gate_bias,
            self.up_bias,
            self.down_bias,
        )
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def variant(self) -> dict:
        """The variant fields, as with_variant takes them."""
        return {name: getattr(self, name) for name in VARIANT_FIELDS}

    def with_variant(self, **variant) -> "PackedExperts":
        """These weights with other variant fields (gate_bias, up_bias, down_bias, activation,
        swiglu_alpha, swiglu_limit); biases are stored as contiguous CPU float32 copies."""
        unknown = set(variant) - set(VARIANT_FIELDS)
        if unknown:
            raise TypeError(f"with_variant: unknown fields {sorted(unknown)}; expected some of {VARIANT_FIELDS}")
        merged = {**self.variant(), **variant}
        check_variant(self.num_experts, self.hidden_size, self.intermediate_size, *(merged[f] for f in VARIANT_FIELDS))
        for name in ("gate_bias", "up_bias", "down_bias"):
            t = variant.get(name)
            if isinstance(t, torch.Tensor):
                variant[name] = t.detach().to("cpu", torch.float32).contiguous()
        return dataclasses.replace(self, **variant)


ACTIVATIONS = ("silu", "clamped_swiglu", "clamped_silu")
VARIANT_FIELDS = ("gate_bias", "up_bias", "down_bias", "activation", "swiglu_alpha", "swiglu_limit")


def check_variant(
    E: int, H: int, I: int, gate_bias, up_bias, down_bias, activation, swiglu_alpha, swiglu_limit
) -> None:
    """Clear errors for a bad expert-MLP variant (the kernels check it again)."""
    for name, t, shape, layout in (
        ("gate_bias", gate_bias, (E, I), "[num_experts, intermediate_size]"),
        ("up_bias", up_bias, (E, I), "[num_experts, intermediate_size]"),
        ("down_bias", down_bias, (E, H), "[num_experts, hidden_size]"),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise TypeError(f"{name} must be float32, bfloat16 or float64, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(t.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, value in (("swiglu_alpha", swiglu_alpha), ("swiglu_limit", swiglu_limit)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if swiglu_limit <= 0:
        raise ValueError(f"swiglu_limit must be > 0, got {swiglu_limit!r}")


def _check_expert_tensor(t: torch.Tensor, name: str, shape: Sequence[int], layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")


def pack_experts(
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weight_format: str = "bf16",
    group_size: int = 128,
) -> PackedExperts:
    """Pack (quantize) [E, I, H], [E, I, H], [E, H, I] expert weights of any float dtype into
    `weight_format`; `group_size` applies to the K-group formats and must divide H and I."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if weight_format in GROUPED_FORMATS and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise TypeError(f"group_size must be an int, got {group_size!r}")
    if not isinstance(gate_proj, torch.Tensor) or gate_proj.dim() != 3:
        raise ValueError("gate_proj must be a 3-D tensor [num_experts, intermediate_size, hidden_size]")
    E, I, H = gate_proj.shape
    _check_expert_tensor(gate_proj, "gate_proj", (E, I, H), "[num_experts, intermediate_size, hidden_size]")
    _check_expert_tensor(up_proj, "up_proj", (E, I, H), "[num_experts, intermediate_size, hidden_size]")
    _check_expert_tensor(down_proj, "down_proj", (E, H, I), "[num_experts, hidden_size, intermediate_size]")
    if weight_format in GROUPED_FORMATS:
        for name, size in (("hidden_size", H), ("intermediate_size", I)):
            if group_size < 2 or group_size % 2 or size % group_size:
                raise ValueError(
                    f"group_size {group_size} must be even and divide {name} ({size}) for "
                    f"weight_format {weight_format!r}; e.g. 32, 64 or 128"
                )
    packed = {}
    with torch.no_grad():
        for name, t in (("gate", gate_proj), ("up", up_proj), ("down", down_proj)):
            blob, scales = torch.ops.kt.pack_weights(t.detach().cpu(), weight_format, int(group_size))
            packed[name], packed[name + "_scale"] = blob, (scales if weight_format != "bf16" else None)
    return PackedExperts(**packed, weight_format=weight_format, num_experts=E, hidden_size=H, intermediate_size=I)


def pack_experts_from_codes(
    gate: Tuple[torch.Tensor, torch.Tensor],
    up: Tuple[torch.Tensor, torch.Tensor],
    down: Tuple[torch.Tensor, torch.Tensor],
    weight_format: str,
) -> PackedExperts:
    """Experts that are already quantized (e.g. GGUF Q8_0 / Q4_0 / Q4_1 blocks), packed exactly:
    each argument is (codes, scales) for [E, N, K] weights. Codes are integers: int8 formats hold
    w = code * scale with code in [-128, 127]; 4-bit formats hold u in [0, 15] with
    w = (u - 8) * scale (symmetric) or w = u * scale + min (zero point). Scales are [E, N, groups] or,
    with a zero point, [E, N, groups, 2] = (scale, min); groups is 1 for the per-row formats and K /
    group_size (even group size) for the K-group ones. Scales may be negative."""
    if weight_format not in WEIGHT_FORMATS or weight_format == "bf16":
        raise ValueError(f"weight_format must be a quantized format {WEIGHT_FORMATS[1:]}, got {weight_format!r}")
    packed = {}
    for name, pair in (("gate", gate), ("up", up), ("down", down)):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"{name} must be a (codes, scales) tuple")
        packed[name], packed[name + "_scale"] = torch.ops.kt.pack_codes(pair[0], pair[1], weight_format)
    E, I, H = gate[0].shape
    if tuple(up[0].shape) != (E, I, H) or tuple(down[0].shape) != (E, H, I):
        raise ValueError(
            f"codes must be gate [E, I, H], up [E, I, H], down [E, H, I]; got {tuple(gate[0].shape)}, "
            f"{tuple(up[0].shape)}, {tuple(down[0].shape)}"
        )
    return PackedExperts(**packed, weight_format=weight_format, num_experts=E, hidden_size=H, intermediate_size=I)


def unpack_experts(experts: PackedExperts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bf16 weights the kernels actually compute with (dequantized for quantized formats), as
    [E, I, H], [E, I, H], [E, H, I]."""
    unpack = torch.ops.kt.unpack_weights
    H, I, fmt = experts.hidden_size, experts.intermediate_size, experts.weight_format
    return (
        unpack(experts.gate, experts.gate_scale, fmt, I, H),
        unpack(experts.up, experts.up_scale, fmt, I, H),
        unpack(experts.down, experts.down_scale, fmt, H, I),
    )


def unpack_parts(parts: Sequence[PackedExperts]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """unpack_experts of a layer split along the intermediate dimension (pack_split's parts), joined."""
    if len(parts) == 1:
        return unpack_experts(parts[0])
    pieces = [unpack_experts(part) for part in parts]
    return tuple(torch.cat([piece[i] for piece in pieces], dim=2 if i == 2 else 1) for i in range(3))


def quantize_int8_groups(values: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and fp32 scales of [..., K] values per `group_size` columns (scale =
    max |w| / 127, round to nearest even), the int8_kgroup rule, for pack_codes."""
    *lead, K = values.shape
    groups = values.float().reshape(*lead, K // group_size, group_size)
    scales = groups.abs().amax(dim=-1) / 127.0
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.round(groups / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(*lead, K), scales


def pack_codes_split(
    gate: Tuple[torch.Tensor, torch.Tensor],
    up: Tuple[torch.Tensor, torch.Tensor],
    down: Tuple[torch.Tensor, torch.Tensor],
    weight_format: str,
    group_size: int,
    split: Sequence[Tuple[int, int]],
) -> List[PackedExperts]:
    """pack_experts_from_codes per intermediate range: gate/up rows lo:hi, down columns lo:hi (and
    its scale groups lo/g:hi/g), so every part stays exact."""
    if len(split) == 1:
        return [pack_experts_from_codes(gate, up, down, weight_format)]
    parts = []
    for lo, hi in split:
        rows = lambda pair: (pair[0][:, lo:hi], pair[1][:, lo:hi])  # noqa: E731
        cols = (down[0][:, :, lo:hi], down[1][:, :, lo // group_size : hi // group_size])
        parts.append(pack_experts_from_codes(rows(gate), rows(up), cols, weight_format))
    return parts


def check_expert_map(physical_to_logical_map, num_experts: int) -> torch.Tensor:
    """A permutation of range(num_experts) as a CPU int64 tensor."""
    if not isinstance(physical_to_logical_map, torch.Tensor):
        physical_to_logical_map = torch.as_tensor(physical_to_logical_map)
    if physical_to_logical_map.dtype.is_floating_point or physical_to_logical_map.dtype == torch.bool:
        raise TypeError(f"physical_to_logical_map must be an integer tensor, got {physical_to_logical_map.dtype}")
    mapping = physical_to_logical_map.detach().to("cpu", torch.int64).reshape(-1)
    if mapping.numel() != num_experts:
        raise ValueError(f"physical_to_logical_map must have num_experts={num_experts} entries, got {mapping.numel()}")
    if not torch.equal(torch.sort(mapping).values, torch.arange(num_experts)):
        raise ValueError(
            f"physical_to_logical_map must be a permutation of 0..{num_experts - 1} "
            "(entry p names the logical expert stored in physical slot p)"
        )
    return mapping


def permute_packed(experts: PackedExperts, mapping: torch.Tensor) -> PackedExperts:
    """Physical slot p gets logical expert mapping[p]; packed blobs are rows per expert, so this moves
    bytes, it does not repack."""
    if torch.equal(mapping, torch.arange(experts.num_experts)):
        return experts
    pick = lambda t: None if t is None else t.index_select(0, mapping)  # noqa: E731
    return PackedExperts(
        pick(experts.gate),
        pick(experts.up),
        pick(experts.down),
        pick(experts.gate_scale),
        pick(experts.up_scale),
        pick(experts.down_scale),
        experts.weight_format,
        experts.num_experts,
        experts.hidden_size,
        experts.intermediate_size,
        pick(experts.gate_bias),
        pick(experts.up_bias),
        pick(experts.down_bias),
        experts.activation,
        experts.swiglu_alpha,
        experts.swiglu_limit,
    )


def split_unit(weight_format: str, group_size: int) -> int:
    """The intermediate rows a part boundary falls on: `group_size` for the K-group formats (down's K
    is the intermediate dimension), 32 otherwise, so every part keeps the kernels' fast panel layout."""
    return group_size if weight_format in GROUPED_FORMATS else 32


def most_parts(intermediate_size: int, parts: int, weight_format: str, group_size: int) -> int:
    """The most parts, up to `parts`, intermediate_split can cut `intermediate_size` into."""
    unit = split_unit(weight_format, group_size)
    return max(1, min(parts, intermediate_size // unit if intermediate_size % unit == 0 else 1))


def intermediate_split(
    intermediate_size: int, parts: int, weight_format: str, group_size: int
) -> List[Tuple[int, int]]:
    """[lo, hi) ranges of the intermediate dimension, one per sub-pool. Boundaries fall on
    `group_size` for the K-group formats (down's K is the intermediate dimension) and on 32 rows
    otherwise, so every part keeps the kernels' fast panel layout."""
    unit = split_unit(weight_format, group_size)
    if parts == 1:
        return [(0, intermediate_size)]
    if intermediate_size % unit or intermediate_size // unit < parts:
        raise ValueError(
            f"threadpool_count={parts} cannot split moe_intermediate_size={intermediate_size} into "
            f"parts that are multiples of {unit} (weight format {weight_format}); use a smaller "
            "threadpool_count"
        )
    units = intermediate_size // unit
    bounds = [unit * (units * p // parts) for p in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def pack_split(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    weight_format: str,
    group_size: int,
    split: Sequence[Tuple[int, int]],
) -> List[PackedExperts]:
    """Pack each intermediate range separately: gate/up rows lo:hi, down columns lo:hi."""
    return [
        pack_experts(gate[:, lo:hi], up[:, lo:hi], down[:, :, lo:hi], weight_format, group_size) for lo, hi in split
    ]


def resplit_packed(experts: PackedExperts, group_size: int, split: Sequence[Tuple[int, int]]) -> List[PackedExperts]:
    """Split already packed (e.g. pre-quantized) experts by repacking their exact dequantized values
    per part. bf16 comes back bit-identical; quantized formats are requantized per part, which can
    move a few codes (down's per-row scales now cover only the part's columns)."""
    if len(split) == 1:
        return [experts]
    if experts.activation != "silu" or any(
        b is not None for b in (experts.gate_bias, experts.up_bias, experts.down_bias)
    ):
        # Each part would add the whole down bias; the parts' activation would be lost.
        raise ValueError(
            "experts with biases or a non-SiLU activation cannot be split over sub-pools; use threadpool_count=1"
        )
    if experts.weight_format != "bf16":
        warnings.warn(
            f"splitting pre-quantized {experts.weight_format} experts over {len(split)} sub-pools "
            "requantizes each part from the stored values",
            RuntimeWarning,
            stacklevel=3,
        )
    gate, up, down = unpack_experts(experts)
    return pack_split(gate, up, down, experts.weight_format, group_size, split)
