"""KTConfig and KTActivationPolicy: kt-kernel 0.7's SFT configuration (`kt_kernel.sft.config`), the
object LLaMA-Factory's and accelerate's KT integrations pass around.

Every field has kt-kernel's name, environment default (ACCELERATE_KT_*) and checks. kt_ops' own
settings are KTSettings (kt_ops.core.settings); `KTConfig.to_settings()` gives the KTSettings the
same run means, which is how kt_ops.sft hands a KTConfig to apply_kt and the wrappers.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Union

from ..core.runtime import environment_flag
from ..core.settings import KTSettings
from .backend import (
    EXPERT_WEIGHT_FORMATS,
    FORMAT_BACKENDS,
    SETTINGS_BACKENDS,
    SFT_BACKENDS,
    check_format_rules,
    normalize_sft_backend,
)

logger = logging.getLogger(__name__)

_CPU_TOPOLOGY_ROOT = Path("/sys/devices/system/cpu")
_ACTIVATION_POLICY_ENV = "ACCELERATE_KT_ACTIVATION_POLICY"
_LEGACY_REUSE_ENV = "KT_REUSE_CHECKPOINT_FORWARD"


@dataclass(frozen=True)
class KTActivationPolicy:
    """Which activations each side keeps between forward and backward: the CPU experts' (cpu) and
    the GPU layers' (gpu), each 'retain' or 'recompute'. gpu='recompute' means activation
    checkpointing; cpu='retain' then keeps the experts' first-forward output for the recompute."""

    cpu: Literal["retain", "recompute"] = "recompute"
    gpu: Literal["retain", "recompute"] = "recompute"

    def __post_init__(self) -> None:
        for side in ("cpu", "gpu"):
            if getattr(self, side) not in ("retain", "recompute"):
                raise ValueError(
                    f"activation_policy.{side} must be one of ['recompute', 'retain'], got {getattr(self, side)!r}"
                )
        if self.cpu == "recompute" and self.gpu == "retain":
            raise NotImplementedError("activation_policy cpu=recompute, gpu=retain is not implemented")

    @classmethod
    def from_value(cls, value: Union["KTActivationPolicy", Mapping]) -> "KTActivationPolicy":
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                "kt_activation_policy must be a KTActivationPolicy or a mapping with exactly the keys 'cpu' and 'gpu'"
            )
        missing, unexpected = sorted({"cpu", "gpu"} - set(value)), sorted(set(value) - {"cpu", "gpu"})
        if missing or unexpected:
            details = [f"missing={missing}"] * bool(missing) + [f"unexpected={unexpected}"] * bool(unexpected)
            raise ValueError(f"kt_activation_policy must contain exactly 'cpu' and 'gpu' ({', '.join(details)})")
        return cls(cpu=value["cpu"], gpu=value["gpu"])


def _env_int(key: str, default):
    value = os.environ.get(key)
    return default if value in (None, "") else int(value)


def _env_float(key: str, default):
    value = os.environ.get(key)
    return default if value in (None, "") else float(value)


def _env_bool(key: str, default: bool) -> bool:
    return default if os.environ.get(key, "").strip() == "" else environment_flag(key)


