"""kt_ops.sft: kt-kernel 0.7's SFT package (`kt_kernel.sft`) on kt_ops. Code written for
kt_kernel.sft runs by importing from kt_ops.sft instead: the same names, arguments and files.

It is a thin layer: the backends are kt_ops' SFT wrappers (kt_ops.wrappers, each holding a
KTMoELayer), the math is kt_ops' ops; this package adds kt-kernel's model wrapping
(KTMoELayerWrapper, wrap_moe_layers_with_kt_wrapper, load_kt_model), its configuration (KTConfig),
PEFT adaptation, checkpoints and artifacts. kt_ops' own front-end for the same job is
kt_ops.integration.apply_kt.
"""

from .amx import AMXSFTMoEWrapper
from .arch import (
    KTAMXConfigError,
    KTAMXError,
    KTAMXModelNotSupportedError,
    KTAMXNotAvailableError,
    MOEArchConfig,
    get_expert_device,
    get_moe_arch_config,
    get_moe_module,
    move_non_experts_to_gpu,
)
from .artifacts import (
    FUSED_EXPERT_LORA_NAME,
    KT_ADAPTER_MANIFEST_NAME,
    KT_NON_EXPERT_MANIFEST_NAME,
    KTAdapterManifest,
    KTArtifactError,
    is_kt_routed_expert_parameter_name,
    is_kt_supported_moe_model,
    load_kt_adapter_artifacts,
    save_kt_adapter_artifacts,
    validate_kt_prequantized_loading_info,
)
from .autograd import KTMoEFunction
from .backend import (
    FP8_BACKEND,
    FP8_SFT_METHOD,
    INT8_BACKEND,
    INT8_SFT_METHOD,
    MXFP4_SFT_METHOD,
    RAWINT4_BACKEND,
    RAWINT4_GROUP_SIZE,
    RAWINT4_SFT_METHOD,
    RAWINT4_WEIGHT_LAYOUT,
    get_fp8_runtime,
    get_int8_runtime,
    get_mxfp4_runtime,
    get_rawint4_runtime,
)
from .base import BaseSFTMoEWrapper, KExpertsSFTBuffer
from .config import KTActivationPolicy, KTConfig
from .conv3d_compat import is_vlm_conv3d_compatible, patch_vlm_conv3d
from .dist_utils import get_activation_checkpoint_context_fn
from .layer import KTMoELayerWrapper
from .lora import (
    KTAdaptationResult,
    LoRAExpertMLP,
    LoRAExperts,
    adapt_peft_lora,
    get_kt_lora_named_params,
    get_kt_lora_params,
    get_kt_named_trainable_params,
    get_kt_rank_local_parameter_names,
    get_kt_trainable_params,
    kt_adapt_peft_lora,
    load_kt_moe_from_adapter,
    load_lora_experts_from_adapter,
    save_kt_moe_to_adapter,
    save_lora_experts_to_adapter,
    sync_kt_lora_gradients,
    update_kt_lora_pointers,
)
from .profiler import collect_kt_sft_profile, format_kt_sft_profile, reset_kt_sft_profile
from .weight_manifest import validate_persistent_int8_weights
from .weights import (
    BlockFP8ExpertWeights,
    RAWINT4ExpertWeights,
    extract_moe_weights,
    get_kt_expert_placeholders,
    load_block_fp8_experts_from_checkpoint_files,
    load_experts_from_checkpoint_files,
    load_rawint4_experts_from_checkpoint_files,
)
from .wrapper import (
    build_kt_device_map,
    build_kt_device_map_simplified,
    get_kt_loading_kwargs,
    load_kt_model,
    wrap_moe_layers_with_kt_wrapper,
)

__all__ = [
    "AMXSFTMoEWrapper",
    "BaseSFTMoEWrapper",
    "BlockFP8ExpertWeights",
    "FP8_BACKEND",
    "FUSED_EXPERT_LORA_NAME",
    "FP8_SFT_METHOD",
    "INT8_BACKEND",
    "INT8_SFT_METHOD",
    "KExpertsSFTBuffer",
    "KTAdapterManifest",
    "KTArtifactError",
    "KT_ADAPTER_MANIFEST_NAME",
    "KT_NON_EXPERT_MANIFEST_NAME",
    "KTAMXConfigError",
    "KTAMXError",
    "KTAMXModelNotSupportedError",
    "KTAMXNotAvailableError",
    "KTActivationPolicy",
    "KTAdaptationResult",
    "KTConfig",
    "KTMoEFunction",
    "KTMoELayerWrapper",
    "LoRAExpertMLP",
    "LoRAExperts",
    "MOEArchConfig",
    "MXFP4_SFT_METHOD",
    "RAWINT4ExpertWeights",
    "RAWINT4_BACKEND",
    "RAWINT4_GROUP_SIZE",
    "RAWINT4_SFT_METHOD",
    "RAWINT4_WEIGHT_LAYOUT",
    "adapt_peft_lora",
    "build_kt_device_map",
    "build_kt_device_map_simplified",
    "collect_kt_sft_profile",
    "extract_moe_weights",
    "format_kt_sft_profile",
    "get_activation_checkpoint_context_fn",
    "get_expert_device",
    "get_fp8_runtime",
    "get_int8_runtime",
    "get_kt_expert_placeholders",
    "get_kt_loading_kwargs",
    "get_kt_lora_named_params",
    "get_kt_lora_params",
    "get_kt_named_trainable_params",
    "get_kt_rank_local_parameter_names",
    "get_kt_trainable_params",
    "get_moe_arch_config",
    "get_moe_module",
    "get_mxfp4_runtime",
    "get_rawint4_runtime",
    "is_vlm_conv3d_compatible",
    "is_kt_routed_expert_parameter_name",
    "is_kt_supported_moe_model",
    "kt_adapt_peft_lora",
    "load_block_fp8_experts_from_checkpoint_files",
    "load_experts_from_checkpoint_files",
    "load_kt_model",
    "load_kt_adapter_artifacts",
    "load_kt_moe_from_adapter",
    "load_lora_experts_from_adapter",
    "load_rawint4_experts_from_checkpoint_files",
    "move_non_experts_to_gpu",
    "patch_vlm_conv3d",
    "reset_kt_sft_profile",
    "save_kt_adapter_artifacts",
    "save_kt_moe_to_adapter",
    "save_lora_experts_to_adapter",
    "sync_kt_lora_gradients",
    "update_kt_lora_pointers",
    "validate_kt_prequantized_loading_info",
    "validate_persistent_int8_weights",
    "wrap_moe_layers_with_kt_wrapper",
]
