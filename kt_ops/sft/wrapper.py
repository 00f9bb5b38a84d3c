"""Wrapping a Hugging Face model's MoE blocks for kt_ops.sft (`kt_kernel.sft.wrapper`):
wrap_moe_layers_with_kt_wrapper replaces each block with a KTMoELayerWrapper whose backend (rank 0
only) is a kt_ops SFT wrapper loaded with the block's experts; load_kt_model loads and wraps a model.

No LoRA is created here: PEFT adds it, and kt_adapt_peft_lora (kt_ops.sft.lora) hands it to the
backends. kt_ops' own front-end for the same job is kt_ops.integration.apply_kt.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, List

import torch
from torch import nn

from ..wrappers.factory import KTMoEWrapper
from . import weight_manifest
from .arch import (
    KTAMXConfigError,
    KTAMXNotAvailableError,
    detect_fused_experts,
    get_layers_prefix,
    get_model_container_and_layers,
    get_moe_arch_config,
    get_moe_module,
    move_non_experts_to_gpu,
)
from .backend import get_int8_runtime
from .checkpoint import load_full_weight_layer, resolve_full_weight_checkpoint
from .config import KTConfig
from .conv3d_compat import patch_vlm_conv3d
from .dist_utils import distributed_rank_world_size
from .ephemeral import EphemeralKTWeightStore
from .layer import KTMoELayerWrapper, KTRoutedExpertsWrapper
from .lora import LoRAExperts
from .weights import (
    clear_original_expert_weights,
    extract_moe_weights,
    load_block_fp8_experts_from_checkpoint_files,
    load_experts_from_checkpoint_files,
    load_rawint4_experts_from_checkpoint_files,
)
from .wrap_plan import (
    WrapPlan,
    layers_prefix,
    make_plan,
    resolve_raw_safetensors_checkpoint_files,
    supports_checkpoint_forward_reuse,
)

logger = logging.getLogger(__name__)

# kt-kernel checks that its extension exists; kt_ops' kernels are part of this package. Both names
# stay module attributes so that callers (and kt-kernel's tests) can substitute the backend.
KT_KERNEL_AVAILABLE = True
_supports_checkpoint_forward_reuse = supports_checkpoint_forward_reuse  # kt-kernel's name

__all__ = [
    "KTMoEWrapper",
    "build_kt_device_map",
    "build_kt_device_map_simplified",
    "get_int8_runtime",
    "get_kt_loading_kwargs",
    "load_kt_model",
    "wrap_moe_layers_with_kt_wrapper",
]


def _get_kt_config(kt_plugin: Any) -> KTConfig:
    return kt_plugin if isinstance(kt_plugin, KTConfig) else KTConfig.from_object(kt_plugin)


def _sync_rank0_wrap_error(error, *, context: str, rank: int, world_size: int) -> None:
    """A failure of a rank-0-only wrapping stage, raised on every rank."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    payload = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(payload, src=0)
    if payload[0] is None:
        return
    if rank == 0 and error is not None:
        raise error
    raise RuntimeError(f"{context}: rank 0 failed: {payload[0]}")


