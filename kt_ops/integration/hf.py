"""Routed experts of Hugging Face transformers (v5) MoE models on kt_ops.

transformers v5 keeps each layer's routed experts in one module (fused `gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`) whose forward is chosen through `ExpertsInterface` by
`config._experts_implementation`. `apply_kt` registers a "kt" implementation there and moves each
experts module's weights into a `KTExperts` (a `KTMoELayer` with per-expert LoRA). Routers, shared
experts, top-k normalisation and scaling are left to the model's own code, which calls the experts
module with the ids and weights it chose. Llama-4's and LongCat-Flash's experts, which transformers
calls directly, are adopted first (custom_experts.py).
"""
from __future__ import annotations

import functools
import os
import re
import sys
import types
import warnings
from typing import Optional

import torch
from torch import nn

from ..core.formats import LORA_NAMES, SFT_METHOD_FORMATS
from ..core.runtime import set_num_threads
from ..layer import KTMoELayer
from ..reference import moe_loop
from ..weights.sources import ExpertSource
from .custom_experts import adopt_custom_experts, install_custom_forward
from .peft_lora import (EXPERT_PARAMS, KTPeftConfigs, add_expert_lora_to_peft_model, combined_lora,
                        install_kt_wrappers, peft_tuner, register_holder_hook, weights_transposed)

KT_IMPLEMENTATION = "kt"

# kt_backend names (kt-kernel / LLaMA-Factory spelling) -> KTMoELayer method.
KT_BACKENDS = {
    "auto": "AMXBF16_SFT",
    "AMXBF16": "AMXBF16_SFT",
    "AMXINT8": "AMXINT8_SFT",
    "AMXINT4": "AMXINT4_SFT",
    "AMXINT4_1": "AMXINT4_1_SFT",
    "AMXINT4_KGroup": "AMXINT4_KGroup_SFT",
    "AMXINT4_1KGroup": "AMXINT4_1KGroup_SFT",
    "AMXFP8": "AMXFP8_SFT",
    **{name: name for name in SFT_METHOD_FORMATS if name.endswith("_SFT")},
}

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class KTExperts(KTMoELayer):
    """The routed experts of one MoE layer on kt_ops: a KTMoELayer whose LoRA on gate/up/down is
    either its own (`lora_rank` > 0: a model used without peft) or handed in by peft per call, with
    the model's layer index. Expert `j` here is expert `first_expert + j` of the model (the first ones
    may stay in transformers). `lora_enabled = False` computes the base experts only (e.g. for a DPO
    reference pass)."""

    def __init__(self, *args, layer_idx: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_idx = layer_idx
        # Set by set_kt_lora_trainable(model, False): frozen expert LoRA is then intended, not an accident.
        self.lora_frozen_on_purpose = False
        self._frozen_warned = False

    def drop_lora(self) -> None:
        """Remove this layer's own LoRA (peft's adapters take over the expert LoRA)."""
        for name in LORA_NAMES:
            if name in self._parameters:
                del self._parameters[name]
        self.lora_rank = 0
        self.lora_scaling = 0.0
        self.lora_enabled = False

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                lora: Optional[tuple] = None) -> torch.Tensor:
        """`lora`: peft's six tensors (gate_a, gate_b, up_a, up_b, down_a, down_b) over this layer's
        experts, scaling already in B, used instead of the layer's own LoRA."""
        if lora is None and self.lora_enabled and self.training and torch.is_grad_enabled() \
                and not self.lora_frozen_on_purpose:
            _warn_if_frozen(self)
        return super().forward(hidden_states, topk_ids, topk_weights, lora=lora,
                               lora_scaling=None if lora is None else 1.0)

    def extra_repr(self) -> str:
        return f"{KTMoELayer.extra_repr(self)}, layer_idx={self.layer_idx}"


def _warn_if_frozen(kt: KTExperts) -> None:
    if kt._frozen_warned or any(p.requires_grad for p in kt.lora_parameters()):
        return
    kt._frozen_warned = True
    warnings.warn("kt expert LoRA is frozen (requires_grad=False) while training; call "
                  "kt_ops.integration.set_kt_lora_trainable(model) to train it, or "
                  "set_kt_lora_trainable(model, False) if freezing it is intended", stacklevel=3)


