"""The bf16 kernels of CPUs this one may lack, through their emulated builds, end to end via the
public ops:

* "amx-emu" compiles the same kernel source as the real AMX build (kernels/gemm_amx.inc) against the
  tile emulation of kernels/amx_emu.h: A row blocks of 16 (m not a multiple of 16, more than 64
  routed rows per expert so several row tasks), reduction chunks of 32 (K not a multiple of 32, odd
  K), 16-column B tiles (N not a multiple of 16), the zero-padded last chunk, and the gemm_nn
  repacking of the backward pass.
* "avx512-bf16-emu" compiles the AVX512_BF16 source (kernels/gemm_avx512.inc) against SIMDe (only
  where SIMDe was installed at build time; skipped otherwise): the 8 x 32 vdpbf16ps blocks, the
  few-row dot-product gemm_nn (up to 4 rows) and the repacked-panel gemm_nn (more rows, ragged
  last panel).
Activations are rounded to bf16 before the products, so the bf16 bars apply (rel_mae <= 0.01
forward, <= 0.02 gradients).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import kt_ops
from kt_testing import compare_with_reference, make_case, rel_mae, run_ops

EMULATIONS = ("amx-emu", "avx512-bf16-emu")


@pytest.fixture(params=EMULATIONS)
def emu(request):
    if request.param not in kt_ops.cpu_info()["available_isas"]:
        pytest.skip(f"{request.param} is not part of this build")
    return request.param


SHAPES = {
    # name: make_case arguments. Rows per expert = T * k / E on average.
    "rows_gt_64_one_expert": dict(T=100, E=1, k=1, H=50, I=70, r=4),
    "rows_gt_64_two_experts": dict(T=90, E=2, k=2, H=40, I=36, r=3, ids_mode="random"),
    "m_odd_k_odd": dict(T=37, E=3, k=2, H=33, I=47, r=2, ids_mode="random", neg_frac=0.1),
    "K_above_32": dict(T=70, E=2, k=2, H=97, I=65, r=5, ids_mode="hot"),
    "tiny": dict(T=3, E=2, k=2, H=5, I=3, r=1),
    "tile_edges": dict(T=80, E=1, k=1, H=64, I=32, r=0),
    "wide": dict(T=41, E=2, k=2, H=130, I=150, r=8, ids_mode="random"),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulation_matches_reference(emu, shape, dtype):
    kt_ops.set_isa(emu)
    # fp32 inputs here are arbitrary fp32 numbers (not bf16-valued, unlike make_case's default on a
    # rounding ISA), so the kernel's own rounding of them is checked too; "tiny" is too small for
    # rel_mae to absorb that rounding and keeps the default.
    bf16_activations = None if shape == "tiny" else False
    case = make_case(
        seed=zlib.crc32(shape.encode()) % 997, hidden_dtype=dtype, bf16_activations=bf16_activations, **SHAPES[shape]
    )
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    out, grads = run_ops(case, experts)
    compare_with_reference(case, out, grads, "bf16")


def test_emulation_close_to_fp32_kernels_beyond_bf16_rounding(emu):
    """The emulations differ from the fp32 ISAs only by the bf16 rounding of the GEMM inputs: with inputs
    that are already bf16 numbers and no LoRA, the gate/up GEMM inputs are exact, so the output is
    much closer to the fp32 kernel's than the generic bar."""
    case = make_case(seed=5, T=75, E=2, k=2, H=50, I=70, r=0, ids_mode="random", bf16_activations=True)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    kt_ops.set_isa("ref")
    ref_out, _ = run_ops(case, experts, with_grads=False)
    kt_ops.set_isa(emu)
    emu_out, _ = run_ops(case, experts, with_grads=False)
    err = rel_mae(emu_out, ref_out)
    assert 0 < err < 3e-3, err  # only the down projection's input h is rounded (2^-9 relative at most)


def test_emulation_deterministic_and_thread_count_independent(emu):
    case = make_case(seed=6, T=70, E=2, k=2, H=40, I=36, r=3, ids_mode="hot")
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    kt_ops.set_isa(emu)
    kt_ops.set_num_threads(1)
    out1, g1 = run_ops(case, experts)
    kt_ops.set_num_threads(2)
    out2, g2 = run_ops(case, experts)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_emulation_env_var_selects_it(emu):
    import os
    import subprocess
    import sys

    env = dict(os.environ, KT_OPS_ISA=emu)
    code = "import kt_ops; print(kt_ops.get_isa())"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == emu
