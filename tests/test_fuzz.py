"""Bad-input fuzz of the raw ops, the layer and the packers, on every ISA this machine runs.

Each example is a valid call with at most one thing made wrong (a shape, a dtype, an id, a size
argument, a truncated blob, a missing or extra scale, a meta tensor, ...). The call must either
raise ValueError / TypeError, or succeed with the reference's result: never crash, hang, raise
something else or return a wrong answer. Examples are derandomized (fixed seed). The forward fuzz
runs KT_OPS_FUZZ_EXAMPLES examples per ISA (default 60 in the suite; .ci/run asks for 700, i.e.
2,100 with the three ISAs of an AVX2 machine), the other three tests a quarter of that each."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kt_ops
from kt_ops.core.formats import GROUPED_FORMATS, LORA_NAMES, WEIGHT_FORMATS
from kt_ops.core.packed import unpack_experts
from kt_ops.reference import moe_sft_reference

EXAMPLES = int(os.environ.get("KT_OPS_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
FUZZ_QUARTER = settings(FUZZ, max_examples=max(1, EXAMPLES // 4))
ACCEPTED = (ValueError, TypeError)

FORWARD_MUTATIONS = (
    "none",
    "noncontiguous",
    "nan",
    "id_high",
    "id_negative",
    "id_float",
    "id_int16",
    "hidden_wrong_width",
    "hidden_3d",
    "weights_shape",
    "weights_int",
    "lora_rank_mismatch",
    "lora_wrong_i",
    "lora_int",
    "lora_fp16",
    "format_unknown",
    "format_other",
    "intermediate_off",
    "intermediate_zero",
    "intermediate_huge",
    "blob_truncated",
    "blob_dtype",
    "scale_missing",
    "scale_extra",
    "scale_shape",
    "scale_dtype",
    "meta_ids",
    "experts_mismatch",
)
BACKWARD_MUTATIONS = ("none", "grad_shape", "grad_int", "saved_shape", "saved_dtype", "weights_shape")


@st.composite
def cases(draw, mutations):
    fmt = draw(st.sampled_from(WEIGHT_FORMATS))
    group = draw(st.sampled_from((2, 4, 8))) if fmt in GROUPED_FORMATS else 128
    unit = group if fmt in GROUPED_FORMATS else 1
    H = unit * draw(st.integers(1, max(1, 40 // unit)))
    I = unit * draw(st.integers(1, max(1, 40 // unit)))
    E = draw(st.integers(1, 5))
    k = draw(st.integers(1, E))
    return dict(
        fmt=fmt,
        group=group,
        E=E,
        H=H,
        I=I,
        k=k,
        T=draw(st.integers(0, 6)),
        r=draw(st.integers(0, 3)),
        dtype=draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float64))),
        seed=draw(st.integers(0, 2**16)),
        mutation=draw(st.sampled_from(mutations)),
    )


def _make(case):
    g = torch.Generator().manual_seed(case["seed"])
    E, H, I, k, T, r = (case[n] for n in ("E", "H", "I", "k", "T", "r"))
    experts = kt_ops.pack_experts(
        torch.randn(E, I, H, generator=g) * 0.2,
        torch.randn(E, I, H, generator=g) * 0.2,
        torch.randn(E, H, I, generator=g) * 0.2,
        case["fmt"],
        case["group"],
    )
    x = torch.randn(T, H, generator=g).to(case["dtype"])
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    w = torch.rand(T, k, generator=g)
    lora_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    loras = [
        torch.randn(s, generator=g).to(lora_dtype) * 0.1
        for s in ((E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r))
    ]
    args = dict(
        x=x,
        ids=ids,
        w=w,
        gate=experts.gate,
        up=experts.up,
        down=experts.down,
        gate_scale=experts.gate_scale,
        up_scale=experts.up_scale,
        down_scale=experts.down_scale,
        fmt=case["fmt"],
        I=I,
        loras=loras,
        scaling=0.5,
    )
    return experts, args


def _mutate(case, a, g):
    m = case["mutation"]
    E, H, I, T, k = (case[n] for n in ("E", "H", "I", "T", "k"))
    if m == "noncontiguous":
        a["x"] = torch.cat([a["x"], a["x"]], 1)[:, ::2] if H else a["x"]
    elif m == "nan" and T:
        a["x"] = a["x"].clone()
        a["x"][0, 0] = float("nan")
    elif m == "id_high" and T:
        a["ids"] = a["ids"].clone()
        a["ids"][-1, -1] = E + int(torch.randint(0, 3, (), generator=g))
    elif m == "id_negative" and T:
        a["ids"] = a["ids"].clone()
        a["ids"][0, 0] = -2
    elif m == "id_float":
        a["ids"] = a["ids"].float()
    elif m == "id_int16":
        a["ids"] = a["ids"].to(torch.int16)
    elif m == "hidden_wrong_width":
        a["x"] = torch.zeros(T, H + 1, dtype=a["x"].dtype)
    elif m == "hidden_3d":
        a["x"] = a["x"].unsqueeze(0)
    elif m == "weights_shape":
        a["w"] = torch.rand(T, k + 1)
    elif m == "weights_int":
        a["w"] = a["w"].long()
    elif m == "lora_rank_mismatch":
        a["loras"][3] = torch.zeros(E, I, a["loras"][3].shape[2] + 1, dtype=a["loras"][3].dtype)
    elif m == "lora_wrong_i":
        a["loras"][1] = torch.zeros(E, I + 1, a["loras"][1].shape[2], dtype=a["loras"][1].dtype)
    elif m == "lora_int":
        a["loras"][0] = a["loras"][0].long()
    elif m == "lora_fp16":
        a["loras"][5] = a["loras"][5].half()
    elif m == "format_unknown":
        a["fmt"] = "int3"
    elif m == "format_other":
        a["fmt"] = "bf16" if case["fmt"] != "bf16" else "int8"
    elif m == "intermediate_off":
        a["I"] = I + int(torch.randint(1, 40, (), generator=g))
    elif m == "intermediate_zero":
        a["I"] = 0
    elif m == "intermediate_huge":
        a["I"] = 2**62
    elif m == "blob_truncated":
        a["gate"] = a["gate"][:, :-1].contiguous()
    elif m == "blob_dtype":
        a["down"] = a["down"].to(torch.int8)
    elif m == "scale_missing":
        a["up_scale"] = None
    elif m == "scale_extra":
        # bf16 takes no scale; a quantized format gets one with a group count that cannot fit
        a["gate_scale"] = torch.ones(E, 16, 1) if case["fmt"] == "bf16" else torch.ones(E, -(-I // 16) * 16, 3)
    elif m == "scale_shape" and a["down_scale"] is not None:
        a["down_scale"] = a["down_scale"][:, :-1].contiguous()
    elif m == "scale_dtype" and a["gate_scale"] is not None:
        a["gate_scale"] = a["gate_scale"].double()
    elif m == "meta_ids":
        a["ids"] = a["ids"].to("meta")
    elif m == "experts_mismatch":
        a["up"] = torch.cat([a["up"], a["up"][:1]])


def _named(a) -> dict:
    """The op's arguments after topk_weights, by name."""
    return dict(
        gate_weight=a["gate"],
        up_weight=a["up"],
        down_weight=a["down"],
        gate_scale=a["gate_scale"],
        up_scale=a["up_scale"],
        down_scale=a["down_scale"],
        weight_format=a["fmt"],
        intermediate_size=a["I"],
        **dict(zip(LORA_NAMES, a["loras"])),
        lora_scaling=a["scaling"],
    )


