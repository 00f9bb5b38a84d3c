"""The Python face of the kt ops: fake (meta) kernels, the autograd formula, the op-call adapter and
the layer split into parts over sub-pools.

The schemas live in kt_ops_csrc/ops.cpp. `moe_sft_forward` is functional: besides the output it
returns the tensors backward needs (`gate_up_pre` = pre-activations g and u per routed pair,
`lora_mid` = the rank-r products x.Ag^T, x.Au^T, h.Ad^T per pair), so autograd, torch.compile and
activation checkpointing see every piece of state.

Every call passes the op's arguments by name: `expert_arguments` maps PackedExperts to them and
`experts_from_arguments` back, and nothing in kt_ops depends on the schemas' order.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch

from . import _C  # noqa: F401  (loads the library that defines torch.ops.kt)
from .core.checks import check_has_data
from .core.formats import LORA_NAMES, lora_shapes
from .core.packed import PackedExperts
from .core.subpools import Subpools, run_parts

# The forward schema's positional arguments (what autograd's `inputs` and gradients follow) and the
# keyword-only ones, by name.
_FORWARD_SCHEMA = torch.ops.kt.moe_sft_forward.default._schema
FORWARD_ARGUMENTS = tuple(a.name for a in _FORWARD_SCHEMA.arguments if not a.kwarg_only)
_FORWARD_KEYWORD_ONLY = tuple(a.name for a in _FORWARD_SCHEMA.arguments if a.kwarg_only)
# The arguments that hold the experts, tensors first (they go through save_for_backward).
_EXPERT_TENSORS = (
    "gate_weight",
    "up_weight",
    "down_weight",
    "gate_scale",
    "up_scale",
    "down_scale",
    "gate_bias",
    "up_bias",
    "down_bias",
)
_EXPERT_VALUES = ("weight_format", "intermediate_size", "activation", "swiglu_alpha", "swiglu_limit")
_SAVED = ("hidden_states", "topk_ids", "topk_weights", *_EXPERT_TENSORS, *LORA_NAMES)


def expert_arguments(experts: PackedExperts) -> dict:
    """The op arguments that describe `experts` (weights, scales, format, sizes and variant), by name."""
    return dict(
        gate_weight=experts.gate,
        up_weight=experts.up,
        down_weight=experts.down,
        gate_scale=experts.gate_scale,
        up_scale=experts.up_scale,
        down_scale=experts.down_scale,
        weight_format=experts.weight_format,
        intermediate_size=experts.intermediate_size,
        gate_bias=experts.gate_bias,
        up_bias=experts.up_bias,
        down_bias=experts.down_bias,
        activation=experts.activation,
        swiglu_alpha=float(experts.swiglu_alpha),
        swiglu_limit=float(experts.swiglu_limit),
    )


def experts_from_arguments(arguments: Mapping, hidden_size: int) -> PackedExperts:
    """The PackedExperts that `expert_arguments` turned into `arguments` (other keys are ignored)."""
    gate = arguments["gate_weight"]
    return PackedExperts(
        gate,
        arguments["up_weight"],
        arguments["down_weight"],
        arguments["gate_scale"],
        arguments["up_scale"],
        arguments["down_scale"],
        arguments["weight_format"],
        gate.shape[0],
        hidden_size,
        arguments["intermediate_size"],
        arguments["gate_bias"],
        arguments["up_bias"],
        arguments["down_bias"],
        arguments["activation"],
        arguments["swiglu_alpha"],
        arguments["swiglu_limit"],
    )


def _accumulation_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden_states.dtype == torch.float64 else torch.float32


def _check_same_device(hidden_states: torch.Tensor, **tensors) -> None:
    # The fake kernel also serves meta tensors: a meta tensor among CPU ones must not silently
    # yield an uninitialised CPU result.
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != hidden_states.device:
            raise ValueError(
                f"kt_ops: {name} must be on the device of hidden_states ({hidden_states.device}), got {t.device}"
            )


@torch.library.register_fake("kt::moe_sft_forward")
def _moe_sft_forward_fake(hidden_states, topk_ids, topk_weights, *args, **kwargs):
    arguments = {**dict(zip(FORWARD_ARGUMENTS[3:], args)), **kwargs}
    _check_same_device(hidden_states, topk_ids=topk_ids, topk_weights=topk_weights, **arguments)
    T, H = hidden_states.shape
    pairs = T * topk_ids.shape[1]
    rank = arguments["gate_lora_a"].shape[1]
    acc = _accumulation_dtype(hidden_states)
    output = hidden_states.new_empty((T, H))
    if arguments["save_for_backward"]:
        return (
            output,
            hidden_states.new_empty((2, pairs, arguments["intermediate_size"]), dtype=acc),
            hidden_states.new_empty((3, pairs, rank), dtype=acc),
        )
    return output, hidden_states.new_empty((0,), dtype=acc), hidden_states.new_empty((0,), dtype=acc)


@torch.library.register_fake("kt::moe_sft_backward")
def _moe_sft_backward_fake(grad_output, hidden_states, topk_ids, topk_weights, **arguments):
    _check_same_device(
        hidden_states, grad_output=grad_output, topk_ids=topk_ids, topk_weights=topk_weights, **arguments
    )
    return (
        torch.empty_like(hidden_states, memory_format=torch.contiguous_format),
        torch.empty_like(topk_weights, memory_format=torch.contiguous_format),
        *(torch.empty_like(arguments[name], memory_format=torch.contiguous_format) for name in LORA_NAMES),
    )


def forward_call(
    hidden_states,
    topk_ids,
    topk_weights,
    experts: PackedExperts,
    loras: Sequence[torch.Tensor],
    lora_scaling: float,
    save_for_backward: bool,
) -> Tuple[tuple, dict]:
    """(args, kwargs) of the kt::moe_sft_forward call for these inputs (for torch.library.opcheck and
    other direct calls of the op)."""
    return (hidden_states, topk_ids, topk_weights), dict(
        **expert_arguments(experts),
        **dict(zip(LORA_NAMES, loras)),
        lora_scaling=float(lora_scaling),
        save_for_backward=bool(save_for_backward),
    )


def backward_call(
    grad_output,
    hidden_states,
    topk_ids,
    topk_weights,
    experts: PackedExperts,
    loras: Sequence[torch.Tensor],
    lora_scaling: float,
    gate_up_pre,
    lora_mid,
    lora_grads: bool = True,
) -> Tuple[tuple, dict]:
    """(args, kwargs) of the kt::moe_sft_backward call for these inputs."""
    return (grad_output, hidden_states, topk_ids, topk_weights), dict(
        **expert_arguments(experts),
        **dict(zip(LORA_NAMES, loras)),
        lora_scaling=float(lora_scaling),
        gate_up_pre=gate_up_pre,
        lora_mid=lora_mid,
        lora_grads=bool(lora_grads),
    )


def forward_op(
    hidden_states,
    topk_ids,
    topk_weights,
    experts: PackedExperts,
    loras: Sequence[torch.Tensor],
    lora_scaling: float,
    save_for_backward: bool,
):
    """kt::moe_sft_forward: (output, gate_up_pre, lora_mid); the last two are empty unless
    save_for_backward, and are what backward_op needs besides the forward's inputs."""
    args, kwargs = forward_call(hidden_states, topk_ids, topk_weights, experts, loras, lora_scaling, save_for_backward)
    return torch.ops.kt.moe_sft_forward(*args, **kwargs)


