"""The routed experts' trainable tensors under kt_ops.sft (`kt_kernel.sft.lora`): PEFT's LoRA on the
expert Linear layers, or the layer's own fused LoRA (transformers v5's fused experts, which PEFT
cannot reach per expert), handed to the CPU backend by reference; the base-weight Parameters of full
fine-tuning; naming them for the optimizer; and saving / restoring what PEFT does not save.

The backend writes every gradient itself (kt_ops.wrappers.sft_state): a PEFT LoRA weight becomes a
view into one contiguous tensor per kind, whose gradient is the matching view of the backend's
gradient buffer, so an optimizer step on the PEFT weights is a step on what the kernels read.
"""

from __future__ import annotations

import logging
import math
import os  # noqa: F401  (kt-kernel's tests patch os.replace through this module)
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..core.formats import LORA_NAMES
from .arch import MOEArchConfig, find_kt_wrappers
from .dist_utils import distributed_rank_world_size
from .lora_files import (
    load_fused_expert_lora,
    load_kt_moe_from_adapter,
    load_lora_experts_from_adapter,
    save_fused_expert_lora,
    save_kt_moe_to_adapter,
    save_lora_experts_to_adapter,
)
from .weights import get_kt_expert_placeholders

logger = logging.getLogger(__name__)

# kt-kernel's names: its tests patch the rank lookup here, and import the file helpers from here
_distributed_rank_world_size = distributed_rank_world_size
_save_fused_expert_lora = save_fused_expert_lora
_load_fused_expert_lora = load_fused_expert_lora

__all__ = [
    "KTAdaptationResult",
    "LoRAExpertMLP",
    "LoRAExperts",
    "adapt_peft_lora",
    "get_kt_lora_named_params",
    "get_kt_lora_params",
    "get_kt_named_trainable_params",
    "get_kt_rank_local_parameter_names",
    "get_kt_trainable_params",
    "kt_adapt_peft_lora",
    "load_kt_moe_from_adapter",
    "load_lora_experts_from_adapter",
    "save_kt_moe_to_adapter",
    "save_lora_experts_to_adapter",
    "sync_kt_lora_gradients",
    "update_kt_lora_pointers",
]


@dataclass(frozen=True)
class KTAdaptationResult:
    """What kt_adapt_peft_lora did: layers adapted now and before, the optimizer's parameters with
    stable names, and the expert placeholders (their names are rank-local, outside FSDP)."""

    adapted_layers: int
    already_adapted_layers: int
    named_optimizer_parameters: Tuple[Tuple[str, nn.Parameter], ...]
    placeholders: Tuple[Tuple[str, nn.Parameter], ...]
    placeholder_names: Tuple[str, ...]