def _forward(a, save):
    return torch.ops.kt.moe_sft_forward(a["x"], a["ids"], a["w"], **_named(a), save_for_backward=save)


def _expected(experts, a):
    gate, up, down = unpack_experts(experts)
    return moe_sft_reference(
        a["x"].double(),
        a["ids"],
        a["w"].double(),
        gate.double(),
        up.double(),
        down.double(),
        *(t.double() for t in a["loras"]),
        a["scaling"],
        compute_dtype=torch.float64,
    )


def _close(got, want, dtype, fmt):
    if got.numel() == 0:
        return True
    # unpack_experts gives quantized weights as bf16 while the kernels dequantize in fp32/fp64, so
    # only bf16 weights make the fp64 comparison exact; the bars catch wrong results, not rounding.
    tol = {torch.float64: 1e-9 if fmt == "bf16" else 1e-2, torch.float32: 2e-2, torch.bfloat16: 5e-2}[dtype]
    if fmt.startswith("int8") and dtype != torch.float64:
        # Few-row int8 calls quantize the activations per K group (kernels/quant.h): each product is
        # off by up to step/2 * sum|W|, a bound on the inputs' scale that cancellation in the output
        # (tiny H or I) can turn into a few percent of max|output|. tests/test_formats.py holds them
        # to the elementwise error model; here the bar only has to catch wrong results.
        tol = max(tol, 6e-2)
    finite = torch.isfinite(want)
    ok_nan = torch.equal(torch.isnan(got.double()), torch.isnan(want))
    scale = want[finite].abs().max().item() if finite.any() else 1.0
    err = (got.double() - want)[finite].abs().max().item() if finite.any() else 0.0
    return ok_nan and err <= tol * max(scale, 1e-3)