def backward_op(
    grad_output,
    hidden_states,
    topk_ids,
    topk_weights,
    experts: PackedExperts,
    loras: Sequence[torch.Tensor],
    lora_scaling: float,
    gate_up_pre,
    lora_mid,
    lora_grads: bool = True,
):
    """kt::moe_sft_backward: (grad hidden_states, grad topk_weights, six LoRA grads). With
    lora_grads=False the LoRA gradients are not computed (zeros are returned in their place)."""
    if grad_output is None:
        grad_output = torch.zeros_like(hidden_states)
    args, kwargs = backward_call(
        grad_output,
        hidden_states,
        topk_ids,
        topk_weights,
        experts,
        loras,
        lora_scaling,
        gate_up_pre,
        lora_mid,
        lora_grads,
    )
    return torch.ops.kt.moe_sft_backward(*args, **kwargs)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    arguments = {**dict(zip(FORWARD_ARGUMENTS, inputs)), **keyword_only_inputs}
    _, gate_up_pre, lora_mid = output
    # The base weights go through save_for_backward too, so saved-tensor hooks (offloading,
    # checkpointing) and torch.compile see every tensor backward reads.
    ctx.save_for_backward(*(arguments[name] for name in _SAVED), gate_up_pre, lora_mid)
    ctx.values = {name: arguments[name] for name in (*_EXPERT_VALUES, "lora_scaling", "save_for_backward")}
    # The saved activations are outputs only so that save_for_backward sees them; without this,
    # autograd hands backward a zero-filled gradient as large as gate_up_pre (tens of MB of fresh
    # pages every training step).
    ctx.mark_non_differentiable(gate_up_pre, lora_mid)
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_output, _grad_gate_up_pre, _grad_lora_mid):
    if not ctx.values["save_for_backward"]:
        raise RuntimeError(
            "kt::moe_sft_forward was called with save_for_backward=False, so it cannot be "
            "differentiated; call it with save_for_backward=True (kt_ops.ops.moe_sft does)"
        )
    if grad_output is None:  # the layer's output did not reach the loss
        return (None,) * len(FORWARD_ARGUMENTS)
    *saved, gate_up_pre, lora_mid = ctx.saved_tensors
    arguments = {**dict(zip(_SAVED, saved)), **ctx.values}
    hidden_states = arguments["hidden_states"]
    experts = experts_from_arguments(arguments, hidden_states.shape[1])
    # needs_input_grad covers the positional arguments the call passed (trailing defaults may be left out)
    needs = dict(zip(FORWARD_ARGUMENTS, ctx.needs_input_grad))
    loras = [arguments[name] for name in LORA_NAMES]
    grads = backward_op(
        grad_output,
        hidden_states,
        arguments["topk_ids"],
        arguments["topk_weights"],
        experts,
        loras,
        arguments["lora_scaling"],
        gate_up_pre,
        lora_mid,
        lora_grads=any(needs.get(name, False) for name in LORA_NAMES),
    )
    by_name = dict(zip(("hidden_states", "topk_weights", *LORA_NAMES), grads))
    return tuple(by_name.get(name) if needs.get(name) else None for name in FORWARD_ARGUMENTS)


