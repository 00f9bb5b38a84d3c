"""Plain-PyTorch reference implementation of the LoRA-augmented MoE expert MLP.

This module is the definition of the math computed by the ``kt`` kernels and
the oracle of the test-suite. It depends on nothing but PyTorch (it does not
import the C++ extension), so it can be loaded on its own.

Math, per expert ``e`` with routed rows ``X`` and ``s = lora_scaling =
lora_alpha / lora_rank``::

    g = X·Wgᵀ + s·(X·Agᵀ)·Bgᵀ + bg    u = X·Wuᵀ + s·(X·Auᵀ)·Buᵀ + bu    h = act(g, u)
    y = h·Wdᵀ + s·(h·Adᵀ)·Bdᵀ + bd    Y[t] = Σ_j w[t,j] · y[t,j]

The biases ``bg``, ``bu`` [E, I] and ``bd`` [E, H] are optional (zero when absent). ``act`` is
``silu(g) ⊙ u`` (activation "silu", the default) or gpt-oss' clamped SwiGLU (activation
"clamped_swiglu", with ``swiglu_alpha`` α and ``swiglu_limit`` L)::

    g' = min(g, L)    u' = clamp(u, -L, L)    h = (u' + 1) ⊙ g' ⊙ sigmoid(α·g')

or DeepSeek-V4's clamped SiLU (activation "clamped_silu": the same clamps, ``h = silu(g') ⊙ u'``,
``swiglu_alpha`` unused), where a clamped element passes no gradient.

Shapes::

    hidden_states  [T, H]           topk_ids [T, k] (int64 or int32)   topk_weights [T, k]
    gate_proj      [E, I, H]        up_proj  [E, I, H]                 down_proj    [E, H, I]
    gate_lora_a    [E, r, H]        gate_lora_b [E, I, r]
    up_lora_a      [E, r, H]        up_lora_b   [E, I, r]
    down_lora_a    [E, r, I]        down_lora_b [E, H, r]

``y[t, j]`` is expert ``topk_ids[t, j]`` applied to ``hidden_states[t]``.
A slot with ``topk_ids[t, j] == -1`` is computed elsewhere: it contributes
nothing to ``Y[t]`` and receives zero gradient. The same expert may appear
more than once in a token's row; its contributions are simply summed.
``r`` may be 0 (no LoRA: the LoRA terms vanish).

The base weights are frozen; the result is differentiable by autograd with
respect to ``hidden_states``, ``topk_weights`` and the six LoRA tensors.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "moe_sft_reference",
    "expert_mlp_reference",
    "gate_activation",
    "moe_loop",
    "routed_experts",
    "base_weight_grads",
]


def gate_activation(
    g: torch.Tensor, u: torch.Tensor, activation: str = "silu", swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0
) -> torch.Tensor:
    """h from the gate and up pre-activations (see the module docstring)."""
    if activation == "silu":
        return F.silu(g) * u
    if activation in ("clamped_swiglu", "clamped_silu"):
        g = g.clamp(max=swiglu_limit)
        u = u.clamp(-swiglu_limit, swiglu_limit)
        if activation == "clamped_silu":
            return F.silu(g) * u
        return (u + 1) * (g * torch.sigmoid(swiglu_alpha * g))
    raise ValueError(f"activation must be 'silu', 'clamped_swiglu' or 'clamped_silu', got {activation!r}")


def routed_experts(topk_ids: torch.Tensor) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, token indices, slot indices) for every expert that some token is routed to, in
    increasing expert order; -1 slots (experts computed elsewhere) are skipped. A token that picks the
    same expert twice appears twice."""
    for expert in torch.unique(topk_ids[topk_ids >= 0]).tolist():
        tokens, slots = torch.where(topk_ids == expert)
        yield expert, tokens, slots


