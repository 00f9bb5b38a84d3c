"""Kernel vs reference: forward output and every gradient, for each available ISA.

* fp32 hidden/LoRA kernel vs fp64 reference: tight (max err <= 3e-5 * max|ref|).
* bf16 hidden/LoRA kernel vs fp64 reference: rel_mae <= 0.01 forward, <= 0.02 grads.
* fp64 runs the portable reference kernel: tight.

The reference always uses the bf16-rounded base weights (unpack_experts of the
packed blobs) and LoRA B is nonzero so every LoRA path is exercised.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import kt_ops
import kt_ops.ops
from kt_testing import GRAD_NAMES, compare_with_reference, make_case, run_ops, run_reference

# Named edge cases from the spec: each runs deterministically on every ISA.
EDGE_CASES = {
    "T0": dict(T=0, E=4, k=2, H=32, I=24, r=4),
    "T1": dict(T=1, E=4, k=2, H=32, I=24, r=4),
    "k_eq_E": dict(T=9, E=5, k=5, H=32, I=24, r=4),
    "all_same_expert": dict(T=24, E=6, k=1, H=32, I=24, r=4, ids_mode="same"),
    "hot_expert": dict(T=24, E=6, k=3, H=32, I=24, r=4, ids_mode="hot"),
    "odd_dims": dict(T=11, E=5, k=2, H=17, I=33, r=3),
    "odd_dims_2": dict(T=13, E=9, k=3, H=33, I=17, r=5),
    "tiny_dims": dict(T=5, E=3, k=2, H=1, I=1, r=1),
    "r1": dict(T=10, E=4, k=2, H=32, I=24, r=1),
    "r0": dict(T=10, E=4, k=2, H=32, I=24, r=0),
    "r16": dict(T=10, E=4, k=2, H=64, I=48, r=16),
    # r and the columns of a task's block past whole 8 x 8 blocks (Ad's columns are transposed in them)
    "r12_ragged_columns": dict(T=20, E=3, k=2, H=40, I=78, r=12),
    "int32_ids": dict(T=10, E=4, k=2, H=32, I=24, r=4, ids_dtype=torch.int32),
    "some_minus_one": dict(T=16, E=4, k=3, H=32, I=24, r=4, neg_frac=0.3),
    "all_minus_one": dict(T=6, E=4, k=2, H=32, I=24, r=4, neg_frac=1.0),
    "duplicates_in_row": dict(T=16, E=3, k=4, H=32, I=24, r=4, ids_mode="random"),
    "int32_minus_one_dup": dict(
        T=16, E=5, k=3, H=40, I=20, r=2, ids_mode="random", neg_frac=0.2, ids_dtype=torch.int32
    ),
    "bigger": dict(T=24, E=8, k=2, H=96, I=96, r=8),
    "negative_scaling": dict(T=8, E=3, k=2, H=32, I=24, r=4, scaling=-0.5),
    # Beyond the small sizes: > 64 rows per expert and > 64 output columns, so the kernels split
    # one expert's work over several row blocks, column panels and threads.
    "multi_task_split": dict(T=150, E=3, k=2, H=136, I=144, r=8, ids_mode="hot", neg_frac=0.05),
    # Few rows per expert and several 64-column blocks per task (ragged last ones): the backward's
    # products over a task's whole run of blocks, then each block's LoRA products.
    "few_rows_wide_runs": dict(T=3, E=4, k=2, H=201, I=261, r=8),
    # About 6 rows per expert: AVX2's few-row product in two passes over W, run-wide as well.
    "some_rows_wide_runs": dict(T=12, E=4, k=2, H=201, I=261, r=8),
}

DTYPE_MODES = {
    # name: (hidden dtype, lora dtype, topk_weights dtype, comparison mode)
    "fp32": (torch.float32, torch.float32, torch.float32, "tight"),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.float32, "bf16"),
    "bf16_w_bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, "bf16"),
}


def _run_and_compare(case, mode):
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    g, u, d = kt_ops.unpack_experts(experts)
    # The reference must see exactly the weights the kernel uses.
    assert torch.equal(g, case.gate) and torch.equal(u, case.up) and torch.equal(d, case.down)
    out, grads = run_ops(case, experts)
    compare_with_reference(case, out, grads, mode)


@pytest.mark.parametrize("dtypes", list(DTYPE_MODES), ids=list(DTYPE_MODES))
@pytest.mark.parametrize("edge", list(EDGE_CASES), ids=list(EDGE_CASES))
def test_edge_cases(isa, edge, dtypes):
    hd, ld, wd, mode = DTYPE_MODES[dtypes]
    case = make_case(
        seed=zlib.crc32(edge.encode()) % 1000, hidden_dtype=hd, lora_dtype=ld, weights_dtype=wd, **EDGE_CASES[edge]
    )
    _run_and_compare(case, mode)


@pytest.mark.parametrize("edge", ["T1", "odd_dims", "some_minus_one", "r0", "duplicates_in_row"])
def test_fp64_runs_reference_kernel_tight(edge):
    case = make_case(seed=7, hidden_dtype=torch.float64, **EDGE_CASES[edge])
    _run_and_compare(case, "tight")


@st.composite
def case_params(draw):
    E = draw(st.integers(1, 9))
    ids_mode = draw(st.sampled_from(["distinct", "random", "same", "hot"]))
    k = draw(st.integers(1, E if ids_mode == "distinct" else min(E + 2, 9)))
    dims = st.one_of(st.sampled_from([16, 17, 32, 33, 64, 96]), st.integers(1, 96))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        T=draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 24))),
        E=E,
        k=k,
        H=draw(dims),
        I=draw(dims),
        r=draw(st.sampled_from([0, 1, 2, 3, 4, 8, 16])),
        ids_mode=ids_mode,
        neg_frac=draw(st.sampled_from([0.0, 0.0, 0.2, 0.5, 1.0])),
        ids_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        scaling=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])),
    )


@given(params=case_params())
def test_property_fp32(isa, params):
    case = make_case(hidden_dtype=torch.float32, **params)
    note(case.describe())
    _run_and_compare(case, "tight")


@given(params=case_params(), weights_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_bf16(isa, params, weights_dtype):
    case = make_case(hidden_dtype=torch.bfloat16, lora_dtype=torch.bfloat16, weights_dtype=weights_dtype, **params)
    note(case.describe())
    _run_and_compare(case, "bf16")


@pytest.mark.parametrize(
    "hd,wd,ld",
    [
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float64, torch.float32),
        (torch.float32, torch.float64, torch.float64),
        (torch.float64, torch.float32, torch.bfloat16),
    ],
)
def test_mixed_dtypes_grad_dtypes(isa, hd, wd, ld):
    """Output has hidden's dtype and every grad has its input's dtype; values stay accurate."""
    case = make_case(seed=11, T=12, E=4, k=2, H=32, I=24, r=4, hidden_dtype=hd, weights_dtype=wd, lora_dtype=ld)
    out, grads = run_ops(case)
    low = torch.bfloat16 in (hd, wd, ld)
    compare_with_reference(case, out, grads, "bf16" if low else "tight")


def _noncontig_leaf(t):
    """A leaf tensor with t's values and a non-contiguous layout."""
    t = t.detach()
    if t.dim() == 2:
        buf = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        buf[:, ::2] = t
        v = buf[:, ::2]
    else:
        v = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(v, t)
    assert not v.is_contiguous() or t.numel() <= 1 or t.shape[-1] == 1 or t.shape[-2] == 1
    return v


