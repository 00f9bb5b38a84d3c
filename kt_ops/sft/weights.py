"""The routed experts' weights for kt_ops.sft (`kt_kernel.sft.weights`): taken from the model
(extract_moe_weights), replaced there by placeholders once the CPU backend holds them, and read from
checkpoints in the forms kt-kernel 0.7 trains on: bf16 / fp16 (and block-FP8 dequantized), raw block
FP8 kept code for code, and compressed-tensors RAWINT4 kept code for code."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from torch import nn

from ..weights.native import dequantize_fp8
from .arch import MOEArchConfig, detect_fused_experts
from .backend import RAWINT4_GROUP_SIZE

logger = logging.getLogger(__name__)

_RANK_LOCAL_NAMES = "_kt_rank_local_parameter_names"


def _require_materialized(name: str, weight: torch.Tensor) -> None:
    if weight.device.type == "meta" or getattr(weight, "_kt_zero_storage", False):
        raise RuntimeError(f"Cannot extract {name}: the routed expert weight is an unmaterialized placeholder")
    try:
        available = weight.untyped_storage().nbytes()
    except (NotImplementedError, RuntimeError):
        return
    needed = weight.numel() * weight.element_size()
    if needed and available < needed:
        raise RuntimeError(f"Cannot extract {name}: the routed expert weight is a zero-storage placeholder")


def extract_moe_weights(moe_module: nn.Module, moe_config: MOEArchConfig) -> Tuple[torch.Tensor, ...]:
    """(gate_proj, up_proj, down_proj) of the block's experts as [E, I, H], [E, I, H], [E, H, I]: from
    transformers v5's fused module (gate_up_proj [E, 2I, H], down_proj [E, H, I]; older Qwen3-VL-MoE
    releases stored both transposed) or from per-expert Linear layers (PEFT-wrapped or not)."""
    experts = getattr(moe_module, moe_config.experts_attr)
    E, I = int(moe_config.expert_num), int(moe_config.intermediate_size)
    if detect_fused_experts(experts):
        gate_up, down = experts.gate_up_proj, experts.down_proj
        _require_materialized("gate_up_proj", gate_up)
        _require_materialized("down_proj", down)
        gate_up, down = gate_up.detach(), down.detach()
        if gate_up.shape[1] != 2 * I and gate_up.shape[2] == 2 * I:  # [E, H, 2I], [E, I, H]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        if tuple(gate_up.shape[:2]) != (E, 2 * I):
            raise ValueError(f"fused gate_up_proj must be [E, 2I, H] with E={E}, I={I}, got {tuple(gate_up.shape)}")
        return gate_up[:, :I].contiguous(), gate_up[:, I:].contiguous(), down.contiguous()
    per_projection = []
    for name in moe_config.weight_names:
        weights = []
        for index, expert in enumerate(experts):
            weight = getattr(expert, name).weight
            weight = weight if isinstance(weight, torch.Tensor) else weight.data
            _require_materialized(f"expert {index} {name}", weight)
            weights.append(weight.detach())
        per_projection.append(torch.stack(weights))
    return tuple(per_projection)


def _placeholder(parameter: torch.Tensor, empty: bool) -> nn.Parameter:
    """A parameter that keeps `parameter`'s shape as metadata but holds no weights: zero elements
    (empty), or its shape over a one-byte storage with zero strides."""
    if empty:
        tensor = torch.empty(0, dtype=parameter.dtype)
    else:
        storage = torch.UntypedStorage(1, device="cpu")
        tensor = torch.tensor([], dtype=parameter.dtype).set_(storage, 0, parameter.shape, [0] * parameter.dim())
    placeholder = nn.Parameter(tensor, requires_grad=False)
    placeholder._kt_zero_storage = True
    placeholder._kt_original_shape = tuple(parameter.shape)
    return placeholder


def clear_original_expert_weights(
    moe_module: nn.Module, moe_config: MOEArchConfig, full_weight_grad: bool = False, *, empty_placeholders=False
) -> None:
    """Replace the block's expert weights by placeholders once the CPU backend holds them (in full
    fine-tuning too: the backend's Parameters are then the weights), keeping the modules where PEFT
    finds them."""
    experts = getattr(moe_module, moe_config.experts_attr, None)
    if experts is None:
        return
    if detect_fused_experts(experts):
        for name in ("gate_up_proj", "down_proj"):
            if isinstance(experts._parameters.get(name), nn.Parameter):
                experts._parameters[name] = _placeholder(experts._parameters[name], empty_placeholders)
        return
    replaced = 0
    for expert in experts:
        for name in moe_config.weight_names:
            projection = getattr(expert, name, None)
            owner, key = _weight_owner(projection)
            if owner is not None:
                owner._parameters[key] = _placeholder(owner._parameters[key], empty_placeholders)
                replaced += 1
    logger.info("Replaced %d expert weight parameters by placeholders", replaced)


_clear_original_expert_weights = clear_original_expert_weights  # kt-kernel's name


def _weight_owner(projection) -> Tuple[Optional[nn.Module], str]:
    """The module whose _parameters hold a projection's weight (a parametrization's 'original', or the
    projection itself), and the key."""
    if projection is None:
        return None, ""
    parametrized = getattr(getattr(projection, "parametrizations", None), "weight", None)
    if parametrized is not None and isinstance(parametrized._parameters.get("original"), nn.Parameter):
        return parametrized, "original"
    if isinstance(getattr(projection, "_parameters", {}).get("weight"), nn.Parameter):
        return projection, "weight"
    return None, ""


def get_kt_expert_placeholders(model: nn.Module) -> Dict[str, nn.Parameter]:
    """{name: parameter} of the expert placeholders in the model's parameter tree (every name a
    placeholder is registered under). The names are found once and kept on the model, so they stay
    valid after the model moves to another device or a placeholder is replaced."""
    ids = set()
    for module in model.modules():
        if getattr(module, "_is_kt_moe_wrapper", False):
            experts = getattr(module, str(getattr(module, "_experts_attr", "")), None)
            if not isinstance(experts, nn.Module):
                raise RuntimeError("KT MoE wrapper does not expose a valid expert subtree")
            ids.update(id(p) for p in experts.parameters() if getattr(p, "_kt_zero_storage", False))
    named, found = {}, {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if named.get(name, parameter) is not parameter:
            raise RuntimeError(f"Model parameter FQN {name!r} resolves to conflicting Parameter identities")
        named[name] = parameter
        if id(parameter) in ids:
            found[name] = parameter
    if {id(p) for p in found.values()} != ids:
        raise RuntimeError("KT expert placeholder is not registered in the model parameter tree")
    cached = getattr(model, _RANK_LOCAL_NAMES, None)
    if cached is None:
        cached = tuple(sorted(found))
        setattr(model, _RANK_LOCAL_NAMES, cached)
    elif not isinstance(cached, tuple) or tuple(sorted(set(cached))) != cached or not all(cached):
        raise RuntimeError("KT rank-local parameter-name cache is invalid")
    elif set(found) - set(cached):
        raise RuntimeError("KT expert placeholder inventory changed after its initial discovery")
    missing = [name for name in cached if name not in named]
    if missing:
        raise RuntimeError(f"Cached KT rank-local parameter FQN is no longer registered: {missing[0]!r}")
    return {name: named[name] for name in cached}


# ---- checkpoint forms ------------------------------------------------------------------------------


@dataclass
class BlockFP8ExpertWeights:
    """Per-expert E4M3 weights [N, K] and their fp32 block scales [N/128, K/128], as stored."""

    gate_proj: List[torch.Tensor]
    gate_scale: List[torch.Tensor]
    up_proj: List[torch.Tensor]
    up_scale: List[torch.Tensor]
    down_proj: List[torch.Tensor]
    down_scale: List[torch.Tensor]
    block_size: Tuple[int, int] = (128, 128)


@dataclass
class RAWINT4ExpertWeights:
    """Signed group-32 int4: uint8 [E, N, K/2] (two values per byte, +8 offset, low nibble first) and
    bf16 scales [E, N, K/32]."""

    gate_proj: torch.Tensor
    gate_scale: torch.Tensor
    up_proj: torch.Tensor
    up_scale: torch.Tensor
    down_proj: torch.Tensor
    down_scale: torch.Tensor
    group_size: int = RAWINT4_GROUP_SIZE


def _tensor_files(checkpoint_files: List[str], sharded_metadata: Optional[dict]) -> Dict[str, str]:
    """{tensor key: file}, from the shard index when given, else by listing the files' keys."""
    if not checkpoint_files:
        raise FileNotFoundError("checkpoint_files is empty")
    weight_map = sharded_metadata.get("weight_map") if isinstance(sharded_metadata, dict) else None
    if weight_map:
        base = os.path.dirname(checkpoint_files[0])
        return {key: os.path.join(base, file) for key, file in weight_map.items()}
    result = {}
    for file in checkpoint_files:
        with safe_open(file, framework="pt") as handle:
            result.update(dict.fromkeys(handle.keys(), file))
    return result


