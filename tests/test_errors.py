"""Bad inputs: every argument's ndim/shape/dtype/range/device problem raises the
right exception type with a message naming the argument. Also NaN/Inf
propagation and T=0.

Entry points: kt_ops.ops.moe_sft ("ops"), torch.ops.kt.moe_sft_forward
("raw"), KTMoELayer ("layer", for the per-call inputs).
"""

from __future__ import annotations

import pytest
import torch

import kt_ops
import kt_ops.ops
from kt_testing import LORA_NAMES, lora_shapes, make_case, run_ops

T, E, K, H, I, R = 6, 4, 2, 16, 12, 3


def valid_args():
    case = make_case(seed=41, T=T, E=E, k=K, H=H, I=I, r=R)
    p = kt_ops.pack_experts(case.gate, case.up, case.down)
    args = dict(
        hidden_states=case.hidden,
        topk_ids=case.ids,
        topk_weights=case.weights,
        gate_weight=p.gate,
        up_weight=p.up,
        down_weight=p.down,
        gate_scale=p.gate_scale,
        up_scale=p.up_scale,
        down_scale=p.down_scale,
        weight_format=p.weight_format,
        intermediate_size=p.intermediate_size,
        lora_scaling=case.scaling,
    )
    args.update(zip(LORA_NAMES, case.lora))
    return args, p, case


def call_ops(args, packed):
    return kt_ops.ops.moe_sft(
        args["hidden_states"],
        args["topk_ids"],
        args["topk_weights"],
        packed,
        tuple(args[n] for n in LORA_NAMES),
        args["lora_scaling"],
    )


def call_raw(args, packed=None):
    # by name: the schema's tail after topk_weights as the test's dict holds it
    return torch.ops.kt.moe_sft_forward(**args, save_for_backward=False)


def call_layer(args, packed):
    layer = kt_ops.KTMoELayer(E, H, I, lora_rank=R, lora_alpha=R * 2.0, lora_dtype=torch.float32)
    _, _, case = valid_args()
    layer.load_weights_from_tensors(case.gate, case.up, case.down)
    return layer(args["hidden_states"], args["topk_ids"], args["topk_weights"])


ENTRY = {"ops": call_ops, "raw": call_raw}


def _set(name, fn):
    def mutate(args):
        args[name] = fn(args[name])

    return mutate


def _set_id(value, dtype=None):
    def mutate(args):
        ids = args["topk_ids"].clone()
        if dtype is not None:
            ids = ids.to(dtype)
        ids[1, 0] = value
        args["topk_ids"] = ids

    return mutate


def _bump(shape, dim):
    s = list(shape)
    s[dim] += 1
    return tuple(s)


# (case id, mutation, expected exception, name the message must contain)
INPUT_CASES = [
    ("hidden_1d", _set("hidden_states", lambda t: t[0]), ValueError, "hidden_states"),
    ("hidden_3d", _set("hidden_states", lambda t: t[None]), ValueError, "hidden_states"),
    ("hidden_wrong_H", _set("hidden_states", lambda t: torch.randn(T, H + 1)), ValueError, "hidden_states"),
    ("hidden_int", _set("hidden_states", lambda t: t.to(torch.int32)), TypeError, "hidden_states"),
    ("hidden_fp16", _set("hidden_states", lambda t: t.half()), TypeError, "hidden_states"),
    ("ids_1d", _set("topk_ids", lambda t: t[:, 0]), ValueError, "topk_ids"),
    ("ids_3d", _set("topk_ids", lambda t: t[None]), ValueError, "topk_ids"),
    ("ids_T_mismatch", _set("topk_ids", lambda t: t[:-1]), ValueError, "topk_ids"),
    ("ids_float", _set("topk_ids", lambda t: t.float()), TypeError, "topk_ids"),
    ("ids_int16", _set("topk_ids", lambda t: t.to(torch.int16)), TypeError, "topk_ids"),
    ("ids_eq_E", _set_id(E), ValueError, "topk_ids"),
    ("ids_minus_2", _set_id(-2), ValueError, "topk_ids"),
    ("ids_huge", _set_id(2**40), ValueError, "topk_ids"),
    ("ids_int32_eq_E", _set_id(E, torch.int32), ValueError, "topk_ids"),
    ("ids_int32_min", _set_id(-(2**31), torch.int32), ValueError, "topk_ids"),
    ("weights_T_mismatch", _set("topk_weights", lambda t: t[:-1]), ValueError, "topk_weights"),
    ("weights_k_mismatch", _set("topk_weights", lambda t: t[:, :1]), ValueError, "topk_weights"),
    ("weights_1d", _set("topk_weights", lambda t: t[:, 0]), ValueError, "topk_weights"),
    ("weights_int", _set("topk_weights", lambda t: t.to(torch.int64)), TypeError, "topk_weights"),
    ("weights_fp16", _set("topk_weights", lambda t: t.half()), TypeError, "topk_weights"),
    ("hidden_meta", _set("hidden_states", lambda t: t.to("meta")), ValueError, "hidden_states"),
    ("ids_meta", _set("topk_ids", lambda t: t.to("meta")), ValueError, "topk_ids"),
    ("weights_meta", _set("topk_weights", lambda t: t.to("meta")), ValueError, "topk_weights"),
]