class LoRAExpertMLP(nn.Module):
    """A small trainable SwiGLU expert on the GPU beside the routed ones (kt-kernel's LoRA experts);
    its down projection starts at zero, so it adds nothing before training."""

    def __init__(self, hidden_size: int, intermediate_size: int, device="cuda", dtype=torch.bfloat16):
        super().__init__()
        self.le_gate = nn.Linear(hidden_size, intermediate_size, bias=False, device=device, dtype=dtype)
        self.le_up = nn.Linear(hidden_size, intermediate_size, bias=False, device=device, dtype=dtype)
        self.le_down = nn.Linear(intermediate_size, hidden_size, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.le_down.weight)
        nn.init.kaiming_uniform_(self.le_gate.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.le_up.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.le_down(nn.functional.silu(self.le_gate(x)) * self.le_up(x))


class LoRAExperts(nn.Module):
    """The mean of `num_experts` LoRAExpertMLPs, applied to every token."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, device="cuda", dtype=torch.bfloat16):
        super().__init__()
        self.experts = nn.ModuleList(
            [LoRAExpertMLP(hidden_size, intermediate_size, device, dtype) for _ in range(num_experts)]
        )
        self.num_experts = num_experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return sum(expert(hidden_states) for expert in self.experts) / self.num_experts


# ---- finding the trainable tensors -----------------------------------------------------------------


def _managed_lora_params(wrapper) -> List[nn.Parameter]:
    params = []
    for loras in (getattr(wrapper, "_peft_lora_modules", None) or {}).values():
        for lora_a, lora_b in loras.values():
            params.extend(m.weight for m in (lora_a, lora_b) if getattr(m.weight, "requires_grad", False))
    params.extend(getattr(wrapper, "_fused_expert_lora_params", None) or ())
    return params


def _lora_params(wrappers) -> List[nn.Parameter]:
    params = []
    for wrapper in wrappers or ():
        params.extend(_managed_lora_params(wrapper))
        if getattr(wrapper, "lora_experts", None) is not None:
            params.extend(wrapper.lora_experts.parameters())
    return params


def _full_weight_params(wrappers) -> List[nn.Parameter]:
    params = []
    for wrapper in wrappers or ():
        backend = getattr(wrapper, "wrapper", None)
        if getattr(wrapper, "_full_weight_grad", False) and backend is not None:
            params.extend(
                p for p in (backend.gate_proj_buf, backend.up_proj_buf, backend.down_proj_buf) if p is not None
            )
    return params


def get_kt_trainable_params(model) -> List[nn.Parameter]:
    """Every KT-managed trainable Parameter: the base weights of full / hybrid fine-tuning, then the
    LoRA (PEFT's on the experts, the fused LoRA, the LoRA experts)."""
    wrappers = find_kt_wrappers(model)
    if not wrappers:
        return []
    full = any(getattr(w, "_full_weight_grad", False) for w in wrappers)
    return (_full_weight_params(wrappers) if full else []) + _lora_params(wrappers)


get_kt_lora_params = get_kt_trainable_params  # kt-kernel's older name, which includes base weights in full mode


def get_kt_named_trainable_params(model) -> List[Tuple[str, nn.Parameter]]:
    """get_kt_trainable_params with a unique stable name each: the model's own name for registered
    ones, `kt.layers.{L}.experts.base.{proj}` / `kt.layers.{L}.experts.fused_lora.{name}` for the
    ones the backend owns outside the module tree."""
    wrappers = find_kt_wrappers(model) or []
    if not wrappers:
        return []
    registered: Dict[int, str] = {}
    if isinstance(model, nn.Module):
        for name, parameter in model.named_parameters(remove_duplicate=False):
            registered.setdefault(id(parameter), name)
    owned: Dict[int, str] = {}
    for wrapper in wrappers:
        layer_idx = getattr(wrapper, "layer_idx", None)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise RuntimeError(f"KT wrapper has an invalid layer index {layer_idx!r}")
        prefix = f"kt.layers.{layer_idx}.experts"
        backend = getattr(wrapper, "wrapper", None)
        if getattr(wrapper, "_full_weight_grad", False) and backend is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                parameter = getattr(backend, f"{proj}_buf", None)
                if isinstance(parameter, nn.Parameter):
                    owned[id(parameter)] = f"{prefix}.base.{proj}"
        fused = getattr(wrapper, "_fused_expert_lora_params", None) or ()
        if len(fused) not in (0, len(LORA_NAMES)):
            raise RuntimeError(f"Layer {layer_idx}: expected six fused LoRA parameters, got {len(fused)}")
        owned.update((id(p), f"{prefix}.fused_lora.{name}") for name, p in zip(LORA_NAMES, fused))
    result, names, seen = [], set(), set()
    for parameter in get_kt_trainable_params(model):
        if id(parameter) in seen:
            continue
        name = registered.get(id(parameter)) or owned.get(id(parameter))
        if name is None:
            raise RuntimeError("KT optimizer parameter has no stable registered or owned name")
        if name in names:
            raise RuntimeError(f"KT optimizer parameter name is not unique: {name}")
        seen.add(id(parameter))
        names.add(name)
        result.append((name, parameter))
    return result


get_kt_lora_named_params = get_kt_named_trainable_params  # kt-kernel's other spelling


def get_kt_rank_local_parameter_names(model) -> Tuple[str, ...]:
    """The expert placeholders' names (rank-local: outside FSDP's sharding)."""
    return tuple(sorted(get_kt_expert_placeholders(model)))


# ---- adaptation: the LoRA, by reference, into the backend ------------------------------------------


def _adaptation_result(model, adapted: int, already: int) -> KTAdaptationResult:
    placeholders = get_kt_expert_placeholders(model) if isinstance(model, nn.Module) else {}
    names = tuple(sorted(placeholders))
    return KTAdaptationResult(
        adapted_layers=adapted,
        already_adapted_layers=already,
        named_optimizer_parameters=tuple(get_kt_named_trainable_params(model)),
        placeholders=tuple((name, placeholders[name]) for name in names),
        placeholder_names=names,
    )


def kt_adapt_peft_lora(model) -> KTAdaptationResult:
    """Hand each KT layer's expert LoRA to its backend (rank 0 owns the backends): the layer's own
    fused LoRA (fused experts, or kt_force_fused_expert_lora), created here, or PEFT's LoRA on the
    expert Linear layers, made views of contiguous tensors. Then the experts' base weights become
    empty placeholders. Call after PEFT injected its LoRA and before the optimizer is made; a layer
    already adapted is left as it is."""
    wrappers = find_kt_wrappers(model)
    if not wrappers:
        return _adaptation_result(model, 0, 0)
    rank0 = _distributed_rank_world_size()[0] == 0
    adapted = already = 0
    for wrapper in wrappers:
        if getattr(wrapper, "_kt_peft_lora_adapted", False):
            already += 1
            continue
        experts = getattr(wrapper, getattr(wrapper, "_experts_attr", "experts"), None)
        if experts is None:
            continue
        if getattr(wrapper, "_use_fused_expert_lora", False) or getattr(wrapper, "_fused_experts", False):
            _adapt_fused(wrapper, rank0)
        elif len(experts) == 0:
            continue
        else:
            _adapt_peft(wrapper, experts, rank0)
        wrapper._kt_peft_lora_adapted = True
        adapted += 1
    for wrapper in wrappers:
        _empty_expert_placeholders(wrapper)
    result = _adaptation_result(model, adapted, already)
    model._kt_peft_lora_adaptation_result = result
    return result


adapt_peft_lora = kt_adapt_peft_lora


def _adapt_fused(wrapper, rank0: bool) -> None:
    rank = getattr(wrapper, "_lora_rank", 1)
    wrapper._peft_lora_modules = None
    if rank == 0:  # full fine-tuning: no LoRA at all
        wrapper._fused_expert_lora_params = []
        return
    wrapper._kt_managed_lora_enabled = True
    authoritative = bool(getattr(wrapper, "_uses_authoritative_optimizer_grads", False))
    if authoritative and not rank0:
        # ranks other than 0 keep the mode (for the collectives) but own no parameter
        wrapper._fused_expert_lora_params = []
        return
    E, I, H = wrapper.moe_config.expert_num, wrapper.moe_config.intermediate_size, wrapper.hidden_size
    shapes = ((E, rank, H), (E, I, rank), (E, rank, H), (E, I, rank), (E, rank, I), (E, H, rank))
    weights = [torch.zeros(shape, dtype=torch.bfloat16) for shape in shapes]
    for tensor in weights[0::2]:  # A as PEFT initializes it, B zero: the LoRA adds nothing yet
        nn.init.kaiming_uniform_(tensor.view(-1, tensor.shape[-1]), a=math.sqrt(5))
    grads = [torch.zeros_like(t) for t in weights]
    params = [nn.Parameter(t) for t in weights]
    if not authoritative:
        for param, grad in zip(params, grads):
            param.grad = grad
    backend = wrapper.wrapper
    if rank0 and backend is not None:
        # the tensors, not the Parameters (which share their storage): registering is done below
        backend.init_lora_weights(
            **dict(zip(LORA_NAMES, weights)), **{f"grad_{n}": g for n, g in zip(LORA_NAMES, grads)}
        )
        if authoritative:
            for name, param, grad in zip(LORA_NAMES, params, grads):
                backend.register_authoritative_optimizer_grad(f"lora.{name}", param, grad)
    elif authoritative:
        raise RuntimeError(f"Layer {wrapper.layer_idx}: rank 0 authoritative LoRA requires a KT backend")
    wrapper._fused_expert_lora_params = params


def _peft_loras(experts, moe_config: MOEArchConfig) -> Dict[int, Dict[str, tuple]]:
    """{expert: {projection: (lora_A, lora_B)}} of PEFT's active adapter on the experts."""
    found = {}
    for index, expert in enumerate(experts):
        loras = {}
        for name in moe_config.weight_names:
            projection = getattr(expert, name, None)
            lora_a, lora_b = getattr(projection, "lora_A", None), getattr(projection, "lora_B", None)
            if isinstance(lora_a, nn.ModuleDict):
                active = getattr(projection, "active_adapter", ["default"])
                adapter = active[0] if isinstance(active, (list, tuple)) and active else "default"
                lora_a = lora_a[adapter] if adapter in lora_a else None
                lora_b = lora_b[adapter] if adapter in lora_b else None
            if lora_a is not None and lora_b is not None:
                loras[name] = (lora_a, lora_b)
        if loras:
            found[index] = loras
    return found


def _adapt_peft(wrapper, experts, rank0: bool) -> None:
    wrapper._fused_expert_lora_params = []
    if getattr(wrapper, "_lora_rank", 1) == 0:
        wrapper._peft_lora_modules = None
        return
    config = wrapper.moe_config
    loras = _peft_loras(experts, config)
    wrapper._peft_lora_modules = loras
    if not loras:
        raise RuntimeError(
            f"[kt_adapt_peft_lora] Layer {wrapper.layer_idx}: No PEFT LoRA found on any expert. Check that PEFT "
            "lora_target includes expert modules."
        )
    first = loras.get(0, {}).get(config.weight_names[0])
    if first is None:
        raise RuntimeError(f"No PEFT LoRA found on expert 0 {config.weight_names[0]}")
    rank, hidden, inter = first[0].weight.shape[0], first[0].weight.shape[1], first[1].weight.shape[0]
    E = config.expert_num
    shapes = ((E, rank, hidden), (E, inter, rank), (E, rank, hidden), (E, inter, rank), (E, rank, inter))
    shapes += ((E, hidden, rank),)
    weights = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    grads = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    pairs = dict(zip(config.weight_names, ((0, 1), (2, 3), (4, 5))))
    with torch.no_grad():
        for e, per_expert in loras.items():
            for name, (lora_a, lora_b) in per_expert.items():
                weights[pairs[name][0]][e].copy_(lora_a.weight)
                weights[pairs[name][1]][e].copy_(lora_b.weight)
    wrapper._kt_managed_lora_enabled = True
    authoritative = bool(getattr(wrapper, "_uses_authoritative_optimizer_grads", False))
    backend = wrapper.wrapper if rank0 else None
    if backend is not None:
        backend.init_lora_weights(*weights, *grads)
    for e, per_expert in loras.items():
        for name, (lora_a, lora_b) in per_expert.items():
            for module, slot in ((lora_a, pairs[name][0]), (lora_b, pairs[name][1])):
                # .data, not a new Parameter: the optimizer keeps its reference
                module.weight.data = weights[slot][e]
                module.weight.requires_grad_(True)
                view = grads[slot][e]
                if authoritative:
                    module.weight.grad = None
                    if backend is not None:
                        backend.register_authoritative_optimizer_grad(
                            f"lora.{LORA_NAMES[slot]}.expert_{e}", module.weight, view
                        )
                else:
                    module.weight.grad = view


def _empty_expert_placeholders(wrapper) -> None:
    """The experts' frozen base weights (tiny placeholders since wrapping) become zero-element ones,
    keeping their shape as metadata, so FSDP never allocates or broadcasts the original shapes."""
    experts = getattr(wrapper, getattr(wrapper, "_experts_attr", "experts"), None)
    if experts is None or getattr(wrapper, "_fused_experts", False):
        return
    for expert in experts:
        for name, param in list(expert.named_parameters()):
            if param.requires_grad or param.data.untyped_storage().nbytes() > 2:
                continue  # LoRA, or a real weight
            shape = getattr(param, "_kt_original_shape", tuple(param.shape))
            owner = expert.get_submodule(name.rpartition(".")[0]) if "." in name else expert
            key = name.rpartition(".")[2]
            if param.numel() == 0 or key not in owner._parameters:
                param._kt_original_shape = tuple(shape)
                continue
            empty = nn.Parameter(torch.empty(0, dtype=param.dtype), requires_grad=False)
            empty._kt_zero_storage, empty._kt_original_shape = True, tuple(shape)
            owner._parameters[key] = empty


# ---- after the optimizer step ----------------------------------------------------------------------


def update_kt_lora_pointers(model) -> None:
    """After optimizer.step(): the backends re-read the LoRA and repack full-weight bases before the
    next forward, and the authoritative gradient windows close."""
    for wrapper in find_kt_wrappers(model) or ():
        if getattr(wrapper, "_kt_managed_lora_enabled", False):
            wrapper._lora_pointers_dirty = True
        backend = getattr(wrapper, "wrapper", None)
        if getattr(wrapper, "_full_weight_grad", False) and backend is not None:
            backend._base_weights_dirty = True
        if backend is not None and getattr(backend, "_uses_authoritative_optimizer_grads", False):
            backend.release_authoritative_optimizer_grads()


def sync_kt_lora_gradients(model) -> None:
    """Check the distributed gradient ownership (no collective: rank 0's backward already saw every
    rank's rows and scaled by 1 / world size). Ordinary modules stay DDP's / FSDP's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    wrappers = find_kt_wrappers(model) or []
    authoritative = [bool(getattr(w, "_uses_authoritative_optimizer_grads", False)) for w in wrappers]
    if any(authoritative) and not all(authoritative):
        raise RuntimeError("Mixed authoritative and legacy KT SFT backends are unsupported in one model")
    for wrapper, owns_grads in zip(wrappers, authoritative):
        backend = getattr(wrapper, "wrapper", None)
        wrapped = int(getattr(wrapper, "_kt_world_size_at_wrap", world))
        if wrapped != world:
            raise RuntimeError(
                f"Layer {wrapper.layer_idx}: KT wrapper was created for world_size={wrapped}, but the active "
                f"process group has world_size={world}"
            )
        what = "an authoritative KT backend" if owns_grads else "a KT backend"
        if rank == 0 and backend is None:
            raise RuntimeError(f"Layer {wrapper.layer_idx}: rank 0 does not own {what}")
        if rank != 0 and backend is not None:
            raise RuntimeError(f"Layer {wrapper.layer_idx}: rank {rank} unexpectedly owns {what}")
        if rank == 0 and owns_grads:
            backend.validate_authoritative_optimizer_grad_state()
        elif owns_grads and any(p.grad is not None for p in _managed_lora_params(wrapper)):
            raise RuntimeError(f"Layer {wrapper.layer_idx}: non-rank-0 KT LoRA Parameter unexpectedly has a gradient")
