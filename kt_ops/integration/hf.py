"""Routed experts of Hugging Face transformers (v5) MoE models, as kt_ops sees them.

transformers v5 keeps each layer's routed experts in one module (fused `gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`) whose forward is chosen through `ExpertsInterface` by
`config._experts_implementation`. kt_ops registers a "kt" implementation there (kt_experts_forward)
that runs the module's `KTExperts` (a `KTMoELayer`; apply.py puts it there). Routers, shared
experts, top-k normalisation and scaling are left to the model's own code, which calls the experts
module with the ids and weights it chose. This module knows the experts modules: which ones kt can
run (check_convertible, KNOWN_GATES), their sizes, weights, layouts and variants.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Optional

import torch
from torch import nn

from ..core.formats import LORA_NAMES
from ..layer import KTMoELayer
from ..reference import moe_loop
from .peft_lora import combined_lora, weights_transposed

KT_IMPLEMENTATION = "kt"

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

    def forward(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        lora: Optional[tuple] = None,
    ) -> torch.Tensor:
        """`lora`: peft's six tensors (gate_a, gate_b, up_a, up_b, down_a, down_b) over this layer's
        experts, scaling already in B, used instead of the layer's own LoRA."""
        if (
            lora is None
            and self.lora_enabled
            and self.training
            and torch.is_grad_enabled()
            and not self.lora_frozen_on_purpose
        ):
            _warn_if_frozen(self)
        return super().forward(
            hidden_states, topk_ids, topk_weights, lora=lora, lora_scaling=None if lora is None else 1.0
        )

    def extra_repr(self) -> str:
        return f"{KTMoELayer.extra_repr(self)}, layer_idx={self.layer_idx}"


def _warn_if_frozen(kt: KTExperts) -> None:
    if kt._frozen_warned or any(p.requires_grad for p in kt.lora_parameters()):
        return
    kt._frozen_warned = True
    warnings.warn(
        "kt expert LoRA is frozen (requires_grad=False) while training; call "
        "kt_ops.integration.set_kt_lora_trainable(model) to train it, or "
        "set_kt_lora_trainable(model, False) if freezing it is intended",
        stacklevel=3,
    )


def _gpu_experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_gpu_experts: int,
    lora: Optional[tuple] = None,
) -> torch.Tensor:
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


def kt_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The "kt" entry of transformers' ExpertsInterface."""
    kt = getattr(self, "kt_experts", None)
    if kt is None:
        raise RuntimeError(
            f"{type(self).__name__} runs with experts_implementation='kt' but holds no kt experts; "
            "convert the model with kt_ops.integration.apply_kt(model)"
        )
    num_gpu = kt.first_expert
    peft_lora = combined_lora(self, kt)
    lora = kt_lora = None
    if peft_lora is not None:
        lora = peft_lora[0]
        kt_lora = tuple(t[num_gpu:] for t in lora)
    # -1 tells kt_ops to skip the slot: id num_experts, which transformers' experts read as "no expert"
    # (e.g. DeepSeek-V4's hash routing, expert parallelism); kt skips the GPU experts' share itself.
    out = kt(hidden_states, top_k_index.masked_fill(top_k_index == self.num_experts, -1), top_k_weights, lora=kt_lora)
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
    return lambda m: dict(
        activation="clamped_swiglu", swiglu_alpha=float(getattr(m, alpha)), swiglu_limit=float(getattr(m, limit))
    )


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
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "is_concatenated")
        and hasattr(module, "num_experts")
        and (
            isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
            or isinstance(getattr(module, "kt_experts", None), KTMoELayer)
        )
    )


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
        problems.append(
            f"activation {type(module.act_fn).__name__} in {type(module).__name__}._apply_gate "
            "(kt_ops computes SiLU there)"
        )
    elif gate is not None:
        pass  # its _apply_gate is one the kernels compute
    elif getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        problems.append(f"a custom gate function ({type(module).__name__}._apply_gate)")
    else:
        act = getattr(module, "act_fn", None)
        if act is None:
            problems.append(
                "a gate activation that is not an act_fn module (kt_ops computes SiLU-gated experts, "
                "gpt-oss' clamped SwiGLU and DeepSeek-V4's clamped SiLU)"
            )
        elif not _is_silu(act):
            problems.append(
                f"activation {type(act).__name__} (kt_ops computes SiLU-gated experts, gpt-oss' "
                "clamped SwiGLU and DeepSeek-V4's clamped SiLU)"
            )
    if problems:
        raise ValueError(
            f"apply_kt: {name} ({type(module).__name__}) cannot run on kt_ops: it uses " + ", ".join(problems)
        )
    _check_expert_tensors(name, module)


def _check_expert_tensors(name: str, module: nn.Module) -> None:
    gate_up, down = module.gate_up_proj, module.down_proj
    if gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(
            f"apply_kt: {name}: expected 3-D gate_up_proj/down_proj, got {tuple(gate_up.shape)} and {tuple(down.shape)}"
        )
    if gate_up.is_meta or down.is_meta:
        raise ValueError(
            f"apply_kt: {name}: expert weights are on the meta device; load the model's weights "
            "first or pass kt_weight_path"
        )


def expert_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate [E, I, H], up [E, I, H], down [E, H, I] views of the module's weights."""
    # [:E]: LongCat-Flash's gate_up_proj also has rows for its identity experts, which have no weights.
    gate_up, down = module.gate_up_proj[: module.num_experts], module.down_proj
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