for _name in LORA_NAMES:
    _shape = lora_shapes(E, H, I, R)[_name]
    _rank_dim = 1 if _name.endswith("_a") else 2
    _outer_dim = 2 if _name.endswith("_a") else 1
    INPUT_CASES += [
        (f"{_name}_wrong_E", _set(_name, lambda t, s=_bump(_shape, 0): torch.randn(s)), ValueError, _name),
        (f"{_name}_wrong_outer", _set(_name, lambda t, s=_bump(_shape, _outer_dim): torch.randn(s)), ValueError, _name),
        (f"{_name}_2d", _set(_name, lambda t: t[0]), ValueError, _name),
        (f"{_name}_4d", _set(_name, lambda t: t[None]), ValueError, _name),
        (f"{_name}_int", _set(_name, lambda t: t.to(torch.int32)), TypeError, _name),
        (f"{_name}_fp16", _set(_name, lambda t: t.half()), TypeError, _name),
        (f"{_name}_meta", _set(_name, lambda t: t.to("meta")), ValueError, _name),
    ]
    if _name != "gate_lora_a":  # the rank is read from gate_lora_a; a mismatch elsewhere names that tensor
        INPUT_CASES.append(
            (
                f"{_name}_rank_mismatch",
                _set(_name, lambda t, s=_bump(_shape, _rank_dim): torch.randn(s)),
                ValueError,
                _name,
            )
        )

RAW_ONLY_CASES = [
    ("intermediate_size_plus1", _set("intermediate_size", lambda v: v + 1), ValueError, "intermediate_size"),
    ("intermediate_size_minus1", _set("intermediate_size", lambda v: v - 1), ValueError, "intermediate_size"),
    ("intermediate_size_zero", _set("intermediate_size", lambda v: 0), ValueError, "intermediate_size"),
    ("weight_format_unknown", _set("weight_format", lambda v: "int3"), ValueError, "weight_format"),
]
for _blob in ("gate_weight", "up_weight", "down_weight"):
    RAW_ONLY_CASES += [
        (f"{_blob}_short", _set(_blob, lambda t: t[:, :-2]), ValueError, _blob),
        (f"{_blob}_long", _set(_blob, lambda t: torch.cat([t, t[:, :4]], 1)), ValueError, _blob),
        (f"{_blob}_wrong_E", _set(_blob, lambda t: t[:-1]), ValueError, _blob),
        (f"{_blob}_1d", _set(_blob, lambda t: t.reshape(-1)), ValueError, _blob),
        (f"{_blob}_dtype", _set(_blob, lambda t: t.to(torch.int32)), TypeError, _blob),
    ]


def _check_raises(entry, mutate, exc, name):
    """name: the argument the message must name (a tuple: any one of them)."""
    names = name if isinstance(name, tuple) else (name,)
    args, packed, _ = valid_args()
    mutate(args)
    with pytest.raises(exc) as info:
        entry(args, packed)
    msg = str(info.value)
    assert any(n in msg for n in names), f"message does not name {' or '.join(names)}: {msg!r}"
    return msg


def test_valid_args_are_valid():
    args, packed, _ = valid_args()
    assert call_ops(args, packed).shape == (T, H)
    assert call_raw(args)[0].shape == (T, H)
    assert call_layer(args, packed).shape == (T, H)


