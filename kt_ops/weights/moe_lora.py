"""Convert the routed-expert part of a PEFT LoRA adapter into the stacked per-layer form that
serving loads with `init_lora_weights`.

    python -m kt_ops.convert_moe_lora --input adapter_model.safetensors --config adapter_config.json \
        --output moe_lora.pt [--lora-alpha A] [--verbose]

Input keys, with any prefix (`base_model.model.model.` ...):
    ...layers.{L}.mlp[.original_moe].experts.{E}.{gate,up,down}_proj.lora_{A,B}.weight   (DeepSeek/Qwen)
    ...layers.{L}.block_sparse_moe.experts.{E}.{w1,w3,w2}.lora_{A,B}.weight   (Mixtral: w1 gate, w3 up, w2 down)
PEFT stores lora_A.weight as [r, in] and lora_B.weight as [out, r], which is already the per-expert
orientation of the kt LoRA tensors (A: [r, in], B: [out, r]), so experts are only stacked:
    {"metadata": {...}, "layer_{L}": {"gate_lora_a": [E, r, H], "gate_lora_b": [E, I, r],
                                      "up_lora_a": [E, r, H], "up_lora_b": [E, I, r],
                                      "down_lora_a": [E, r, I], "down_lora_b": [E, H, r]}}
Tensors keep the adapter's dtype. Other LoRA keys (attention, dense MLPs) are not part of the
output; --verbose lists them.

alpha: --lora-alpha if given, else the adapter config's (its alpha_pattern entry for the expert
modules when one matches, else lora_alpha), else 32.0. The explicit flag wins over the config:
a flag that is silently ignored whenever a config is passed would be of no use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..core.checks import check_int, check_number
from ..core.durable import atomic_file
from ..core.formats import PROJECTIONS

logger = logging.getLogger(__name__)

DEFAULT_LORA_ALPHA = 32.0
FORMAT = "kt_ops.moe_lora"
FORMAT_VERSION = 1
NUM_EXPERTS_METADATA = "kt_ops.num_experts"  # safetensors metadata save_kt_adapter writes

_PROJ_ALIASES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}

# The module name (everything before `.lora_A.weight`) is captured too: peft matches rank_pattern /
# alpha_pattern against it.
MOE_PATTERN = re.compile(
    r"^(?P<module>(?:.*\.)?layers\.(?P<layer>\d+)\."
    r"(?:mlp\.(?:original_moe\.)?experts\.(?P<e1>\d+)\.(?P<p1>gate_proj|up_proj|down_proj)"
    r"|block_sparse_moe\.experts\.(?P<e2>\d+)\.(?P<p2>w1|w2|w3)))"
    r"\.lora_(?P<ab>[AB])\.weight$"
)
# Anything else stored under an expert projection (DoRA magnitudes, LoRA biases, ...) changes what
# the expert computes; the kernels cannot reproduce it, so it must not be dropped silently.
_EXPERT_MODULE = re.compile(
    r"(?:^|\.)layers\.\d+\.(?:mlp\.(?:original_moe\.)?experts\.\d+\.(?:gate_proj|up_proj|down_proj)"
    r"|block_sparse_moe\.experts\.\d+\.(?:w1|w2|w3))\."
)


class NothingToConvert(ValueError):
    """The adapter has no routed-expert LoRA."""


def parse_moe_key(key: str) -> Optional[Tuple[int, int, str, str]]:
    """(layer_idx, expert_id, "gate"|"up"|"down", "a"|"b") for a routed-expert LoRA key, else None."""
    m = MOE_PATTERN.match(key)
    if m is None:
        return None
    expert = m.group("e1") if m.group("e1") is not None else m.group("e2")
    proj = m.group("p1") or m.group("p2")
    return int(m.group("layer")), int(expert), _PROJ_ALIASES[proj], m.group("ab").lower()


def load_adapter_config(config_path: str) -> dict:
    with open(config_path, "r") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {config_path} must hold a JSON object, got {type(config).__name__}")
    return config


def _pattern_value(patterns, module_names: Sequence[str], what: str):
    """The value of the first peft pattern key that matches the expert modules, as peft resolves
    rank_pattern / alpha_pattern (the key must match at the end of the module name)."""
    if not patterns:
        return None
    if not isinstance(patterns, dict):
        raise ValueError(f"adapter config {what} must be an object mapping module patterns to values")
    hits = set()
    for name in module_names:
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", name):
                hits.add(value)
                break
    if len(hits) > 1:
        raise ValueError(
            f"adapter config {what} gives the routed experts several values {sorted(hits)}; "
            "one converted file holds one (rank, alpha)"
        )
    return hits.pop() if hits else None


def _config_rank_alpha(
    config: Optional[dict], module_names: Sequence[str], alpha_given: bool
) -> Tuple[Optional[int], Optional[float]]:
    if config is None:
        return None, None
    if config.get("use_dora"):
        raise ValueError("adapter config has use_dora=true: DoRA experts cannot be served by the kt_ops LoRA kernels")
    if config.get("use_rslora") and not alpha_given:
        # rsLoRA scales by alpha/sqrt(r); the kernels scale by alpha/r. Converting alpha would make a
        # file whose metadata disagrees with its adapter config, so refuse instead.
        raise ValueError(
            "adapter config has use_rslora=true (scaling alpha/sqrt(r)); the kt_ops kernels scale by "
            "alpha/r: pass --lora-alpha <alpha*sqrt(r)> to convert it explicitly"
        )
    rank = _pattern_value(config.get("rank_pattern"), module_names, "rank_pattern")
    if rank is None:
        rank = config.get("r")
    alpha = _pattern_value(config.get("alpha_pattern"), module_names, "alpha_pattern")
    if alpha is None:
        alpha = config.get("lora_alpha")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"adapter config rank r must be a positive int, got {rank!r}")
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0
    ):
        raise ValueError(f"adapter config lora_alpha must be a positive number, got {alpha!r}")
    return rank, (float(alpha) if alpha is not None else None)


def _open_adapter(input_path: str):
    from safetensors import safe_open

    try:
        return safe_open(input_path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{input_path} is not a readable safetensors file: {e}") from None


def _index(f, input_path: str):
    """(keys[layer][expert][proj][a|b], module names, ignored keys). Keys, not tensors: layers are
    read one at a time, so a large adapter is never held twice (per expert and stacked)."""
    index: Dict[int, Dict[int, Dict[str, Dict[str, str]]]] = {}
    modules: List[str] = []
    ignored: List[str] = []
    for key in f.keys():
        parsed = parse_moe_key(key)
        if parsed is None:
            if _EXPERT_MODULE.search(key):
                raise ValueError(
                    f"{input_path}: {key} is an expert tensor the kt_ops LoRA kernels cannot "
                    "apply (only lora_A.weight / lora_B.weight are supported)"
                )
            ignored.append(key)
            continue
        layer, expert, proj, ab = parsed
        index.setdefault(layer, {}).setdefault(expert, {}).setdefault(proj, {})[ab] = key
        if ab == "a":
            modules.append(MOE_PATTERN.match(key).group("module"))
    return index, modules, ignored


def _stack_layer(
    layer: int, experts: Dict[int, Dict[str, Dict[str, torch.Tensor]]], num_experts: int, fill_missing: bool = False
) -> Tuple[Dict[str, torch.Tensor], List[int]]:
    """Check one layer is complete and consistent, then stack it ([E, ...] per LoRA tensor).
    Returns (stacked tensors, ids of the experts filled with a zero LoRA)."""
    ids = sorted(experts)
    missing = sorted(set(range(num_experts)) - set(ids))
    if missing and not fill_missing:
        raise ValueError(
            f"layer {layer}: experts must be numbered 0..{num_experts - 1}, but expert(s) "
            f"{missing[:8]}{'...' if len(missing) > 8 else ''} have no LoRA "
            f"(found {len(ids)} experts, highest id {ids[-1]}); if they were left without LoRA on "
            "purpose (e.g. experts kept on the GPU while training), pass --fill-missing-experts"
        )
    for e in ids:
        for proj in PROJECTIONS:
            for ab in ("a", "b"):
                if ab not in experts[e].get(proj, {}):
                    raise ValueError(f"layer {layer}, expert {e}: {proj} projection has no lora_{ab.upper()} weight")
    # Reference shapes from the lowest expert: A is [r, in], B is [out, r]; gate/up map H -> I, down I -> H.
    first = experts[ids[0]]
    rank, hidden = first["gate"]["a"].shape if first["gate"]["a"].dim() == 2 else (None, None)
    inter = first["gate"]["b"].shape[0] if first["gate"]["b"].dim() == 2 else None
    expected = {
        ("gate", "a"): (rank, hidden),
        ("gate", "b"): (inter, rank),
        ("up", "a"): (rank, hidden),
        ("up", "b"): (inter, rank),
        ("down", "a"): (rank, inter),
        ("down", "b"): (hidden, rank),
    }
    dtype = first["gate"]["a"].dtype
    if not dtype.is_floating_point:
        raise ValueError(
            f"layer {layer}, expert {ids[0]}: gate lora_A is {dtype}; LoRA weights must be floating "
            "point (an integer adapter is not a LoRA the kernels can apply, and is not cast silently)"
        )
    for e in ids:
        for (proj, ab), shape in expected.items():
            t = experts[e][proj][ab]
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"layer {layer}, expert {e}: {proj} lora_{ab.upper()} has shape {tuple(t.shape)}, "
                    f"expected {shape} (rank {rank}, hidden {hidden}, intermediate {inter}, "
                    f"taken from expert {ids[0]}'s gate projection)"
                )
            if t.dtype != dtype:
                raise ValueError(
                    f"layer {layer}, expert {e}: {proj} lora_{ab.upper()} is {t.dtype}, the other "
                    f"expert LoRA tensors are {dtype}"
                )
    # A zero LoRA leaves an expert exactly as its base weights compute it.
    zeros = {key: torch.zeros(shape, dtype=dtype) for key, shape in expected.items()}
    full = [
        experts[e] if e in experts else {p: {ab: zeros[(p, ab)] for ab in ("a", "b")} for p in PROJECTIONS}
        for e in range(num_experts)
    ]
    stacked = {
        f"{proj}_lora_{ab}": torch.stack([expert[proj][ab] for expert in full]).contiguous()
        for proj in PROJECTIONS
        for ab in ("a", "b")
    }
    return stacked, missing


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_output(output_path: str, inputs: Dict[str, Optional[str]]) -> None:
    """The output may replace an earlier output of this converter, never anything else: an input, or
    a file of another kind the user keeps there."""
    for flag, path in inputs.items():
        if path is not None and _same_file(output_path, path):
            raise ValueError(
                f"--output {output_path} is the {flag} file; write the converted adapter to another "
                "path (the input would be destroyed)"
            )
    if os.path.isdir(output_path):
        raise ValueError(f"--output {output_path} is a directory; name the output .pt file")
    if os.path.exists(output_path):
        try:
            existing = torch.load(output_path, map_location="cpu", weights_only=True, mmap=True)
            ours = isinstance(existing, dict) and existing.get("metadata", {}).get("format") == FORMAT
        except Exception:
            ours = False
        if not ours:
            raise ValueError(
                f"--output {output_path} exists and is not a converted MoE-LoRA file ({FORMAT}); it is "
                "left untouched: remove it or choose another output path"
            )


def _recorded_num_experts(f, input_path: str) -> Optional[int]:
    """Experts per layer as save_kt_adapter records it (adapter metadata `kt_ops.num_experts`)."""
    value = (f.metadata() or {}).get(NUM_EXPERTS_METADATA)
    if value is None:
        return None
    try:
        count = int(value)
        if count < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{input_path}: metadata {NUM_EXPERTS_METADATA}={value!r} must be a positive int") from None
    return count


def _checked_arguments(input_path, output_path, config_path, lora_alpha, num_experts) -> Optional[dict]:
    """convert_moe_lora's arguments checked; the adapter config (None without config_path)."""
    for name, path in (("input_path", input_path), ("output_path", output_path)):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path, got {type(path).__name__}")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"input adapter not found: {input_path}")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"output directory does not exist: {out_dir}")
    check_int(num_experts, "num_experts", 1, optional=True)
    _check_output(
        os.fspath(output_path),
        {"--input": os.fspath(input_path), "--config": None if config_path is None else os.fspath(config_path)},
    )
    check_number(lora_alpha, "lora_alpha", positive=True, optional=True)
    config = None
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"adapter config not found: {config_path}")
        config = load_adapter_config(config_path)

    return config


