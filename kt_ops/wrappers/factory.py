"""KTMoEWrapper: the one entry point for every CPU-expert wrapper. `mode` picks inference or SFT, and
`method` the weight format; the object returned is the concrete wrapper:

    inference  AMXINT4, AMXINT8, MOE_INT4, MOE_INT8  -> AMXMoEWrapper (online quantization or kt_ops' own
                                                        pre-quantized files)
               FP8, RAWINT4                          -> NativeMoEWrapper (HF safetensors checkpoints: DeepSeek
                                                        fp8 block-scaled, compressed-tensors pack-quantized int4)
               LLAMAFILE                             -> LlamafileMoEWrapper (GGUF files)
    sft        *_SFT                                 -> AMXSFTMoEWrapper

Inference wrappers accept max_deferred_experts_per_token (see kt_ops.wrappers.amx for deferred experts)."""

from __future__ import annotations

from typing import List, Optional

from ..core.checks import check_int
from ..core.formats import INFERENCE_METHODS, SFT_METHOD_FORMATS, SFT_METHODS, SKIP_LORA_METHODS
from ..core.runtime import usable_cpus
from ..core.settings import KTSettings
from .amx import AMXMoEWrapper
from .amx_sft import AMXSFTMoEWrapper
from .llamafile import LlamafileMoEWrapper
from .native import NativeMoEWrapper
from .sft import KExpertsSFTBuffer


# weight format -> the SFT method computing it
FORMAT_SFT_METHODS = {SFT_METHOD_FORMATS[method]: method for method in SFT_METHODS}


class KTMoEWrapper:
    INFERENCE_METHODS = frozenset(INFERENCE_METHODS)
    SFT_METHODS = frozenset(SFT_METHODS + SKIP_LORA_METHODS)

    def __new__(
        cls,
        layer_idx: int,
        num_experts: int,
        num_experts_per_tok: int,
        hidden_size: int,
        moe_intermediate_size: int,
        num_gpu_experts: int,
        cpuinfer_threads: int,
        threadpool_count: int,
        weight_path: Optional[str],
        chunked_prefill_size: int,
        cpu_save: bool = False,
        max_deferred_experts_per_token: Optional[int] = None,
        method: str = "AMXINT4",
        mode: str = "inference",
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        max_cache_depth: int = 1,
        group_size: int = 128,
        zero_point: bool = True,
    ):
        if mode not in ("inference", "sft"):
            raise ValueError(f"Unknown mode: {mode!r}. Must be 'inference' or 'sft'.")
        supported = cls.INFERENCE_METHODS if mode == "inference" else cls.SFT_METHODS
        if method not in supported:
            raise ValueError(f"Method {method!r} not supported in {mode} mode. Supported methods: {sorted(supported)}")
        base = dict(
            layer_idx=layer_idx,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            hidden_size=hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            num_gpu_experts=num_gpu_experts,
            cpuinfer_threads=cpuinfer_threads,
            threadpool_count=threadpool_count,
            weight_path=weight_path,
            chunked_prefill_size=chunked_prefill_size,
        )
        if mode == "sft":
            return AMXSFTMoEWrapper(
                method=method,
                lora_rank=lora_rank,
                lora_alpha=lora_alpha,
                max_cache_depth=max_cache_depth,
                group_size=group_size,
                zero_point=zero_point,
                **base,
            )
        if method == "LLAMAFILE":
            wrapper_cls = LlamafileMoEWrapper
        elif method in ("FP8", "RAWINT4"):
            wrapper_cls = NativeMoEWrapper
        else:
            wrapper_cls = AMXMoEWrapper
        return wrapper_cls(
            method=method, cpu_save=cpu_save, max_deferred_experts_per_token=max_deferred_experts_per_token, **base
        )

    @classmethod
    def from_settings(
        cls,
        settings: KTSettings,
        layer_idx: int,
        num_experts: int,
        num_experts_per_tok: int,
        hidden_size: int,
        moe_intermediate_size: int,
        chunked_prefill_size: int = 512,
        group_size: int = 128,
    ) -> AMXSFTMoEWrapper:
        """The SFT wrapper of one layer that `settings` describe (kt-kernel's KTConfig fields): its
        kt_backend's SFT method (for 'auto' with kt_weight_path, the file's format decides when the
        weights are loaded: the method is bf16's), kt_num_threads as cpuinfer_threads (default: the
        CPUs this process may use), kt_threadpool_count, kt_num_gpu_experts, kt_weight_path,
        kt_max_cache_depth, lora_rank and lora_alpha."""
        if not isinstance(settings, KTSettings):
            raise TypeError(f"settings must be a KTSettings, got {type(settings).__name__}")
        return cls(
            layer_idx=layer_idx,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            hidden_size=hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            num_gpu_experts=settings.kt_num_gpu_experts,
            cpuinfer_threads=settings.kt_num_threads or usable_cpus(),
            threadpool_count=settings.kt_threadpool_count,
            weight_path=settings.kt_weight_path,
            chunked_prefill_size=chunked_prefill_size,
            method=FORMAT_SFT_METHODS[settings.weight_format],
            mode="sft",
            lora_rank=settings.lora_rank,
            lora_alpha=settings.alpha,
            max_cache_depth=settings.kt_max_cache_depth,
            group_size=group_size,
        )

    # kt-kernel's buffer-cache controls. kt_ops caches host staging buffers only in SFT mode
    # (KExpertsSFTBuffer, keyed by qlen and sizes); inference stages through torch's pinned-memory
    # caching allocator, which needs no per-size registration.
    @staticmethod
    def set_capture_batch_sizes(capture_bs: List[int]) -> None:
        """Batch sizes (qlen) whose staging buffers stay cached; buffers of other sizes are kept
        only until a buffer of another uncaptured size is needed. An empty list keeps every size."""
        sizes = [check_int(b, "capture_bs entry", 1) for b in capture_bs]
        KExpertsSFTBuffer.capture_bs = sizes

    @staticmethod
    def get_capture_batch_sizes() -> List[int]:
        return list(KExpertsSFTBuffer.capture_bs)

    @staticmethod
    def clear_buffer_cache() -> None:
        """Drop every cached staging buffer."""
        KExpertsSFTBuffer.clear_cache()

    clear_sft_buffer_cache = clear_buffer_cache