def _read(tensor_files: Dict[str, str], keys: List[str]) -> Dict[str, torch.Tensor]:
    """The tensors `keys`, each shard opened once."""
    by_file: Dict[str, List[str]] = {}
    for key in keys:
        by_file.setdefault(tensor_files[key], []).append(key)
    out = {}
    for file, file_keys in by_file.items():
        with safe_open(file, framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in file_keys})
    return out


def _expert_keys(tensor_files, prefix: str, moe_config: MOEArchConfig, layer_idx: int, suffixes, what: str):
    """{(expert, projection index, suffix): key} of a layer's per-expert tensors; raises
    FileNotFoundError naming how many are missing, ValueError for a fused layer."""
    experts = f"{prefix}.{layer_idx}.{moe_config.moe_layer_attr}.{moe_config.experts_attr}"
    fused = [f"{experts}.{n}{w}" for n in ("gate_up_proj", "down_proj") for w in ("", ".weight")]
    if any(key in tensor_files for key in fused):
        raise ValueError(f"{what} SFT requires non-fused per-expert checkpoint weights; layer {layer_idx} is fused")
    keys = {
        (e, p, suffix): f"{experts}.{e}.{name}.{suffix}"
        for e in range(int(moe_config.expert_num))
        for p, name in enumerate(moe_config.weight_names)
        for suffix in suffixes
    }
    missing = [key for key in keys.values() if key not in tensor_files]
    if missing:
        more = " ..." if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"layer {layer_idx} is missing {len(missing)} {what} tensors: {', '.join(missing[:3])}{more}"
        )
    return keys