def _on_rank0(rank: int, world: int, context: str, fn):
    """fn() on rank 0 (None elsewhere), its failure raised on every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except BaseException as exc:
            error = exc
    _sync_rank0_wrap_error(error, context=context, rank=rank, world_size=world)
    return result


def _layer_weights(plan: WrapPlan, model, moe_module, moe_config, layer_idx: int, hidden_size: int):
    """What one layer's backend loads: ('full' | 'tensors', (gate, up, down)), ('fp8' | 'rawint4',
    checkpoint weights), or ('path', None) for the pre-quantized files at kt_weight_path."""
    if plan.full_checkpoint:
        E, I, H = moe_config.expert_num, moe_config.intermediate_size, hidden_size
        shapes = {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)}
        return "tensors", load_full_weight_layer(plan.full_checkpoint, layer_idx=layer_idx, expected_shapes=shapes)
    if plan.expert_weight_format == "mxfp4" or plan.use_kt_weight_path:
        return "path", None
    files = (plan.checkpoint_files, plan.sharded_metadata, layers_prefix(model), moe_config, layer_idx)
    if plan.expert_weight_format == "fp8":
        return "fp8", load_block_fp8_experts_from_checkpoint_files(*files, hidden_size=hidden_size)
    if plan.expert_weight_format == "rawint4":
        return "rawint4", load_rawint4_experts_from_checkpoint_files(*files, hidden_size=hidden_size)
    if plan.checkpoint_files:
        return "tensors", load_experts_from_checkpoint_files(*files)
    gate, up, down = extract_moe_weights(moe_module, moe_config)
    return "tensors", tuple(t.cpu().to(torch.bfloat16).contiguous() for t in (gate, up, down))


def _load_backend(backend, kind: str, weights, plan: WrapPlan, num_experts: int) -> None:
    mapping = torch.arange(num_experts, dtype=torch.int64)
    if kind == "fp8":
        backend.load_block_fp8_weights(weights, mapping)
    elif kind == "rawint4":
        backend.load_rawint4_weights(weights, mapping)
    elif kind == "path":
        backend.load_weights(mapping)
    else:
        backend.load_weights_from_tensors(*weights, physical_to_logical_map_cpu=mapping)
    if plan.full_weight_grad:
        backend.init_full_weight_grad_buffers(*weights)
    else:
        backend.gate_proj = backend.up_proj = backend.down_proj = None


def _make_backend(plan: WrapPlan, cfg, moe_config, layer_idx: int, hidden_size: int, capacity: int, text_config):
    backend = KTMoEWrapper(
        layer_idx=layer_idx,
        num_experts=moe_config.expert_num,
        num_experts_per_tok=moe_config.num_experts_per_tok,
        hidden_size=hidden_size,
        moe_intermediate_size=moe_config.intermediate_size,
        gpu_experts_mask=None,
        num_gpu_experts=0,
        cpuinfer_threads=max(int(cfg.kt_num_threads or 1), plan.threadpool_count),
        threadpool_count=plan.threadpool_count,
        weight_path=plan.kt_weight_path or "",
        chunked_prefill_size=capacity,
        method=plan.method,
        mode="sft",
        lora_rank=plan.lora_rank,
        lora_alpha=plan.lora_alpha,
        lora_dropout=float(cfg.kt_lora_dropout or 0.0),
        max_cache_depth=int(cfg.kt_max_cache_depth or 2),
        group_size=32 if plan.expert_weight_format in ("rawint4", "mxfp4") else 128,
        zero_point=plan.expert_weight_format not in ("rawint4", "mxfp4"),
        swiglu_limit=float(getattr(text_config, "swiglu_limit", 0.0)) if plan.expert_weight_format == "mxfp4" else 0.0,
        full_weight_grad=plan.full_weight_grad,
    )
    policy = cfg.kt_activation_policy
    # what the layer and its autograd read from the backend (kt-kernel sets them the same way)
    backend._uses_authoritative_optimizer_grads = plan.authoritative
    backend.share_backward_bb = cfg.kt_share_backward_bb
    backend.reuse_checkpoint_forward = policy.cpu == "retain" and policy.gpu == "recompute"
    backend.activation_policy = policy
    backend.share_cache_pool = policy.cpu != "retain"
    return backend


def wrap_moe_layers_with_kt_wrapper(model: nn.Module, kt_plugin: Any) -> List[KTMoELayerWrapper]:
    """Replace the model's MoE blocks by KTMoELayerWrappers whose rank-0 backends hold the experts;
    the blocks' expert weights become placeholders. Returns the wrappers, in layer order."""
    if not KT_KERNEL_AVAILABLE:
        raise KTAMXNotAvailableError("the kt_ops backend is not available")
    rank, world = distributed_rank_world_size()
    moe_config = get_moe_arch_config(model.config)
    patched = patch_vlm_conv3d(model)
    if patched:
        logger.info("Patched KT VLM Conv3D modules: %s", patched)
    text_config = getattr(model.config, "text_config", None) or model.config
    hidden_size = text_config.hidden_size
    cfg = _get_kt_config(kt_plugin)
    plan = make_plan(model, cfg)
    _, layers = get_model_container_and_layers(model, purpose="wrapping")
    moe_layers = [i for i, layer in enumerate(layers) if get_moe_module(layer, moe_config) is not None]
    store = None
    if plan.expert_weight_format == "int8":
        ephemeral = cfg.kt_weight_lifecycle == "ephemeral"
        store = _on_rank0(
            rank,
            world,
            "opening ephemeral INT8 weights" if ephemeral else "validating persistent INT8 weights",
            lambda: _check_int8_weights(plan, moe_config, moe_layers, hidden_size, ephemeral),
        )
    max_len = cfg.kt_model_max_length or getattr(model.config, "max_position_embeddings", 4096)
    capacity = int(max_len) * world  # rank 0 receives every rank's rows
    context = _WrapContext(model, cfg, plan, moe_config, hidden_size, capacity, text_config, rank, world, store)
    wrappers = [_wrap_one(context, layers[i], i) for i in moe_layers]
    if store is not None:
        _on_rank0(rank, world, "finishing ephemeral INT8 weights", store.finish)
    # what kt_adapt_peft_lora and the parameter helpers find (load_kt_model sets it too)
    model._kt_wrappers = wrappers
    model._kt_expert_weight_format = plan.expert_weight_format or "bf16"
    # the backward pass meets the layers in reverse: each backend starts the next one's preparation
    for lower, higher in zip(wrappers, wrappers[1:]):
        if higher.wrapper is not None and lower.wrapper is not None:
            higher.wrapper._next_backward_wrapper = lower.wrapper
    if wrappers and wrappers[0].wrapper is not None:
        wrappers[0].wrapper._next_backward_wrapper = None
    return wrappers