def _read_layers(
    f, input_path: str, weights: dict, num_experts: Optional[int], fill_missing_experts: bool, verbose: bool
) -> Tuple[dict, Dict[int, List[int]], int]:
    """({"layer_L": the layer's six stacked LoRA tensors}, {layer: experts filled with zeros}, the
    number of experts) of the adapter open as `f`."""
    result: dict = {}
    filled: Dict[int, List[int]] = {}
    highest = max(max(experts) for experts in weights.values())
    recorded = _recorded_num_experts(f, str(input_path))
    if num_experts is not None and recorded is not None and num_experts != recorded:
        raise ValueError(f"num_experts={num_experts} was given, but {input_path} records {recorded} experts per layer")
    num_experts = num_experts or recorded
    if num_experts is None:
        num_experts = highest + 1
        logger.warning(
            "%s does not record the number of experts: assuming %d (highest expert id + 1); pass "
            "--num-experts if the model has more",
            input_path,
            num_experts,
        )
    elif highest >= num_experts:
        raise ValueError(
            f"{input_path} has LoRA for expert {highest}, but the layers have {num_experts} experts "
            f"(ids 0..{num_experts - 1})"
        )
    for layer in sorted(weights):
        tensors = {
            e: {proj: {ab: f.get_tensor(key) for ab, key in keys.items()} for proj, keys in projs.items()}
            for e, projs in weights[layer].items()
        }
        result[f"layer_{layer}"], missing = _stack_layer(layer, tensors, num_experts, fill_missing_experts)
        del tensors
        if missing:
            filled[layer] = missing
            logger.warning("layer %d: expert(s) %s have no LoRA; filled with zeros", layer, missing)
        if verbose:
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in result[f"layer_{layer}"].items())
            logger.info("layer %d: %s", layer, shapes)
    return result, filled, num_experts


