"""The per-expert adapter layout, for tools that read adapters of the original (unfused) checkpoint
layout such as `kt_ops.convert_moe_lora`. A peft model's own `save_pretrained` writes peft's fused
`target_parameters` layout instead, which is the one to share: stock peft 0.21 reads this per-expert
layout only into per-expert modules (its conversion onto transformers v5's fused experts does not
reproduce the adapter), `load_kt_adapter` reads it into a kt model exactly.

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
import warnings
from typing import Optional

import torch
from torch import nn

from ..core.durable import atomic_files, recover
from ..weights.moe_lora import NUM_EXPERTS_METADATA
from .install import holder_of, kt_experts_modules
from .peft_lora import EXPERT_PARAMS, adapter_factors, wrapper_chain

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# Checkpoint layouts that differ from the module tree: model_type -> (block holding the experts,
# gate / up / down projection names). Other models keep their own block name and gate_proj/up_proj/down_proj.
_CHECKPOINT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
_DEFAULT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# KTExperts parameter (A, B) per projection; A is [E, r, in], B is [E, out, r] as in peft's Linear.
_KT_PARAMS = (("gate_lora_a", "gate_lora_b"), ("up_lora_a", "up_lora_b"), ("down_lora_a", "down_lora_b"))
_GATE, _UP, _DOWN = 0, 1, 2


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


# peft's names of the layers it saves whole when LoRA targets them (peft.utils.other.EMBEDDING_LAYER_NAMES)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def embedding_layers_to_save(model: nn.Module):
    """What to pass as peft's `save_embedding_layers`: True when the active LoRA config names an
    embedding layer in target_modules (peft's "auto" does the same, with a warning that it did),
    else "auto" (peft then saves them when the vocabulary was resized)."""
    config = model.peft_config[model.active_adapter]
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (list, set, tuple)) and any(name in targets for name in EMBEDDING_LAYER_NAMES):
        return True
    return "auto"


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
    if not is_peft_model(model):
        name = "base_model.model." + name
    parent, _, leaf = name.rpartition(".")
    holder = parent.rpartition(".")[0]
    return f"{holder}.{block}.{leaf}" if holder else f"{block}.{leaf}"


class _ExpertLoRA:
    """Per-expert gate / up / down LoRA of one experts module, wherever it lives: the kt layer's own
    parameters, or one peft adapter on the fused parameters (gate and up share the fused A)."""

    def __init__(self, model: nn.Module, name: str, module: nn.Module, kt, adapter: Optional[str]):
        self.kt, self.module = kt, module
        self.interleaved = not getattr(module, "is_concatenated", True)
        holder_name, child = holder_of(name)
        _, wrappers = wrapper_chain(getattr(model.get_submodule(holder_name), child))
        self.wrappers = {p: w for p, w in wrappers.items() if adapter in w.lora_A}
        self.adapter = adapter
        if self.wrappers:
            settings = _wrapper_settings(self.wrappers, adapter)
            if len(settings) > 1:
                raise ValueError(
                    f"{name}: adapter {adapter!r} uses different (r, lora_alpha) {sorted(settings)} on "
                    "gate_up_proj and down_proj; the per-expert layout describes one; save with "
                    "model.save_pretrained instead"
                )
            self.rank, self.alpha = settings.pop()
            self.experts = range(kt.first_expert + kt.num_experts)
        else:
            self.rank, self.alpha = kt.lora_rank, kt.lora_alpha
            self.experts = range(kt.first_expert, kt.first_expert + kt.num_experts) if kt.lora_rank else range(0)
        self.projections = [
            i
            for i, p in ((_GATE, "gate_up_proj"), (_UP, "gate_up_proj"), (_DOWN, "down_proj"))
            if not self.wrappers or p in self.wrappers
        ]

    def read(self, expert: int, proj: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of one expert's projection."""
        if not self.wrappers:
            a_name, b_name = _KT_PARAMS[proj]
            local = expert - self.kt.first_expert
            return getattr(self.kt, a_name)[local], getattr(self.kt, b_name)[local]
        A, B, _ = adapter_factors(self.wrappers["down_proj" if proj == _DOWN else "gate_up_proj"], self.adapter)
        if proj == _DOWN:
            return A[expert], B[expert]
        I = self.kt.intermediate_size
        if self.interleaved:  # gate and up rows alternate (gpt-oss)
            return A[expert], B[expert, 0::2] if proj == _GATE else B[expert, 1::2]
        return A[expert], B[expert, :I] if proj == _GATE else B[expert, I:]

    @torch.no_grad()
    def write(self, expert: int, values: dict[int, tuple[torch.Tensor, torch.Tensor]], where: str) -> None:
        """Set one expert's LoRA from {projection: (A, B)} exactly (gate and up of one fused adapter must
        share A, or use a fused rank twice theirs: then they are stacked block-diagonally, as peft does)."""
        if not self.wrappers:
            for proj, (a, b) in values.items():
                self._copy(getattr(self.kt, _KT_PARAMS[proj][0])[expert - self.kt.first_expert], a, where)
                self._copy(getattr(self.kt, _KT_PARAMS[proj][1])[expert - self.kt.first_expert], b, where)
            return
        if _DOWN in values:
            self._write_fused("down_proj", expert, *values[_DOWN], where)
        if _GATE in values or _UP in values:
            if _GATE not in values or _UP not in values:
                raise ValueError(f"{where}: gate and up LoRA must both be present for the fused gate_up_proj")
            (ga, gb), (ua, ub) = values[_GATE], values[_UP]
            if torch.equal(ga, ua):
                a, gate_rows, up_rows = ga, gb, ub
            else:
                a = torch.cat([ga, ua], dim=0)
                gate_rows, up_rows = torch.block_diag(gb, ub).chunk(2, dim=0)
            if self.interleaved:  # gate and up rows alternate (gpt-oss)
                b = torch.stack([gate_rows, up_rows], dim=1).flatten(0, 1)
            else:
                b = torch.cat([gate_rows, up_rows], dim=0)
            self._write_fused("gate_up_proj", expert, a, b, where)

    def _write_fused(self, param: str, expert: int, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
        wrapper = self.wrappers[param]
        A, B, _ = adapter_factors(wrapper, self.adapter)
        self._copy(A[expert], a, where)
        self._copy(B[expert], b, where)

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, where: str) -> None:
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"{where}: shape {tuple(src.shape)} in the adapter, the model needs {tuple(dst.shape)} "
                "(LoRA rank / model size differ)"
            )
        dst.copy_(src.to(dst.dtype))


