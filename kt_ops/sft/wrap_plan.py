"""What wrapping a model for kt_ops.sft means for one configuration (WrapPlan), decided once before
any layer is touched: the SFT method, LoRA rank and alpha, full or hybrid fine-tuning, the activation
policy, whether the backends keep authoritative gradients, the sub-pool split, and where the experts'
weights come from (a full checkpoint, pre-quantized files at kt_weight_path, raw checkpoint files, or
the model itself)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..wrappers.sft_state import supports_authoritative_optimizer_grads
from .arch import KTAMXConfigError, get_layers_prefix
from .backend import SFT_BACKENDS
from .checkpoint import resolve_full_weight_checkpoint

_REUSE_METHODS = ("AMXBF16_SFT", "AMXFP8_SFT", "AMXINT8_SFT", "INT8_SFT", "RAWINT4_SFT", "MXFP4_SFT")


def supports_checkpoint_forward_reuse(full_weight_grad: bool, lora_rank: int) -> bool:
    """Keeping the first forward's output for the recompute works for pure full or pure LoRA
    fine-tuning (hybrid changes both the base and the LoRA between the passes' bookkeeping)."""
    return (full_weight_grad and lora_rank == 0) or (not full_weight_grad and lora_rank > 0)


@dataclass
class WrapPlan:
    method: str
    lora_rank: int
    lora_alpha: float
    full_weight_grad: bool
    use_lora_experts: bool
    lora_expert_num: int
    lora_expert_intermediate_size: int
    expert_weight_format: Optional[str]
    force_fused_expert_lora: bool
    authoritative: bool
    threadpool_count: int
    kt_weight_path: Optional[str]
    full_checkpoint: Optional[str]
    checkpoint_files: Optional[list]
    sharded_metadata: Optional[dict]

    @property
    def use_kt_weight_path(self) -> bool:
        """Pre-quantized experts at kt_weight_path (for FP8 and RAWINT4 that path is the raw checkpoint)."""
        return self.kt_weight_path is not None and self.expert_weight_format not in ("fp8", "rawint4")


def _lora_rank(cfg) -> int:
    rank = cfg.kt_lora_rank if cfg.kt_lora_rank is not None else 1
    if cfg.kt_train_mode == "full":
        return 0
    # LLaMA-Factory passes a default rank even for full tuning: without an explicit one, full stays full
    if cfg.kt_full_weight_grad and cfg.kt_train_mode != "hybrid" and rank > 0 and cfg.kt_lora_rank is None:
        return 0
    return rank


def make_plan(model, cfg) -> WrapPlan:
    method = SFT_BACKENDS[str(cfg.kt_backend).lower()][1]
    rank, full = _lora_rank(cfg), bool(cfg.kt_full_weight_grad)
    fmt = cfg.kt_expert_weight_format
    force_fused = bool(cfg.kt_force_fused_expert_lora)
    if force_fused and "SkipLoRA" in method:
        raise KTAMXConfigError("kt_force_fused_expert_lora is incompatible with SkipLoRA backends")
    if fmt in ("int8", "fp8", "rawint4", "mxfp4") and (full or cfg.kt_train_mode != "lora" or rank <= 0):
        raise KTAMXConfigError(f"{fmt.upper()} SFT supports frozen-base LoRA only; Full and Hybrid are not supported")
    policy = cfg.kt_activation_policy
    gpu_experts = int(cfg.kt_num_gpu_experts or 0)
    if policy.cpu == "retain" and (
        not supports_checkpoint_forward_reuse(full, rank)
        or method not in _REUSE_METHODS
        or gpu_experts
        or cfg.kt_use_lora_experts
    ):
        raise KTAMXConfigError(
            "activation_policy.cpu=retain requires CPU-only AMXBF16 Full/LoRA or frozen-base INT8/FP8/RAWINT4/MXFP4 "
            "LoRA; Hybrid, GPU-expert, LoRA-expert, generic INT4, and SkipLoRA paths are not supported"
        )
    full_checkpoint = resolve_full_weight_checkpoint(cfg.kt_expert_checkpoint_path)
    plan = WrapPlan(
        method=method,
        lora_rank=rank,
        lora_alpha=cfg.kt_lora_alpha if cfg.kt_lora_alpha is not None else 1.0,
        full_weight_grad=full,
        use_lora_experts=bool(cfg.kt_use_lora_experts),
        lora_expert_num=cfg.kt_lora_expert_num or 2,
        lora_expert_intermediate_size=cfg.kt_lora_expert_intermediate_size or 1024,
        expert_weight_format=fmt,
        force_fused_expert_lora=force_fused,
        authoritative=supports_authoritative_optimizer_grads(
            method, gpu_experts, full_weight_grad=full, lora_rank=rank
        ),
        threadpool_count=int(cfg.kt_threadpool_count or 1) if cfg.kt_tp_enabled else 1,
        kt_weight_path=cfg.kt_weight_path,
        full_checkpoint=full_checkpoint,
        checkpoint_files=cfg.kt_checkpoint_files,
        sharded_metadata=cfg.kt_sharded_metadata,
    )
    _resolve_checkpoint_sources(plan, cfg, model)
    return plan


def _resolve_checkpoint_sources(plan: WrapPlan, cfg, model) -> None:
    if plan.full_checkpoint and plan.use_kt_weight_path:
        raise KTAMXConfigError(
            "A KT full checkpoint and kt_weight_path were both selected; choose one source of the expert weights"
        )
    if cfg.kt_expert_checkpoint_path and not plan.full_checkpoint:
        files, meta = resolve_raw_safetensors_checkpoint_files(cfg.kt_expert_checkpoint_path)
        if files:
            plan.checkpoint_files, plan.sharded_metadata = files, meta
    if plan.expert_weight_format in ("fp8", "rawint4") and not plan.checkpoint_files and plan.kt_weight_path:
        plan.checkpoint_files, plan.sharded_metadata = resolve_raw_safetensors_checkpoint_files(plan.kt_weight_path)
    if plan.expert_weight_format in ("fp8", "rawint4") and not plan.checkpoint_files:
        raise KTAMXConfigError(
            f"{plan.expert_weight_format.upper()} SFT requires raw safetensors checkpoint files: point kt_weight_path "
            "at the checkpoint or set kt_expert_checkpoint_path"
        )
    if plan.expert_weight_format == "int8" and not plan.use_kt_weight_path:
        raise KTAMXConfigError("INT8 SFT requires kt_weight_path with pre-quantized .kt weights")
    cfg.kt_checkpoint_files, cfg.kt_sharded_metadata = plan.checkpoint_files, plan.sharded_metadata
    if cfg.kt_skip_expert_loading and not (plan.use_kt_weight_path or plan.full_checkpoint or plan.checkpoint_files):
        path = getattr(getattr(model, "config", None), "name_or_path", None)
        files, meta = resolve_raw_safetensors_checkpoint_files(path) if path else (None, None)
        if not files:
            raise KTAMXConfigError(
                "KT skip_expert_loading is enabled but no kt_weight_path was provided and no safetensors checkpoint "
                "files could be resolved for on-the-fly expert loading"
            )
        plan.checkpoint_files, plan.sharded_metadata = files, meta


def resolve_raw_safetensors_checkpoint_files(path: Any):
    """(the safetensors shards, the index's metadata or None) of a local checkpoint: a file, or a
    directory with or without model.safetensors.index.json; (None, None) when there are none."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return [str(path)], None
    if not path.is_dir():
        return None, None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        metadata = json.loads(index.read_text(encoding="utf-8"))
        weight_map = metadata.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise KTAMXConfigError(f"invalid safetensors index without weight_map: {index}")
        files = sorted({str(path / name) for name in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"safetensors index references missing shard: {missing[0]}")
        return files, metadata
    files = sorted(str(f) for f in path.glob("*.safetensors"))
    return (files, None) if files else (None, None)


def layers_prefix(model) -> str:
    return get_layers_prefix(model.config)