def _gpu_experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor, num_gpu_experts: int,
                         lora: Optional[tuple] = None) -> torch.Tensor:
    """The experts kept in transformers (ids < num_gpu_experts), with the module's own weights, biases and
    gate; `lora` as for KTExperts.forward over these experts."""
    gate_up_w, down_w = module.kt_gpu_gate_up_proj, module.kt_gpu_down_proj
    gate_up_b = getattr(module, "kt_gpu_gate_up_proj_bias", None)
    down_b = getattr(module, "kt_gpu_down_proj_bias", None)

    transposed = weights_transposed(module)

    def expert_fn(expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = x @ gate_up_w[expert] if transposed else nn.functional.linear(x, gate_up_w[expert])
        if gate_up_b is not None:
            gate_up = gate_up + gate_up_b[expert]
        if lora is not None:
            ga, gb, ua, ub, da, db = (t[expert].to(x.dtype) for t in lora)
            gate_up = gate_up + fuse_gate_up(module, (x @ ga.T) @ gb.T, (x @ ua.T) @ ub.T, dim=-1)
        h = module._apply_gate(gate_up)
        y = h @ down_w[expert] if transposed else nn.functional.linear(h, down_w[expert])
        if down_b is not None:
            y = y + down_b[expert]
        return y + (h @ da.T) @ db.T if lora is not None else y

    gpu_ids = torch.where(top_k_index < num_gpu_experts, top_k_index, -1)
    return moe_loop(hidden_states, gpu_ids, top_k_weights, expert_fn)


def kt_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "kt" entry of transformers' ExpertsInterface."""
    kt = getattr(self, "kt_experts", None)
    if kt is None:
        raise RuntimeError(f"{type(self).__name__} runs with experts_implementation='kt' but holds no kt experts; "
                           "convert the model with kt_ops.integration.apply_kt(model)")
    num_gpu = kt.first_expert
    peft_lora = combined_lora(self, kt)
    lora = kt_lora = None
    if peft_lora is not None:
        lora = peft_lora[0]
        kt_lora = tuple(t[num_gpu:] for t in lora)
    # -1 tells kt_ops to skip the slot: id num_experts, which transformers' experts read as "no expert"
    # (e.g. DeepSeek-V4's hash routing, expert parallelism); kt skips the GPU experts' share itself.
    out = kt(hidden_states, top_k_index.masked_fill(top_k_index == self.num_experts, -1), top_k_weights,
             lora=kt_lora)
    if num_gpu > 0:
        gpu_lora = None if lora is None else tuple(t[:num_gpu] for t in lora)
        out = out + _gpu_experts_forward(self, hidden_states, top_k_index, top_k_weights, num_gpu, gpu_lora)
    return out.to(hidden_states.dtype)


def register_kt_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ALL_EXPERTS_FUNCTIONS.get(KT_IMPLEMENTATION) is not kt_experts_forward:
        ExpertsInterface.register(KT_IMPLEMENTATION, kt_experts_forward)


def _is_silu(act: nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act, (nn.SiLU, SiLUActivation))


def _clamped_swiglu(alpha: str, limit: str):
    return lambda m: dict(activation="clamped_swiglu", swiglu_alpha=float(getattr(m, alpha)),
                          swiglu_limit=float(getattr(m, limit)))


def _clamped_silu(limit: str):
    return lambda m: dict(activation="clamped_silu", swiglu_limit=float(getattr(m, limit)))


# Experts whose own _apply_gate (transformers calls it in every experts implementation) is one the
# kernels compute: (model type, class) -> the PackedExperts.with_variant fields, from the module.
#   gpt-oss, MiniMax-M3-VL: g' = min(g, L), u' = clamp(u, -L, L), (u' + 1) * g' * sigmoid(alpha * g')
#     (gpt-oss' gate/up alternate in gate_up_proj [E, H, 2I]; it has biases)
#   DeepSeek-V4 (act_fn), GLM-5-Next, HY-V4 (F.silu): silu(g') * u' with the same clamps
#   Beam: silu(g) * u computed in fp32, as the kernels do (act_fn)
KNOWN_GATES = {
    ("gpt_oss", "GptOssExperts"): _clamped_swiglu("alpha", "limit"),
    ("minimax_m3_vl", "MiniMaxM3VLExperts"): _clamped_swiglu("swiglu_alpha", "swiglu_limit"),
    ("deepseek_v4", "DeepseekV4Experts"): _clamped_silu("limit"),
    ("glm5_next", "Glm5NextTextExperts"): _clamped_silu("swiglu_limit"),
    ("hy_v4", "HYV4Experts"): _clamped_silu("swiglu_limit"),
    ("beam", "BeamExperts"): lambda m: {},
}
_GATES_THROUGH_ACT_FN = ("DeepseekV4Experts", "BeamExperts")  # SiLU only if their act_fn is


def known_gate(module: nn.Module) -> Optional[dict]:
    """The variant fields of experts whose custom _apply_gate the kernels compute (KNOWN_GATES); None
    for other experts."""
    for (model_type, class_name), fields in KNOWN_GATES.items():
        module_name = f"transformers.models.{model_type}.modeling_{model_type}"
        # A modeling file not imported yet has built no module: nothing to import here.
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and isinstance(module, cls):
            return fields(module)
    return None


def expert_dims(module: nn.Module) -> tuple[int, int]:
    """(hidden size, intermediate size) of a transformers experts module (gpt-oss names them *_size)."""
    if hasattr(module, "hidden_dim"):
        return module.hidden_dim, module.intermediate_dim
    return module.hidden_size, module.intermediate_size


def _is_hf_experts(module: nn.Module) -> bool:
    # Modules decorated with transformers' @use_experts_implementation get `has_gate` etc. in __init__.
    return (hasattr(module, "has_gate") and hasattr(module, "is_concatenated") and hasattr(module, "num_experts")
            and (isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
                 or isinstance(getattr(module, "kt_experts", None), KTMoELayer)))


def find_moe_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every transformers experts module in `model`."""
    return [(name, m) for name, m in model.named_modules() if _is_hf_experts(m)]


def check_convertible(name: str, module: nn.Module) -> None:
    from transformers.integrations.moe import _default_apply_gate

    # Biases and interleaved gate/up are converted; the activation must be one the kernels compute.
    problems = []
    if not module.has_gate:
        problems.append("experts without a gate projection")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("a post-expert norm")
    gate = known_gate(module)
    if gate is not None and type(module).__name__ in _GATES_THROUGH_ACT_FN and not _is_silu(module.act_fn):
        problems.append(f"activation {type(module.act_fn).__name__} in {type(module).__name__}._apply_gate "
                        "(kt_ops computes SiLU there)")
    elif gate is not None:
        pass  # its _apply_gate is one the kernels compute
    elif getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        problems.append(f"a custom gate function ({type(module).__name__}._apply_gate)")
    else:
        act = getattr(module, "act_fn", None)
        if act is None:
            problems.append("a gate activation that is not an act_fn module (kt_ops computes SiLU-gated experts, "
                            "gpt-oss' clamped SwiGLU and DeepSeek-V4's clamped SiLU)")
        elif not _is_silu(act):
            problems.append(f"activation {type(act).__name__} (kt_ops computes SiLU-gated experts, gpt-oss' "
                            "clamped SwiGLU and DeepSeek-V4's clamped SiLU)")
    if problems:
        raise ValueError(f"apply_kt: {name} ({type(module).__name__}) cannot run on kt_ops: it uses "
                         + ", ".join(problems))
    _check_expert_tensors(name, module)


def _check_expert_tensors(name: str, module: nn.Module) -> None:
    gate_up, down = module.gate_up_proj, module.down_proj
    if gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"apply_kt: {name}: expected 3-D gate_up_proj/down_proj, got {tuple(gate_up.shape)} "
                         f"and {tuple(down.shape)}")
    if gate_up.is_meta or down.is_meta:
        raise ValueError(f"apply_kt: {name}: expert weights are on the meta device; load the model's weights "
                         "first or pass kt_weight_path")


def _expert_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate [E, I, H], up [E, I, H], down [E, H, I] views of the module's weights."""
    # [:E]: LongCat-Flash's gate_up_proj also has rows for its identity experts, which have no weights.
    gate_up, down = module.gate_up_proj[:module.num_experts], module.down_proj
    if weights_transposed(module):  # [E, H, 2I] and [E, I, H]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate, up = _split_gate_up(module, gate_up)
    return gate, up, down


def fuse_gate_up(module: nn.Module, gate: torch.Tensor, up: torch.Tensor, dim: int) -> torch.Tensor:
    """gate and up fused along `dim` in the module's layout: [gate; up], or alternating entries when the
    module is not is_concatenated (gpt-oss)."""
    if getattr(module, "is_concatenated", True):
        return torch.cat([gate, up], dim=dim)
    dim = dim % gate.dim()
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def _split_gate_up(module: nn.Module, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up halves of [E, 2I, ...]: [gate; up] or, not is_concatenated, alternating rows."""
    if getattr(module, "is_concatenated", True):
        return gate_up.chunk(2, dim=1)
    return gate_up[:, 0::2], gate_up[:, 1::2]


def expert_variant(module: nn.Module, first: int) -> dict:
    """PackedExperts.with_variant fields of experts first.. of the module: biases (has_bias) and a
    custom gate's activation (known_gate); nothing for SiLU-gated experts without biases."""
    variant = {}
    if getattr(module, "has_bias", False):
        gate_bias, up_bias = _split_gate_up(module, module.gate_up_proj_bias[first:])
        variant.update(gate_bias=gate_bias, up_bias=up_bias, down_bias=module.down_proj_bias[first:])
    variant.update(known_gate(module) or {})
    return variant


def method_for_packed(kt_backend: str, weight_format: str, where: str) -> str:
    """The KTExperts method for pre-quantized experts of `weight_format` under `kt_backend`: the
    backend's own, or its K-group variant (a NUMA-split KTransformers layer keeps down's per-part
    scales as groups)."""
    if kt_backend == "auto":
        return weight_format
    wanted = SFT_METHOD_FORMATS[KT_BACKENDS[kt_backend]]
    if weight_format in (wanted, wanted + "_kgroup"):
        return weight_format
    raise ValueError(f"{where} holds {weight_format!r} experts but kt_backend {kt_backend!r} means {wanted!r}; "
                     "pass kt_backend='auto' to use the stored format")


def check_tp_enabled(kt_tp_enabled) -> None:
    if not isinstance(kt_tp_enabled, bool):
        raise TypeError(f"kt_tp_enabled must be a bool, got {kt_tp_enabled!r}")
    if kt_tp_enabled:
        # kt-kernel splits experts over NUMA nodes; kt_ops has one worker pool over all cores.
        warnings.warn("kt_tp_enabled=True has no effect: kt_ops runs each layer on one worker pool spanning "
                      "all cores", stacklevel=3)


def _positive_or_none(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")


def apply_kt(model: nn.Module, kt_backend: str = "AMXBF16", kt_num_threads: Optional[int] = None,
             kt_tp_enabled: bool = False, kt_num_gpu_experts: int = 0, kt_weight_path: Optional[str] = None,
             lora_rank: int = 16, lora_alpha: float = 32.0, lora_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Run the routed experts of a transformers v5 MoE model (DeepSeek-V2/V3/V4, Qwen2/3-MoE, Mixtral,
    gpt-oss, and other models whose experts use `@use_experts_implementation` with SiLU gating, gpt-oss'
    clamped SwiGLU or DeepSeek-V4's clamped SiLU, with or without expert biases; Llama-4 and
    LongCat-Flash) on kt_ops, in place.

    Each experts module's weights are packed into a `KTExperts` child (`<experts>.kt_experts`) one layer
    at a time and the originals are released, so the model never holds a layer's experts twice. The
    first `kt_num_gpu_experts` experts of every layer stay in the module (on its device) and the rest
    go to kt; their outputs are summed. `kt_weight_path` supplies pre-quantized experts instead of
    packing (kt_ops.weights.sources.ExpertSource: a kt_ops converted file or directory, a KTransformers
    converted directory, or a block-FP8 checkpoint: kept as fp8 codes with an fp8 backend,
    requantized to int8_kgroup otherwise).

    Expert LoRA (`lora_rank` > 0) is a peft LoRA adapter on the experts' `gate_up_proj` / `down_proj`
    (peft's `target_parameters` format), computed inside the kt kernels. On a `PeftModel` every LoRA
    adapter gains it now; on a plain model the experts carry their own LoRA until stock
    `peft.get_peft_model` / `PeftModel.from_pretrained` wraps the model, whose LoRA configs then gain
    the experts (peft warns once that the model already has a `peft_config`: it is kt's). A config
    that already targets the experts is used as it is. Returns `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(kt_backend, str) or kt_backend not in KT_BACKENDS:
        raise ValueError(f"kt_backend must be one of {sorted(KT_BACKENDS)}, got {kt_backend!r}")
    _positive_or_none(kt_num_threads, "kt_num_threads")
    check_tp_enabled(kt_tp_enabled)
    if isinstance(kt_num_gpu_experts, bool) or not isinstance(kt_num_gpu_experts, int) or kt_num_gpu_experts < 0:
        raise ValueError(f"kt_num_gpu_experts must be an int >= 0, got {kt_num_gpu_experts!r}")
    if kt_weight_path is not None and not isinstance(kt_weight_path, (str, os.PathLike)):
        raise TypeError(f"kt_weight_path must be a path or None, got {type(kt_weight_path).__name__}")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an int >= 0, got {lora_rank!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise TypeError(f"lora_alpha must be a number, got {lora_alpha!r}")

    adopt_custom_experts(model)  # Llama-4, LongCat-Flash: experts transformers does not dispatch
    found = find_moe_experts(model)
    if not found:
        raise ValueError(f"apply_kt: {type(model).__name__} has no transformers experts module "
                         "(a module decorated with @use_experts_implementation holding gate_up_proj/down_proj)")
    already = [name for name, m in found if hasattr(m, "kt_experts")]
    if already:
        raise ValueError(f"apply_kt: the model is already converted (e.g. {already[0]}.kt_experts exists)")
    layer_of = {}
    for name, module in found:
        check_convertible(name, module)
        if kt_num_gpu_experts >= module.num_experts:
            raise ValueError(f"kt_num_gpu_experts ({kt_num_gpu_experts}) must be smaller than the number of "
                             f"experts of {name} ({module.num_experts})")
        match = LAYER_INDEX.search(name + ".")
        layer_of[name] = int(match.group(1)) if match else None
        if kt_weight_path is not None and layer_of[name] is None:
            raise ValueError(f"apply_kt: cannot tell the layer index of {name} to look it up in kt_weight_path")

    register_kt_implementation()
    if kt_num_threads is not None:
        set_num_threads(kt_num_threads)
    method = KT_BACKENDS[kt_backend]

    # Pre-quantized experts hold the CPU experts only: the first kt_num_gpu_experts stay in the model.
    if kt_weight_path is not None and not os.path.exists(kt_weight_path):
        raise FileNotFoundError(f"kt_weight_path {os.fspath(kt_weight_path)!r} does not exist")
    source = ExpertSource(os.fspath(kt_weight_path)) if kt_weight_path is not None else None
    if source is not None and not source.is_quantized_source():
        raise ValueError(f"kt_weight_path {source.path} holds float experts (a Hugging Face checkpoint); apply_kt "
                         "packs the model's own experts, so pass kt_weight_path only for converted experts "
                         "(kt_ops.convert_weights, KTransformers) or a block-FP8 checkpoint")
    tuner = peft_tuner(model)
    kt_targets = set()
    for name, module in found:
        E, N = module.num_experts, kt_num_gpu_experts
        H, I = expert_dims(module)
        layer_idx = layer_of[name]
        packed = None
        if source is not None:
            packed = source.packed_layer(layer_idx, E - N, H, I, SFT_METHOD_FORMATS[KT_BACKENDS[kt_backend]])
            method = method_for_packed(kt_backend, packed.weight_format, source.path)
        kt = KTExperts(E - N, H, I, lora_rank=0 if tuner is not None else lora_rank, lora_alpha=lora_alpha,
                       method=method, lora_dtype=lora_dtype, first_expert=N, layer_idx=layer_idx)
        if packed is not None:
            kt.experts = packed
        else:
            gate, up, down = _expert_weights(module)
            kt.load_weights_from_tensors(gate[N:], up[N:], down[N:])
        variant = expert_variant(module, N)
        if variant:
            kt.experts = kt.experts.with_variant(**variant)
        # LoRA lives where the layer's activations do, so the optimizer steps it with the rest.
        device = module.gate_up_proj.device
        kt.to(device)
        gate_up_proj, down_proj = module.gate_up_proj, module.down_proj
        keep_gate_up = gate_up_proj[:N].detach().clone() if N else None
        keep_down = down_proj[:N].detach().clone() if N else None
        # Release the originals now (before the next layer) so a layer's experts exist once.
        del gate_up_proj, down_proj
        kt_targets.add(install_kt_experts(model, name, module, kt, keep_gate_up, keep_down, device))
        install_custom_forward(model, name, module)
    finish_kt_conversion(model, found, tuple(sorted(kt_targets)), lora_rank, lora_alpha)
    return model


def install_kt_experts(model: nn.Module, name: str, module: nn.Module, kt: KTExperts,
                       keep_gate_up: Optional[torch.Tensor], keep_down: Optional[torch.Tensor],
                       device: torch.device) -> str:
    """Make the transformers experts module `name` of `model` run on `kt`: its expert weights become
    one-element placeholders (peft's target_parameters sizes and places LoRA from them), the first
    experts kept on `device` (`keep_*`, None for none) become buffers, and the holder's forward is
    wrapped. Returns the peft target prefix of the module ("mlp.experts")."""
    shapes = {p: (getattr(module, p).shape, getattr(module, p).dtype) for p in EXPERT_PARAMS}
    for pname in EXPERT_PARAMS:
        delattr(module, pname)
    for pname, keep in (("gate_up_proj", keep_gate_up), ("down_proj", keep_down)):
        shape, dtype = shapes[pname]
        if keep is None:
            keep = torch.empty((0,) + tuple(shape[1:]), dtype=dtype, device=device)
        module.register_buffer("kt_gpu_" + pname, keep.to(device), persistent=False)
        module.register_parameter(pname, _placeholder(shape, dtype, device))
    if not getattr(module, "_kt_state_dict_hooks", False):
        module._register_state_dict_hook(_drop_placeholders_from_state_dict)
        module.register_load_state_dict_post_hook(_placeholders_not_missing)
        module._kt_state_dict_hooks = True
    module.kt_peft_lora = {}
    module._apply = types.MethodType(_apply_keeping_placeholders, module)
    module.kt_experts = kt
    module.config._experts_implementation = KT_IMPLEMENTATION
    if getattr(module, "has_bias", False):
        # The biases now live in kt (kt.experts), frozen like the weights; the kept experts' stay here.
        for pname in ("gate_up_proj_bias", "down_proj_bias"):
            kept = getattr(module, pname)[:kt.first_expert].detach().clone()
            delattr(module, pname)
            module.register_buffer("kt_gpu_" + pname, kept.to(device), persistent=False)

    holder_name, child = holder_of(name)
    holder = model.get_submodule(holder_name)
    register_holder_hook(holder, child)
    install_kt_wrappers(holder, child)
    return f"{holder_name.rpartition('.')[2]}.{child}"


def finish_kt_conversion(model: nn.Module, found: list[tuple[str, nn.Module]], kt_prefixes: tuple[str, ...],
                         lora_rank: int, lora_alpha: float) -> None:
    """After every experts module of `model` is installed: hook the expert LoRA into peft (an existing
    PeftModel's adapters gain it now; a later peft.get_peft_model's LoraConfig gains it then)."""
    kt_targets = tuple(sorted(f"{prefix}.{pname}" for prefix in kt_prefixes for pname in EXPERT_PARAMS))
    # DistributedDataParallel broadcasts every parameter at start; a stride-0 placeholder cannot be
    # written, so it skips them (DDP reads this attribute of the module it wraps; peft forwards it).
    model._ddp_params_and_buffers_to_ignore = _PlaceholderNames(model)
    tuner = peft_tuner(model)
    if tuner is not None:
        # get_peft_model came first: its adapters gain the expert LoRA now.
        add_expert_lora_to_peft_model(tuner, kt_targets, lora_rank, float(lora_alpha))
        for name, _ in found:
            holder_name, child = holder_of(name)
            install_kt_wrappers(model.get_submodule(holder_name), child)
    elif lora_rank:
        # A later peft.get_peft_model stores its LoraConfig here: it gains the experts and the
        # adapters replace the kt layers' own LoRA.
        model.peft_config = KTPeftConfigs(kt_targets=kt_targets, kt_rank=lora_rank, kt_alpha=float(lora_alpha),
                                          on_lora=functools.partial(_drop_own_lora, model))


class _PlaceholderNames:
    """The qualified names of the expert placeholders of `model`, computed when iterated (after any
    peft wrapping), also as seen from a PeftModel around it."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __iter__(self):
        for name, module in self.model.named_modules():
            if isinstance(getattr(module, "kt_experts", None), KTExperts):
                for pname in EXPERT_PARAMS:
                    yield f"{name}.{pname}" if name else pname
                    yield f"base_model.model.{name}.{pname}" if name else f"base_model.model.{pname}"


def _placeholder(shape, dtype: torch.dtype, device) -> nn.Parameter:
    # The base weights now live packed in kt; peft's target_parameters still needs a parameter with the
    # original shape, dtype and device to size and place the LoRA. Stride 0: one element of storage.
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)


def _apply_keeping_placeholders(self, fn, recurse=True):
    # model.to(dtype / device) would turn a stride-0 placeholder into a full-size tensor; give it the new
    # dtype and device at one element instead.
    placeholders = {n: self._parameters.pop(n) for n in EXPERT_PARAMS if n in self._parameters}
    try:
        result = type(self)._apply(self, fn, recurse)
    finally:
        for n, p in placeholders.items():
            probe = fn(torch.zeros((), dtype=p.dtype, device=p.device))
            self._parameters[n] = _placeholder(p.shape, probe.dtype, probe.device)
    return result


def _drop_placeholders_from_state_dict(module, state_dict, prefix, local_metadata):
    for pname in EXPERT_PARAMS:
        state_dict.pop(prefix + pname, None)


def _placeholders_not_missing(module, incompatible_keys):
    # Placeholders are never saved, so a state dict without them is complete.
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.rpartition(".")[2] in EXPERT_PARAMS]:
        missing.remove(key)


def holder_of(name: str) -> tuple[str, str]:
    """(name of the module holding the experts module, attribute name) with peft's `.base_layer` removed."""
    plain = name.replace(".base_layer", "")
    holder, _, child = plain.rpartition(".")
    return holder, child


def _drop_own_lora(model: nn.Module) -> None:
    for _, _, kt in kt_experts_modules(model):
        kt.drop_lora()


def kt_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module, KTExperts]]:
    """(name of the transformers experts module, that module, its KTExperts) for a converted model."""
    return [(name, m, m.kt_experts) for name, m in find_moe_experts(model)
            if isinstance(getattr(m, "kt_experts", None), KTExperts)]


def kt_expert_wrappers(model: nn.Module) -> list[nn.Module]:
    """The peft ParamWrappers (expert LoRA) around the kt experts of `model`."""
    from .peft_lora import wrapper_chain

    wrappers = []
    for name, _, _ in kt_experts_modules(model):
        holder_name, child = holder_of(name)
        wrappers.extend(wrapper_chain(getattr(model.get_submodule(holder_name), child))[1].values())
    return wrappers