torch.library.register_autograd("kt::moe_sft_forward", _autograd_backward, setup_context=_setup_context)


def lora_inputs(experts: PackedExperts, lora: Optional[Sequence[torch.Tensor]], like: torch.Tensor):
    """The six LoRA tensors for the op; rank-0 placeholders when `lora` is None."""
    if lora is not None:
        if len(lora) != 6:
            raise ValueError(f"lora must hold 6 tensors (gate_a, gate_b, up_a, up_b, down_a, down_b), got {len(lora)}")
        return tuple(lora)
    dtype = torch.float32 if like.dtype == torch.bfloat16 else like.dtype
    shapes = lora_shapes(experts.num_experts, experts.hidden_size, experts.intermediate_size, 0)
    return tuple(like.new_zeros(shape, dtype=dtype) for shape in shapes)


# ---- a layer split along the intermediate dimension (threadpool_count sub-pools) -------------------
# Part p holds gate/up rows and down columns lo:hi of every expert. Each part runs the ops on its own
# sub-pool and the outputs add up. Which dimension of each LoRA tensor runs along the intermediate
# size (None: it does not): those are sliced per part, and the gradients of the others summed.
_LORA_INTERMEDIATE_DIM = (None, 1, None, 1, 2, None)


def split_lora(lora: Sequence[torch.Tensor], split: Sequence[Tuple[int, int]]) -> list:
    """The six LoRA tensors of each part [lo, hi) of `split` (contiguous copies of the intermediate
    ranges; with one part, `lora` itself)."""
    if len(split) == 1:
        return [tuple(lora)]
    return [
        tuple(
            t if dim is None else t.narrow(dim, lo, hi - lo).contiguous()
            for t, dim in zip(lora, _LORA_INTERMEDIATE_DIM)
        )
        for lo, hi in split
    ]