@dataclass
class _WrapContext:
    model: nn.Module
    cfg: KTConfig
    plan: WrapPlan
    moe_config: Any
    hidden_size: int
    capacity: int
    text_config: Any
    rank: int
    world: int
    ephemeral_store: Any = None  # rank 0's EphemeralKTWeightStore: each layer's files go once it is loaded


def _wrap_one(c: _WrapContext, layer: nn.Module, layer_idx: int) -> KTMoELayerWrapper:
    """Wrap one MoE block: rank 0 reads its experts and loads them into a new backend."""
    plan, moe_config = c.plan, c.moe_config
    module = get_moe_module(layer, moe_config)
    fused = detect_fused_experts(getattr(module, moe_config.experts_attr, None))
    quantized = plan.expert_weight_format in ("int8", "fp8", "rawint4", "mxfp4")
    if quantized and not fused and not plan.force_fused_expert_lora:
        raise KTAMXConfigError(
            f"{plan.expert_weight_format.upper()} LoRA with non-fused runtime experts requires "
            "kt_force_fused_expert_lora=true"
        )
    stage = functools.partial(_on_rank0, c.rank, c.world)
    kind, weights = stage(
        f"resolving expert weights for layer {layer_idx}",
        functools.partial(_layer_weights, plan, c.model, module, moe_config, layer_idx, c.hidden_size),
    ) or (None, None)
    backend = stage(
        f"constructing KT layer {layer_idx}",
        functools.partial(_make_backend, plan, c.cfg, moe_config, layer_idx, c.hidden_size, c.capacity, c.text_config),
    )
    stage(
        f"loading KT layer {layer_idx}",
        functools.partial(_load_backend, backend, kind, weights, plan, moe_config.expert_num),
    )
    if c.ephemeral_store is not None:
        stage(
            f"consuming ephemeral INT8 layer {layer_idx}", functools.partial(c.ephemeral_store.consume_layer, layer_idx)
        )
    wrapper = _wrap_layer(plan, c.cfg, module, backend, moe_config, c.hidden_size, layer_idx, fused, c.world)
    if moe_config.router_type != "precomputed":
        setattr(layer, moe_config.moe_layer_attr, wrapper)
    clear_original_expert_weights(module, moe_config, plan.full_weight_grad, empty_placeholders=quantized)
    if moe_config.router_type == "precomputed":
        setattr(module, moe_config.experts_attr, wrapper)
    return wrapper


def _check_int8_weights(plan: WrapPlan, moe_config, layer_indices, hidden_size: int, ephemeral: bool):
    """Validate the INT8 directory before any layer loads; the opened store of an ephemeral one."""
    get_int8_runtime()
    geometry = dict(
        layer_indices=layer_indices,
        numa_count=plan.threadpool_count,
        expert_num=moe_config.expert_num,
        hidden_size=hidden_size,
        intermediate_size=moe_config.intermediate_size,
    )
    if ephemeral:
        return EphemeralKTWeightStore.open(plan.kt_weight_path, **geometry)
    weight_manifest.validate_persistent_int8_weights(plan.kt_weight_path, **geometry)
    return None


def _wrap_layer(plan: WrapPlan, cfg, module, backend, moe_config, hidden_size, layer_idx, fused, world):
    lora_experts = None
    if plan.use_lora_experts:
        lora_experts = LoRAExperts(plan.lora_expert_num, hidden_size, plan.lora_expert_intermediate_size)
    cls = KTRoutedExpertsWrapper if moe_config.router_type == "precomputed" else KTMoELayerWrapper
    wrapper = cls(
        original_moe=module,
        wrapper=backend,
        lora_params=None,
        moe_config=moe_config,
        hidden_size=hidden_size,
        layer_idx=layer_idx,
        lora_experts=lora_experts,
        full_weight_grad=plan.full_weight_grad,
        uses_authoritative_optimizer_grads=plan.authoritative,
        activation_policy=cfg.kt_activation_policy,
    )
    wrapper._fused_experts = fused
    wrapper._use_fused_expert_lora = fused or plan.force_fused_expert_lora
    wrapper._force_fused_expert_lora = plan.force_fused_expert_lora
    wrapper._lora_rank, wrapper._lora_alpha = plan.lora_rank, float(plan.lora_alpha)
    wrapper._kt_owner_rank, wrapper._kt_world_size_at_wrap = 0, world
    wrapper._kt_expert_weight_format = plan.expert_weight_format or "bf16"
    return wrapper