@pytest.fixture(params=kt_ops.cpu_info()["available_isas"])
def fuzz_isa(request):
    previous = kt_ops.cpu_info()["isa"]
    kt_ops.set_isa(request.param)
    yield request.param
    kt_ops.set_isa(previous)


def test_forward_bad_inputs(fuzz_isa):
    @FUZZ
    @given(cases(FORWARD_MUTATIONS))
    def check(case):
        experts, a = _make(case)
        _mutate(case, a, torch.Generator().manual_seed(case["seed"]))
        try:
            out, _, _ = _forward(a, save=False)
        except ACCEPTED:
            return
        # It ran: then the input was valid (a mutation that turned out harmless, e.g. T = 0), and
        # the result must be the reference's.
        want = _expected(experts, a)
        assert out.shape == a["x"].shape and out.dtype == a["x"].dtype
        assert _close(out, want, a["x"].dtype, case["fmt"]), (case, (out.double() - want).abs().max())

    check()


def test_backward_bad_inputs(fuzz_isa):
    @FUZZ_QUARTER
    @given(cases(BACKWARD_MUTATIONS))
    def check(case):
        experts, a = _make(case)
        out, gate_up_pre, lora_mid = _forward(a, save=True)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"])).to(out.dtype)
        m = case["mutation"]
        if m == "grad_shape":
            grad = torch.zeros(case["T"] + 1, case["H"], dtype=out.dtype)
        elif m == "grad_int":
            grad = grad.long()
        elif m == "saved_shape":
            gate_up_pre = gate_up_pre[:, :-1] if gate_up_pre.shape[1] else torch.zeros(2, 1, case["I"])
        elif m == "saved_dtype":
            lora_mid = lora_mid.half()
        elif m == "weights_shape":
            a["w"] = torch.rand(case["T"], case["k"] + 1)
        try:
            grads = torch.ops.kt.moe_sft_backward(
                grad, a["x"], a["ids"], a["w"], **_named(a), gate_up_pre=gate_up_pre, lora_mid=lora_mid
            )
        except ACCEPTED:
            assert m != "none", case
            return
        assert grads[0].shape == a["x"].shape and grads[1].shape == a["w"].shape
        if m == "none" and grads[0].numel():
            # The input gradient against autograd through the fp64 reference.
            x = a["x"].double().requires_grad_(True)
            gate, up, down = unpack_experts(experts)
            want = moe_sft_reference(
                x,
                a["ids"],
                a["w"].double(),
                gate.double(),
                up.double(),
                down.double(),
                *(t.double() for t in a["loras"]),
                a["scaling"],
                compute_dtype=torch.float64,
            )
            want.backward(grad.double())
            assert _close(grads[0], x.grad, a["x"].dtype, case["fmt"]), case

    check()