def _available_cpu_ids() -> set:
    """The CPUs this process may run on (affinity / cpuset)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _read_cpu_topology(cpu: int) -> Optional[tuple]:
    """(physical package, core) of a logical CPU from sysfs, None when unreadable."""
    topology = _CPU_TOPOLOGY_ROOT / f"cpu{cpu}" / "topology"
    try:
        return int((topology / "physical_package_id").read_text()), int((topology / "core_id").read_text())
    except (OSError, ValueError):
        return None


def detect_physical_cpu_count() -> int:
    """The physical cores this process may run on: distinct (package, core) pairs of its CPUs, so SMT
    siblings count once; the CPU count when the topology cannot be read."""
    cpus = _available_cpu_ids()
    cores = {core for core in map(_read_cpu_topology, cpus) if core is not None}
    return max(1, len(cores) or len(cpus))


def _set_torch_num_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def configure_omp_threads() -> int:
    """Size torch's OpenMP team (which the kt_ops kernels run on) for SFT: ACCELERATE_KT_OMP_NUM_THREADS
    when set, else an OMP_NUM_THREADS above 1 (accelerate sets 1 for GPU jobs when nobody chose),
    else 1 on distributed ranks other than 0 (they own no experts), else the physical cores."""
    kt_override, omp = _env_int("ACCELERATE_KT_OMP_NUM_THREADS", None), _env_int("OMP_NUM_THREADS", None)
    if kt_override is not None:
        threads, source = kt_override, "ACCELERATE_KT_OMP_NUM_THREADS"
    elif omp is not None and omp > 1:
        threads, source = omp, "OMP_NUM_THREADS"
    elif _env_int("WORLD_SIZE", 1) > 1 and _env_int("RANK", 0) != 0:
        threads, source = 1, "a distributed rank that owns no experts"
    else:
        threads, source = detect_physical_cpu_count(), "the physical cores"
    if threads < 1:
        raise ValueError(f"OpenMP thread count must be positive, got {threads}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    _set_torch_num_threads(threads)
    logger.info("KT SFT configured OMP_NUM_THREADS=%d from %s", threads, source)
    return threads


def _policy_from_environment() -> Optional[KTActivationPolicy]:
    forwarded = os.environ.get(_ACTIVATION_POLICY_ENV, "").strip()
    legacy = os.environ.get(_LEGACY_REUSE_ENV, "").strip()
    if forwarded and legacy:
        raise ValueError(
            f"{_ACTIVATION_POLICY_ENV} conflicts with legacy {_LEGACY_REUSE_ENV}; unset {_LEGACY_REUSE_ENV}"
        )
    if forwarded:
        try:
            value = json.loads(forwarded)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{_ACTIVATION_POLICY_ENV} must be a JSON object with exactly the keys 'cpu' and 'gpu'"
            ) from error
        return KTActivationPolicy.from_value(value)
    if legacy:
        if legacy.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(f"{_LEGACY_REUSE_ENV} must be a boolean value, got {legacy!r}")
        warnings.warn(
            f"{_LEGACY_REUSE_ENV} is deprecated; configure kt_activation_policy through the training frontend instead",
            FutureWarning,
            stacklevel=4,
        )
        retain = legacy.lower() in ("1", "true", "yes", "on")
        return KTActivationPolicy(cpu="retain" if retain else "recompute", gpu="recompute")
    return None


# Filled by the training frontend while it wraps (outer runtime metadata), never by users.
_RUNTIME_FIELDS = ("kt_checkpoint_files", "kt_sharded_metadata", "kt_skip_expert_loading")


@dataclass
class KTConfig:
    """kt-kernel's SFT configuration; `KTConfig(**mapping)` takes YAML / HfTrainerKTConfig keys as
    they are, and a field left None takes its ACCELERATE_KT_* environment default."""

    # backend
    kt_backend: Optional[str] = None
    kt_num_threads: Optional[int] = None
    kt_tp_enabled: Optional[bool] = None
    kt_threadpool_count: Optional[int] = None
    # weights
    kt_weight_path: Optional[str] = None
    kt_non_expert_weight_path: Optional[str] = None
    kt_expert_weight_format: Optional[str] = None
    kt_weight_lifecycle: Optional[str] = None
    kt_expert_checkpoint_path: Optional[str] = None  # HF experts, or a KT full-weight checkpoint directory
    kt_num_gpu_experts: Optional[int] = None
    kt_skip_expert_loading: Optional[bool] = None
    kt_share_backward_bb: Optional[bool] = None
    kt_share_cache_pool: Optional[bool] = None
    kt_force_fused_expert_lora: Optional[bool] = None
    # forward cache
    kt_max_cache_depth: Optional[int] = None
    kt_model_max_length: Optional[int] = None
    kt_activation_policy: Union[KTActivationPolicy, Mapping, None] = None
    # LoRA
    kt_lora_rank: Optional[int] = None
    kt_lora_alpha: Optional[float] = None
    kt_lora_dropout: Optional[float] = None
    # training mode: "lora", "full" (base weights) or "hybrid" (both)
    kt_train_mode: Optional[str] = None
    kt_full_weight_grad: Optional[bool] = None
    # extra GPU-side experts (kt-kernel's LoRA experts)
    kt_use_lora_experts: Optional[bool] = None
    kt_lora_expert_num: Optional[int] = None
    kt_lora_expert_intermediate_size: Optional[int] = None
    # runtime state set while wrapping
    kt_checkpoint_files: Optional[List[str]] = None
    kt_sharded_metadata: Optional[dict] = None
    # custom wrapping
    kt_wrap_fn: Optional[Callable[..., Any]] = None
    kt_wrap_kwargs: Optional[Dict[str, Any]] = None

    @classmethod
    def from_object(cls, obj: Any) -> "KTConfig":
        """A KTConfig from a KTConfig (itself), a mapping of fields, or a container holding one in a
        static `kt_config` or `config` attribute (accelerate's plugin, HfTrainerKTConfig), whose own
        kt_checkpoint_files / kt_sharded_metadata / kt_skip_expert_loading override it."""
        return cls._from_object(obj, set())

    @classmethod
    def _from_object(cls, obj: Any, seen: set) -> "KTConfig":
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, Mapping):
            return cls(**cls._validated_mapping(obj))
        if id(obj) in seen:
            raise ValueError("Cyclic KT configuration container")
        seen.add(id(obj))
        names = {f.name for f in dataclasses.fields(cls)}
        attributes = vars(obj) if hasattr(obj, "__dict__") else {}
        unknown = sorted(n for n in attributes if n.startswith("kt_") and n not in names and n != "kt_config")
        if unknown:
            raise TypeError(f"Unknown KTConfig fields: {unknown}")
        absent = object()
        containers = [n for n in ("kt_config", "config") if inspect.getattr_static(obj, n, absent) is not absent]
        for name in containers:
            nested = getattr(obj, name, None)
            if nested is None:
                continue
            if nested is obj:
                raise ValueError(f"Cyclic KT configuration container: {name}")
            overrides = {n: getattr(obj, n, None) for n in _RUNTIME_FIELDS}
            overrides = {n: v for n, v in overrides.items() if v is not None}
            if isinstance(nested, Mapping):
                return cls(**{**cls._validated_mapping(nested), **overrides})
            resolved = cls._from_object(nested, seen)
            overrides = {n: v for n, v in overrides.items() if v is not getattr(resolved, n, None)}
            if not overrides:
                return resolved
            result = copy.copy(resolved)  # the overlay never changes the caller's config
            for n, v in overrides.items():
                setattr(result, n, v)
            return result
        if containers:
            return cls()
        raise TypeError(
            "KT configuration must be a KTConfig, a mapping, or a public container with a static 'kt_config' or "
            "'config' attribute"
        )

    @classmethod
    def _validated_mapping(cls, obj: Mapping) -> dict:
        payload = dict(obj)
        bad = sorted(repr(n) for n in payload if not isinstance(n, str))
        if bad:
            raise TypeError(f"KTConfig field names must be strings: {bad}")
        if "enabled" in payload:  # the framework's on/off switch, not a KT field
            enabled = payload.pop("enabled")
            if enabled is not None and not isinstance(enabled, bool):
                raise TypeError("KT framework field 'enabled' must be a bool or None")
        unknown = sorted(set(payload) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"Unknown KTConfig fields: {unknown}")
        return payload

    def __post_init__(self):
        configure_omp_threads()
        self._resolve_format_and_lifecycle()
        self._resolve_activation_policy()
        self._resolve_backend()
        self._resolve_environment_defaults()
        if self.kt_non_expert_weight_path and self.kt_expert_weight_format not in ("int8", "mxfp4"):
            raise ValueError(
                "kt_non_expert_weight_path is supported only with kt_expert_weight_format='int8' or 'mxfp4'"
            )
        check_format_rules(self)
        if self.kt_weight_lifecycle == "ephemeral" and self.kt_expert_weight_format != "int8":
            raise ValueError("kt_weight_lifecycle='ephemeral' is supported only for INT8 .kt weights")

    def _resolve_format_and_lifecycle(self) -> None:
        if self.kt_expert_weight_format is None:
            self.kt_expert_weight_format = os.environ.get("ACCELERATE_KT_EXPERT_WEIGHT_FORMAT")
        if self.kt_expert_weight_format is not None:
            self.kt_expert_weight_format = str(self.kt_expert_weight_format).strip().lower()
            if self.kt_expert_weight_format not in EXPERT_WEIGHT_FORMATS:
                raise ValueError(
                    f"kt_expert_weight_format must be one of {list(EXPERT_WEIGHT_FORMATS)}, "
                    f"got {self.kt_expert_weight_format!r}"
                )
        if self.kt_weight_lifecycle is None:
            self.kt_weight_lifecycle = os.environ.get("ACCELERATE_KT_WEIGHT_LIFECYCLE", "persistent")
        self.kt_weight_lifecycle = str(self.kt_weight_lifecycle).strip().lower()
        if self.kt_weight_lifecycle not in ("persistent", "ephemeral"):
            raise ValueError(
                f"kt_weight_lifecycle must be one of ['ephemeral', 'persistent'], got {self.kt_weight_lifecycle!r}"
            )

    def _resolve_activation_policy(self) -> None:
        forwarded = os.environ.get(_ACTIVATION_POLICY_ENV, "").strip()
        legacy = os.environ.get(_LEGACY_REUSE_ENV, "").strip()
        if self.kt_activation_policy is not None:
            if forwarded:
                raise ValueError(f"kt_activation_policy conflicts with {_ACTIVATION_POLICY_ENV}; unset it")
            if legacy:
                raise ValueError(f"kt_activation_policy conflicts with legacy {_LEGACY_REUSE_ENV}; unset it")
            self.kt_activation_policy = KTActivationPolicy.from_value(self.kt_activation_policy)
            return
        self.kt_activation_policy = _policy_from_environment() or KTActivationPolicy()

    def _resolve_backend(self) -> None:
        explicit = self.kt_backend is not None
        if self.kt_backend is None:
            quantized = self.kt_expert_weight_format in ("int8", "fp8", "rawint4", "mxfp4")
            self.kt_backend = os.environ.get("ACCELERATE_KT_BACKEND") or ("auto" if quantized else "AMXBF16")
        self.kt_backend = normalize_sft_backend(self.kt_backend, expert_weight_format=self.kt_expert_weight_format)
        implied = {v: k for k, v in FORMAT_BACKENDS.items()}.get(self.kt_backend)
        if self.kt_expert_weight_format is None:
            self.kt_expert_weight_format = implied
        elif FORMAT_BACKENDS[self.kt_expert_weight_format] != self.kt_backend:
            source = "kt_backend" if explicit else "ACCELERATE_KT_BACKEND"
            raise ValueError(
                f"kt_expert_weight_format={self.kt_expert_weight_format!r} conflicts with {source}={self.kt_backend!r}"
            )

    def _resolve_environment_defaults(self) -> None:
        env = {
            "kt_num_threads": lambda: _env_int("ACCELERATE_KT_NUM_THREADS", 1),
            "kt_tp_enabled": lambda: _env_bool("ACCELERATE_KT_TP_ENABLED", False),
            "kt_threadpool_count": lambda: _env_int("ACCELERATE_KT_THREADPOOL_COUNT", 1),
            "kt_weight_path": lambda: os.environ.get("ACCELERATE_KT_WEIGHT_PATH"),
            "kt_non_expert_weight_path": lambda: os.environ.get("ACCELERATE_KT_NON_EXPERT_WEIGHT_PATH"),
            "kt_expert_checkpoint_path": lambda: os.environ.get("ACCELERATE_KT_EXPERT_CHECKPOINT_PATH"),
            "kt_num_gpu_experts": lambda: _env_int("ACCELERATE_KT_NUM_GPU_EXPERTS", 0),
            "kt_max_cache_depth": lambda: _env_int("ACCELERATE_KT_MAX_CACHE_DEPTH", 2),
            "kt_share_backward_bb": lambda: _env_bool(
                "ACCELERATE_KT_SHARE_BACKWARD_BB", self.kt_expert_weight_format not in ("rawint4", "mxfp4")
            ),
            "kt_share_cache_pool": lambda: False,
            "kt_force_fused_expert_lora": lambda: _env_bool("ACCELERATE_KT_FORCE_FUSED_EXPERT_LORA", False),
            "kt_use_lora_experts": lambda: _env_bool("ACCELERATE_KT_USE_LORA_EXPERTS", False),
            "kt_lora_expert_num": lambda: _env_int("ACCELERATE_KT_LORA_EXPERT_NUM", None),
            "kt_lora_expert_intermediate_size": lambda: _env_int("ACCELERATE_KT_LORA_EXPERT_INTERMEDIATE_SIZE", None),
            "kt_lora_rank": lambda: _env_int("ACCELERATE_KT_LORA_RANK", None),
            "kt_lora_alpha": lambda: _env_float("ACCELERATE_KT_LORA_ALPHA", None),
            "kt_lora_dropout": lambda: _env_float("ACCELERATE_KT_LORA_DROPOUT", 0.0),
            "kt_train_mode": lambda: os.environ.get("ACCELERATE_KT_TRAIN_MODE", "lora"),
            "kt_model_max_length": lambda: _env_int("ACCELERATE_KT_MODEL_MAX_LENGTH", None),
        }
        for name, default in env.items():
            if getattr(self, name) is None:
                setattr(self, name, default())
        if self.kt_lora_alpha is None and self.kt_lora_rank is not None:
            self.kt_lora_alpha = float(self.kt_lora_rank * 2)
        if not 0.0 <= self.kt_lora_dropout < 1.0:
            raise ValueError(f"kt_lora_dropout must be in [0, 1), got {self.kt_lora_dropout}")
        if self.kt_train_mode not in ("lora", "full", "hybrid"):
            raise ValueError(f"kt_train_mode must be one of ['full', 'hybrid', 'lora'], got {self.kt_train_mode!r}")
        if self.kt_full_weight_grad is None:
            self.kt_full_weight_grad = self.kt_train_mode in ("full", "hybrid")
        if self.kt_skip_expert_loading is None and "ACCELERATE_KT_SKIP_EXPERT_LOADING" in os.environ:
            self.kt_skip_expert_loading = _env_bool("ACCELERATE_KT_SKIP_EXPERT_LOADING", True)

    # ---- what it means for kt_ops -------------------------------------------------------------------

    @property
    def sft_method(self) -> str:
        """The SFT method (AMXSFTMoEWrapper's) of kt_backend."""
        return SFT_BACKENDS[self.kt_backend.lower()][1]

    @property
    def effective_threadpool_count(self) -> int:
        """kt-kernel splits layers over kt_threadpool_count sub-pools only with kt_tp_enabled."""
        return int(self.kt_threadpool_count or 1) if self.kt_tp_enabled else 1

    def to_settings(self) -> KTSettings:
        """The KTSettings of this run (for apply_kt and kt_ops' own front-ends)."""
        method = self.sft_method.removesuffix("_SkipLoRA")
        backend = SETTINGS_BACKENDS.get(method)
        if backend is None:
            raise ValueError(f"kt_backend {self.kt_backend!r} has no kt_ops settings form; use the SFT wrappers")
        return KTSettings(
            kt_backend=backend,
            kt_weight_path=self.kt_weight_path or None,
            kt_num_threads=int(self.kt_num_threads) if self.kt_num_threads and self.kt_num_threads > 1 else None,
            kt_threadpool_count=self.effective_threadpool_count,
            kt_num_gpu_experts=int(self.kt_num_gpu_experts or 0),
            kt_max_cache_depth=int(self.kt_max_cache_depth or 1),
            lora_rank=int(self.kt_lora_rank if self.kt_lora_rank is not None else 16),
            lora_alpha=self.kt_lora_alpha,
        )
