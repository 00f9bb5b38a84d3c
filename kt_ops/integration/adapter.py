"""One standard PEFT LoRA adapter directory for a model whose routed experts run on kt_ops.

The expert LoRA is written per expert under the keys a peft LoRA on the unfused (checkpoint-layout)
experts would have, e.g. `base_model.model.model.layers.3.mlp.experts.5.gate_proj.lora_A.weight`
([r, H]) and `...lora_B.weight` ([I, r]); Mixtral uses `block_sparse_moe.experts.{E}.w1/w3/w2`. Any
peft LoRA on other modules (attention) is saved beside it, so the directory loads in tools that read
peft adapters for the original checkpoint layout.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch
from torch import nn

from ..convert_moe_lora import NUM_EXPERTS_METADATA
from .hf import KTExperts, kt_experts_modules

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# Checkpoint layouts that differ from the module tree: model_type -> (block holding the experts,
# gate / up / down projection names). Other models keep their own block name and gate_proj/up_proj/down_proj.
_CHECKPOINT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
_DEFAULT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# KTExperts parameter (A, B) per projection; A is [E, r, in], B is [E, out, r] as in peft's Linear.
_KT_PARAMS = (("gate_lora_a", "gate_lora_b"), ("up_lora_a", "up_lora_b"), ("down_lora_a", "down_lora_b"))


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _checkpoint_names(name: str, experts_module: nn.Module) -> tuple[str, tuple[str, str, str]]:
    """(block, projections) of the unfused experts for the experts module called `name`."""
    model_type = getattr(getattr(experts_module, "config", None), "model_type", None)
    if model_type in _CHECKPOINT_NAMES:
        return _CHECKPOINT_NAMES[model_type]
    parent = name.rpartition(".")[0]
    return parent.rpartition(".")[2], _DEFAULT_PROJECTIONS


def _expert_prefix(model: nn.Module, name: str, experts_module: nn.Module) -> str:
    """Key prefix of the unfused experts (`...layers.L.mlp.experts`) in peft's saved-adapter naming."""
    block, _ = _checkpoint_names(name, experts_module)
    if not _is_peft_model(model):
        name = "base_model.model." + name
    parent, _, leaf = name.rpartition(".")
    holder = parent.rpartition(".")[0]
    return f"{holder}.{block}.{leaf}" if holder else f"{block}.{leaf}"


def _expert_tensors(model: nn.Module) -> dict[str, tuple[KTExperts, str, int]]:
    """Adapter key -> (KTExperts, parameter name, local expert index) for every expert LoRA tensor."""
    keys = {}
    modules = kt_experts_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no kt experts; call kt_ops.integration.apply_kt(model) first")
    for name, module, kt in modules:
        if not kt.lora_rank:
            continue
        prefix = _expert_prefix(model, name, module)
        _, projections = _checkpoint_names(name, module)
        for local in range(kt.num_experts):
            expert = kt.first_expert + local
            for proj, (a_name, b_name) in zip(projections, _KT_PARAMS):
                keys[f"{prefix}.{expert}.{proj}.lora_A.weight"] = (kt, a_name, local)
                keys[f"{prefix}.{expert}.{proj}.lora_B.weight"] = (kt, b_name, local)
    return keys


def _kt_lora_settings(model: nn.Module) -> tuple[int, float]:
    settings = {(kt.lora_rank, kt.lora_alpha) for _, _, kt in kt_experts_modules(model) if kt.lora_rank}
    if not settings:
        raise ValueError("the model's kt experts have no LoRA (apply_kt was called with lora_rank=0)")
    if len(settings) > 1:
        raise ValueError(f"kt experts use several (lora_rank, lora_alpha) settings {sorted(settings)}; "
                         "one adapter config cannot describe them")
    return settings.pop()


def _expert_target_regex(model: nn.Module) -> str:
    parts = set()
    for name, module, _ in kt_experts_modules(model):
        block, projections = _checkpoint_names(name, module)
        parts.add(rf".*\.{re.escape(block)}\.experts\.\d+\.(?:{'|'.join(projections)})")
    return "|".join(sorted(parts))


