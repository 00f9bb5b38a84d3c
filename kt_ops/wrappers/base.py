"""What the inference and SFT wrappers share: the worker-pool configuration, the one CPUInfer per
process (which sizes the pool and owns the process's NUMA sub-pools, `threadpool_count`) and the
validation of the arguments both modes take."""

from __future__ import annotations

import atexit
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, List, Optional, Sequence, Tuple

import torch

from .. import _C
from ..core.checks import check_int, check_number, check_path
from ..core.runtime import usable_cpus
from ..core.packed import PackedExperts, permute_packed
from ..core.subpools import Subpools, process_subpools
from ..layer import KTMoELayer


@dataclass
class WorkerPoolConfig:
    """How the CPU work is spread: `subpool_count` sub-pools (one per NUMA node in tensor-parallel
    mode) of `max_threads_per_subpool` threads each; sub-pool i on NUMA node `numa_nodes[i]` when
    given (kt-kernel's numa_nodes), else on the i-th node."""

    subpool_count: int = 1
    max_threads_per_subpool: int = 1
    numa_nodes: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        check_int(self.subpool_count, "subpool_count", 1)
        check_int(self.max_threads_per_subpool, "max_threads_per_subpool", 1)

    @property
    def total_threads(self) -> int:
        return self.subpool_count * self.max_threads_per_subpool


