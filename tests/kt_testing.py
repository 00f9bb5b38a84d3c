"""Shared helpers of the kt_ops test-suite: input generation, oracles, comparisons.

This module never imports ``kt_ops`` at module level, so the reference tests
run even when the C++ extension is not built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import pathlib
from typing import Optional, Sequence

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE_PATH = REPO_ROOT / "kt_ops" / "reference.py"

LORA_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")
GRAD_NAMES = ("hidden_states", "topk_weights") + LORA_NAMES


def load_reference_module():
    """Load kt_ops/reference.py by file path (does not execute kt_ops/__init__.py)."""
    spec = importlib.util.spec_from_file_location("kt_ops_reference_standalone", REFERENCE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = load_reference_module()


def lora_shapes(E: int, H: int, I: int, r: int):
    return {
        "gate_lora_a": (E, r, H),
        "gate_lora_b": (E, I, r),
        "up_lora_a": (E, r, H),
        "up_lora_b": (E, I, r),
        "down_lora_a": (E, r, I),
        "down_lora_b": (E, H, r),
    }


@dataclasses.dataclass
class Case:
    """One set of inputs. Base weights are bf16 (what the kernel sees after packing)."""

    hidden: torch.Tensor  # [T, H]
    ids: torch.Tensor  # [T, k]
    weights: torch.Tensor  # [T, k]
    gate: torch.Tensor  # [E, I, H] bf16
    up: torch.Tensor  # [E, I, H] bf16
    down: torch.Tensor  # [E, H, I] bf16
    lora: tuple  # 6 tensors, order of LORA_NAMES
    scaling: float
    grad_out: torch.Tensor  # [T, H], dtype of hidden

    @property
    def T(self):
        return self.hidden.shape[0]

    @property
    def H(self):
        return self.hidden.shape[1]

    @property
    def E(self):
        return self.gate.shape[0]

    @property
    def I(self):
        return self.gate.shape[1]

    @property
    def k(self):
        return self.ids.shape[1]

    @property
    def r(self):
        return self.lora[0].shape[1]

    def base(self):
        return (self.gate, self.up, self.down)

    def describe(self):
        return (
            f"T={self.T} H={self.H} I={self.I} E={self.E} k={self.k} r={self.r} "
            f"ids={self.ids.dtype} hidden={self.hidden.dtype} weights={self.weights.dtype} "
            f"lora={self.lora[0].dtype} s={self.scaling}"
        )


def make_ids(gen, T, E, k, mode="random", neg_frac=0.0, dtype=torch.int64):
    """Routing ids [T, k].

    mode: "distinct" (k distinct experts per token, needs k <= E), "random"
    (with replacement: duplicates allowed), "same" (every slot the same expert),
    "hot" (most slots expert 0). neg_frac: fraction of slots set to -1.
    """
    if mode == "distinct":
        assert k <= E
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    elif mode == "random":
        ids = torch.randint(0, E, (T, k), generator=gen)
    elif mode == "same":
        e = int(torch.randint(0, E, (1,), generator=gen))
        ids = torch.full((T, k), e)
    elif mode == "hot":
        ids = torch.randint(0, E, (T, k), generator=gen)
        hot = torch.rand(T, k, generator=gen) < 0.75
        ids[hot] = 0
    else:
        raise ValueError(mode)
    ids = ids.to(torch.int64).reshape(T, k)
    if neg_frac > 0:
        neg = torch.rand(T, k, generator=gen) < neg_frac
        ids[neg] = -1
    return ids.to(dtype)


def make_case(
    seed: int = 0,
    T: int = 8,
    E: int = 4,
    k: int = 2,
    H: int = 32,
    I: int = 24,
    r: int = 4,
    ids_mode: str = "distinct",
    neg_frac: float = 0.0,
    ids_dtype: torch.dtype = torch.int64,
    hidden_dtype: torch.dtype = torch.float32,
    weights_dtype: Optional[torch.dtype] = None,
    lora_dtype: Optional[torch.dtype] = None,
    scaling: float = 2.0,
    zero_lora_b: bool = False,
) -> Case:
    """Random inputs with O(1) activations; LoRA B nonzero unless zero_lora_b."""
    gen = torch.Generator().manual_seed(seed)
    weights_dtype = weights_dtype or (torch.float64 if hidden_dtype == torch.float64 else torch.float32)
    lora_dtype = lora_dtype or hidden_dtype

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    hidden = randn(T, H).to(hidden_dtype)
    ids = make_ids(gen, T, E, k, ids_mode, neg_frac, ids_dtype)
    weights = (torch.rand(T, k, generator=gen, dtype=torch.float64) + 0.1).to(weights_dtype)
    gate = randn(E, I, H, std=H ** -0.5).to(torch.bfloat16)
    up = randn(E, I, H, std=H ** -0.5).to(torch.bfloat16)
    down = randn(E, H, I, std=I ** -0.5).to(torch.bfloat16)
    shapes = lora_shapes(E, H, I, r)
    lora = []
    for name in LORA_NAMES:
        shape = shapes[name]
        if name.endswith("_a"):
            t = randn(*shape, std=shape[2] ** -0.5)
        elif zero_lora_b:
            t = torch.zeros(shape, dtype=torch.float64)
        else:
            t = randn(*shape, std=0.5 * max(r, 1) ** -0.5)
        lora.append(t.to(lora_dtype))
    grad_out = randn(T, H).to(hidden_dtype)
    return Case(hidden, ids, weights, gate, up, down, tuple(lora), float(scaling), grad_out)


def with_dtypes(case: Case, hidden_dtype=None, weights_dtype=None, lora_dtype=None) -> Case:
    hd = hidden_dtype or case.hidden.dtype
    return dataclasses.replace(
        case,
        hidden=case.hidden.to(hd),
        weights=case.weights.to(weights_dtype or case.weights.dtype),
        lora=tuple(t.to(lora_dtype or t.dtype) for t in case.lora),
        grad_out=case.grad_out.to(hd),
    )


def _grad_inputs(hidden, weights, lora):
    leaves = [hidden.detach().clone().requires_grad_(True), weights.detach().clone().requires_grad_(True)]
    leaves += [t.detach().clone().requires_grad_(True) for t in lora]
    return leaves


def grads_of(out, leaves, grad_out):
    """Gradients of <out, grad_out> w.r.t. leaves; None where a leaf is unused."""
    if not out.requires_grad:
        return [None] * len(leaves)
    return list(torch.autograd.grad(out, leaves, grad_out, allow_unused=True))


@contextlib.contextmanager
def single_torch_thread():
    """Run tiny eager ops on one intra-op thread: with 2 cores shared with other work (the kt_ops
    pool, a parallel build), OpenMP's spinning barriers can make them 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_reference(case: Case, compute_dtype=torch.float64, with_grads=True):
    with single_torch_thread():
        return _run_reference(case, compute_dtype, with_grads)


