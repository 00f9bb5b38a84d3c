"""AMXMoEWrapper: inference-mode experts (AMXINT4, AMXINT8, and the generic MOE_INT4 / MOE_INT8
names) on the kt_ops kernels, with no LoRA and nothing saved for backward. LlamafileMoEWrapper and
NativeMoEWrapper reuse its forward path and differ only in how weights are loaded.

Deferred experts (max_deferred_experts_per_token = N > 0): each forward splits every token's routed
experts with select_deferred_experts(topk_ids, topk_weights, protected_k) (protected_k defaults to
num_experts_per_tok - N). The immediate experts are computed and returned by that call; the deferred
ones are queued on the CPUInfer thread right behind them and run while the caller goes on. Their
contribution (a [qlen, hidden] tensor for the same tokens) is ADDED to the output of the wrapper's
NEXT forward/sync_forward, whose qlen must therefore match (decode steps); flush_deferred() hands
over the outstanding contribution instead, e.g. before a call of another length or at the end.
So for one call: output_now + contribution_delivered_later == the full MoE output of its tokens.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from ..core.checks import check_has_data
from ..core.formats import INFERENCE_FORMATS
from ..core.host import to_device, to_host_async
from ..core.packed import PackedExperts, check_expert_map, pack_experts, pack_split, resplit_packed
from ..ops import forward_parts
from ..weights.ktransformers import load_kt_layer_parts
from ..weights.loaders import SafeTensorLoader
from .base import BaseMoEWrapper


class AMXMoEWrapper(BaseMoEWrapper):
    """Experts set in `gpu_experts_mask` (kt-kernel 0.7; an int there, or num_gpu_experts, means the
    first N, as the specification had it) are the ones the caller runs on its GPU: the CPU skips them
    and adds nothing for them."""

    # method -> (weight format of load_weights_from_tensors, K-group size)
    METHOD_FORMATS: Dict[str, Tuple[str, int]] = {m: (f, 128) for m, f in INFERENCE_FORMATS.items()}
    SUPPORTED_METHODS = frozenset(METHOD_FORMATS)

    def __init__(
        self,
        layer_idx: int,
        num_experts: int,
        num_experts_per_tok: int,
        hidden_size: int,
        moe_intermediate_size: int,
        gpu_experts_mask: Union[torch.Tensor, int, None],
        cpuinfer_threads: int,
        threadpool_count: int,
        weight_path: Optional[str],
        chunked_prefill_size: int,
        cpu_save: bool = False,
        max_deferred_experts_per_token: Optional[int] = None,
        method: str = "AMXINT4",
        numa_nodes: Optional[Sequence[int]] = None,
        num_gpu_experts: int = 0,
        swiglu_limit: float = 0.0,
        swiglu_alpha: float = 0.0,
    ):
        if method not in self.METHOD_FORMATS:
            raise ValueError(f"Unsupported method: {method!r}. Supported methods: {sorted(self.METHOD_FORMATS)}")
        super().__init__(
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
            cpu_save,
            max_deferred_experts_per_token,
            numa_nodes,
            num_gpu_experts,
            swiglu_limit,
            swiglu_alpha,
        )
        self.method = method
        self.weight_format, self.group_size = self.METHOD_FORMATS[method]
        self._make_layer(self.weight_format, self.group_size)
        self._in_flight = []
        self._deferred_pending = None  # the last synced call's deferred contribution, still owed

    def load_weights_from_tensors(
        self,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        physical_to_logical_map_cpu: torch.Tensor,
    ) -> None:
        """Quantize [E, I, H], [E, I, H], [E, H, I] logical-expert weights online. With cpu_save the
        quantized form is also written to `weight_path`, so the next start loads it."""
        mapping = check_expert_map(physical_to_logical_map_cpu, self.num_experts)
        parts = pack_split(gate_proj, up_proj, down_proj, self.weight_format, self.group_size, self.split)
        if self.cpu_save:
            from ..weights.packed_io import save_packed_layer

            if not self.weight_path:
                raise ValueError("cpu_save=True needs weight_path: the quantized experts are written there")
            full = parts[0] if len(parts) == 1 else None
            if full is None:
                full = pack_experts(gate_proj, up_proj, down_proj, self.weight_format, self.group_size)
            save_packed_layer(self.weight_path, self.layer_idx, full)
        self._set_parts(parts, mapping)

    def _set_parts(self, parts: Sequence[PackedExperts], mapping: torch.Tensor) -> None:
        super()._set_parts(parts, mapping)
        self.weight_format = parts[0].weight_format  # a converted file may hold its K-group variant

    def load_weights(self, physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Load layer `layer_idx` of the pre-quantized form at `weight_path` (kt_ops' own, or a
        KTransformers INT8/INT4 conversion); no map means identity."""

        if physical_to_logical_map_cpu is None:
            physical_to_logical_map_cpu = torch.arange(self.num_experts)
        mapping = check_expert_map(physical_to_logical_map_cpu, self.num_experts)
        if not self.weight_path:
            raise RuntimeError(
                "weight_path is not set: call load_weights_from_tensors() instead, or create the "
                "wrapper with weight_path"
            )
        kt_parts = load_kt_layer_parts(
            self.weight_path,
            self.layer_idx,
            self.weight_format,
            self.split,
            self.group_size,
            (self.num_experts, self.hidden_size, self.moe_intermediate_size),
        )
        if kt_parts is not None:
            self._set_parts(kt_parts, mapping)
            return
        experts = SafeTensorLoader(self.weight_path).load_packed(self.layer_idx)
        if experts.weight_format != self.weight_format:
            raise ValueError(
                f"{self.weight_path} holds layer {self.layer_idx} as {experts.weight_format}; method "
                f"{self.method} needs {self.weight_format}"
            )
        self._set_parts(resplit_packed(experts, self.group_size, self.split), mapping)

    def forward(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        cuda_stream=None,
        protected_k: Optional[int] = None,
    ) -> torch.Tensor:
        self.submit_forward(hidden_states, topk_ids, topk_weights, cuda_stream, protected_k=protected_k)
        return self.sync_forward(hidden_states, cuda_stream)

    def submit_forward(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        cuda_stream=None,
        protected_k: Optional[int] = None,
    ) -> None:
        """Start the experts on the CPUInfer thread and return at once; sync_forward collects.
        `protected_k` (deferral only) overrides how many top-scoring experts per token stay immediate."""
        if not self.experts_parts:
            raise RuntimeError("Weights not loaded. Call load_weights() first.")
        check_has_data(hidden_states=hidden_states, topk_ids=topk_ids, topk_weights=topk_weights)
        if (
            not isinstance(hidden_states, torch.Tensor)
            or hidden_states.dim() != 2
            or hidden_states.shape[1] != self.hidden_size
        ):
            raise ValueError(f"hidden_states must be a [qlen, {self.hidden_size}] tensor")
        if protected_k is not None and not self.max_deferred_experts_per_token:
            raise ValueError(
                "protected_k needs deferred experts: create the wrapper with max_deferred_experts_per_token > 0"
            )
        if protected_k is None and self.max_deferred_experts_per_token:
            protected_k = max(self.num_experts_per_tok - self.max_deferred_experts_per_token, 0)
        (x, ids, w), copied = to_host_async((hidden_states, topk_ids, topk_weights), cuda_stream)
        if copied is None:
            routed = _Done(self._route(x, ids, w, protected_k))
        else:
            # Device inputs: the CPUInfer thread, not the caller, waits for their copies to land.
            routed = self.cpu_infer.submit(self._route_after, copied, x, ids, w, protected_k)
        immediate = self.cpu_infer.submit(self._compute_routed, routed, 0)
        deferred = (
            self.cpu_infer.submit(self._compute_routed, routed, 1) if self.max_deferred_experts_per_token else None
        )
        self._in_flight.append((immediate, deferred))

    def _route(self, x, ids, w, protected_k):
        """(x, immediate ids, deferred ids or None, weights): GPU experts masked, deferral applied."""
        ids = self.layer.held_ids(ids)
        if not self.max_deferred_experts_per_token:
            return x, ids, None, w
        immediate_ids, deferred_ids = self.select_deferred_experts(ids, w, protected_k)
        return x, immediate_ids, deferred_ids, w

    def _route_after(self, copied, x, ids, w, protected_k):
        copied.synchronize()
        return self._route(x, ids, w, protected_k)

    def _compute_routed(self, routed, which: int) -> torch.Tensor:
        x, immediate_ids, deferred_ids, w = routed.result()
        return self._compute(x, deferred_ids if which else immediate_ids, w)

    def sync_forward(self, hidden_states: torch.Tensor, cuda_stream=None) -> torch.Tensor:
        """The output of the oldest submitted forward, on hidden_states' device, plus the deferred
        contribution the previous call left (see the module docstring)."""
        if not self._in_flight:
            raise RuntimeError("sync_forward() without a pending submit_forward()")
        immediate, deferred = self._in_flight.pop(0)
        output = immediate.result()
        if self._deferred_pending is not None:
            # queued before this call's immediate work, so already finished
            owed = self._deferred_pending.result()
            if owed.shape != output.shape:
                self._in_flight.insert(0, (immediate, deferred))
                raise ValueError(
                    f"the previous call's deferred experts cover {owed.shape[0]} tokens but this call "
                    f"has {output.shape[0]}; call flush_deferred() before changing qlen"
                )
            output = output + owed
        self._deferred_pending = deferred
        return to_device(output.to(hidden_states.dtype), hidden_states.device, cuda_stream)

    def flush_deferred(self, hidden_states: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Wait for and return the deferred contribution still owed by the last synced call (None if
        nothing is owed); it will then not be added to the next call. Cast to hidden_states' device and
        dtype when given."""
        if self._deferred_pending is None:
            return None
        owed, self._deferred_pending = self._deferred_pending.result(), None
        if hidden_states is not None:
            owed = owed.to(device=hidden_states.device, dtype=hidden_states.dtype)
        return owed

    def _compute(self, x, ids, w) -> torch.Tensor:
        chunks = []
        for start in range(0, max(x.shape[0], 1), self.chunked_prefill_size):
            end = start + self.chunked_prefill_size
            _, out, _ = forward_parts(
                x[start:end],
                ids[start:end],
                w[start:end],
                self.layer.experts_parts,
                None,
                0.0,
                False,
                self.layer.subpools,
            )
            chunks.append(out)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class _Done:
    """An already computed value with the interface of CPUInfer's pending results."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value