def _wrapper_settings(wrappers: dict, adapter: Optional[str]) -> set:
    return {(w.r[adapter], w.lora_alpha[adapter]) for w in wrappers.values() if adapter in w.lora_A}


def per_expert_layout_fits(model: nn.Module) -> bool:
    """Whether save_kt_adapter's per-expert layout can describe the model's expert LoRA: one (r,
    lora_alpha) on gate_up_proj and down_proj. Not so when a LoraConfig names the v4 expert projections
    (gate_proj / up_proj / down_proj, e.g. LLaMA-Factory's lora_target all): peft then gives the fused
    gate_up_proj twice the rank; model.save_pretrained (peft's own layout) holds that."""
    adapter = model.active_adapter if is_peft_model(model) else None
    for name, _, _ in kt_experts_modules(model):
        holder_name, child = holder_of(name)
        _, wrappers = wrapper_chain(getattr(model.get_submodule(holder_name), child))
        if len(_wrapper_settings(wrappers, adapter)) > 1:
            return False
    return True


def _expert_loras(model: nn.Module, adapter: Optional[str]) -> list[tuple[str, nn.Module, _ExpertLoRA]]:
    modules = kt_experts_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no kt experts; call kt_ops.integration.apply_kt(model) first")
    return [(name, module, _ExpertLoRA(model, name, module, kt, adapter)) for name, module, kt in modules]


def _expert_keys(model: nn.Module, adapter: Optional[str]) -> dict[str, tuple[_ExpertLoRA, int, int, str]]:
    """Adapter key -> (expert LoRA, expert, projection, "A" or "B") for every per-expert LoRA tensor."""
    keys = {}
    for name, module, lora in _expert_loras(model, adapter):
        plain = name.replace(".base_layer", "")  # peft's wrappers are not part of the checkpoint naming
        prefix = _expert_prefix(model, plain, module)
        _, projections = _checkpoint_names(plain, module)
        for expert in lora.experts:
            for proj in lora.projections:
                for part in ("A", "B"):
                    keys[f"{prefix}.{expert}.{projections[proj]}.lora_{part}.weight"] = (lora, expert, proj, part)
    return keys


