"""Expert LoRA as peft's own LoRA on the experts' fused parameters (`target_parameters`).

After `apply_kt`, each converted experts module keeps `gate_up_proj` / `down_proj` as zero-storage
placeholders with the original shapes, dtype and device, so peft's `target_parameters` machinery
(`lora.ParamWrapper`) wraps them exactly as on the plain transformers model: same module tree, same
adapter keys, same adapter_config. Only one step of `ParamWrapper` changes on a kt module: instead of
parametrizing the weight as W + scaling·B·A (which would build the whole expert stack), the wrapper
hands its active adapters' A / B to the experts module, whose kt forward passes them to the kernels.
peft's disable_adapter / set_adapter / delete_adapter / state dicts therefore act on the expert LoRA
unchanged.

A LoraConfig that does not target the experts gains them: the model's `peft_config` (a dict peft
itself reads and writes) adds `target_parameters` for the experts, with `apply_kt`'s `lora_rank` /
`lora_alpha` as rank/alpha patterns, whenever peft stores a config in it (get_peft_model,
add_adapter, PeftModel.from_pretrained of an adapter saved without them).
"""

from __future__ import annotations

import contextlib
import re
import types
import warnings
from typing import Optional

import torch
from torch import nn

# transformers' names of the fused expert weights (the only layout kt converts).
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def _param_wrapper_cls():
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def wrapper_chain(module: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(the innermost module, {parameter name: peft ParamWrapper}) for a possibly wrapped experts module."""
    wrappers = {}
    try:
        ParamWrapper = _param_wrapper_cls()
    except ImportError:
        return module, wrappers
    while isinstance(module, ParamWrapper):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return module, wrappers


def weights_transposed(module: nn.Module) -> bool:
    """Whether an experts module stores each expert's weights as [in, out] (computes x @ W): transformers'
    `is_transposed`, or `kt_hidden_major` (Llama-4's experts, which do so without telling peft)."""
    return bool(getattr(module, "is_transposed", False) or getattr(module, "kt_hidden_major", False))


def adapter_factors(wrapper: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [E, r, in], B [E, out, r], scaling) of one adapter of a ParamWrapper, as views of peft's
    lora_A [r·E, in] and lora_B [out, r·E] weights: the expert update is scaling·B[e]·A[e] on the
    weight as a [out, in] matrix (for transposed layouts too, where the parameter holds its transpose)."""
    E = wrapper.num_experts
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    a, b = a.reshape(E, -1, a.shape[-1]), b.reshape(b.shape[0], -1, E).permute(2, 0, 1)
    if getattr(wrapper.get_base_layer(), "kt_hidden_major", False):
        # peft takes the [E, in, out] parameter for [E, out, in] (no is_transposed), so its B·A is the
        # update of the stored [in, out] matrix: the [out, in] weight's update is Aᵀ·Bᵀ.
        a, b = b.transpose(1, 2), a.transpose(1, 2)
    return a, b, wrapper.scaling[adapter]


@contextlib.contextmanager
def _kt_activate_lora(self, active_adapters):
    # Replaces ParamWrapper._activate_lora on kt experts: publish the factors, never W + B·A.
    base = self.get_base_layer()
    adapters = [a for a in active_adapters if a in self.lora_A]
    base.kt_peft_lora[self.parameter_name] = [adapter_factors(self, a) for a in adapters]
    try:
        yield
    finally:
        base.kt_peft_lora.pop(self.parameter_name, None)


def _kt_merge(self, *args, **kwargs):
    raise NotImplementedError(
        "peft cannot merge LoRA into kt experts (their weights are packed for the kernels); "
        "kt_ops.integration.export_merged(model, directory) writes a merged transformers checkpoint instead"
    )


def install_kt_wrappers(holder: nn.Module, child: str) -> None:
    """Forward pre-hook of the module that holds an experts module as `child`: route the ParamWrappers
    peft put around it (at any time, in any order) through the kt forward."""
    _, wrappers = wrapper_chain(getattr(holder, child))
    for wrapper in wrappers.values():
        if "_activate_lora" not in wrapper.__dict__:
            wrapper._activate_lora = types.MethodType(_kt_activate_lora, wrapper)
            wrapper.merge = types.MethodType(_kt_merge, wrapper)


def _hook(child: str, holder: nn.Module, args) -> None:
    install_kt_wrappers(holder, child)


def register_holder_hook(holder: nn.Module, child: str) -> None:
    import functools

    holder.register_forward_pre_hook(functools.partial(_hook, child))


def combined_lora(module: nn.Module, kt) -> Optional[tuple[tuple[torch.Tensor, ...], int]]:
    """The six kernel LoRA tensors over all experts of `module` from the active peft adapters, scaling
    folded into B (kernel scaling 1), or None when no adapter is active. Several adapters concatenate
    along the rank; gate and up share the fused A; a projection without LoRA gets zero factors."""
    entries = getattr(module, "kt_peft_lora", None)
    if not entries or not any(entries.values()):
        return None
    E, H, I = kt.num_experts + kt.first_expert, kt.hidden_size, kt.intermediate_size

    def stack(name):
        items = entries.get(name) or []
        if not items:
            return None
        # [:E]: LongCat-Flash's gate_up_proj also has rows for its identity experts, which have no weights.
        a = torch.cat([f[0][:E] for f in items], dim=1)
        b = torch.cat([f[1][:E] * f[2] for f in items], dim=2)
        return a, b

    gate_up, down = stack("gate_up_proj"), stack("down_proj")
    like = (gate_up or down)[0]
    rank = max(x[0].shape[1] for x in (gate_up, down) if x is not None)

    def padded(pair, in_dim, out_dim):
        if pair is None:
            return like.new_zeros(E, rank, in_dim), like.new_zeros(E, out_dim, rank)
        a, b = pair
        extra = rank - a.shape[1]
        if extra:  # zero rows/columns add nothing and get no gradient through the pad
            a = nn.functional.pad(a, (0, 0, 0, extra))
            b = nn.functional.pad(b, (0, extra))
        return a, b

    gu_a, gu_b = padded(gate_up, H, 2 * I)
    d_a, d_b = padded(down, I, H)
    if not getattr(module, "is_concatenated", True):  # e.g. gpt-oss: gate and up alternate along 2I
        return (gu_a, gu_b[:, 0::2], gu_a, gu_b[:, 1::2], d_a, d_b), rank
    return (gu_a, gu_b[:, :I], gu_a, gu_b[:, I:], d_a, d_b), rank


# ----------------------------------------------------------------------------------------------------
# The config side: configs stored in the model's peft_config gain the expert targets.


def _targets_experts(config) -> bool:
    """Whether a LoraConfig already says what LoRA the experts get (then it is used as it is)."""
    params = getattr(config, "target_parameters", None) or []
    if any(p.rpartition(".")[2] in EXPERT_PARAMS for p in params):
        return True
    modules = getattr(config, "target_modules", None)
    # e.g. a per-expert adapter's regex over experts.{e}.gate_proj
    text = modules if isinstance(modules, str) else " ".join(modules or [])
    return "experts" in text


class KTPeftConfigs(dict):
    """The model's `peft_config` after `apply_kt`: a dict of adapter name -> config, as peft keeps it,
    that adds the experts to every LoRA config stored in it (see the module docstring)."""

    def __init__(self, *args, kt_targets=(), kt_rank: int = 0, kt_alpha: float = 0.0, on_lora=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kt_targets = tuple(kt_targets)  # e.g. ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
        self.kt_rank = kt_rank
        self.kt_alpha = kt_alpha
        self.on_lora = on_lora  # called once a LoRA config arrives (drops kt's own expert LoRA)

    def __setitem__(self, name, config) -> None:
        self.add_experts(config)
        super().__setitem__(name, config)

    def update(self, *args, **kwargs) -> None:
        for name, config in dict(*args, **kwargs).items():
            self[name] = config

    def setdefault(self, name, config=None):
        if name not in self:
            self[name] = config
        return self[name]

    def __deepcopy__(self, memo):
        import copy

        new = KTPeftConfigs(kt_targets=self.kt_targets, kt_rank=self.kt_rank, kt_alpha=self.kt_alpha)
        memo[id(self)] = new
        dict.update(new, {k: copy.deepcopy(v, memo) for k, v in self.items()})
        new.on_lora = copy.deepcopy(self.on_lora, memo)
        return new

    def __reduce__(self):
        return (dict, (dict(self),))

    def add_experts(self, config) -> None:
        """Make a LoraConfig target the experts too (with apply_kt's rank and alpha), once; the first
        one also drops the kt layers' own LoRA (on_lora)."""
        from peft import LoraConfig

        if not isinstance(config, LoraConfig) or not self.kt_targets:
            return
        if self.on_lora is not None:
            self.on_lora()
        if not self.kt_rank or _targets_experts(config):
            return
        if config.lora_dropout:
            raise ValueError(
                f"LoraConfig.lora_dropout={config.lora_dropout}: the expert LoRA that apply_kt(lora_rank="
                f"{self.kt_rank}) adds is peft's target_parameters LoRA, which has no dropout; use "
                "lora_dropout=0, or apply_kt(..., lora_rank=0) for LoRA outside the experts only"
            )
        config.target_parameters = list(config.target_parameters or []) + list(self.kt_targets)
        if (self.kt_rank, self.kt_alpha) != (config.r, config.lora_alpha):
            pattern = expert_pattern(self.kt_targets)
            config.rank_pattern = {**(config.rank_pattern or {}), pattern: self.kt_rank}
            config.alpha_pattern = {**(config.alpha_pattern or {}), pattern: self.kt_alpha}
            # peft 0.21 checks these patterns against targeted modules only, not target_parameters, and
            # warns that they were ignored although it applies them; silence exactly that message.
            for attr in ("rank_pattern", "alpha_pattern"):
                warnings.filterwarnings(
                    "ignore",
                    category=RuntimeWarning,
                    message=re.escape(
                        f"The following {attr} keys did not match any targeted module and were ignored: {[pattern]}."
                    ),
                )


def expert_pattern(targets) -> str:
    """A rank/alpha pattern key matching the expert parameters (peft matches it at the end of a key)."""
    holders = sorted({t.rpartition(".")[0] for t in targets})
    params = sorted({t.rpartition(".")[2] for t in targets})
    return rf"(?:{'|'.join(re.escape(h) for h in holders)})\.(?:{'|'.join(params)})"


def peft_tuner(model: nn.Module):
    """The peft LoraModel (BaseTuner) of a PeftModel, or None."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        return None
    if isinstance(model, PeftModel):
        return model.base_model
    return model if isinstance(model, BaseTuner) else None


def keep_adding_experts(tuner, hook: KTPeftConfigs) -> None:
    """Let the config store of a peft model made without apply_kt's `hook` on the model (whose
    configs already target the experts) add the experts to its later adapters, as the hook does."""
    configs = KTPeftConfigs(tuner.peft_config, kt_targets=hook.kt_targets, kt_rank=hook.kt_rank, kt_alpha=hook.kt_alpha)
    tuner.peft_config = configs
    tuner.model.peft_config = configs


def add_expert_lora_to_peft_model(tuner, kt_targets, kt_rank: int, kt_alpha: float) -> None:
    """Give every LoRA adapter of an existing peft model the expert LoRA (apply_kt after get_peft_model),
    and make its config store add them to later adapters."""
    from peft import LoraConfig

    configs = KTPeftConfigs(tuner.peft_config, kt_targets=kt_targets, kt_rank=kt_rank, kt_alpha=kt_alpha)
    for name, config in configs.items():
        if not isinstance(config, LoraConfig) or _targets_experts(config) or not kt_rank:
            continue
        configs.add_experts(config)
        expert_only = LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=[],
            target_parameters=list(kt_targets),
            rank_pattern=dict(config.rank_pattern or {}),
            alpha_pattern=dict(config.alpha_pattern or {}),
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            inference_mode=config.inference_mode,
        )
        tuner._inject_parameters(peft_config=expert_only, model=tuner.model, adapter_name=name, low_cpu_mem_usage=False)
        # as get_peft_model does by default: bf16 / fp16 adapter weights train in fp32
        tuner._cast_adapter_dtype(adapter_name=name, autocast_adapter_dtype=True)
    tuner.peft_config = configs
    tuner.model.peft_config = configs
    # New wrappers start with their own adapter active and trainable; follow the model's state.
    active = tuner.active_adapters
    inference = all(getattr(configs[a], "inference_mode", False) for a in active if a in configs)
    for module in tuner.model.modules():
        _, wrappers = wrapper_chain(module)
        for wrapper in wrappers.values():
            wrapper.set_adapter(active, inference_mode=inference)
