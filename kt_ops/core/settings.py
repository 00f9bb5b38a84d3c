"""KTSettings: the kt settings of a fine-tuning run, parsed, defaulted and checked in one place.

`kt-sft` builds one from its config, `apply_kt` and `from_pretrained` from their keyword arguments,
and `KTMoEWrapper.from_settings` makes the SFT wrapper one describes (the wrappers' own arguments
keep kt-kernel's names: cpuinfer_threads is kt_num_threads, threadpool_count kt_threadpool_count,
...). The field names are kt-kernel's `KTConfig` fields and LLaMA-Factory's config keys (kt-kernel's
kt_lora_rank / kt_lora_alpha are lora_rank / lora_alpha).
A value of the wrong type raises TypeError, one outside what is allowed ValueError. The fields hold
what was given; `backend`, `weight_format`, `alpha` and `lora_scaling` resolve the defaults that
depend on other fields (so `replace` resolves them again).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Optional

from .checks import check_bool, check_choice, check_int, check_number, check_path
from .formats import FORMAT_BACKENDS, KT_BACKENDS
from .runtime import usable_cpus


def _help(text: str):
    return {"help": text}


@dataclass(frozen=True)
class KTSettings:
    kt_backend: str = field(
        default="auto",
        metadata=_help(
            "expert weight format: AMXBF16, AMXINT8, AMXINT4, AMXINT4_1, AMXINT4_KGroup, AMXINT4_1KGroup, AMXFP8 "
            "(or kt-kernel's *_SFT method names), or auto: kt_expert_weight_format's, else kt_weight_path's, else bf16"
        ),
    )
    kt_expert_weight_format: Optional[str] = field(
        default=None,
        metadata=_help(
            "LLaMA-Factory's name for the format: bf16, int8, int4 or fp8 (must agree with an explicit kt_backend)"
        ),
    )
    kt_weight_path: Optional[str] = field(
        default=None,
        metadata=_help(
            "pre-quantized experts: a kt_ops converted file or directory, a KTransformers converted directory, "
            "or a block-FP8 checkpoint"
        ),
    )
    kt_num_threads: Optional[int] = field(
        default=None,
        metadata=_help("kt_ops worker threads (default: physical cores; capped at the CPUs this process may use)"),
    )
    kt_threadpool_count: int = field(
        default=1,
        metadata=_help(
            "sub-pools (one per NUMA node): each layer's intermediate dimension is split over them and the parts "
            "run at once, kt_num_threads / kt_threadpool_count threads each"
        ),
    )
    kt_tp_enabled: bool = field(
        default=False,
        metadata=_help(
            "kt-kernel's tensor-parallel switch: the kt_threadpool_count split is kt_ops' only multi-pool mode, so "
            "this only says so"
        ),
    )
    kt_num_gpu_experts: int = field(
        default=0, metadata=_help("experts per layer kept in transformers (the first N), the others on kt_ops")
    )
    kt_max_cache_depth: int = field(
        default=1,
        metadata=_help("forwards an SFT wrapper keeps for backward (autograd keeps those of the layer itself)"),
    )
    lora_rank: int = field(default=16, metadata=_help("expert LoRA rank (0: no expert LoRA)"))
    lora_alpha: Optional[float] = field(
        default=None, metadata=_help("expert LoRA alpha, scaling = alpha / rank (default: 2 x lora_rank)")
    )

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen: normalise once)
        check_choice(self.kt_backend, "kt_backend", ("auto", *KT_BACKENDS))
        if self.kt_expert_weight_format is not None:
            check_choice(self.kt_expert_weight_format, "kt_expert_weight_format", FORMAT_BACKENDS)
        set_("kt_weight_path", check_path(self.kt_weight_path, "kt_weight_path"))
        check_int(self.kt_num_threads, "kt_num_threads", 1, optional=True)
        check_int(self.kt_threadpool_count, "kt_threadpool_count", 1)
        check_bool(self.kt_tp_enabled, "kt_tp_enabled")
        check_int(self.kt_num_gpu_experts, "kt_num_gpu_experts", 0)
        check_int(self.kt_max_cache_depth, "kt_max_cache_depth", 1)
        check_int(self.lora_rank, "lora_rank", 0)
        set_("lora_alpha", check_number(self.lora_alpha, "lora_alpha", positive=True, optional=True))
        _ = self.backend  # raises when an explicit kt_backend and kt_expert_weight_format disagree
        self._check_threads(set_)
        if self.kt_tp_enabled and self.kt_threadpool_count == 1:
            warnings.warn(
                "kt_tp_enabled=True has no effect with kt_threadpool_count=1: set kt_threadpool_count to "
                "the number of sub-pools (NUMA nodes) to split each layer over",
                stacklevel=3,
            )

    @property
    def backend(self) -> str:
        """kt_backend with 'auto' resolved: kt_expert_weight_format's backend, else bf16's; it stays
        'auto' with kt_weight_path, whose stored format then decides (format_of_stored)."""
        backend, fmt = self.kt_backend, self.kt_expert_weight_format
        if backend == "auto":
            if fmt is not None:
                return FORMAT_BACKENDS[fmt]
            return "auto" if self.kt_weight_path is not None else "AMXBF16"
        if fmt is not None and KT_BACKENDS[backend] != fmt:
            raise ValueError(
                f"kt_backend {backend!r} computes {KT_BACKENDS[backend]!r} experts but "
                f"kt_expert_weight_format is {fmt!r}"
            )
        return backend

    def _check_threads(self, set_) -> None:
        threads = self.kt_num_threads
        if threads is not None and threads < self.kt_threadpool_count:
            raise ValueError(
                f"kt_num_threads ({threads}) must be at least kt_threadpool_count "
                f"({self.kt_threadpool_count}): every sub-pool needs a thread"
            )
        cpus = usable_cpus()
        if threads is not None and threads > cpus:
            # The kernels' workers spin while they wait: oversubscribed cores make every call slower.
            warnings.warn(
                f"kt_num_threads={threads} exceeds the {cpus} CPUs this process may use; using {cpus}", stacklevel=4
            )
            set_("kt_num_threads", max(cpus, self.kt_threadpool_count))

    @property
    def weight_format(self) -> str:
        """The format float experts are packed into (bf16 for 'auto'); a block-FP8 source keeps its
        codes only for fp8 (kt_ops.weights.sources.ExpertSource)."""
        backend = self.backend
        return KT_BACKENDS["AMXBF16" if backend == "auto" else backend]

    @property
    def alpha(self) -> float:
        """lora_alpha, default 2 x lora_rank (kt-kernel's and LLaMA-Factory's default)."""
        return 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha

    @property
    def lora_scaling(self) -> float:
        return self.alpha / self.lora_rank if self.lora_rank else 0.0

    def format_of_stored(self, stored_format: str, where: str) -> str:
        """The format to run pre-quantized experts stored as `stored_format` in: any with kt_backend
        'auto' (and no kt_expert_weight_format); else the backend's own, or its K-group variant (a
        NUMA-split KTransformers layer keeps down's per-part scales as groups)."""
        if self.kt_backend == "auto" and self.kt_expert_weight_format is None:
            return stored_format
        wanted = self.weight_format
        if stored_format in (wanted, wanted + "_kgroup"):
            return stored_format
        raise ValueError(
            f"{where} holds {stored_format!r} experts but kt_backend {self.backend!r} means "
            f"{wanted!r}; pass kt_backend='auto' to use the stored format"
        )

    def replace(self, **changes) -> "KTSettings":
        """These settings with `changes`, checked again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, settings: Optional["KTSettings"] = None, **fields) -> "KTSettings":
        """`settings` (default: the defaults) with `fields` given as keyword arguments on top."""
        if settings is None:
            return cls(**fields)
        if not isinstance(settings, KTSettings):
            raise TypeError(f"settings must be a KTSettings or None, got {type(settings).__name__}")
        return settings.replace(**fields) if fields else settings


def setting_fields() -> dict:
    """{name: dataclasses.Field} of KTSettings, each with its help text in metadata["help"]."""
    return {f.name: f for f in dataclasses.fields(KTSettings)}