@st.composite
def code_cases(draw):
    fmt = draw(st.sampled_from(WEIGHT_FORMATS[1:]))
    E, N = draw(st.integers(0, 3)), draw(st.integers(0, 20))
    K = draw(st.integers(0, 20))
    groups = draw(st.integers(0, 4))
    zp = fmt in ("int4_1", "int4_1_kgroup")
    codes_dtype = draw(st.sampled_from((torch.int8, torch.uint8, torch.int32, torch.float32, torch.int64)))
    scale_shape = [E, N, groups] + ([2] if zp else [])
    if draw(st.booleans()):
        scale_shape[draw(st.integers(0, len(scale_shape) - 1))] += draw(st.integers(-1, 1))
    lo, hi = (-128, 127) if fmt.startswith("int8") else (0, 15)
    if draw(st.booleans()):
        hi += 1  # one code out of range
    return fmt, (E, N, K), codes_dtype, [max(0, s) for s in scale_shape], lo, hi, draw(st.integers(0, 999))


def test_pack_codes_bad_inputs(fuzz_isa):
    @FUZZ_QUARTER
    @given(code_cases())
    def check(case):
        fmt, shape, codes_dtype, scale_shape, lo, hi, seed = case
        g = torch.Generator().manual_seed(seed)
        codes = (
            torch.randint(lo, hi + 1, shape, generator=g).to(codes_dtype)
            if math.prod(shape)
            else torch.zeros(shape, dtype=codes_dtype)
        )
        scales = torch.rand(scale_shape, generator=g)
        try:
            packed, packed_scales = torch.ops.kt.pack_codes(codes, scales, fmt)
        except ACCEPTED:
            return
        # Accepted: it must round-trip exactly through the kernels' dequantization.
        E, N, K = shape
        back = torch.ops.kt.unpack_weights(packed, packed_scales, fmt, N, K)
        assert back.shape == (E, N, K)

    check()


def test_pack_experts_and_layer_bad_inputs(fuzz_isa):
    @FUZZ_QUARTER
    @given(
        cases(("none", "hidden_wrong_width", "id_high", "weights_shape", "meta_ids", "noncontiguous")),
        st.sampled_from(("ok", "gate_shape", "down_shape", "int_weights", "group_odd")),
    )
    def check(case, pack_mutation):
        g = torch.Generator().manual_seed(case["seed"])
        E, H, I = case["E"], case["H"], case["I"]
        gate, up, down = (
            torch.randn(E, I, H, generator=g),
            torch.randn(E, I, H, generator=g),
            torch.randn(E, H, I, generator=g),
        )
        group = case["group"]
        if pack_mutation == "gate_shape":
            gate = gate[:, :, :-1] if H > 1 else torch.randn(E, I, 2)
        elif pack_mutation == "down_shape":
            down = down.transpose(1, 2) if H != I else torch.randn(E, H + 1, I)
        elif pack_mutation == "int_weights":
            up = up.long()
        elif pack_mutation == "group_odd" and case["fmt"] in GROUPED_FORMATS:
            group = 3
        try:
            experts = kt_ops.pack_experts(gate, up, down, case["fmt"], group)
        except ACCEPTED:
            assert pack_mutation != "ok", case
            return
        _, a = _make(case)
        _mutate(case, a, g)
        loras = None if case["r"] == 0 else a["loras"]
        try:
            out = kt_ops.moe_sft(a["x"], a["ids"], a["w"], experts, loras, 0.5)
        except ACCEPTED:
            return
        assert out.shape == a["x"].shape
        assert _close(out, _expected(experts, a), a["x"].dtype, case["fmt"]), case

    check()