def _layer_sizes(result: dict, weights: dict) -> Tuple[dict, int, int, int]:
    """(the first layer's tensors, rank, hidden, intermediate), the same in every layer."""
    first = result[f"layer_{min(weights)}"]
    rank, hidden = first["gate_lora_a"].shape[1:]
    inter = first["gate_lora_b"].shape[1]
    for key, layer_weights in result.items():
        got = (
            layer_weights["gate_lora_a"].shape[1],
            layer_weights["gate_lora_a"].shape[2],
            layer_weights["gate_lora_b"].shape[1],
        )
        if got != (rank, hidden, inter):
            raise ValueError(
                f"{key} has (rank, hidden, intermediate) = {got}, layer {min(weights)} has "
                f"{(rank, hidden, inter)}; every layer of one file must agree"
            )
    return first, rank, hidden, inter


def _alpha(lora_alpha: Optional[float], config_alpha: Optional[float]) -> float:
    """The alpha to record: the argument's, else the adapter config's, else the default."""
    if lora_alpha is not None:
        return float(lora_alpha)
    if config_alpha is not None:
        return config_alpha
    logger.warning("no --lora-alpha and no lora_alpha in an adapter config: using %s", DEFAULT_LORA_ALPHA)
    return DEFAULT_LORA_ALPHA