def part_ranges(parts: Sequence[PackedExperts]) -> list:
    """The [lo, hi) intermediate range of each part."""
    ranges, lo = [], 0
    for part in parts:
        ranges.append((lo, lo + part.intermediate_size))
        lo += part.intermediate_size
    return ranges


def forward_parts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    parts: Sequence[PackedExperts],
    lora_parts: Optional[Sequence[tuple]],
    lora_scaling: float,
    save_for_backward: bool,
    subpools: Optional[Subpools] = None,
):
    """Run kt::moe_sft_forward once per part (at once on `subpools` when it has one sub-pool per
    part) and sum the outputs in part order; `lora_parts` None means no LoRA. Several parts mean
    several roundings of a sum, so bf16 inputs then run in fp32 (the caller rounds once). Returns
    (the x the parts ran on, output, [(gate_up_pre, lora_mid)] per part)."""
    if len(parts) > 1 and x.dtype == torch.bfloat16:
        x = x.float()
    if lora_parts is None:
        lora_parts = [lora_inputs(experts, None, x) for experts in parts]
    with torch.no_grad():
        results = run_parts(
            subpools,
            forward_op,
            [
                (x, ids, weights, experts, loras, lora_scaling, save_for_backward)
                for experts, loras in zip(parts, lora_parts)
            ],
        )
    output = results[0][0]
    for out, _, _ in results[1:]:
        output = output.add_(out)
    return x, output, [(gate_up_pre, lora_mid) for _, gate_up_pre, lora_mid in results]


def backward_parts(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    parts: Sequence[PackedExperts],
    lora_parts: Optional[Sequence[tuple]],
    lora_scaling: float,
    activations: Sequence[tuple],
    subpools: Optional[Subpools] = None,
    lora_grads: bool = True,
):
    """The gradients of a forward_parts call (x, activations: what it returned) as (grad x, grad
    weights, the six LoRA gradients of the whole layer, or None when `lora_parts` is None or
    `lora_grads` is False: the LoRA then shapes grad x only)."""
    lora_grads = lora_grads and lora_parts is not None
    if lora_parts is None:
        lora_parts = [lora_inputs(experts, None, x) for experts in parts]
    with torch.no_grad():
        results = run_parts(
            subpools,
            backward_op,
            [
                (grad_output, x, ids, weights, experts, loras, lora_scaling, gate_up_pre, lora_mid, lora_grads)
                for experts, loras, (gate_up_pre, lora_mid) in zip(parts, lora_parts, activations)
            ],
        )
    grad_x, grad_weights = results[0][0], results[0][1]
    for part in results[1:]:
        grad_x = grad_x + part[0]
        grad_weights = grad_weights + part[1]
    if not lora_grads:
        return grad_x, grad_weights, None
    grads = list(results[0][2:])
    if len(results) > 1:
        for i, dim in enumerate(_LORA_INTERMEDIATE_DIM):
            pieces = [part[2 + i] for part in results]
            # adds, not stack().sum(0): torch's reduction over the new dim took ~15 ms for 32K
            # elements here (torch 2.13, 2-core Zen 3), more than the whole backward
            grads[i] = torch.cat(pieces, dim) if dim is not None else functools.reduce(torch.add, pieces)
    return grad_x, grad_weights, tuple(grads)