def _adapter_config(model: nn.Module) -> dict:
    from peft import LoraConfig

    rank, alpha = _kt_lora_settings(model)
    experts_regex = _expert_target_regex(model)
    if _is_peft_model(model):
        config = model.peft_config[model.active_adapter]
        if not isinstance(config, LoraConfig):
            raise TypeError(f"save_kt_adapter supports LoRA adapters, the model has a {type(config).__name__}")
        data = config.to_dict()
        targets = config.target_modules
        if isinstance(targets, str):
            other = targets
        else:
            other = rf".*\.(?:{'|'.join(re.escape(t) for t in sorted(targets))})" if targets else None
        data["target_modules"] = f"(?:{other})|(?:{experts_regex})" if other else experts_regex
        if (rank, alpha) != (config.r, config.lora_alpha):
            # peft resolves per-module r / alpha through these patterns (matched at the end of a module name).
            data["rank_pattern"] = {**(config.rank_pattern or {}), experts_regex: rank}
            data["alpha_pattern"] = {**(config.alpha_pattern or {}), experts_regex: alpha}
    else:
        data = LoraConfig(r=rank, lora_alpha=alpha, target_modules=experts_regex, task_type="CAUSAL_LM").to_dict()
        data["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    data["inference_mode"] = True  # as peft writes it: a saved adapter loads frozen unless asked otherwise
    for key, value in list(data.items()):
        if isinstance(value, set):
            data[key] = sorted(value)
        elif hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums
            data[key] = value.value
    return data


def save_kt_adapter(model: nn.Module, save_directory: str) -> None:
    """Write `adapter_model.safetensors` + `adapter_config.json` to `save_directory`: the kt expert LoRA
    per expert in the model's checkpoint naming, plus the peft LoRA of a `PeftModel` (e.g. attention)."""
    from safetensors.torch import save_file

    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
    tensors = {}
    if _is_peft_model(model):
        from peft import get_peft_model_state_dict

        tensors.update({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()})
    for key, (kt, param_name, local) in _expert_tensors(model).items():
        tensors[key] = getattr(kt, param_name).detach()[local].cpu().contiguous()
    config = _adapter_config(model)
    # The expert count lets convert_moe_lora tell an expert without LoRA from one that does not exist.
    counts = {kt.first_expert + kt.num_experts for _, _, kt in kt_experts_modules(model) if kt.lora_rank}
    metadata = {"format": "pt"}
    if len(counts) == 1:
        metadata[NUM_EXPERTS_METADATA] = str(counts.pop())
    os.makedirs(save_directory, exist_ok=True)
    save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS), metadata=metadata)
    with open(os.path.join(save_directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_kt_adapter(model: nn.Module, adapter_directory: str, adapter_name: Optional[str] = None) -> nn.Module:
    """Load what `save_kt_adapter` wrote into a model converted with the same `apply_kt` settings (and,
    when the adapter holds non-expert LoRA, wrapped by `get_peft_model` with the same LoRA config).
    Every expert LoRA tensor must be present with its exact shape; values are copied exactly."""
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(adapter_directory), ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter_directory}")
    try:
        state = load_file(path)
    except Exception as e:  # safetensors' own error type for a truncated or corrupt file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    expected = _expert_tensors(model)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KeyError(f"{path} lacks {len(missing)} expert LoRA tensors the model needs, e.g. {missing[:3]}")
    # Every check runs before the first parameter changes, and a failure in peft's own load puts the
    # expert LoRA back: a failed load leaves the model as it was.
    for key, (kt, param_name, local) in expected.items():
        param, value = getattr(kt, param_name), state[key]
        if tuple(value.shape) != tuple(param.shape[1:]):
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} in the adapter, the model needs "
                             f"{tuple(param.shape[1:])} (lora_rank / model size differ)")
        if not value.is_floating_point():
            raise ValueError(f"{path}: {key} is {value.dtype}; LoRA weights must be floating point")
    rest = {key: value for key, value in state.items() if key not in expected}
    if rest and not _is_peft_model(model):
        raise ValueError(f"{path} also holds {len(rest)} non-expert LoRA tensors (e.g. {next(iter(rest))}); "
                         "wrap the model with peft.get_peft_model using the saved adapter_config.json first")
    backup = [(param, param.detach().clone()) for name, param in model.named_parameters() if "lora" in name]
    try:
        with torch.no_grad():
            for key, (kt, param_name, local) in expected.items():
                getattr(kt, param_name)[local].copy_(state[key])
        if rest:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, rest, adapter_name=adapter_name or model.active_adapter)
            unexpected = getattr(result, "unexpected_keys", None) or []
            if unexpected:
                raise ValueError(f"{path}: {len(unexpected)} tensors match no LoRA module of the model, "
                                 f"e.g. {unexpected[:3]}")
    except BaseException:
        with torch.no_grad():
            for param, saved in backup:
                param.copy_(saved)
        raise
    return model