def _lora_settings(model: nn.Module, adapter: Optional[str]) -> tuple[int, float]:
    settings = {(lora.rank, lora.alpha) for _, _, lora in _expert_loras(model, adapter) if lora.experts}
    if not settings:
        raise ValueError(
            "the model's kt experts have no LoRA (apply_kt was called with lora_rank=0 and no peft "
            "adapter targets the experts)"
        )
    if len(settings) > 1:
        raise ValueError(
            f"kt experts use several (lora_rank, lora_alpha) settings {sorted(settings)}; "
            "one adapter config cannot describe them"
        )
    return settings.pop()


def _expert_target_regex(model: nn.Module) -> str:
    parts = set()
    for name, module, _ in kt_experts_modules(model):
        block, projections = _checkpoint_names(name.replace(".base_layer", ""), module)
        parts.add(rf".*\.{re.escape(block)}\.experts\.\d+\.(?:{'|'.join(projections)})")
    return "|".join(sorted(parts))


def _is_fused_expert_key(key: str) -> bool:
    # peft's keys of a ParamWrapper on the experts: "...experts.lora_A.weight", "...experts.base_layer.lora_B.weight"
    return bool(re.search(r"\.experts\.(?:base_layer\.)*lora_[AB]\.", key))


def _adapter_config(model: nn.Module, adapter: Optional[str]) -> dict:
    from peft import LoraConfig

    rank, alpha = _lora_settings(model, adapter)
    experts_regex = _expert_target_regex(model)
    if is_peft_model(model):
        config = model.peft_config[adapter]
        if not isinstance(config, LoraConfig):
            raise TypeError(f"save_kt_adapter supports LoRA adapters, the model has a {type(config).__name__}")
        data = config.to_dict()
        # The experts are described per expert here, not through peft's fused target_parameters.
        data["target_parameters"] = [
            t for t in (config.target_parameters or []) if t.rpartition(".")[2] not in EXPERT_PARAMS
        ] or None
        expert_keys = [k for k in (config.rank_pattern or {}) if any(p in k for p in EXPERT_PARAMS)]
        rank_pattern = {k: v for k, v in (config.rank_pattern or {}).items() if k not in expert_keys}
        alpha_pattern = {k: v for k, v in (config.alpha_pattern or {}).items() if k not in expert_keys}
        targets = config.target_modules
        if isinstance(targets, str):
            other = targets
        else:
            other = rf".*\.(?:{'|'.join(re.escape(t) for t in sorted(targets))})" if targets else None
        data["target_modules"] = f"(?:{other})|(?:{experts_regex})" if other else experts_regex
        if (rank, alpha) != (config.r, config.lora_alpha):
            # peft resolves per-module r / alpha through these patterns (matched at the end of a module name).
            rank_pattern[experts_regex] = rank
            alpha_pattern[experts_regex] = alpha
        data["rank_pattern"], data["alpha_pattern"] = rank_pattern, alpha_pattern
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


def _is_per_expert_key(key: str) -> bool:
    return bool(re.search(r"\.experts\.\d+\.", key))