class _PartsFunction(torch.autograd.Function):
    """moe_sft over several parts: forward_parts and backward_parts, each part on its sub-pool."""

    @staticmethod
    def forward(ctx, hidden_states, topk_ids, topk_weights, parts, subpools, lora_scaling, save_for_backward, *lora):
        lora_parts = split_lora(lora, part_ranges(parts)) if lora else None
        x, output, activations = forward_parts(
            hidden_states, topk_ids, topk_weights, parts, lora_parts, lora_scaling, save_for_backward, subpools
        )
        ctx.parts, ctx.subpools, ctx.lora_scaling, ctx.num_lora = parts, subpools, lora_scaling, len(lora)
        ctx.input_dtype = hidden_states.dtype
        flat_lora = [t for loras in lora_parts or () for t in loras]
        ctx.save_for_backward(x, topk_ids, topk_weights, *(t for pair in activations for t in pair), *flat_lora)
        ctx.set_materialize_grads(False)
        return output.to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None:
            return (None,) * (7 + ctx.num_lora)
        x, ids, weights, *rest = ctx.saved_tensors
        count = len(ctx.parts)
        activations = [tuple(rest[2 * p : 2 * p + 2]) for p in range(count)]
        flat_lora = rest[2 * count :]
        lora_parts = [tuple(flat_lora[6 * p : 6 * p + 6]) for p in range(count)] if flat_lora else None
        needs = ctx.needs_input_grad
        if lora_parts is not None and not any(needs[7:]):
            lora_parts = None  # LoRA was given but is frozen: its gradients are not computed
        grad_x, grad_weights, lora_grads = backward_parts(
            grad_output.to(x.dtype), x, ids, weights, ctx.parts, lora_parts, ctx.lora_scaling, activations, ctx.subpools
        )
        lora_grads = lora_grads or (None,) * ctx.num_lora
        return (
            grad_x.to(ctx.input_dtype) if needs[0] else None,
            None,
            grad_weights if needs[2] else None,
            None,
            None,
            None,
            None,
            *(g if need else None for g, need in zip(lora_grads, needs[7:])),
        )


def _check_cpu_inputs(tensors: dict) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(
                f"{name} must be a CPU tensor, got device {t.device} (KTMoELayer moves inputs to the CPU for you)"
            )


def moe_sft(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: Union[PackedExperts, Sequence[PackedExperts]],
    lora: Optional[Sequence[torch.Tensor]],
    lora_scaling: float,
    subpools: Optional[Subpools] = None,
) -> torch.Tensor:
    """Differentiable MoE experts with LoRA: [T, H] -> [T, H]. `lora` = (gate_a, gate_b, up_a, up_b,
    down_a, down_b) or None for no LoRA. Activations are saved only when a gradient is needed.
    `experts` may be the parts of a layer split along the intermediate dimension
    (core.packed.pack_split); they run at once on `subpools` when it has one sub-pool per part."""
    parts = [experts] if isinstance(experts, PackedExperts) else list(experts)
    check_has_data(hidden_states=hidden_states, topk_ids=topk_ids, topk_weights=topk_weights)
    loras = lora_inputs(parts[0], lora, hidden_states)
    _check_cpu_inputs(
        {
            "hidden_states": hidden_states,
            "topk_ids": topk_ids,
            "topk_weights": topk_weights,
            **dict(zip(LORA_NAMES, loras)),
        }
    )
    if hidden_states.dim() != 2 or hidden_states.shape[1] != parts[0].hidden_size:
        raise ValueError(
            f"hidden_states must have shape [num_tokens, {parts[0].hidden_size}] to match the experts' "
            f"hidden_size, got {tuple(hidden_states.shape)}"
        )
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, topk_weights, *loras))
    if len(parts) > 1:
        return _PartsFunction.apply(
            hidden_states, topk_ids, topk_weights, parts, subpools, float(lora_scaling), needs_grad, *(lora or ())
        )
    output, _, _ = forward_op(hidden_states, topk_ids, topk_weights, parts[0], loras, lora_scaling, needs_grad)
    return output
