"""Where a model keeps its MoE pieces (`kt_kernel.sft.arch`): MOEArchConfig per architecture, the
decoder-layer stack behind PEFT / TRL / DDP wrappers, and moving everything but the routed experts to
the accelerator."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)


class KTAMXError(Exception):
    """Base of kt_ops.sft's errors (kt-kernel's names)."""


class KTAMXNotAvailableError(KTAMXError):
    """The CPU backend is not available."""


class KTAMXModelNotSupportedError(KTAMXError):
    """The model's architecture has no MOEArchConfig."""


class KTAMXConfigError(KTAMXError):
    """The KT configuration cannot be used with this model."""


@dataclass
class MOEArchConfig:
    """Where the MoE block sits in a decoder layer (moe_layer_attr), its router and experts
    attributes, the experts' projection names (gate, up, down), their sizes, and how it routes:
    'linear' (softmax top-k), 'deepseek_gate' (sigmoid, group-limited, correction bias),
    'glm4_moe_gate', or 'precomputed' (the model routes; KT computes the experts only)."""

    moe_layer_attr: str
    router_attr: str
    experts_attr: str
    weight_names: Tuple[str, str, str]
    expert_num: int
    intermediate_size: int
    num_experts_per_tok: int
    has_shared_experts: bool = False
    router_type: str = "linear"


_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _config(expert_num, cfg, *, shared: bool, router_type: str = "linear", **overrides) -> MOEArchConfig:
    values = dict(
        moe_layer_attr="mlp",
        router_attr="gate",
        experts_attr="experts",
        weight_names=_PROJECTIONS,
        expert_num=expert_num,
        intermediate_size=cfg.moe_intermediate_size,
        num_experts_per_tok=cfg.num_experts_per_tok,
        has_shared_experts=shared,
        router_type=router_type,
    )
    values.update(overrides)
    return MOEArchConfig(**values)


# model_type -> architecture name, for configs without `architectures` (a model made with from_config)
_ARCHITECTURE_OF_MODEL_TYPE = {
    "deepseek_v2": "DeepseekV2",
    "deepseek_v3": "DeepseekV3",
    "qwen2_moe": "Qwen2Moe",
    "qwen3_moe": "Qwen3Moe",
    "qwen3_vl_moe": "Qwen3VLMoe",
    "qwen3_5_moe": "Qwen3_5Moe",
    "glm4_moe": "Glm4Moe",
    "mixtral": "Mixtral",
}


def get_moe_arch_config(config) -> MOEArchConfig:
    """The MOEArchConfig of a Hugging Face config (its text_config for multimodal models)."""
    arch = config.architectures[0] if getattr(config, "architectures", None) else ""
    arch = arch or _ARCHITECTURE_OF_MODEL_TYPE.get(str(getattr(config, "model_type", "")), "")
    cfg = getattr(config, "text_config", None) or config
    model_type, text_type = str(getattr(config, "model_type", "")), str(getattr(cfg, "model_type", ""))
    deepseek_shared = lambda c: getattr(c, "n_shared_experts", 0) > 0  # noqa: E731
    if "DeepseekV4" in arch or model_type == "deepseek_v4":
        return _config(cfg.n_routed_experts, cfg, shared=True, router_type="precomputed")
    kimi = {"kimi_k2", "kimi_k25", "kimi_k2_5", "kimi_k26", "kimi_k2_6"}
    if "KimiK2" in arch or model_type in kimi or text_type == "kimi_k2":
        return _config(cfg.n_routed_experts, cfg, shared=deepseek_shared(cfg), router_type="deepseek_gate")
    if "DeepseekV2" in arch or "DeepseekV3" in arch:
        return _config(config.n_routed_experts, config, shared=deepseek_shared(config), router_type="deepseek_gate")
    if any(name in arch for name in ("Qwen2Moe", "Qwen3Moe", "Qwen3VLMoe", "Qwen3_5Moe")):
        return _config(cfg.num_experts, cfg, shared=getattr(cfg, "shared_expert_intermediate_size", 0) > 0)
    if "Glm4Moe" in arch:
        return _config(config.n_routed_experts, config, shared=deepseek_shared(config), router_type="glm4_moe_gate")
    if "Mixtral" in arch:
        return _config(
            config.num_local_experts,
            config,
            shared=False,
            moe_layer_attr="block_sparse_moe",
            weight_names=("w1", "w3", "w2"),
            intermediate_size=config.intermediate_size,
        )
    raise KTAMXModelNotSupportedError(
        f"Model architecture {arch!r} is not supported by kt_ops.sft. Supported architectures: DeepseekV2, "
        "DeepseekV3, DeepseekV4, KimiK2/KimiK25, Qwen2Moe, Qwen3Moe, Qwen3VLMoe, Qwen3_5Moe, Glm4Moe, Mixtral "
        "(kt_ops.integration.apply_kt covers every transformers MoE model)"
    )


def get_moe_module(layer: nn.Module, moe_config: MOEArchConfig) -> Optional[nn.Module]:
    """The layer's MoE block, or None for a dense layer."""
    module = getattr(layer, moe_config.moe_layer_attr, None)
    return module if module is not None and hasattr(module, moe_config.experts_attr) else None