def moe_loop(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Y[t] = sum_j w[t, j] * expert_fn(ids[t, j], x[t]): the per-expert loop every plain-PyTorch MoE
    here runs (the oracle, the benchmarks' eager baselines, experts kept on the GPU). `expert_fn(e,
    rows)` maps the rows routed to expert e, [n, H], to [n, H_out]; the result has hidden_states' dtype."""
    out = hidden_states.new_zeros(hidden_states.shape[0], hidden_states.shape[1])
    for expert, tokens, slots in routed_experts(topk_ids):
        y = expert_fn(expert, hidden_states[tokens])
        out = out.index_add(0, tokens, (y * topk_weights[tokens, slots, None].to(y.dtype)).to(out.dtype))
    return out


def expert_mlp_reference(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    a_gate: torch.Tensor,
    b_gate: torch.Tensor,
    a_up: torch.Tensor,
    b_up: torch.Tensor,
    a_down: torch.Tensor,
    b_down: torch.Tensor,
    lora_scaling: float,
    gate_bias: Optional[torch.Tensor] = None,
    up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    activation: str = "silu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """One expert applied to rows ``x`` [n, H]; all tensors of one dtype.

    ``w_gate``/``w_up`` [I, H], ``w_down`` [H, I], ``a_gate``/``a_up`` [r, H],
    ``b_gate``/``b_up`` [I, r], ``a_down`` [r, I], ``b_down`` [H, r]; the
    optional biases ``gate_bias``/``up_bias`` [I] and ``down_bias`` [H].
    Returns ``y`` [n, H].
    """
    s = lora_scaling
    g = x @ w_gate.T + s * ((x @ a_gate.T) @ b_gate.T)
    u = x @ w_up.T + s * ((x @ a_up.T) @ b_up.T)
    if gate_bias is not None:
        g = g + gate_bias
    if up_bias is not None:
        u = u + up_bias
    h = gate_activation(g, u, activation, swiglu_alpha, swiglu_limit)
    y = h @ w_down.T + s * ((h @ a_down.T) @ b_down.T)
    return y + down_bias if down_bias is not None else y


def _default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Low-precision inputs are computed in fp32; fp32 stays fp32, fp64 stays fp64.
    return torch.promote_types(dtype, torch.float32)


def _check_shapes(hidden_states, topk_ids, topk_weights, gate_proj, up_proj, down_proj, lora, biases) -> None:
    """moe_sft_reference's arguments fit together, and every routed id is an expert or -1."""
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H], got shape {tuple(hidden_states.shape)}")
    T, H = hidden_states.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must be [T={T}, k], got shape {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
        )
    E, I, H_g = gate_proj.shape
    if H_g != H or tuple(up_proj.shape) != (E, I, H) or tuple(down_proj.shape) != (E, H, I):
        raise ValueError(
            "base weights must be gate_proj/up_proj [E, I, H] and down_proj [E, H, I] "
            f"with H={H}; got {tuple(gate_proj.shape)}, {tuple(up_proj.shape)}, {tuple(down_proj.shape)}"
        )
    gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b = lora
    gate_bias, up_bias, down_bias = biases
    r = gate_lora_a.shape[1]
    expected = {
        "gate_lora_a": (gate_lora_a, (E, r, H)),
        "gate_lora_b": (gate_lora_b, (E, I, r)),
        "up_lora_a": (up_lora_a, (E, r, H)),
        "up_lora_b": (up_lora_b, (E, I, r)),
        "down_lora_a": (down_lora_a, (E, r, I)),
        "down_lora_b": (down_lora_b, (E, H, r)),
    }
    for name, t, shape in (
        ("gate_bias", gate_bias, (E, I)),
        ("up_bias", up_bias, (E, I)),
        ("down_bias", down_bias, (E, H)),
    ):
        if t is not None:
            expected[name] = (t, shape)
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")

    ids = topk_ids.reshape(-1).to(torch.int64)
    bad = (ids < -1) | (ids >= E)
    if bool(bad.any()):
        raise ValueError(f"topk_ids must lie in [0, {E}) or be -1, got {int(ids[bad][0])}")


def moe_sft_reference(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_lora_a: torch.Tensor,
    gate_lora_b: torch.Tensor,
    up_lora_a: torch.Tensor,
    up_lora_b: torch.Tensor,
    down_lora_a: torch.Tensor,
    down_lora_b: torch.Tensor,
    lora_scaling: float,
    compute_dtype: Optional[torch.dtype] = None,
    gate_bias: Optional[torch.Tensor] = None,
    up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    activation: str = "silu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """Reference MoE forward (see the module docstring for the math).

    Every tensor is cast to ``compute_dtype`` for the computation. When
    ``compute_dtype`` is None the computation runs in
    ``promote_types(hidden_states.dtype, float32)`` and the result is returned
    in ``hidden_states.dtype``; otherwise the result is in ``compute_dtype``.

    Raises ValueError when ``topk_ids`` holds an id outside ``[0, E)`` other
    than -1, or when the shapes do not fit together.
    """
    out_dtype = compute_dtype if compute_dtype is not None else hidden_states.dtype
    cdt = compute_dtype if compute_dtype is not None else _default_compute_dtype(hidden_states.dtype)
    lora = (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
    _check_shapes(
        hidden_states, topk_ids, topk_weights, gate_proj, up_proj, down_proj, lora, (gate_bias, up_bias, down_bias)
    )

    x = hidden_states.to(cdt)
    base = [gate_proj.to(cdt), up_proj.to(cdt), down_proj.to(cdt)]
    lora = [t.to(cdt) for t in lora]

    biases = [None if t is None else t.to(cdt) for t in (gate_bias, up_bias, down_bias)]

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        return expert_mlp_reference(
            rows,
            base[0][e],
            base[1][e],
            base[2][e],
            *(t[e] for t in lora),
            lora_scaling,
            *(None if b is None else b[e] for b in biases),
            activation,
            swiglu_alpha,
            swiglu_limit,
        )

    return moe_loop(x, topk_ids.to(torch.int64), topk_weights.to(cdt), expert).to(out_dtype)


def base_weight_grads(
    grad_output: torch.Tensor,
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_pre: torch.Tensor,
    down_proj: torch.Tensor,
    down_lora: Optional[Tuple[torch.Tensor, torch.Tensor]],
    lora_scaling: float,
    activation: str = "silu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the base weights (gate_proj [E, I, H], up_proj [E, I, H], down_proj [E, H, I],
    fp32) for full fine-tuning, which the kernels do not compute, from what the forward op saved.

    `gate_up_pre` [2, T*k, I] holds g and u of pair t*k + j (the op's saved activations);
    `down_proj` [E, H, I] is the down weight the forward used and `down_lora` (Ad [E, r, I], Bd [E, H,
    r]) its LoRA, or None. Per expert e with routed rows X, routing weights w and dY the rows' output
    gradients: dy = w·dY, dh = dy·Wd + s·(dy·Bd)·Ad, (dg, du) = act's backward at (g, u), and
    dWd = dyᵀh, dWg = dgᵀX, dWu = duᵀX. `down_proj` may cover a range of the intermediate dimension
    (a part of a split layer): gate_up_pre and Ad then cover the same range."""
    E, H, I = down_proj.shape
    k = topk_ids.shape[1]
    grads = [torch.zeros((E, I, H)), torch.zeros((E, I, H)), torch.zeros((E, H, I))]
    pre = gate_up_pre.float()
    for e, tokens, slots in routed_experts(topk_ids):
        pairs = tokens * k + slots
        x = hidden_states[tokens].float()
        dy = grad_output[tokens].float() * topk_weights[tokens, slots, None].float()
        dh = dy @ down_proj[e].float()
        if down_lora is not None:
            a_down, b_down = down_lora
            dh = dh + lora_scaling * ((dy @ b_down[e].float()) @ a_down[e].float())
        with torch.enable_grad():
            g = pre[0, pairs].requires_grad_()
            u = pre[1, pairs].requires_grad_()
            h = gate_activation(g, u, activation, swiglu_alpha, swiglu_limit)
            dg, du = torch.autograd.grad(h, (g, u), dh)
        grads[0][e] += dg.T @ x
        grads[1][e] += du.T @ x
        grads[2][e] += dy.T @ h.detach()
    return grads[0], grads[1], grads[2]