def _wrap_for(model: nn.Module, directory: str, state: dict) -> nn.Module:
    """`peft.get_peft_model(model, saved config)` for the adapter's non-expert LoRA modules (the experts
    join through apply_kt's config store)."""
    import peft

    config_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory} to wrap the model with")
    with open(config_path) as f:
        data = json.load(f)
    modules = sorted(
        {
            re.sub(r"^base_model\.model\.", "", k.split(".lora_")[0])
            for k in state
            if not _is_per_expert_key(k) and ".lora_" in k
        }
    )
    if not modules:
        raise ValueError(f"{directory}: {len(state)} tensors are neither per-expert LoRA nor peft LoRA keys")
    data["target_modules"] = modules
    experts = [k for k in data.get("rank_pattern") or {} if "experts" in k]
    for key in ("rank_pattern", "alpha_pattern"):
        data[key] = {k: v for k, v in (data.get(key) or {}).items() if k not in experts}
    data["inference_mode"] = False
    config = peft.LoraConfig.from_peft_type(**data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        return peft.get_peft_model(model, config)


def save_kt_adapter(model: nn.Module, save_directory: str) -> None:
    """Write `adapter_model.safetensors` + `adapter_config.json` to `save_directory` in the per-expert
    layout: the expert LoRA (the kt layers' own, or the active peft adapter's) per expert in the
    model's checkpoint naming, plus the rest of a `PeftModel`'s LoRA (e.g. attention). Optional:
    `model.save_pretrained` writes peft's fused layout, which needs nothing from kt_ops to load."""
    from safetensors.torch import save_file

    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
    tensors = {}
    adapter = model.active_adapter if is_peft_model(model) else None
    if adapter is not None:
        from peft import get_peft_model_state_dict

        tensors.update(
            {
                k: v.detach().cpu().contiguous()
                for k, v in get_peft_model_state_dict(
                    model, save_embedding_layers=embedding_layers_to_save(model)
                ).items()
                if not _is_fused_expert_key(k)
            }
        )
    for key, (lora, expert, proj, part) in _expert_keys(model, adapter).items():
        # clone: gate and up share the fused A, and safetensors refuses tensors sharing memory (or
        # strided views: Llama-4's factors are transposes of peft's)
        tensors[key] = (
            lora.read(expert, proj)[0 if part == "A" else 1].detach().cpu().clone(memory_format=torch.contiguous_format)
        )
    config = _adapter_config(model, adapter)
    # The expert count lets convert_moe_lora tell an expert without LoRA from one that does not exist.
    counts = {kt.first_expert + kt.num_experts for _, _, kt in kt_experts_modules(model)}
    metadata = {"format": "pt"}
    if len(counts) == 1:
        metadata[NUM_EXPERTS_METADATA] = str(counts.pop())
    # Both files switch as one set: weights and config of two different saves never meet.
    with atomic_files(save_directory) as staging:
        save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS), metadata=metadata)
        with open(os.path.join(staging, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def load_kt_adapter(model: nn.Module, adapter_directory: str, adapter_name: Optional[str] = None) -> nn.Module:
    """Load an adapter into a model converted with `apply_kt`, in place: per-expert keys (what
    `save_kt_adapter` writes) go into the expert LoRA (the kt layers' own, or peft adapter
    `adapter_name`, default the active one); the rest (peft's keys, including its fused expert layout)
    through `peft.set_peft_model_state_dict`. Every expert LoRA tensor the model has must be present
    with its exact shape; values are copied exactly. A model without peft whose adapter also holds
    other LoRA (attention) is first wrapped by `peft.get_peft_model` with the saved config for those
    modules; the wrapped model is returned (else `model` itself). For peft's own layout
    `peft.PeftModel.from_pretrained(apply_kt(base_model), directory)` is the stock call."""
    from safetensors.torch import load_file

    recover(os.fspath(adapter_directory))  # completes a save that a kill interrupted
    path = os.path.join(os.fspath(adapter_directory), ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter_directory}")
    try:
        state = load_file(path)
    except Exception as e:  # safetensors' own error type for a truncated or corrupt file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    for key, value in state.items():
        if not value.is_floating_point():
            raise ValueError(f"{path}: {key} is {value.dtype}; LoRA weights must be floating point")
    if not is_peft_model(model) and any(not _is_per_expert_key(k) for k in state):
        model = _wrap_for(model, os.fspath(adapter_directory), state)
    adapter = (adapter_name or model.active_adapter) if is_peft_model(model) else None
    expected = _expert_keys(model, adapter)
    per_expert = [k for k in expected if k in state]
    grouped: dict = {}
    if per_expert or not is_peft_model(model):
        missing = sorted(set(expected) - set(state))
        if missing:
            raise KeyError(f"{path} lacks {len(missing)} expert LoRA tensors the model needs, e.g. {missing[:3]}")
        for key, (lora, expert, proj, part) in expected.items():
            entry = grouped.setdefault((id(lora), expert), (lora, {}, []))
            entry[1].setdefault(proj, {})[part] = state.pop(key)
            entry[2].append(key)
    if state and not is_peft_model(model):
        raise ValueError(
            f"{path} also holds {len(state)} non-expert LoRA tensors (e.g. {next(iter(state))}); "
            "load it with peft.PeftModel.from_pretrained(model, directory)"
        )
    # A shape error can surface in the middle of the copies (or in peft's own load): every LoRA
    # tensor is put back then, so a failed load leaves the model as it was.
    backup = [(param, param.detach().clone()) for name, param in model.named_parameters() if "lora" in name]
    try:
        for (_, expert), (lora, projs, keys) in grouped.items():
            lora.write(expert, {p: (v["A"], v["B"]) for p, v in projs.items()}, f"{path} ({', '.join(keys)})")
        if state:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, state, adapter_name=adapter)
            unexpected = getattr(result, "unexpected_keys", None) or []
            if unexpected:
                raise ValueError(
                    f"{path}: {len(unexpected)} tensors match no LoRA module of the model, e.g. {unexpected[:3]}"
                )
    except BaseException:
        with torch.no_grad():
            for param, saved in backup:
                param.copy_(saved)
        raise
    return model