def detect_fused_experts(experts: Optional[nn.Module]) -> bool:
    """Whether the experts are transformers v5's fused module (3-D gate_up_proj [E, 2I, H] and
    down_proj [E, H, I]) rather than a list of per-expert Linear layers."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3


def get_layers_prefix(config) -> str:
    """The checkpoint key prefix of the decoder layers."""
    arch = config.architectures[0] if getattr(config, "architectures", None) else ""
    model_type = str(getattr(config, "model_type", ""))
    text_config = getattr(config, "text_config", None)
    text_type = str(getattr(text_config, "model_type", ""))
    kimi_composite = model_type in {"kimi_k25", "kimi_k2_5", "kimi_k26", "kimi_k2_6"} or arch in {
        "KimiK25ForConditionalGeneration",
        "KimiK26ForConditionalGeneration",
    }
    if text_config is not None and kimi_composite:
        return "language_model.model.layers"
    if text_type == "kimi_k2":
        raise KTAMXModelNotSupportedError(
            f"Unknown composite Kimi architecture {arch!r} (model_type {model_type!r}) has no known layer prefix"
        )
    if "Qwen3_5Moe" in arch or "Qwen3VLMoe" in arch:
        return "model.language_model.layers"
    return "model.layers"


_get_layers_prefix = get_layers_prefix  # kt-kernel's name


def get_model_container_and_layers(model: nn.Module, *, purpose: str):
    """(the module holding `.layers`, the decoder layers), looking through PEFT, TRL value-head and
    DDP wrappers (their model / base_model / pretrained_model / module / language_model)."""
    queue, seen, names = [model], set(), []
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        names.append(type(current).__name__)
        layers = getattr(current, "layers", None)
        if isinstance(layers, (list, tuple, nn.ModuleList)):
            return current, layers
        for attr in ("model", "base_model", "pretrained_model", "module", "language_model"):
            child = getattr(current, attr, None)
            if isinstance(child, nn.Module) and child is not current:
                queue.append(child)
        get_base = getattr(current, "get_base_model", None)
        if callable(get_base):
            try:
                base = get_base()
            except Exception:
                base = None
            if isinstance(base, nn.Module) and base is not current:
                queue.append(base)
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    raise KTAMXConfigError(
        f"Model does not expose a .model.layers or .layers attribute for KT {purpose} (looked through "
        f"model/base_model/pretrained_model/module/get_base_model: {shown})"
    )


_get_model_container_and_layers = get_model_container_and_layers  # kt-kernel's name

_SHARED = ("shared_experts", "shared_expert", "shared_experts_gate", "shared_expert_gate")


def move_non_experts_to_gpu(model: nn.Module, moe_config: Optional[MOEArchConfig] = None, device="cuda:0") -> None:
    """Move everything but the routed experts to `device`: embeddings, norms, the head, attention,
    routers, shared experts and their gates, dense MLPs; the routed experts stay on the CPU."""
    if moe_config is None:
        config = getattr(model, "config", None)
        if config is None:
            raise KTAMXConfigError("Model config is required to infer the MoE architecture")
        moe_config = get_moe_arch_config(config)
    container, layers = get_model_container_and_layers(model, purpose="placement")
    for name in ("embed_tokens", "norm", "hc_head"):
        if hasattr(container, name):
            getattr(container, name).to(device)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head = head if head is not None else getattr(model, "lm_head", None)
    if head is not None:
        head.to(device)
    for layer in layers:
        for name in ("attn_hc", "ffn_hc", "self_attn", "input_layernorm", "post_attention_layernorm"):
            if hasattr(layer, name):
                getattr(layer, name).to(device)
        moe = get_moe_module(layer, moe_config)
        if moe is None:
            if hasattr(layer, "mlp"):
                layer.mlp.to(device)
            continue
        for name in (moe_config.router_attr, *_SHARED):
            part = getattr(moe, name, None)
            if part is not None:
                part.to(device)
    logger.info("Moved non-expert parameters to %s", device)


def get_expert_device(model: nn.Module, moe_config: Optional[MOEArchConfig] = None) -> str:
    """The device type of the first routed expert's weights ('unknown' when there is none)."""
    if moe_config is None:
        config = getattr(model, "config", None)
        if config is None:
            return "unknown"
        moe_config = get_moe_arch_config(config)
    try:
        _, layers = get_model_container_and_layers(model, purpose="expert device probing")
    except KTAMXConfigError:
        return "unknown"
    for layer in layers:
        experts = getattr(get_moe_module(layer, moe_config), moe_config.experts_attr, None)
        if isinstance(experts, nn.Module) and len(list(experts.parameters())):
            return next(experts.parameters()).device.type
    return "unknown"


def find_kt_wrappers(model) -> Optional[list]:
    """model._kt_wrappers, looking through PEFT / other wrappers' base_model / model."""
    wrappers = getattr(model, "_kt_wrappers", None)
    current = model
    for attr in ("base_model", "model"):
        if wrappers is not None:
            break
        if hasattr(current, attr):
            current = getattr(current, attr)
            wrappers = getattr(current, "_kt_wrappers", None)
    return wrappers
