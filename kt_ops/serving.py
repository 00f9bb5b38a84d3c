"""Serving one MoE layer's CPU experts for an inference engine, with or without a fine-tuned MoE
LoRA.

    config = KTConfig(layer_idx=3, num_gpu_experts=0, cpuinfer_threads=32, threadpool_count=2,
                      weight_path="/kt/int8", chunked_prefill_size=8192,
                      max_deferred_experts_per_token=None, method="AMXINT8",
                      moe_lora_enabled=True, moe_lora_path="moe_lora.pt",   # from convert_moe_lora
                      sft_method="AMXBF16_SFT", model_path="/hf/model")
    method = KTEPWrapperMethod(config, num_experts_per_tok=8)
    method.create_weights(layer, num_experts, hidden_size, intermediate_size, torch.bfloat16)
    method.process_weights_after_loading(layer)        # base weights from file, then the layer's LoRA
    method.submit(hidden_states, topk_ids, topk_weights)
    ...                                                # the engine's GPU experts run meanwhile
    out = method.sync(hidden_states)

Without a MoE LoRA the layer runs an inference-mode wrapper (`method`, submit_forward/sync_forward).
With one it runs an SFT-mode wrapper (`sft_method`) through forward_sft(save_for_backward=False).
LoRA mode does not compute inside sync(): submit() queues forward_sft on the
process's CPUInfer thread, the one inference mode uses, so the CPU experts overlap the engine's GPU
work in both modes and calls complete in submission order.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .core.checks import check_bool, check_int, check_number, check_path
from .core.formats import LORA_NAMES
from .wrappers import KTMoEWrapper

__all__ = ["KTConfig", "KTEPWrapperMethod", "clear_moe_lora_cache", "get_sft_weight_path", "load_moe_lora_layer"]


@dataclass
class KTConfig:
    """The CPU-expert settings of one MoE layer.

    lora_rank / lora_alpha default to None here (the spec has 16 / 32.0): None takes the values the
    converted MoE LoRA file records, which are the adapter's own. An explicit value must agree with
    the file, since a mismatched alpha would silently scale the LoRA wrong."""

    layer_idx: int
    num_gpu_experts: int
    cpuinfer_threads: int
    threadpool_count: int
    weight_path: Optional[str]
    chunked_prefill_size: int
    max_deferred_experts_per_token: Optional[int]
    method: str
    num_layers: Optional[int] = None
    gpu_prefill_token_threshold: Optional[int] = None

    moe_lora_enabled: bool = False
    moe_lora_path: Optional[str] = None
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    sft_method: str = "AMXBF16_SFT"

    model_path: Optional[str] = None

    def __post_init__(self):
        for name, minimum, optional in (
            ("layer_idx", 0, False),
            ("num_gpu_experts", 0, False),
            ("cpuinfer_threads", 1, False),
            ("threadpool_count", 1, False),
            ("chunked_prefill_size", 1, False),
            ("max_deferred_experts_per_token", 0, True),
            ("num_layers", 1, True),
            ("gpu_prefill_token_threshold", 0, True),
            ("lora_rank", 1, True),
        ):
            check_int(getattr(self, name), f"KTConfig.{name}", minimum, optional)
        if self.cpuinfer_threads < self.threadpool_count:
            raise ValueError(
                f"KTConfig.cpuinfer_threads ({self.cpuinfer_threads}) must be at least threadpool_count "
                f"({self.threadpool_count}): every sub-pool needs a thread"
            )
        if self.num_layers is not None and self.layer_idx >= self.num_layers:
            raise ValueError(f"KTConfig.layer_idx ({self.layer_idx}) must be below num_layers ({self.num_layers})")
        for name in ("weight_path", "moe_lora_path", "model_path"):
            check_path(getattr(self, name), f"KTConfig.{name}")
        if not isinstance(self.method, str) or self.method not in KTMoEWrapper.INFERENCE_METHODS:
            raise ValueError(
                f"KTConfig.method must be one of {sorted(KTMoEWrapper.INFERENCE_METHODS)}, got {self.method!r}"
            )
        if not isinstance(self.sft_method, str) or self.sft_method not in KTMoEWrapper.SFT_METHODS:
            raise ValueError(
                f"KTConfig.sft_method must be one of {sorted(KTMoEWrapper.SFT_METHODS)}, got {self.sft_method!r}"
            )
        check_bool(self.moe_lora_enabled, "KTConfig.moe_lora_enabled")
        if self.moe_lora_enabled and not self.moe_lora_path:
            raise ValueError(
                "KTConfig.moe_lora_enabled=True needs moe_lora_path (the file written by "
                "python -m kt_ops.convert_moe_lora)"
            )
        if self.moe_lora_path and not self.moe_lora_enabled:
            # Serving the base model while the operator believes the adapter is active is the one
            # outcome worse than refusing to start.
            raise ValueError(
                f"KTConfig.moe_lora_path is set ({self.moe_lora_path}) but moe_lora_enabled is False; "
                "set moe_lora_enabled=True to serve it, or drop the path"
            )
        check_number(self.lora_alpha, "KTConfig.lora_alpha", positive=True, optional=True)


def _sft_weight_path_or_none(kt_config: KTConfig) -> Optional[str]:
    path = kt_config.model_path if kt_config.sft_method == "AMXBF16_SFT" else kt_config.weight_path
    return os.fspath(path) if path else None


def get_sft_weight_path(kt_config: KTConfig) -> str:
    """Where SFT mode reads base weights: the HuggingFace bf16 checkpoint
    (`model_path`) for AMXBF16_SFT, the pre-quantized `weight_path` for the other SFT methods."""
    if not isinstance(kt_config, KTConfig):
        raise TypeError(f"kt_config must be a KTConfig, got {type(kt_config).__name__}")
    path = _sft_weight_path_or_none(kt_config)
    if path is None:
        field = "model_path" if kt_config.sft_method == "AMXBF16_SFT" else "weight_path"
        what = (
            "the HuggingFace bf16 checkpoint"
            if field == "model_path"
            else "the pre-quantized weights from python -m kt_ops.convert_weights"
        )
        raise ValueError(
            f"KTConfig.{field} is not set: sft_method {kt_config.sft_method} reads base weights from "
            f"{what}; set it, or pass the base weights as tensors"
        )
    return path


# ---- the converted MoE LoRA file ------------------------------------------------------------------

_lora_cache: Dict[Tuple[str, int, int], dict] = {}
_lora_cache_lock = threading.Lock()


def _load_lora_file(path: str) -> dict:
    """The whole converted file, loaded once per (path, mtime, size): every MoE layer reads the same
    file, and re-reading it per layer costs layers x file size. mmap keeps the unused layers on
    disk; weights_only refuses pickled code in a file that came from elsewhere."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MoE LoRA file not found: {path} (KTConfig.moe_lora_path; write it with python -m kt_ops.convert_moe_lora)"
        )
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_mtime_ns, st.st_size)
    with _lora_cache_lock:
        cached = _lora_cache.get(key)
        if cached is not None:
            return cached
        try:
            data = torch.load(real, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several unrelated types for a file it cannot read
            raise ValueError(f"MoE LoRA file {path} cannot be read as a converted MoE LoRA: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
            raise ValueError(
                f"MoE LoRA file {path} has no 'metadata' dict: write it with python -m kt_ops.convert_moe_lora"
            )
        for stale in [k for k in _lora_cache if k[0] == real]:
            del _lora_cache[stale]
        _lora_cache[key] = data
        return data


def clear_moe_lora_cache() -> None:
    """Forget the loaded MoE LoRA files (their tensors stay alive while wrappers use them)."""
    with _lora_cache_lock:
        _lora_cache.clear()


def load_moe_lora_layer(path: str, layer_idx: int) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(the six LoRA tensors of `layer_{layer_idx}`, the file's metadata)."""
    data = _load_lora_file(os.fspath(path))
    key = f"layer_{layer_idx}"
    if key not in data:
        available = sorted(
            (k for k in data if k.startswith("layer_")), key=lambda k: int(k[6:]) if k[6:].isdigit() else -1
        )
        raise KeyError(f"layer {layer_idx} not found in MoE LoRA file {path}; available layers: {available}")
    layer = data[key]
    if not isinstance(layer, dict):
        raise ValueError(f"MoE LoRA file {path}: {key} must be a dict of LoRA tensors, got {type(layer).__name__}")
    missing = [name for name in LORA_NAMES if not isinstance(layer.get(name), torch.Tensor)]
    if missing:
        raise ValueError(f"MoE LoRA file {path}: {key} has no tensor(s) {missing}")
    return {name: layer[name] for name in LORA_NAMES}, data["metadata"]


# ---- the engine-facing method ---------------------------------------------------------------------


class KTEPWrapperMethod:
    """One MoE layer's CPU experts, with the lifecycle an engine drives:
    create_weights -> process_weights_after_loading -> (submit -> sync)*.

    Only tensor-parallel rank 0 computes: other ranks build nothing and sync()
    returns zeros, so summing over ranks counts the CPU experts once. Expert ids below
    `num_gpu_experts` are the engine's GPU experts and are skipped on the CPU in both modes; in LoRA
    mode that means the adapter's LoRA for those experts is the GPU side's business."""

    def __init__(self, kt_config: KTConfig, num_experts_per_tok: int, tp_rank: int = 0, tp_size: int = 1):
        if not isinstance(kt_config, KTConfig):
            raise TypeError(f"kt_config must be a KTConfig, got {type(kt_config).__name__}")
        for name, value, minimum in (
            ("num_experts_per_tok", num_experts_per_tok, 1),
            ("tp_rank", tp_rank, 0),
            ("tp_size", tp_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if tp_rank >= tp_size:
            raise ValueError(f"tp_rank ({tp_rank}) must be below tp_size ({tp_size})")
        self.kt_config = kt_config
        self.num_experts_per_tok = num_experts_per_tok
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.wrapper = None
        self.lora_weights: Optional[Dict[str, torch.Tensor]] = None
        self.num_experts: Optional[int] = None
        self._weights_ready = False
        self._pending: List = []

    @property
    def lora_mode(self) -> bool:
        return self.kt_config.moe_lora_enabled

    def _layer_max_deferred(self) -> Optional[int]:
        cfg = self.kt_config
        # Deferred experts are folded into the next layer's output; the last layer has no next layer.
        if (
            cfg.max_deferred_experts_per_token is not None
            and cfg.num_layers is not None
            and cfg.layer_idx == cfg.num_layers - 1
        ):
            return 0
        return cfg.max_deferred_experts_per_token

    def _lora_rank_alpha(self) -> Tuple[int, float]:
        """The file's (rank, alpha), checked against any explicit KTConfig values."""
        cfg = self.kt_config
        _, metadata = load_moe_lora_layer(cfg.moe_lora_path, cfg.layer_idx)
        rank, alpha = metadata.get("lora_rank"), metadata.get("lora_alpha")
        if (
            isinstance(rank, bool)
            or not isinstance(rank, int)
            or rank < 1
            or isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not alpha > 0
        ):
            raise ValueError(
                f"MoE LoRA file {cfg.moe_lora_path}: metadata lora_rank / lora_alpha must be a positive "
                f"int / number, got {rank!r} / {alpha!r}"
            )
        if cfg.lora_rank is not None and cfg.lora_rank != rank:
            raise ValueError(
                f"KTConfig.lora_rank={cfg.lora_rank} but MoE LoRA file {cfg.moe_lora_path} has rank "
                f"{rank}; set lora_rank={rank} or None"
            )
        if cfg.lora_alpha is not None and float(cfg.lora_alpha) != float(alpha):
            raise ValueError(
                f"KTConfig.lora_alpha={cfg.lora_alpha} but MoE LoRA file {cfg.moe_lora_path} was "
                f"converted with lora_alpha={alpha}; set lora_alpha=None to use the file's, or "
                "re-convert with --lora-alpha"
            )
        return rank, float(alpha)

    def create_weights(
        self,
        layer: Optional[torch.nn.Module],
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype = torch.bfloat16,
        **extra_weight_attrs,
    ) -> None:
        """Build this layer's wrapper: SFT mode with `sft_method` when a MoE LoRA is configured,
        inference mode with `method` otherwise. `layer` and `params_dtype` belong to the engine's
        GPU side and are not used here."""
        if self.wrapper is not None:
            raise RuntimeError(f"create_weights() already ran for layer {self.kt_config.layer_idx}")
        for name, value in (
            ("num_experts", num_experts),
            ("hidden_size", hidden_size),
            ("intermediate_size_per_partition", intermediate_size_per_partition),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        cfg = self.kt_config
        if cfg.num_gpu_experts > num_experts:
            raise ValueError(f"KTConfig.num_gpu_experts ({cfg.num_gpu_experts}) exceeds num_experts ({num_experts})")
        self.num_experts = num_experts
        if self.tp_rank != 0:
            return
        # The CPU holds whole experts: the per-partition size is the engine's GPU sharding.
        intermediate_size = intermediate_size_per_partition * self.tp_size
        common = dict(
            layer_idx=cfg.layer_idx,
            num_experts=num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            hidden_size=hidden_size,
            moe_intermediate_size=intermediate_size,
            num_gpu_experts=cfg.num_gpu_experts,
            cpuinfer_threads=cfg.cpuinfer_threads,
            threadpool_count=cfg.threadpool_count,
            chunked_prefill_size=cfg.chunked_prefill_size,
        )
        if self.lora_mode:
            rank, alpha = self._lora_rank_alpha()
            if cfg.num_gpu_experts:
                warnings.warn(
                    f"layer {cfg.layer_idx}: the {cfg.num_gpu_experts} GPU experts are skipped on the CPU, "
                    "so this MoE LoRA reaches them only if the GPU method applies it",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.wrapper = KTMoEWrapper(
                **common,
                weight_path=_sft_weight_path_or_none(cfg),
                mode="sft",
                method=cfg.sft_method,
                lora_rank=rank,
                lora_alpha=alpha,
                max_cache_depth=1,
            )  # serving never keeps a forward for backward
        else:
            weight_path = os.fspath(cfg.weight_path) if cfg.weight_path else None
            self.wrapper = KTMoEWrapper(
                **common,
                weight_path=weight_path,
                mode="inference",
                method=cfg.method,
                max_deferred_experts_per_token=self._layer_max_deferred(),
            )

    def process_weights_after_loading(
        self,
        layer: Optional[torch.nn.Module] = None,
        physical_to_logical_map_cpu: Optional[torch.Tensor] = None,
        *,
        gate_proj: Optional[torch.Tensor] = None,
        up_proj: Optional[torch.Tensor] = None,
        down_proj: Optional[torch.Tensor] = None,
    ) -> None:
        """Load the base experts, then (LoRA mode) this layer's MoE LoRA.

        Base weights come from `gate_proj` [E, I, H], `up_proj` [E, I, H], `down_proj` [E, H, I]
        (logical expert order) when the engine passes them, else from file: the wrapper's
        load_weights reads `weight_path` (inference, SFT int methods) or `model_path` (AMXBF16_SFT).
        `physical_to_logical_map_cpu` (default: identity) says which logical expert each physical
        slot holds; the LoRA file is in logical order and is permuted to match."""
        if self.tp_rank != 0:
            return
        if self.wrapper is None:
            raise RuntimeError("process_weights_after_loading() before create_weights()")
        if self._weights_ready:
            raise RuntimeError(f"process_weights_after_loading() already ran for layer {self.kt_config.layer_idx}")
        E = self.num_experts
        mapping = torch.arange(E) if physical_to_logical_map_cpu is None else physical_to_logical_map_cpu
        given = [t is not None for t in (gate_proj, up_proj, down_proj)]
        if any(given) and not all(given):
            raise ValueError("pass all of gate_proj, up_proj, down_proj, or none of them (to load from file)")
        if all(given):
            self.wrapper.load_weights_from_tensors(gate_proj, up_proj, down_proj, mapping)
        else:
            if self.lora_mode:
                get_sft_weight_path(self.kt_config)  # a clear error naming the missing field
            elif not self.kt_config.weight_path:
                raise ValueError(
                    "KTConfig.weight_path is not set: inference mode reads the pre-quantized experts "
                    "there; set it, or pass gate_proj/up_proj/down_proj"
                )
            self.wrapper.load_weights(mapping)
        if self.lora_mode:
            self._load_moe_lora_weights(self.wrapper.physical_to_logical_map)
        self._weights_ready = True

    def _load_moe_lora_weights(self, mapping: torch.Tensor) -> None:
        cfg = self.kt_config
        lora, metadata = load_moe_lora_layer(cfg.moe_lora_path, cfg.layer_idx)
        w = self.wrapper
        E, H, I, r = w.num_experts, w.hidden_size, w.moe_intermediate_size, w.lora_rank
        expected = {
            "gate_lora_a": (E, r, H),
            "gate_lora_b": (E, I, r),
            "up_lora_a": (E, r, H),
            "up_lora_b": (E, I, r),
            "down_lora_a": (E, r, I),
            "down_lora_b": (E, H, r),
        }
        for name, shape in expected.items():
            if tuple(lora[name].shape) != shape:
                raise ValueError(
                    f"MoE LoRA file {cfg.moe_lora_path}: layer_{cfg.layer_idx}.{name} has shape "
                    f"{tuple(lora[name].shape)}, this layer needs {shape} (num_experts={E}, "
                    f"hidden_size={H}, intermediate_size={I}, lora_rank={r})"
                )
        if not torch.equal(mapping, torch.arange(E)):
            lora = {name: t.index_select(0, mapping) for name, t in lora.items()}
        self.lora_weights = lora
        w.init_lora_weights(*(lora[name] for name in LORA_NAMES))

    # ---- forward ------------------------------------------------------------------------------------

    def submit(
        self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, cuda_stream=None
    ) -> None:
        """Start this layer's CPU experts and return at once; sync() collects, oldest first."""
        if self.tp_rank != 0:
            return
        if not self._weights_ready:
            raise RuntimeError("submit() before process_weights_after_loading()")
        if not self.lora_mode:
            self.wrapper.submit_forward(hidden_states, topk_ids, topk_weights, cuda_stream)
            return
        self.wrapper.check_tokens(hidden_states, topk_ids, topk_weights)
        # Copies, not views: the engine may reuse its input buffers before sync().
        x = hidden_states.detach().to("cpu", copy=True)
        ids = topk_ids.detach().to("cpu", copy=True)
        w = topk_weights.detach().to("cpu", copy=True)
        self._pending.append(self.wrapper.cpu_infer.submit(self.wrapper.forward_sft, x, ids, w, False))

    def sync(self, x: torch.Tensor, cuda_stream=None) -> torch.Tensor:
        """The CPU experts' output of the oldest submit(), on x's device and dtype."""
        if self.tp_rank != 0:
            return torch.zeros_like(x)
        if not self._weights_ready:
            raise RuntimeError("sync() before process_weights_after_loading()")
        if not self.lora_mode:
            return self.wrapper.sync_forward(x, cuda_stream)
        if not self._pending:
            raise RuntimeError("sync() without a pending submit()")
        output = self._pending.pop(0).result()
        return output.to(device=x.device, dtype=x.dtype)

    def apply(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """submit() + sync() for callers with nothing to overlap."""
        self.submit(hidden_states, topk_ids, topk_weights)
        return self.sync(hidden_states)