def _metadata(rank, alpha, layers, num_experts, hidden, inter, first, input_path, filled) -> dict:
    """The metadata the serving side reads from a converted file."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_rank": int(rank),
        "lora_alpha": alpha,
        "lora_scaling": alpha / int(rank),
        "num_layers": len(layers),
        "layers": layers,
        "num_experts": num_experts,
        "hidden_size": int(hidden),
        "intermediate_size": int(inter),
        "dtype": str(first["gate_lora_a"].dtype).replace("torch.", ""),
        "source": os.path.basename(str(input_path)),
        "filled_experts": filled,
    }


def convert_moe_lora(
    input_path: str,
    output_path: str,
    config_path: Optional[str] = None,
    lora_alpha: Optional[float] = None,
    verbose: bool = False,
    fill_missing_experts: bool = False,
    num_experts: Optional[int] = None,
) -> dict:
    """Convert `input_path` (PEFT adapter_model.safetensors) into `output_path` (torch.save'd dict).

    Experts 0..num_experts-1 must all have LoRA, unless `fill_missing_experts`: then experts with no
    LoRA key at all get a zero LoRA (recorded in metadata["filled_experts"]); an expert with only
    some of its six tensors is an error either way. The expert count is `num_experts`, else the one
    save_kt_adapter records in the adapter, else (older adapters) the highest id + 1, with a warning:
    an expert missing from every layer cannot be told from one that does not exist.

    Returns statistics: {"status": "success", "num_layers", "num_experts", "lora_rank", "lora_alpha",
    "total_keys", "ignored_keys"}. Raises NothingToConvert (writing nothing) when the adapter has no
    routed-expert LoRA, ValueError for an incomplete or inconsistent one, FileNotFoundError for a
    missing input or config."""
    config = _checked_arguments(input_path, output_path, config_path, lora_alpha, num_experts)

    with _open_adapter(str(input_path)) as f:
        weights, modules, ignored = _index(f, str(input_path))
        if verbose:
            for key in ignored:
                logger.info("ignored (not a routed-expert LoRA): %s", key)
        elif ignored:
            logger.info("ignored %d non-expert key(s) (--verbose lists them)", len(ignored))
        if not weights:
            raise NothingToConvert(
                f"{input_path} has no routed-expert LoRA keys (layers.L.mlp.experts.E.*_proj or "
                "layers.L.block_sparse_moe.experts.E.w1/w2/w3); nothing to convert"
            )
        config_rank, config_alpha = _config_rank_alpha(config, modules, lora_alpha is not None)
        result, filled, num_experts = _read_layers(
            f, str(input_path), weights, num_experts, fill_missing_experts, verbose
        )

    first, rank, hidden, inter = _layer_sizes(result, weights)
    if config_rank is not None and config_rank != rank:
        raise ValueError(
            f"adapter config says rank r={config_rank} for the experts, but the expert LoRA tensors have rank {rank}"
        )
    alpha = _alpha(lora_alpha, config_alpha)

    total_keys = sum(
        len(proj) for experts in weights.values() for expert in experts.values() for proj in expert.values()
    )
    result["metadata"] = _metadata(rank, alpha, sorted(weights), num_experts, hidden, inter, first, input_path, filled)
    # An interrupted run never leaves a truncated file where the server would look for the adapter.
    # The file object is ours so that a failed write closes it at once (torch's own writer stays
    # open for as long as the exception's traceback lives, holding the disk space).
    with atomic_file(output_path) as tmp, open(tmp, "wb") as f:
        torch.save(result, f)
    stats = {
        "status": "success",
        "num_layers": len(weights),
        "num_experts": num_experts,
        "lora_rank": int(rank),
        "lora_alpha": alpha,
        "total_keys": total_keys,
        "ignored_keys": len(ignored),
    }
    logger.info("converted %s -> %s: %s", input_path, output_path, stats)
    return stats


def convert_peft_to_kt_format(
    input_path: str, output_path: str, lora_alpha: float = DEFAULT_LORA_ALPHA, verbose: bool = False
) -> dict:
    """The converter's original entry point: like convert_moe_lora without a config, but an adapter without
    expert LoRA returns {"status": "skipped", "reason": "no_moe_keys"} instead of raising."""
    try:
        return convert_moe_lora(input_path, output_path, lora_alpha=lora_alpha, verbose=verbose)
    except NothingToConvert as e:
        logger.warning("%s", e)
        return {"status": "skipped", "reason": "no_moe_keys"}
