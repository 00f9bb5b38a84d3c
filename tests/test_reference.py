"""Tests of kt_ops/reference.py alone (run without the C++ extension).

reference.py is loaded by file path so kt_ops/__init__.py (which imports the
extension) is never executed here.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kt_testing import LORA_NAMES, REFERENCE_PATH, make_case, reference, run_reference, single_torch_thread

ref_fn = reference.moe_sft_reference


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with single_torch_thread():
        yield


def naive(case, dtype=torch.float64):
    """Token-by-token, slot-by-slot formulation (no grouping, no index_add)."""
    c = lambda t: t.to(dtype)  # noqa: E731
    Wg, Wu, Wd = c(case.gate), c(case.up), c(case.down)
    Ag, Bg, Au, Bu, Ad, Bd = (c(t) for t in case.lora)
    s = case.scaling
    out = torch.zeros(case.T, case.H, dtype=dtype)
    for t in range(case.T):
        x = c(case.hidden[t])
        for j in range(case.k):
            e = int(case.ids[t, j])
            if e == -1:
                continue
            g = Wg[e] @ x + s * (Bg[e] @ (Ag[e] @ x))
            u = Wu[e] @ x + s * (Bu[e] @ (Au[e] @ x))
            h = F.silu(g) * u
            y = Wd[e] @ h + s * (Bd[e] @ (Ad[e] @ h))
            out[t] += c(case.weights[t, j]) * y
    return out


def call(case, **kw):
    return ref_fn(case.hidden, case.ids, case.weights, case.gate, case.up, case.down, *case.lora, case.scaling, **kw)


def test_module_docstring_states_the_math():
    doc = reference.__doc__
    for piece in ("silu(g)", "X·Wgᵀ", "h·Wdᵀ", "Σ_j w[t,j] · y[t,j]", "-1"):
        assert piece in doc


def test_no_module_level_import_of_the_extension():
    tree = ast.parse(REFERENCE_PATH.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for n in names:
            assert not n.startswith("kt_ops") and not n.startswith("."), f"reference.py imports {n} at module level"


def test_loads_standalone_in_fresh_interpreter():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('r', {str(REFERENCE_PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert callable(m.moe_sft_reference)\n"
        "assert not any(k.startswith('kt_ops') for k in sys.modules), [k for k in sys.modules if 'kt' in k]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@given(
    seed=st.integers(0, 2**31 - 1),
    T=st.integers(0, 7),
    E=st.integers(1, 5),
    k=st.integers(1, 4),
    H=st.integers(1, 12),
    I=st.integers(1, 12),
    r=st.integers(0, 3),
    mode=st.sampled_from(["random", "same", "hot"]),
    neg_frac=st.sampled_from([0.0, 0.3, 1.0]),
    ids_dtype=st.sampled_from([torch.int64, torch.int32]),
)
def test_matches_naive_per_token_loop(seed, T, E, k, H, I, r, mode, neg_frac, ids_dtype):
    case = make_case(seed, T, E, k, H, I, r, mode, neg_frac, ids_dtype, hidden_dtype=torch.float64)
    out = call(case)
    assert out.dtype == torch.float64 and out.shape == (T, H)
    torch.testing.assert_close(out, naive(case), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r", [0, 1, 3])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_gradcheck_reference(r, ids_dtype):
    case = make_case(
        3,
        T=5,
        E=3,
        k=3,
        H=6,
        I=5,
        r=r,
        ids_mode="random",
        neg_frac=0.25,
        ids_dtype=ids_dtype,
        hidden_dtype=torch.float64,
    )
    inputs = [t.detach().clone().requires_grad_(True) for t in (case.hidden, case.weights, *case.lora)]

    def f(hidden, weights, *lora):
        return ref_fn(hidden, case.ids, weights, case.gate, case.up, case.down, *lora, case.scaling)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_minus_one_slot_contributes_nothing_and_gets_zero_grad():
    case = make_case(1, T=6, E=4, k=3, H=8, I=6, r=2, ids_mode="distinct", hidden_dtype=torch.float64)
    case.ids[0, 1] = -1
    case.ids[3, :] = -1
    out, grads = run_reference(case)
    # Same as giving those slots weight 0 on any valid expert.
    ids2 = case.ids.clone()
    ids2[ids2 == -1] = 2
    w2 = case.weights.clone()
    w2[case.ids == -1] = 0
    out2 = ref_fn(case.hidden, ids2, w2, case.gate, case.up, case.down, *case.lora, case.scaling)
    torch.testing.assert_close(out, out2, rtol=1e-12, atol=1e-12)
    assert torch.all(out[3] == 0)
    grad_w = grads[1]
    assert grad_w[0, 1] == 0 and torch.all(grad_w[3] == 0)
    assert torch.all(grads[0][3] == 0)


def test_duplicate_expert_in_row_sums():
    case = make_case(2, T=4, E=3, k=2, H=8, I=6, r=2, hidden_dtype=torch.float64)
    case.ids[:] = torch.tensor([1, 1])
    out = call(case)
    ids1 = case.ids.clone()
    ids1[:, 1] = -1
    w1 = case.weights.clone()
    w1[:, 0] = case.weights.sum(1)
    out1 = ref_fn(case.hidden, ids1, w1, case.gate, case.up, case.down, *case.lora, case.scaling)
    torch.testing.assert_close(out, out1, rtol=1e-12, atol=1e-12)


def test_zero_rank_equals_zero_lora_b():
    c0 = make_case(4, T=5, E=3, k=2, H=8, I=6, r=0, hidden_dtype=torch.float64)
    c2 = make_case(4, T=5, E=3, k=2, H=8, I=6, r=2, hidden_dtype=torch.float64, zero_lora_b=True)
    c2.hidden, c2.ids, c2.weights, c2.gate, c2.up, c2.down = c0.hidden, c0.ids, c0.weights, c0.gate, c0.up, c0.down
    torch.testing.assert_close(call(c0), call(c2), rtol=1e-12, atol=1e-12)
    _, grads = run_reference(c0)
    for g, name in zip(grads[2:], LORA_NAMES):
        assert g.numel() == 0, name


def test_lora_scaling_is_linear_in_lora_term():
    case = make_case(5, T=5, E=3, k=2, H=8, I=6, r=2, hidden_dtype=torch.float64)
    base = ref_fn(case.hidden, case.ids, case.weights, case.gate, case.up, case.down, *case.lora, 0.0)
    zero_b = [t if n.endswith("_a") else torch.zeros_like(t) for n, t in zip(LORA_NAMES, case.lora)]
    base2 = ref_fn(case.hidden, case.ids, case.weights, case.gate, case.up, case.down, *zero_b, 7.0)
    torch.testing.assert_close(base, base2, rtol=1e-12, atol=1e-12)


def test_dtypes():
    case = make_case(6, T=4, E=3, k=2, H=8, I=6, r=2, hidden_dtype=torch.bfloat16, lora_dtype=torch.bfloat16)
    assert call(case).dtype == torch.bfloat16
    assert call(case, compute_dtype=torch.float64).dtype == torch.float64
    assert call(case, compute_dtype=torch.float32).dtype == torch.float32
    # default compute dtype for bf16 is fp32: matches fp64 closely after rounding
    torch.testing.assert_close(call(case).double(), call(case, compute_dtype=torch.float64), rtol=1e-2, atol=1e-2)
    case32 = make_case(6, T=4, E=3, k=2, H=8, I=6, r=2, hidden_dtype=torch.float32)
    assert call(case32).dtype == torch.float32


def test_empty_tokens():
    case = make_case(7, T=0, E=3, k=2, H=8, I=6, r=2, hidden_dtype=torch.float64)
    out, grads = run_reference(case)
    assert out.shape == (0, 8)
    assert grads[0].shape == (0, 8)
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("bad", [3, -2, 100])
def test_out_of_range_ids_raise(bad):
    case = make_case(8, T=4, E=3, k=2, H=8, I=6, r=2, hidden_dtype=torch.float64)
    case.ids[2, 1] = bad
    with pytest.raises(ValueError, match="topk_ids"):
        call(case)


def test_shape_errors_name_the_argument():
    case = make_case(9, T=4, E=3, k=2, H=8, I=6, r=2, hidden_dtype=torch.float64)
    lora = list(case.lora)
    lora[3] = lora[3][:, :-1]
    with pytest.raises(ValueError, match="up_lora_b"):
        ref_fn(case.hidden, case.ids, case.weights, case.gate, case.up, case.down, *lora, case.scaling)
    with pytest.raises(ValueError, match="topk_weights"):
        ref_fn(case.hidden, case.ids, case.weights[:-1], case.gate, case.up, case.down, *case.lora, case.scaling)