def test_non_contiguous_inputs_give_same_result(isa):
    case = make_case(seed=12, T=10, E=4, k=3, H=32, I=24, r=4, ids_mode="random", neg_frac=0.2)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    out_c, grads_c = run_ops(case, experts)

    leaves = [_noncontig_leaf(t).requires_grad_(True) for t in (case.hidden, case.weights, *case.lora)]
    ids = _noncontig_leaf(case.ids)
    assert not leaves[0].is_contiguous() and not ids.is_contiguous()
    out = kt_ops.ops.moe_sft(leaves[0], ids, leaves[1], experts, tuple(leaves[2:]), case.scaling)
    grads = torch.autograd.grad(out, leaves, _noncontig_leaf(case.grad_out))
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    for name, a, b in zip(GRAD_NAMES, grads, grads_c):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"grad {n}: {m}")


def test_reference_path_uses_module_reference():
    """kt_ops.reference (package import) is the same code as the file-path load used by the tests."""
    import kt_ops.reference as pkg_ref

    case = make_case(seed=13, T=6, E=3, k=2, H=16, I=8, r=2, hidden_dtype=torch.float64)
    out_pkg = pkg_ref.moe_sft_reference(
        case.hidden, case.ids, case.weights, case.gate, case.up, case.down, *case.lora, case.scaling
    )
    out_file, _ = run_reference(case, with_grads=False)
    torch.testing.assert_close(out_pkg, out_file, rtol=0, atol=0)