def _run_reference(case: Case, compute_dtype, with_grads):
    """Reference output and gradients in compute_dtype (None grads replaced by zeros).

    The leaves are exact compute_dtype copies of the inputs, so the reference gradients are
    not rounded to the inputs' (possibly bf16) dtype."""
    cd = compute_dtype or case.hidden.dtype
    leaves = _grad_inputs(case.hidden.to(cd), case.weights.to(cd), [t.to(cd) for t in case.lora])
    out = reference.moe_sft_reference(
        leaves[0], case.ids, leaves[1], case.gate, case.up, case.down, *leaves[2:], case.scaling,
        compute_dtype=compute_dtype,
    )
    if not with_grads:
        return out.detach(), None
    grads = grads_of(out, leaves, case.grad_out.to(out.dtype))
    grads = [torch.zeros_like(l, dtype=out.dtype) if g is None else g for g, l in zip(grads, leaves)]
    return out.detach(), grads


def run_ops(case: Case, experts=None, with_grads=True):
    """Kernel output and gradients through kt_ops.ops.moe_sft."""
    import kt_ops
    import kt_ops.ops

    if experts is None:
        experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    leaves = _grad_inputs(case.hidden, case.weights, case.lora)
    out = kt_ops.ops.moe_sft(leaves[0], case.ids, leaves[1], experts, tuple(leaves[2:]), case.scaling)
    if not with_grads:
        return out.detach(), None
    grads = grads_of(out, leaves, case.grad_out)
    return out.detach(), grads


def rel_mae(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a-b| / mean|b| in float64 (0 when both are empty or identical zero)."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    if b.numel() == 0:
        return 0.0
    num = (a - b).abs().mean().item()
    den = b.abs().mean().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def check_tensor_like(name, got, expected_shape, expected_dtype):
    assert got is not None, f"{name}: no gradient returned"
    assert tuple(got.shape) == tuple(expected_shape), f"{name}: shape {tuple(got.shape)} != {tuple(expected_shape)}"
    assert got.dtype == expected_dtype, f"{name}: dtype {got.dtype} != {expected_dtype}"


def assert_tight(name, got, ref, rtol=3e-5):
    """max|got-ref| <= rtol * max(max|ref|, 1e-3): tight check for fp32 vs fp64 reference
    (fp32 kernels measured at <= 1e-6 relative for H, I <= 96)."""
    got = got.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values in kernel result"
    err = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-3)
    assert err <= rtol * scale, f"{name}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3e} (rel {err / scale:.3e})"


def assert_rel_mae(name, got, ref, tol):
    got_d = got.detach().to(torch.float64)
    assert got_d.shape == ref.shape, f"{name}: shape {tuple(got_d.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got_d).all(), f"{name}: non-finite values in kernel result"
    err = rel_mae(got_d, ref)
    assert err <= tol, f"{name}: rel_mae {err:.4e} > {tol}"


def compare_with_reference(case: Case, out, grads, mode: str, ref=None):
    """mode "tight" (fp32/fp64 kernel) or "bf16" (rel_mae 0.01 forward, 0.02 grads)."""
    ref_out, ref_grads = ref if ref is not None else run_reference(case)
    check_tensor_like("output", out, (case.T, case.H), case.hidden.dtype)
    if mode == "tight":
        assert_tight("output", out, ref_out)
    else:
        assert_rel_mae("output", out, ref_out, 0.01)
    if grads is None:
        return
    inputs = [case.hidden, case.weights, *case.lora]
    for name, g, rg, inp in zip(GRAD_NAMES, grads, ref_grads, inputs):
        if g is None and inp.numel() == 0:
            continue  # r == 0: an absent gradient of an empty tensor is fine
        check_tensor_like(f"grad {name}", g, inp.shape, inp.dtype)
        if mode == "tight":
            assert_tight(f"grad {name}", g, rg)
        else:
            assert_rel_mae(f"grad {name}", g, rg, 0.02)


def assert_same(name, a, b):
    """Bitwise-identical tensors (NaN == NaN)."""
    if a is None or b is None:
        assert a is None and b is None, f"{name}: one is None"
        return
    assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), (
        f"{name}: not identical, max diff {(a.double() - b.double()).abs().max().item():.3e}"
    )


def assert_all_same(names: Sequence[str], xs, ys):
    for n, a, b in zip(names, xs, ys):
        assert_same(n, a, b)
