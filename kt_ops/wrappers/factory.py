"""KTMoEWrapper: the one entry point for every CPU-expert wrapper. `mode` picks inference or SFT, and
`method` the weight format; the object returned is the concrete wrapper:

    inference  AMXINT4, AMXINT8, MOE_INT4, MOE_INT8  -> AMXMoEWrapper (online quantization or kt_ops' own
                                                        pre-quantized files)
               FP8, RAWINT4, BF16                    -> NativeMoEWrapper (HF safetensors checkpoints: DeepSeek
                                                        fp8 block-scaled, compressed-tensors pack-quantized int4,
                                                        bf16)
               LLAMAFILE                             -> LlamafileMoEWrapper (GGUF files)
    sft        *_SFT, *_SFT_SkipLoRA                 -> AMXSFTMoEWrapper

The arguments are kt-kernel 0.7's, by position or keyword; the specification's calls (kt-kernel of
January 2026: num_gpu_experts where 0.7 takes gpu_experts_mask) work unchanged.
Inference wrappers accept max_deferred_experts_per_token (see kt_ops.wrappers.amx for deferred experts)."""

from __future__ import annotations

from typing import List, Optional, Sequence

from ..core.checks import check_int
from ..core.formats import (
    CHECKPOINT_SFT_METHODS,
    FORMAT_SFT_METHODS,
    INFERENCE_METHODS,
    KT_KERNEL_ONLY_METHODS,
    SFT_METHODS,
    SKIP_LORA_METHODS,
)
from ..core.runtime import usable_cpus
from ..core.settings import KTSettings
from .amx import AMXMoEWrapper
from .amx_sft import AMXSFTMoEWrapper
from .llamafile import LlamafileMoEWrapper
from .native import NativeMoEWrapper
from .sft import KExpertsSFTBuffer

_REQUIRED = object()


def _arguments(
    layer_idx=_REQUIRED,
    num_experts=_REQUIRED,
    num_experts_per_tok=_REQUIRED,
    hidden_size=_REQUIRED,
    moe_intermediate_size=_REQUIRED,
    gpu_experts_mask=None,
    cpuinfer_threads=_REQUIRED,
    threadpool_count=_REQUIRED,
    weight_path=_REQUIRED,
    chunked_prefill_size=_REQUIRED,
    cpu_save: bool = False,
    max_deferred_experts_per_token: Optional[int] = None,
    method: str = "AMXINT4",
    numa_nodes: Optional[Sequence[int]] = None,
    mode: str = "inference",
    num_gpu_experts: int = 0,
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.0,
    max_cache_depth: int = 1,
    group_size: int = 128,
    zero_point: bool = True,
    full_weight_grad: bool = False,
    swiglu_limit: float = 0.0,
    swiglu_alpha: float = 0.0,
) -> dict:
    """kt-kernel 0.7's KTMoEWrapper signature, bound by Python's own rules. gpu_experts_mask sits
    between required arguments there; it has a default here so that the specification's calls,
    which name num_gpu_experts instead, bind too."""
    arguments = dict(locals())
    missing = [name for name, value in arguments.items() if value is _REQUIRED]
    if missing:
        raise TypeError(f"KTMoEWrapper() missing required arguments: {missing}")
    return arguments


class KTMoEWrapper:
    INFERENCE_METHODS = frozenset(INFERENCE_METHODS)
    SFT_METHODS = frozenset(SFT_METHODS + SKIP_LORA_METHODS + tuple(CHECKPOINT_SFT_METHODS))

    def __new__(cls, *args, **kwargs):
        """KTMoEWrapper(layer_idx, num_experts, num_experts_per_tok, hidden_size,
        moe_intermediate_size, gpu_experts_mask, cpuinfer_threads, threadpool_count, weight_path,
        chunked_prefill_size, cpu_save=False, max_deferred_experts_per_token=None, method="AMXINT4",
        numa_nodes=None, mode="inference", num_gpu_experts=0, lora_rank=16, lora_alpha=32.0,
        lora_dropout=0.0, max_cache_depth=1, group_size=128, zero_point=True,
        full_weight_grad=False, swiglu_limit=0.0, swiglu_alpha=0.0).

        gpu_experts_mask: [num_experts] bool, True for the experts the caller computes on its GPU
        (None: none; an int: the first N, the specification's num_gpu_experts in this position).
        swiglu_limit / swiglu_alpha pick the expert activation: a limit alone is DeepSeek-V4's
        clamped SiLU, an alpha gpt-oss' / MiniMax-M3's SwiGLU (clamped at the limit when one is
        given)."""
        a = _arguments(*args, **kwargs)
        mode, method = a["mode"], a["method"]
        if mode not in ("inference", "sft"):
            raise ValueError(f"Unknown mode: {mode!r}. Must be 'inference' or 'sft'.")
        supported = cls.INFERENCE_METHODS if mode == "inference" else cls.SFT_METHODS
        if method not in supported:
            unsupported = " (a kt-kernel method kt_ops does not compute)" if method in KT_KERNEL_ONLY_METHODS else ""
            raise ValueError(
                f"Method {method!r} not supported in {mode} mode{unsupported}. Supported methods: {sorted(supported)}"
            )
        base = {
            name: a[name]
            for name in (
                "layer_idx",
                "num_experts",
                "num_experts_per_tok",
                "hidden_size",
                "moe_intermediate_size",
                "cpuinfer_threads",
                "threadpool_count",
                "weight_path",
                "chunked_prefill_size",
                "numa_nodes",
                "swiglu_limit",
                "swiglu_alpha",
            )
        }
        if mode == "sft":
            return AMXSFTMoEWrapper(
                num_gpu_experts=a["num_gpu_experts"],
                gpu_experts_mask=a["gpu_experts_mask"],
                method=method,
                lora_rank=a["lora_rank"],
                lora_alpha=a["lora_alpha"],
                lora_dropout=a["lora_dropout"],
                max_cache_depth=a["max_cache_depth"],
                group_size=a["group_size"],
                zero_point=a["zero_point"],
                full_weight_grad=a["full_weight_grad"],
                **base,
            )
        if method == "LLAMAFILE":
            wrapper_cls = LlamafileMoEWrapper
        elif method in NativeMoEWrapper.METHOD_FORMATS:
            wrapper_cls = NativeMoEWrapper
        else:
            wrapper_cls = AMXMoEWrapper
        return wrapper_cls(
            gpu_experts_mask=a["gpu_experts_mask"],
            num_gpu_experts=a["num_gpu_experts"],
            method=method,
            cpu_save=a["cpu_save"],
            max_deferred_experts_per_token=a["max_deferred_experts_per_token"],
            **base,
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