# ---- device maps and loading --------------------------------------------------------------------------


def build_kt_device_map(config, kt_plugin, device: str = "cuda:0") -> dict:
    """A from_pretrained device_map: every layer on `device`, the routed experts on the CPU except the
    first kt_num_gpu_experts."""
    moe_config = get_moe_arch_config(config)
    text_config = getattr(config, "text_config", None) or config
    prefix = get_layers_prefix(config)
    head = prefix.rpartition(".layers")[0]
    gpu_experts = int(_get_kt_config(kt_plugin).kt_num_gpu_experts or 0)
    lm_head = "language_model.lm_head" if prefix.startswith("language_model.") else "lm_head"
    device_map = {f"{head}.embed_tokens": device, f"{head}.norm": device, lm_head: device}
    for layer_idx in range(text_config.num_hidden_layers):
        layer = f"{prefix}.{layer_idx}"
        device_map[layer] = device
        experts = f"{layer}.{moe_config.moe_layer_attr}.{moe_config.experts_attr}"
        if gpu_experts:
            for e in range(moe_config.expert_num):
                device_map[f"{experts}.{e}"] = device if e < gpu_experts else "cpu"
        else:
            device_map[experts] = "cpu"
    return device_map


build_kt_device_map_simplified = build_kt_device_map


def get_kt_loading_kwargs(config, kt_plugin, torch_dtype=torch.bfloat16, trust_remote_code=None, token=None) -> dict:
    """from_pretrained keywords for a KT model: on the CPU (the wrappers take the experts from there)."""
    kwargs = {"config": config, "torch_dtype": torch_dtype, "device_map": "cpu", "low_cpu_mem_usage": True}
    if trust_remote_code is not None:
        kwargs["trust_remote_code"] = trust_remote_code
    if token is not None:
        kwargs["token"] = token
    return kwargs


def load_kt_model(
    config,
    model_args: Any = None,
    finetuning_args: Any = None,
    kt_plugin=None,
    model_name_or_path=None,
    trust_remote_code=None,
    token=None,
    torch_dtype=torch.bfloat16,
    **kwargs,
) -> nn.Module:
    """Load `model_name_or_path` with transformers, move everything but the routed experts to this
    rank's GPU (when there is one) and wrap its MoE blocks (kt-kernel's load_kt_model). A full-weight
    checkpoint found in the model directory becomes the experts' source. The configuration is
    kt_plugin (a KTConfig, mapping or plugin), else model_args' kt_* fields."""
    from transformers import AutoModelForCausalLM

    if kt_plugin is None:
        if model_args is None:
            raise KTAMXConfigError("Either kt_plugin or model_args must be provided to load_kt_model()")
        kt_plugin = KTConfig(**{k: v for k, v in vars(model_args).items() if k.startswith("kt_") and v is not None})
    model_name_or_path = model_name_or_path or getattr(model_args, "model_name_or_path", None)
    if model_name_or_path is None:
        raise KTAMXConfigError("model_name_or_path is required to load_kt_model()")
    get_moe_arch_config(config)
    cfg = _get_kt_config(kt_plugin)
    found = resolve_full_weight_checkpoint(model_name_or_path)
    if found is not None and cfg.kt_expert_checkpoint_path is None:
        cfg.kt_expert_checkpoint_path = found
    if cfg.kt_expert_weight_format in ("fp8", "rawint4", "mxfp4"):
        files, meta = resolve_raw_safetensors_checkpoint_files(model_name_or_path)
        if not files:
            raise KTAMXConfigError(
                f"native {cfg.kt_expert_weight_format.upper()} SFT requires raw safetensors checkpoint files"
            )
        cfg.kt_checkpoint_files, cfg.kt_sharded_metadata, cfg.kt_skip_expert_loading = files, meta, True
    loading = get_kt_loading_kwargs(config, kt_plugin, torch_dtype, trust_remote_code, token)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **{**loading, **kwargs})
    if torch.cuda.is_available():
        move_non_experts_to_gpu(model, get_moe_arch_config(config), f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    wrappers = getattr(model, "_kt_wrappers", None) or wrap_moe_layers_with_kt_wrapper(model, cfg)
    model._kt_wrappers = wrappers
    model._kt_tp_enabled = bool(cfg.kt_tp_enabled)
    model._kt_use_lora_experts = bool(cfg.kt_use_lora_experts)
    model._kt_full_weight_grad = bool(cfg.kt_full_weight_grad)
    model._kt_train_mode = cfg.kt_train_mode
    model._kt_expert_weight_format = cfg.kt_expert_weight_format or "bf16"
    return model