@pytest.mark.parametrize("entry", list(ENTRY))
@pytest.mark.parametrize("case_id,mutate,exc,name", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_bad_input(entry, case_id, mutate, exc, name):
    if entry == "raw" and case_id == "hidden_wrong_H":
        # The raw op only sees byte blobs: a hidden size that disagrees with them may be blamed on either.
        name = ("hidden_states", "gate_weight")
    _check_raises(ENTRY[entry], mutate, exc, name)


@pytest.mark.parametrize("case_id,mutate,exc,name", RAW_ONLY_CASES, ids=[c[0] for c in RAW_ONLY_CASES])
def test_bad_raw_op_argument(case_id, mutate, exc, name):
    if case_id == "gate_weight_wrong_E":
        # num_experts is read from gate_weight, so the disagreement may be blamed on up_weight.
        name = ("gate_weight", "up_weight")
    _check_raises(call_raw, mutate, exc, name)


def test_gate_lora_a_rank_mismatch_is_reported():
    args, packed, _ = valid_args()
    args["gate_lora_a"] = torch.randn(E, R + 1, H)
    for entry in (call_ops, call_raw):
        with pytest.raises(ValueError) as info:
            entry(args, packed)
        assert any(n in str(info.value) for n in LORA_NAMES), str(info.value)


# KTMoELayer moves inputs from any device to the CPU, so meta inputs are tested separately.
LAYER_CASES = [
    c for c in INPUT_CASES if c[3] in ("hidden_states", "topk_ids", "topk_weights") and not c[0].endswith("_meta")
]


@pytest.mark.parametrize("case_id,mutate,exc,name", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_bad_input_layer(case_id, mutate, exc, name):
    _check_raises(call_layer, mutate, exc, name)


def test_layer_meta_input_fails():
    args, packed, _ = valid_args()
    args["hidden_states"] = args["hidden_states"].to("meta")
    with pytest.raises((ValueError, NotImplementedError, RuntimeError)):
        call_layer(args, packed)


def test_bad_backward_grad_output_shape():
    args, packed, case = valid_args()
    _, gate_up_pre, lora_mid = torch.ops.kt.moe_sft_forward(**args, save_for_backward=True)

    def backward(grad_output, gate_up_pre, lora_mid):
        return torch.ops.kt.moe_sft_backward(grad_output, **args, gate_up_pre=gate_up_pre, lora_mid=lora_mid)

    with pytest.raises(ValueError, match="grad_output"):
        backward(torch.randn(T, H + 1), gate_up_pre, lora_mid)
    with pytest.raises(ValueError, match="gate_up_pre"):
        backward(torch.randn(T, H), gate_up_pre[:, :-1], lora_mid)
    with pytest.raises(ValueError, match="lora_mid"):
        backward(torch.randn(T, H), gate_up_pre, lora_mid[:, :, :-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensor_rejected():
    args, packed, _ = valid_args()
    args["hidden_states"] = args["hidden_states"].cuda()
    with pytest.raises(ValueError, match="hidden_states"):
        call_ops(args, packed)


def test_all_meta_raw_op_is_shape_inference():
    """All-meta inputs reach the fake kernel: right output shapes, no computation."""
    args, _, _ = valid_args()
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out = call_raw(meta)[0]
    assert out.device.type == "meta" and out.shape == (T, H) and out.dtype == torch.float32


# ----------------------------------------------------------------------------- NaN / Inf, T = 0


def _nan_case(dtype):
    return make_case(seed=42, T=8, E=4, k=2, H=16, I=12, r=3, hidden_dtype=dtype, lora_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_inf_in_hidden_propagate(isa, dtype):
    case = _nan_case(dtype)
    case.ids[5] = -1  # token 5 is computed elsewhere: its NaN must not leak anywhere
    case.hidden[0, 3] = float("nan")
    case.hidden[1, :] = float("inf")
    case.hidden[5, :] = float("nan")
    out, grads = run_ops(case)
    assert torch.isnan(out[0]).all(), out[0]
    assert not torch.isfinite(out[1]).any(), out[1]
    assert torch.all(out[5] == 0), out[5]
    assert torch.isfinite(out[[2, 3, 4, 6, 7]]).all()
    assert torch.isnan(grads[0][0]).any()  # backward ran through the NaN without crashing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_weights_and_lora_propagate(isa, dtype):
    case = _nan_case(dtype)
    case.weights[2, 1] = float("nan")
    out, _ = run_ops(case)
    assert torch.isnan(out[2]).all()
    assert torch.isfinite(out[torch.arange(8) != 2]).all()

    case = _nan_case(dtype)
    e = int(case.ids[3, 0])
    case.lora[1][e, 0, 0] = float("nan")  # gate_lora_b of expert e
    out, _ = run_ops(case)
    hit = (case.ids == e).any(1)
    assert torch.isnan(out[hit]).any(1).all()
    assert torch.isfinite(out[~hit]).all()

    case = _nan_case(dtype)
    e = int(case.ids[4, 1])
    case.down[e, 2, 1] = float("inf")  # base weight of expert e
    out, _ = run_ops(case)
    hit = (case.ids == e).any(1)
    assert (~torch.isfinite(out[hit])).any(1).all()
    assert torch.isfinite(out[~hit]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_tokens(dtype):
    case = make_case(seed=43, T=0, E=4, k=2, H=16, I=12, r=3, hidden_dtype=dtype)
    out, grads = run_ops(case)
    assert out.shape == (0, 16) and out.dtype == dtype
    for g, inp in zip(grads, (case.hidden, case.weights, *case.lora)):
        assert g is not None and g.shape == inp.shape and g.dtype == inp.dtype
        assert torch.all(g == 0)
    layer = kt_ops.KTMoELayer(4, 16, 12, lora_rank=3)
    layer.load_weights_from_tensors(case.gate, case.up, case.down)
    x = case.hidden.detach().requires_grad_(True)
    y = layer(x, case.ids, case.weights)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 16)
