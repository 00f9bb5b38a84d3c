"""Hugging Face integration: routed experts of transformers MoE models on kt_ops, with LoRA, for
fine-tuning with stock peft, the transformers Trainer and trl. `apply_kt` is the only call needed;
the rest is optional (models used without peft, the per-expert adapter layout, merged export)."""

from .adapter import load_kt_adapter, save_kt_adapter
from .export import export_merged
from ..core.formats import KT_BACKENDS
from ..core.settings import KTSettings
from .apply import apply_kt
from .hf import KTExperts, find_moe_experts, kt_experts_forward
from .install import kt_experts_modules
from .loading import from_pretrained, share_kt_experts
from .lora import disable_kt_lora, get_peft_model, kt_lora_parameters, set_kt_lora_trainable

__all__ = [
    "KT_BACKENDS",
    "KTExperts",
    "KTSettings",
    "apply_kt",
    "disable_kt_lora",
    "export_merged",
    "find_moe_experts",
    "from_pretrained",
    "get_peft_model",
    "kt_experts_forward",
    "kt_experts_modules",
    "kt_lora_parameters",
    "load_kt_adapter",
    "save_kt_adapter",
    "set_kt_lora_trainable",
    "share_kt_experts",
]