def load_block_fp8_experts_from_checkpoint_files(
    checkpoint_files: List[str],
    sharded_metadata: Optional[dict],
    layers_prefix: str,
    moe_config: MOEArchConfig,
    layer_idx: int,
    hidden_size: int,
    block_size: Tuple[int, int] = (128, 128),
) -> BlockFP8ExpertWeights:
    """A layer's block-FP8 experts as stored (E4M3 weights, 128x128 block scales as fp32), one tensor
    per expert: AMXSFTMoEWrapper.load_block_fp8_weights keeps the codes."""
    if tuple(block_size) != (128, 128):
        raise ValueError(f"native FP8 SFT requires weight_block_size=[128, 128], got {tuple(block_size)}")
    H, I = int(hidden_size), int(moe_config.intermediate_size)
    if H % 128 or I % 128:
        raise ValueError(f"native FP8 SFT requires hidden and intermediate sizes divisible by 128, got {H}, {I}")
    files = _tensor_files(checkpoint_files, sharded_metadata)
    keys = _expert_keys(files, layers_prefix, moe_config, layer_idx, ("weight", "weight_scale_inv"), "native FP8")
    tensors = _read(files, list(keys.values()))
    shapes = ((I, H), (I, H), (H, I))
    out: Dict[str, List[torch.Tensor]] = {f"{p}_{k}": [] for p in ("gate", "up", "down") for k in ("proj", "scale")}
    for e in range(int(moe_config.expert_num)):
        for p, label in enumerate(("gate", "up", "down")):
            weight, scale = tensors[keys[e, p, "weight"]], tensors[keys[e, p, "weight_scale_inv"]]
            key = keys[e, p, "weight"]
            if weight.dtype != torch.float8_e4m3fn or tuple(weight.shape) != shapes[p]:
                raise ValueError(f"{key} must be float8_e4m3fn {shapes[p]}, got {weight.dtype} {tuple(weight.shape)}")
            blocks = (shapes[p][0] // 128, shapes[p][1] // 128)
            if scale.dtype not in (torch.bfloat16, torch.float32) or tuple(scale.shape) != blocks:
                raise ValueError(
                    f"{key}_scale_inv must be a bf16 or fp32 {blocks} (128x128 blocks), got {scale.dtype} "
                    f"{tuple(scale.shape)}"
                )
            out[f"{label}_proj"].append(weight.contiguous())
            out[f"{label}_scale"].append(scale.float().contiguous())
    return BlockFP8ExpertWeights(**out, block_size=(128, 128))


def load_rawint4_experts_from_checkpoint_files(
    checkpoint_files: List[str],
    sharded_metadata: Optional[dict],
    layers_prefix: str,
    moe_config: MOEArchConfig,
    layer_idx: int,
    hidden_size: int,
    group_size: int = RAWINT4_GROUP_SIZE,
) -> RAWINT4ExpertWeights:
    """A layer's compressed-tensors pack-quantized int4 experts (weight_packed int32 [N, K/8], eight
    signed values each, low nibble first, or uint8 [N, K/2]; weight_scale [N, K/group]) as
    RAWINT4ExpertWeights, code for code."""
    if int(group_size) != RAWINT4_GROUP_SIZE:
        raise ValueError(f"RAWINT4 SFT requires group_size={RAWINT4_GROUP_SIZE}, got {group_size}")
    H, I = int(hidden_size), int(moe_config.intermediate_size)
    files = _tensor_files(checkpoint_files, sharded_metadata)
    keys = _expert_keys(files, layers_prefix, moe_config, layer_idx, ("weight_packed", "weight_scale"), "RAWINT4")
    tensors = _read(files, list(keys.values()))
    shapes = ((I, H), (I, H), (H, I))
    out = {}
    for p, label in enumerate(("gate", "up", "down")):
        N, K = shapes[p]
        packed, scales = [], []
        for e in range(int(moe_config.expert_num)):
            key = keys[e, p, "weight_packed"]
            packed.append(_rawint4_bytes(key, tensors[key], N, K))
            scale = tensors[keys[e, p, "weight_scale"]]
            if not scale.is_floating_point() or tuple(scale.shape) != (N, K // group_size):
                raise ValueError(f"{key[: -len('weight_packed')]}weight_scale must be float [{N}, {K // group_size}]")
            scales.append(scale.to(torch.bfloat16))
        out[f"{label}_proj"], out[f"{label}_scale"] = torch.stack(packed), torch.stack(scales)
    return RAWINT4ExpertWeights(**out, group_size=RAWINT4_GROUP_SIZE)


def _rawint4_bytes(key: str, packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """uint8 [N, K/2], two +8-offset nibbles per byte, low first, from either stored form."""
    if packed.dtype == torch.uint8 and tuple(packed.shape) == (N, K // 2):
        return packed.contiguous()
    if packed.dtype != torch.int32 or tuple(packed.shape) != (N, K // 8):
        raise ValueError(
            f"{key} must be int32 [{N}, {K // 8}] or uint8 [{N}, {K // 2}], got {packed.dtype} {list(packed.shape)}"
        )
    nibbles = (packed.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF
    # compressed-tensors stores two's complement nibbles; RAWINT4's bytes hold value + 8
    unsigned = (torch.where(nibbles >= 8, nibbles - 16, nibbles) + 8).reshape(N, K)
    return (unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)).to(torch.uint8).contiguous()


def load_experts_from_checkpoint_files(
    checkpoint_files: List[str],
    sharded_metadata: Optional[dict],
    layers_prefix: str,
    moe_config: MOEArchConfig,
    layer_idx: int,
    block_size=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's experts as bf16 [E, I, H], [E, I, H], [E, H, I] from a checkpoint (block-FP8 experts
    dequantized with their weight_scale_inv)."""
    files = _tensor_files(checkpoint_files, sharded_metadata)
    probe = f"{layers_prefix}.{layer_idx}.{moe_config.moe_layer_attr}.{moe_config.experts_attr}.0."
    fp8 = f"{probe}{moe_config.weight_names[0]}.weight_scale_inv" in files
    keys = _expert_keys(
        files, layers_prefix, moe_config, layer_idx, ("weight", "weight_scale_inv") if fp8 else ("weight",), "expert"
    )
    tensors = _read(files, list(keys.values()))
    stacked = []
    for p in range(3):
        per_expert = []
        for e in range(int(moe_config.expert_num)):
            weight = tensors[keys[e, p, "weight"]]
            if fp8:
                weight = dequantize_fp8(keys[e, p, "weight"], weight, tensors[keys[e, p, "weight_scale_inv"]])
            per_expert.append(weight.to(torch.bfloat16))
        stacked.append(torch.stack(per_expert))
    return tuple(stacked)