class CPUInfer:
    """The process's CPU engine: sizes kt_ops' worker pool and runs submitted work, in order, on one
    background thread (what inference's submit_forward/sync_forward build on).

    The pool never gets more threads than the process may run on: the kernels' workers spin while
    they wait, so oversubscribed cores would make every call slower, not faster."""

    def __init__(self, config: WorkerPoolConfig):
        self.config = config
        available = usable_cpus()
        self.num_threads = min(config.total_threads, available)
        if self.num_threads < config.total_threads:
            warnings.warn(
                f"cpuinfer_threads asks for {config.total_threads} threads but this process may use "
                f"{available} CPUs; using {self.num_threads}",
                RuntimeWarning,
                stacklevel=3,
            )
        _C.set_num_threads(self.num_threads)
        # threadpool_count > 1: the parts of a layer run at once, each on a sub-pool of its own
        # (pinned to its NUMA node's CPUs when the machine has several nodes).
        self.subpools: Optional[Subpools] = process_subpools(
            config.subpool_count, max(1, self.num_threads // config.subpool_count), config.numa_nodes
        )
        self._tasks: "queue.Queue[Optional[Tuple[Callable, tuple, _Pending]]]" = queue.Queue()
        self._worker: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._pending: List[_Pending] = []
        self._inline: List[_Pending] = []  # work submitted from the worker thread itself, already run
        self._closed = False
        # The worker is a daemon thread (it must not keep the interpreter alive), so work still queued
        # at exit (deferred experts nobody flushed) would be running in C++ while the process tears
        # itself down. Draining it at exit lets the process end normally.
        atexit.register(self.shutdown)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def submit(self, fn: Callable, *args) -> "_Pending":
        """Queue `fn(*args)` on the background thread; returns at once. Work submitted by a task
        running on that thread (a wrapper called from the thread, as serving does) runs at once
        instead: queued behind the task that waits for it, it would never run."""
        if threading.current_thread() is self._worker:
            pending = _Pending()
            try:
                pending.value = fn(*args)
            except BaseException as error:  # raised by the matching sync()
                pending.error = error
            pending.done.set()
            self._inline.append(pending)
            return pending
        with self._start_lock:
            if self._closed:
                raise RuntimeError("kt_ops CPUInfer is shut down (the interpreter is exiting); no new work runs")
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="kt_ops-cpuinfer", daemon=True)
                self._worker.start()
            pending = _Pending()
            self._pending.append(pending)
        self._tasks.put((fn, args, pending))
        return pending

    def sync(self) -> None:
        """Wait for everything submitted so far; re-raises the first error a task raised."""
        if threading.current_thread() is self._worker:
            pending, self._inline = self._inline, []
            for p in pending:
                p.result()
            return
        with self._start_lock:
            pending, self._pending = self._pending, []
        for p in pending:
            p.result()

    def shutdown(self) -> None:
        """Finish the queued work (errors are dropped: nobody waits for them) and stop the thread.
        Runs at interpreter exit; later submits raise."""
        with self._start_lock:
            self._closed = True
            worker = self._worker
        if worker is None:
            return
        self._tasks.put(None)
        worker.join()

    def _after_fork_in_child(self) -> None:
        # Only the forking thread exists in the child: the worker (and whatever it was running)
        # is gone, so the child starts with an empty queue and a worker of its own on first submit.
        self._tasks = queue.Queue()
        self._worker = None
        self._start_lock = threading.Lock()
        self._pending = []
        self._inline = []

    def _run(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            fn, args, pending = item
            try:
                pending.value = fn(*args)
            except BaseException as error:  # handed to whoever waits on it
                pending.error = error
            pending.done.set()


class _Pending:
    def __init__(self):
        self.done = threading.Event()
        self.value = None
        self.error: Optional[BaseException] = None

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


def gpu_experts_mask_of(gpu_experts_mask, num_gpu_experts: int, num_experts: int) -> torch.Tensor:
    """[num_experts] bool, True for the experts the caller computes on its GPU (the CPU skips them):
    kt-kernel 0.7's gpu_experts_mask (a [num_experts] bool tensor, or None for none), together with
    the specification's num_gpu_experts (the first N experts). The specification passed
    num_gpu_experts where kt-kernel 0.7 takes the mask, so an int there means the same."""
    check_int(num_gpu_experts, "num_gpu_experts", 0)
    if isinstance(gpu_experts_mask, int) and not isinstance(gpu_experts_mask, bool):
        check_int(gpu_experts_mask, "num_gpu_experts", 0)
        if num_gpu_experts and num_gpu_experts != gpu_experts_mask:
            raise ValueError(
                f"num_gpu_experts is given twice with different values: {gpu_experts_mask} (in gpu_experts_mask's "
                f"position) and {num_gpu_experts}"
            )
        num_gpu_experts, gpu_experts_mask = gpu_experts_mask, None
    if num_gpu_experts > num_experts:
        raise ValueError(f"num_gpu_experts ({num_gpu_experts}) cannot exceed num_experts ({num_experts})")
    mask = torch.arange(num_experts) < num_gpu_experts
    if gpu_experts_mask is None:
        return mask
    if not isinstance(gpu_experts_mask, torch.Tensor):
        raise TypeError(
            f"gpu_experts_mask must be a bool tensor of shape [{num_experts}], an int (num_gpu_experts) or None, "
            f"got {type(gpu_experts_mask).__name__}"
        )
    if gpu_experts_mask.dtype != torch.bool or tuple(gpu_experts_mask.shape) != (num_experts,):
        raise ValueError(
            f"gpu_experts_mask must be a torch.bool tensor of shape [{num_experts}] (True: the expert runs on the "
            f"GPU), got {gpu_experts_mask.dtype} {tuple(gpu_experts_mask.shape)}"
        )
    return mask | gpu_experts_mask.detach().to("cpu")


def generate_gpu_experts_masks(activation_freq: torch.Tensor, num_gpu_experts: int) -> torch.Tensor:
    """Which experts to keep on the GPU across all layers: the `num_gpu_experts` with the highest
    activation frequency in `activation_freq` [num_layers, num_experts] (clamped to 0..all), as a CPU
    bool mask of the same shape (kt-kernel's experts_base.generate_gpu_experts_masks)."""
    if not isinstance(activation_freq, torch.Tensor) or activation_freq.dim() != 2:
        raise ValueError("activation_freq must be a [num_layers, num_experts] tensor")
    if isinstance(num_gpu_experts, bool) or not isinstance(num_gpu_experts, int):
        raise TypeError(f"num_gpu_experts must be an int, got {num_gpu_experts!r}")
    count = min(max(num_gpu_experts, 0), activation_freq.numel())
    mask = torch.zeros(activation_freq.numel(), dtype=torch.bool)
    if count:
        mask[torch.topk(activation_freq.detach().reshape(-1).to("cpu"), count, sorted=False).indices] = True
    return mask.view(activation_freq.shape)


def activation_variant(swiglu_limit: float, swiglu_alpha: float) -> dict:
    """kt-kernel's activation arguments as a PackedExperts variant ({} for plain SiLU): a limit L
    alone is DeepSeek-V4's clamped SiLU, silu(min(g, L)) * clamp(u, -L, L); an alpha a is the
    SwiGLU of gpt-oss and MiniMax-M3, (clamp(u, -L, L) + 1) * g' * sigmoid(a * g') with g' = min(g, L),
    unclamped without a limit."""
    limit = check_number(swiglu_limit, "swiglu_limit")
    alpha = check_number(swiglu_alpha, "swiglu_alpha")
    if limit < 0 or alpha < 0:
        raise ValueError(f"swiglu_limit and swiglu_alpha must be >= 0 (0: unused), got {limit} and {alpha}")
    if alpha:
        # no limit: clamps at the largest float never bind
        return dict(
            activation="clamped_swiglu", swiglu_alpha=alpha, swiglu_limit=limit or torch.finfo(torch.float32).max
        )
    if limit:
        return dict(activation="clamped_silu", swiglu_limit=limit)
    return {}


class _MoEBase:
    """One CPUInfer per process, created on first use behind a lock, and config validation."""

    _cpu_infer_instance: ClassVar[Optional[CPUInfer]] = None
    _cpu_infer_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def _get_cpu_infer(
        cls, cpuinfer_threads: int, threadpool_count: int, numa_nodes: Optional[Sequence[int]] = None
    ) -> CPUInfer:
        """`cpuinfer_threads` is the total, split evenly over the `threadpool_count` sub-pools (on
        `numa_nodes` when given). The first wrapper's configuration wins; a later different one is
        reported, not applied."""
        check_int(cpuinfer_threads, "cpuinfer_threads", 1)
        check_int(threadpool_count, "threadpool_count", 1)
        if cpuinfer_threads < threadpool_count:
            raise ValueError(
                f"cpuinfer_threads ({cpuinfer_threads}) must be at least threadpool_count "
                f"({threadpool_count}): every sub-pool needs a thread"
            )
        if numa_nodes is not None:
            if isinstance(numa_nodes, (str, bytes)) or not isinstance(numa_nodes, Sequence):
                # the specification's positional calls had `mode` where kt-kernel 0.7 put numa_nodes
                raise TypeError(
                    f"numa_nodes must be a list of NUMA node ids or None, got {numa_nodes!r} (pass mode= by keyword)"
                )
            numa_nodes = tuple(numa_nodes)
        config = WorkerPoolConfig(
            subpool_count=threadpool_count,
            max_threads_per_subpool=cpuinfer_threads // threadpool_count,
            numa_nodes=numa_nodes,
        )
        with _MoEBase._cpu_infer_lock:
            if _MoEBase._cpu_infer_instance is None:
                _MoEBase._cpu_infer_instance = CPUInfer(config)
            elif _MoEBase._cpu_infer_instance.config != config:
                warnings.warn(
                    f"the process's CPUInfer already exists with {_MoEBase._cpu_infer_instance.config}; "
                    f"ignoring {config}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return _MoEBase._cpu_infer_instance

    @classmethod
    def _validate_base_config(
        cls, num_experts: int, hidden_size: int, moe_intermediate_size: int, num_experts_per_tok: int
    ) -> None:
        for name, value in (
            ("num_experts", num_experts),
            ("hidden_size", hidden_size),
            ("moe_intermediate_size", moe_intermediate_size),
            ("num_experts_per_tok", num_experts_per_tok),
        ):
            check_int(value, name, 1)
        if num_experts_per_tok > num_experts:
            raise ValueError(f"num_experts_per_tok ({num_experts_per_tok}) cannot exceed num_experts ({num_experts})")

    def _init_common(
        self,
        layer_idx: int,
        num_experts: int,
        num_experts_per_tok: int,
        hidden_size: int,
        moe_intermediate_size: int,
        gpu_experts_mask,
        cpuinfer_threads: int,
        threadpool_count: int,
        weight_path,
        chunked_prefill_size: int,
        numa_nodes: Optional[Sequence[int]] = None,
        num_gpu_experts: int = 0,
        swiglu_limit: float = 0.0,
        swiglu_alpha: float = 0.0,
    ) -> None:
        """Validate and store the arguments both modes share, and attach the process's CPUInfer.
        `gpu_experts_mask` is kt-kernel 0.7's (see gpu_experts_mask_of), `num_gpu_experts` the
        specification's; swiglu_limit / swiglu_alpha pick the activation (activation_variant)."""
        self._variant = activation_variant(swiglu_limit, swiglu_alpha)
        self.swiglu_limit, self.swiglu_alpha = float(swiglu_limit), float(swiglu_alpha)
        self._validate_base_config(
            num_experts=num_experts,
            hidden_size=hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            num_experts_per_tok=num_experts_per_tok,
        )
        check_int(layer_idx, "layer_idx", 0)
        check_int(chunked_prefill_size, "chunked_prefill_size", 1)
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        self._gpu_experts_mask = gpu_experts_mask_of(gpu_experts_mask, num_gpu_experts, num_experts)
        self.num_gpu_experts = int(self._gpu_experts_mask.sum())
        self.cpuinfer_threads = cpuinfer_threads
        self.threadpool_count = threadpool_count
        self.weight_path = check_path(weight_path, "weight_path")
        self.chunked_prefill_size = chunked_prefill_size
        self.cpu_infer = self._get_cpu_infer(cpuinfer_threads, threadpool_count, numa_nodes)

    # ---- the layer the wrapper computes with ------------------------------------------------------

    def _make_layer(self, weight_format: str, group_size: int) -> None:
        """The KTMoELayer holding the packed experts: split over `threadpool_count` sub-pools, the
        ids of the GPU experts (below num_gpu_experts, or kt-kernel's gpu_experts_mask) skipped."""
        self.layer = KTMoELayer(
            self.num_experts,
            self.hidden_size,
            self.moe_intermediate_size,
            lora_rank=0,
            method=weight_format,
            group_size=group_size,
            threadpool_count=self.threadpool_count,
            subpools=self.cpu_infer.subpools,
        )
        self.layer.gpu_experts_mask = self._gpu_experts_mask
        self.split = self.layer.split

    @property
    def experts_parts(self) -> List[PackedExperts]:
        """The loaded experts, one PackedExperts per range of `split`."""
        return self.layer.experts_parts

    @property
    def gpu_experts_mask(self) -> torch.Tensor:
        """[num_experts] bool: True for the experts the caller computes on its GPU (skipped here)."""
        return self.layer.gpu_experts_mask

    @gpu_experts_mask.setter
    def gpu_experts_mask(self, mask: torch.Tensor) -> None:
        self.layer.gpu_experts_mask = gpu_experts_mask_of(mask, 0, self.num_experts)
        self.num_gpu_experts = int(self.layer.gpu_experts_mask.sum())

    def _set_parts(self, parts: Sequence[PackedExperts], mapping: torch.Tensor) -> None:
        """Use the loaded `parts` (logical experts) in the physical order `mapping` gives, with the
        wrapper's activation."""
        self.layer.set_parts([permute_packed(part, mapping) for part in parts])
        if self._variant:
            self.layer.set_variant(**self._variant)


class BaseMoEWrapper(_MoEBase):
    """Inference-mode base: the SFT methods are refused with a pointer to mode='sft'."""

    def __init__(
        self,
        layer_idx: int,
        num_experts: int,
        num_experts_per_tok: int,
        hidden_size: int,
        moe_intermediate_size: int,
        gpu_experts_mask,
        cpuinfer_threads: int,
        threadpool_count: int,
        weight_path: Optional[str],
        chunked_prefill_size: int,
        cpu_save: bool = False,
        max_deferred_experts_per_token: Optional[int] = None,
        numa_nodes: Optional[Sequence[int]] = None,
        num_gpu_experts: int = 0,
        swiglu_limit: float = 0.0,
        swiglu_alpha: float = 0.0,
    ):
        self._init_common(
            layer_idx,
            num_experts,
            num_experts_per_tok,
            hidden_size,
            moe_intermediate_size,
            gpu_experts_mask,
            cpuinfer_threads,
            threadpool_count,
            weight_path,
            chunked_prefill_size,
            numa_nodes,
            num_gpu_experts,
            swiglu_limit,
            swiglu_alpha,
        )
        if max_deferred_experts_per_token is not None:
            check_int(max_deferred_experts_per_token, "max_deferred_experts_per_token", 0)
            if max_deferred_experts_per_token >= num_experts_per_tok:
                raise ValueError(
                    f"max_deferred_experts_per_token ({max_deferred_experts_per_token}) must be below "
                    f"num_experts_per_tok ({num_experts_per_tok}): every token keeps an immediate expert"
                )
        self.cpu_save = bool(cpu_save)
        self.max_deferred_experts_per_token = max_deferred_experts_per_token

    def select_deferred_experts(
        self, expert_ids: torch.Tensor, scores: torch.Tensor, protected_k: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Split each token's routed experts into (immediate_ids, deferred_ids), both shaped like
        `expert_ids` with -1 in the slots the other one holds. Per token the `protected_k`
        highest-scoring slots stay immediate; of the others, the lowest-scoring ones, at most
        `max_deferred_experts_per_token`, are deferred and the rest stay immediate. Ties go to the
        earlier slot. Slots already -1 (GPU experts) stay -1 in both."""
        limit = self.max_deferred_experts_per_token or 0
        if not isinstance(expert_ids, torch.Tensor) or expert_ids.dim() != 2:
            raise ValueError("expert_ids must be a [qlen, num_experts_per_tok] tensor")
        if not isinstance(scores, torch.Tensor) or scores.shape != expert_ids.shape:
            raise ValueError(
                f"scores must be a tensor shaped like expert_ids {tuple(expert_ids.shape)}, got "
                f"{None if not isinstance(scores, torch.Tensor) else tuple(scores.shape)}"
            )
        k = expert_ids.shape[1]
        check_int(protected_k, "protected_k", 0)
        if protected_k > k:
            raise ValueError(f"protected_k ({protected_k}) cannot exceed num_experts_per_tok ({k})")
        n_defer = min(limit, k - protected_k)
        deferred_mask = torch.zeros(expert_ids.shape, dtype=torch.bool, device=expert_ids.device)
        if n_defer:
            # stable descending order: rank r holds the r-th best slot; the last n_defer ranks defer
            order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
            deferred_mask.scatter_(1, order[:, k - n_defer :], True)
        deferred_mask &= expert_ids >= 0
        none = torch.full_like(expert_ids, -1)
        return torch.where(deferred_mask, none, expert_ids), torch.where(deferred_mask, expert_ids, none)

    def forward_sft(self, *args, **kwargs):
        raise RuntimeError(
            "forward_sft() is not available in inference mode. Use forward() instead, or create "
            "wrapper with mode='sft'."
        )

    def backward(self, *args, **kwargs):
        raise RuntimeError(
            "backward() is not available in inference mode. Create wrapper with mode='sft' to use SFT features."
        )

    def init_lora_weights(self, *args, **kwargs):
        raise RuntimeError(
            "init_lora_weights() is not available in inference mode. Create wrapper with mode='sft' "
            "to use SFT features."
        )

    def update_lora_weights(self, *args, **kwargs):
        raise RuntimeError(
            "update_lora_weights() is not available in inference mode. Create wrapper with "
            "mode='sft' to use SFT features."
        )
