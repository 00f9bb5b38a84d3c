"""ISA selection, cpu_info content, KT_OPS_ISA, thread-count API."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import kt_ops
from kt_testing import (
    LORA_NAMES,
    assert_all_same,
    assert_rel_mae,
    assert_same,
    isa_rounds_activations,
    make_case,
    run_ops,
)

ALL_ISAS = ("ref", "avx2", "avx512", "amx", "amx-emu", "avx512-bf16-emu")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_cpu_info_content():
    info = kt_ops.cpu_info()
    assert {"features", "isa", "available_isas", "num_threads"} <= set(info)
    feats = info["features"]
    assert isinstance(feats, dict) and feats and all(isinstance(v, bool) for v in feats.values())
    assert "avx2" in feats
    avail = info["available_isas"]
    assert isinstance(avail, list) and "ref" in avail
    assert len(set(avail)) == len(avail) and set(avail) <= set(ALL_ISAS)
    assert info["isa"] in avail
    assert info["isa"] == kt_ops.get_isa()
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1
    assert info["num_threads"] == kt_ops.get_num_threads()


def test_features_agree_with_proc_cpuinfo():
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    feats = kt_ops.cpu_info()["features"]
    assert feats["avx2"] == ("avx2" in flags)
    for name, flag in (
        ("avx512f", "avx512f"),
        ("avx512_vbmi", "avx512vbmi"),
        ("amx_bf16", "amx_bf16"),
        ("amx_tile", "amx_tile"),
    ):
        if name in feats:
            assert feats[name] == (flag in flags), name
    avail = kt_ops.cpu_info()["available_isas"]
    if "avx2" not in flags:
        assert "avx2" not in avail
    if "avx512f" not in flags:
        assert "avx512" not in avail
    if "amx_bf16" not in flags:
        assert "amx" not in avail


def test_set_isa_each_available():
    for name in kt_ops.cpu_info()["available_isas"]:
        kt_ops.set_isa(name)
        assert kt_ops.get_isa() == name
        assert kt_ops.cpu_info()["isa"] == name


def test_set_isa_auto_picks_an_available_one():
    kt_ops.set_isa("auto")
    assert kt_ops.get_isa() in kt_ops.cpu_info()["available_isas"]
    assert kt_ops.get_isa() != "ref" or kt_ops.cpu_info()["available_isas"] == ["ref"]


@pytest.mark.parametrize("name", [n for n in ALL_ISAS])
def test_set_isa_unavailable_raises(name):
    if name in kt_ops.cpu_info()["available_isas"]:
        pytest.skip(f"{name} is available here")
    before = kt_ops.get_isa()
    with pytest.raises(ValueError, match=name):
        kt_ops.set_isa(name)
    assert kt_ops.get_isa() == before  # a failed set_isa changes nothing


def test_set_isa_amx_on_this_machine():
    flags = _cpu_flags()
    if flags is None or "amx_bf16" in flags:
        pytest.skip("CPU has AMX")
    with pytest.raises(ValueError):
        kt_ops.set_isa("amx")


@pytest.mark.parametrize("name", ["", "sse", "AVX3", "cuda", "avx512-bf16"])
def test_set_isa_unknown_raises(name):
    with pytest.raises(ValueError):
        kt_ops.set_isa(name)


def test_env_var_selects_initial_isa():
    env = dict(os.environ, KT_OPS_ISA="ref")
    code = "import kt_ops; print(kt_ops.get_isa())"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "ref"


def test_all_isas_agree_closely():
    """Every ISA computes the same math (fp32): results within fp32 rounding of each other; ISAs that
    round activations to bf16 (amx, amx-emu, avx512 with AVX512_BF16) within the bf16 bars."""
    case = make_case(seed=51, T=20, E=6, k=3, H=48, I=40, r=4, ids_mode="random", neg_frac=0.1)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    results = {}
    for name in kt_ops.cpu_info()["available_isas"]:
        kt_ops.set_isa(name)
        results[name] = run_ops(case, experts)
    base_out, base_grads = results["ref"]
    for name, (out, grads) in results.items():
        if isa_rounds_activations(name):
            assert_rel_mae(f"{name} output", out, base_out.double(), 0.01)
            for gname, a, b in zip(["hidden", "weights", *LORA_NAMES], grads, base_grads):
                assert_rel_mae(f"{name} {gname}", a, b.double(), 0.02)
            continue
        torch.testing.assert_close(out, base_out, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n} output: {m}")
        for gname, a, b in zip(["hidden", "weights", *LORA_NAMES], grads, base_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name, g=gname: f"{n} {g}: {m}")


def test_amx_emu_always_available():
    """The emulated AMX kernels run on any CPU; "auto" never picks them."""
    assert "amx-emu" in kt_ops.cpu_info()["available_isas"]
    assert "amx-emu" in kt_ops._C.known_isas()
    kt_ops.set_isa("amx-emu")
    assert kt_ops.get_isa() == "amx-emu"
    kt_ops.set_isa("auto")
    assert kt_ops.get_isa() != "amx-emu"


def test_set_isa_unavailable_message_names_missing_features():
    feats = kt_ops.cpu_info()["features"]
    if feats["avx512f"] and feats["amx_tile"]:
        pytest.skip("this CPU has AVX512F and AMX-TILE: no ISA is unavailable for lack of them")
    if not feats["avx512f"]:
        with pytest.raises(ValueError, match=r"'avx512'.*lacks.*AVX512F"):
            kt_ops.set_isa("avx512")
    if not feats["amx_tile"]:
        with pytest.raises(ValueError, match=r"'amx'.*lacks.*AMX-TILE"):
            kt_ops.set_isa("amx")


def test_deterministic_repeat(isa):
    case = make_case(seed=52, T=24, E=5, k=2, H=64, I=32, r=4, ids_mode="hot")
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    out1, g1 = run_ops(case, experts)
    out2, g2 = run_ops(case, experts)
    assert_same("output", out2, out1)
    assert_all_same(["hidden", "weights", *LORA_NAMES], g2, g1)


def test_rows_batch_invariant(isa):
    """A token's output and gradients do not depend on the tokens that come with it, bit for bit: alone
    or in a few, its experts' rows go through the few-row kernels (gemm_nn up to 4 rows), in the whole
    batch through the many-row ones (data-parallel training compares half batches with whole ones,
    test_fsdp.py)."""
    case = make_case(seed=53, T=48, E=3, k=2, H=80, I=72, r=4, ids_mode="random")
    experts = kt_ops.pack_experts(case.gate, case.up, case.down)
    whole_out, whole_grads = run_ops(case, experts)
    for count in (1, 2, 6):
        part = dataclasses.replace(
            case,
            hidden=case.hidden[:count],
            ids=case.ids[:count],
            weights=case.weights[:count],
            grad_out=case.grad_out[:count],
        )
        out, grads = run_ops(part, experts)
        assert_same(f"{count} tokens: output", out, whole_out[:count])
        assert_same(f"{count} tokens: grad hidden", grads[0], whole_grads[0][:count])
        assert_same(f"{count} tokens: grad weights", grads[1], whole_grads[1][:count])


def test_set_num_threads_roundtrip():
    n = kt_ops.get_num_threads()
    kt_ops.set_num_threads(1)
    assert kt_ops.get_num_threads() == 1
    kt_ops.set_num_threads(n)
    assert kt_ops.get_num_threads() == n
