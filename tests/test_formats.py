"""Quantized weight formats: kernels vs the reference on the dequantized weights, accuracy against
bf16, packing round trips, the saved pre-quantized form and bad input."""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest
import torch

import kt_ops
from kt_testing import (
    GRAD_NAMES,
    LORA_NAMES,
    assert_rel_mae,
    compare_with_reference,
    isa_rounds_activations,
    make_case,
    rel_mae,
    run_ops,
    run_reference,
)

# Every format here has integer codes (fp8: test_fp8.py): their few-row path takes integer dot products.
QUANTIZED = ("int8", "int4", "int4_1", "int4_kgroup", "int4_1_kgroup", "int8_kgroup")
METHODS = {
    "AMXBF16_SFT": "bf16",
    "AMXINT8_SFT": "int8",
    "AMXINT4_SFT": "int4",
    "AMXINT4_1_SFT": "int4_1",
    "AMXINT4_KGroup_SFT": "int4_kgroup",
    "AMXINT4_1KGroup_SFT": "int4_1_kgroup",
}


def _compare_quantized(case, out, grads, experts):
    """unpack_experts gives the exact fp32 value of each code; the buffered kernels compute with it
    rounded to bf16 (2^-9 relative per weight), so outputs agree to ~1e-3, far below the
    quantization error itself (1e-2 to 2e-1). The few-row path quantizes the activations instead:
    the output and hidden-state gradient are held to the error model of both (integer_error_bounds)."""
    ref_out, ref_grads = run_reference(case)
    out_bound, dx_bound, rest = integer_error_bounds(case, experts)
    assert_within_model("output", out, ref_out, out_bound)
    assert_within_model("grad hidden_states", grads[0], ref_grads[0], dx_bound)
    for name, g, rg in zip(GRAD_NAMES[1:], grads[1:], ref_grads[1:]):
        # the buffered path's bar plus the mean of the activation quantization's bound
        extra = 1.1 * rest[name].mean().item() / max(rg.abs().mean().item(), 1e-30)
        assert_rel_mae(f"grad {name}", g, rg, 4e-3 + extra)


# ---- error model of the integer formats ---------------------------------------------------------

DIRECT_ROWS = 4  # kernels/quant.h kDirectQuantRows: experts with up to this many rows read the codes


def _activation_groups(K, weight_groups):
    """kernels/quant.h activation_groups: the K groups the integer products quantize activations in, the
    weights' groups split into 64 k pairs (128 k) where they are longer and a multiple of it."""
    pairs = (K + 1) // 2 // weight_groups
    return (K + 1) // 2 // 64 if pairs > 64 and pairs % 64 == 0 else weight_groups


def _group_abs_sums(w, groups):
    """sum |w| per row and K group of the format ([N, K] -> [N, groups]); odd K (per-row formats,
    one group) is padded with the zero column of the packed layout."""
    K = w.shape[1]
    group_k = 2 * (((K + 1) // 2) // groups)
    return torch.nn.functional.pad(w.abs(), (0, groups * group_k - K)).view(w.shape[0], groups, group_k).sum(-1)


def _activation_steps(x, groups):
    """The activation quantization step per row and K group: max |x over the group| / 127."""
    K = x.shape[1]
    group_k = 2 * (((K + 1) // 2) // groups)
    return torch.nn.functional.pad(x.abs(), (0, groups * group_k - K)).view(x.shape[0], groups, group_k).amax(-1) / 127


def _direct_rows():
    """Rows per expert up to which the integer formats take integer dot products: DIRECT_ROWS, or every
    row where kt_ops.set_integer_dot(True) applies."""
    return float("inf") if kt_ops.get_integer_dot() else DIRECT_ROWS


def integer_error_bounds(case, experts):
    """Elementwise bounds on |kernel - reference on the dequantized weights| of the output and of
    the gradient of the hidden states for the integer formats, in float64 (first order in the errors).
    Each forward projection y = x . W^T of an expert is off by at most
      * sum_groups step / 2 * sum_(k in group) |W[n, k]|, step = max |x over the group| / 127, where
        the expert has at most _direct_rows() rows (integer dot products on activations quantized
        per K group, _activation_groups; kernels/quant.h);
      * 2^-7 |x| . |W|^T otherwise (the dequantized weights, and on the ISAs that do so the
        activations, rounded to bf16: 2^-8 each);
    the errors eg, eu of gate and up reach h = silu(g) u as 1.1 eg (|u| + eu) + |silu(g)| eu
    (|silu'| <= 1.1), then the down projection (its step taken from |h| + eh) and its LoRA, weighted
    by |topk weight|. Backward runs on bf16-rounded weights (2^-7 per product as above) and on the
    saved g and u, whose errors reach dg = dh u silu'(g) and du = dh silu(g) as
    |dh| (1.1 eu + 0.5 |u| eg) and 1.1 |dh| eg (|silu''| <= 0.5). Returns (output bound, hidden
    gradient bound, {other gradient: the part of its error the forward's errors cause})."""
    import kt_ops

    eps = 2.0**-7
    with torch.no_grad():
        gate, up, down = (t.to(torch.float64) for t in kt_ops.unpack_experts(experts))
        groups_h = _activation_groups(case.H, experts.gate_scale.shape[2])
        groups_i = _activation_groups(case.I, experts.down_scale.shape[2])
        x, w = case.hidden.to(torch.float64), case.weights.to(torch.float64).reshape(-1)
        dy = case.grad_out.to(torch.float64)
        ag, bg, au, bu, ad, bd = (t.to(torch.float64) for t in case.lora)
        s = case.scaling
        ids = case.ids.to(torch.int64).reshape(-1)
        out_bound = torch.zeros(case.T, case.H, dtype=torch.float64)
        dx_bound = torch.zeros(case.T, case.H, dtype=torch.float64)
        rest = {name: torch.zeros_like(t) for name, t in zip(LORA_NAMES, case.lora)}
        rest = {name: t.to(torch.float64) for name, t in rest.items()}
        rest["topk_weights"] = torch.zeros(case.T, case.k, dtype=torch.float64)

        def projection_error(inp_abs, W, groups, direct):
            if direct:
                return (_activation_steps(inp_abs, groups) / 2) @ _group_abs_sums(W, groups).T
            return eps * inp_abs @ W.abs().T

        def through_lora(err, a, b):  # err . |A|^T . |B|^T, scaled
            return s * ((err @ a.abs().T) @ b.abs().T)

        for e in torch.unique(ids[ids >= 0]).tolist():
            slots = torch.nonzero(ids == e).flatten()
            tokens = slots // case.k
            xe, we = x[tokens], w[slots].unsqueeze(1)
            direct = len(slots) <= _direct_rows()
            g = xe @ gate[e].T + s * ((xe @ ag[e].T) @ bg[e].T)
            u = xe @ up[e].T + s * ((xe @ au[e].T) @ bu[e].T)
            eg = projection_error(xe.abs(), gate[e], groups_h, direct)
            eu = projection_error(xe.abs(), up[e], groups_h, direct)
            sig = torch.sigmoid(g)
            silu = g * sig
            eh = 1.1 * eg * (u.abs() + eu) + silu.abs() * eu
            h_abs = (silu * u).abs() + eh  # bounds the |h| the kernel quantizes
            ed = eh @ down[e].abs().T + projection_error(h_abs, down[e], groups_i, direct)
            out_bound.index_add_(0, tokens, we.abs() * (ed + through_lora(eh, ad[e], bd[e])))
            dh = we * (dy[tokens] @ down[e] + s * ((dy[tokens] @ bd[e]) @ ad[e]))
            edh = eps * we.abs() * (dy[tokens].abs() @ down[e].abs())
            dg = dh * u * sig * (1 + g * (1 - sig))
            du = dh * silu
            edg = dh.abs() * (1.1 * eu + 0.5 * u.abs() * eg) + edh * 1.1 * (u.abs() + eu)
            edu = dh.abs() * 1.1 * eg + edh * (silu.abs() + 1.1 * eg)
            dx = edg @ gate[e].abs() + edu @ up[e].abs() + eps * (dg.abs() @ gate[e].abs() + du.abs() @ up[e].abs())
            dx = dx + through_lora(edg, bg[e].T, ag[e].T) + through_lora(edu, bu[e].T, au[e].T)
            dx_bound.index_add_(0, tokens, dx)
            # The rest carry the forward's error through the saved g, u and h (the bf16 rounding
            # of backward is left to the rel_mae bar of the buffered path).
            wdy = we * dy[tokens]
            rest["gate_lora_a"][e] += s * (edg @ bg[e].abs()).T @ xe.abs()
            rest["gate_lora_b"][e] += s * edg.T @ (xe @ ag[e].T).abs()
            rest["up_lora_a"][e] += s * (edu @ bu[e].abs()).T @ xe.abs()
            rest["up_lora_b"][e] += s * edu.T @ (xe @ au[e].T).abs()
            rest["down_lora_a"][e] += s * (wdy @ bd[e]).abs().T @ eh
            rest["down_lora_b"][e] += s * wdy.abs().T @ (eh @ ad[e].abs().T)
            rest["topk_weights"].view(-1)[slots] += (dy[tokens].abs() * (ed + through_lora(eh, ad[e], bd[e]))).sum(1)
    return out_bound, dx_bound, rest


def assert_within_model(name, got, ref, bound):
    """|got - ref| <= 1.1 bound + 1e-5 max|ref| elementwise (fp32 accumulation elsewhere)."""
    got = got.detach().to(torch.float64)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    slack = 1e-5 * max(ref.abs().max().item(), 1e-3)
    excess = ((got - ref).abs() - 1.1 * bound - slack).max().item()
    assert excess <= 0, f"{name}: error exceeds the integer formats' error model by {excess:.3e}"


def _dequantized_case(case, experts):
    gate, up, down = kt_ops.unpack_experts(experts)
    return dataclasses.replace(case, gate=gate, up=up, down=down)


SHAPES = {
    # per-row formats take any size; K-group formats need group_size | H and I
    "odd": dict(T=13, E=5, k=2, H=33, I=17, r=3),
    "multi_task": dict(T=90, E=3, k=2, H=96, I=160, r=4, ids_mode="hot", neg_frac=0.1),
    "grouped": dict(T=20, E=4, k=3, H=64, I=96, r=2),
}


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_matches_reference_on_dequantized_weights(isa, fmt, shape):
    if fmt.endswith("kgroup") and shape != "grouped":
        pytest.skip("K-group formats need group_size to divide H and I")
    case = make_case(seed=zlib.crc32(f"{fmt}/{shape}".encode()) % 1000, **SHAPES[shape])
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, fmt, group_size=32)
    out, grads = run_ops(case, experts)
    _compare_quantized(_dequantized_case(case, experts), out, grads, experts)


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("T", [1, 2, 7])
def test_few_row_path_on_codes(isa, fmt, T):
    """Up to 4 rows per expert (decode) the kernels read the codes directly, with integer dot
    products on quantized activations on every ISA: held to that error model, which must also show
    (a few ulps of fp32 would mean the activations were not quantized)."""
    case = make_case(seed=T, T=T, E=3, k=1, H=65 if not fmt.endswith("kgroup") else 64, I=64, r=2)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, fmt, group_size=32)
    out, _ = run_ops(case, experts, with_grads=False)
    ref_case = _dequantized_case(case, experts)
    ref_out, _ = run_reference(ref_case, with_grads=False)
    assert_within_model("output", out, ref_out, integer_error_bounds(ref_case, experts)[0])
    assert (out - ref_out).abs().max() > 1e-5 * ref_out.abs().max()


@pytest.fixture
def integer_dot():
    kt_ops.set_integer_dot(True)
    try:
        yield
    finally:
        kt_ops.set_integer_dot(False)


# "tiles": H, I and group_size 64 multiples of 64 k, as the AMX tile products need (quant_amx.inc;
# other shapes take the vector kernels under the AMX ISAs too), and the per-row format's activations
# in groups of 128 k (2 and 3 of them); ~40 rows per expert: two row tiles and a partial one.
DOT_SHAPES = {"multi_task": (SHAPES["multi_task"], 32), "grouped": (SHAPES["grouped"], 32)}
DOT_SHAPES["tiles"] = (dict(T=40, E=2, k=2, H=256, I=384, r=2), 64)


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("shape", list(DOT_SHAPES))
def test_integer_dot_at_every_row_count(isa, fmt, shape, integer_dot):
    """set_integer_dot(True): the integer formats take integer dot products for experts of any size (here
    ~10-60 rows each), held to that path's error model, forward and backward."""
    dims, group_size = DOT_SHAPES[shape]
    if fmt.endswith("kgroup") and shape == "multi_task":
        pytest.skip("K-group formats need group_size to divide H and I")
    case = make_case(seed=zlib.crc32(f"dot/{fmt}/{shape}".encode()) % 1000, **dims)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, fmt, group_size=group_size)
    out, grads = run_ops(case, experts)
    kt_ops.set_integer_dot(False)
    out_off, _ = run_ops(case, experts, with_grads=False)
    assert not torch.equal(out, out_off)  # the experts' many rows did leave the dequantized path
    kt_ops.set_integer_dot(True)
    _compare_quantized(_dequantized_case(case, experts), out, grads, experts)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_integer_dot_has_the_same_bits_on_every_isa(fmt, integer_dot):
    """The integer sums are exact and the scales are applied in one order on every table (AMX tiles,
    real or emulated, AVX-512 VNNI, AVX2): without LoRA, whose expansions sum in each ISA's own
    order, the ISAs that round activations to bf16 (and share the AVX-512 activation's bits) agree bit
    for bit. (ref and avx2 compute silu to different ulps, which can move an int8 step of h.)"""
    names = [name for name in kt_ops.cpu_info()["available_isas"] if isa_rounds_activations(name)]
    if len(names) < 2:
        pytest.skip(f"one bf16-rounding ISA here ({names})")
    case = make_case(seed=11, T=40, E=2, k=2, H=256, I=384, r=0, bf16_activations=True)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, fmt, group_size=64)
    previous, outputs = kt_ops.get_isa(), {}
    try:
        for name in names:
            kt_ops.set_isa(name)
            outputs[name], _ = run_ops(case, experts, with_grads=False)
    finally:
        kt_ops.set_isa(previous)
    for name in names[1:]:
        assert torch.equal(outputs[name], outputs[names[0]]), f"{name} differs from {names[0]}"


def test_integer_dot_over_many_chunks_and_non_finite_rows(isa, integer_dot):
    """One expert with more rows than a task's chunk (256), a NaN in one token's hidden state: under
    integer dot products the rows of every chunk meet their own quantization, and the expert whose
    rows hold a NaN falls back to fp32 products on the codes, where the NaN stays in its token."""
    case = make_case(seed=5, T=300, E=2, k=1, H=32, I=32, r=2, ids_mode="same")
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, "int8")
    out, grads = run_ops(case, experts)
    ref_case = _dequantized_case(case, experts)
    _compare_quantized(ref_case, out, grads, experts)
    hidden = case.hidden.clone()
    hidden[7, 3] = float("nan")
    out_nan, _ = run_ops(dataclasses.replace(case, hidden=hidden), experts, with_grads=False)
    assert torch.isnan(out_nan[7]).all()
    finite = torch.ones(case.T, dtype=torch.bool)
    finite[7] = False
    ref_out, _ = run_reference(ref_case, with_grads=False)
    assert_rel_mae("output of the other tokens (fp32 on the codes)", out_nan[finite], ref_out[finite], 3e-3)


def test_integer_dot_toggled_during_calls():
    """set_integer_dot from another thread while the op runs: each call reads the setting once for
    all its experts, so every output is one of the two settings' outputs, bit for bit."""
    import threading

    case = make_case(seed=9, T=40, E=2, k=2, H=256, I=384, r=2)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, "int8")
    kt_ops.set_integer_dot(False)
    off, _ = run_ops(case, experts, with_grads=False)
    kt_ops.set_integer_dot(True)
    on, _ = run_ops(case, experts, with_grads=False)
    assert not torch.equal(on, off)
    stop = threading.Event()

    def toggle():
        while not stop.is_set():
            kt_ops.set_integer_dot(not kt_ops.get_integer_dot())

    thread = threading.Thread(target=toggle)
    thread.start()
    try:
        for _ in range(20):
            out, _ = run_ops(case, experts, with_grads=False)
            assert torch.equal(out, on) or torch.equal(out, off)
    finally:
        stop.set()
        thread.join()
        kt_ops.set_integer_dot(False)


def test_set_integer_dot_checks_its_argument(monkeypatch):
    with pytest.raises(TypeError, match="enabled must be a bool"):
        kt_ops.set_integer_dot(1)
    assert kt_ops.get_integer_dot() is False
    monkeypatch.setenv("KT_OPS_INTEGER_DOT", "On")
    assert kt_ops.environment_flag("KT_OPS_INTEGER_DOT") is True
    monkeypatch.setenv("KT_OPS_INTEGER_DOT", "maybe")
    with pytest.raises(ValueError, match="KT_OPS_INTEGER_DOT must be one of"):
        kt_ops.environment_flag("KT_OPS_INTEGER_DOT")


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_bf16_inputs_on_quantized_weights(isa, fmt):
    case = make_case(seed=3, T=16, E=4, k=2, H=64, I=64, r=4, hidden_dtype=torch.bfloat16)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, fmt, group_size=32)
    out, grads = run_ops(case, experts)
    compare_with_reference(_dequantized_case(case, experts), out, grads, "bf16")


# Accuracy against the bf16 weights (relative mean-abs error, forward / grad of hidden_states) on
# i.i.d. Gaussian weights, the hardest case for round-to-nearest: no outliers for the scales to
# absorb. Measured (H=I=256, group 128): int8 0.013/0.013, int4 0.18/0.19, int4_1 0.17/0.18,
# int4_kgroup 0.17/0.18, int4_1_kgroup 0.16/0.17. The K-group bar (0.12/0.15) assumed real
# checkpoints; on Gaussian weights 4-bit RTN sits near 0.17 at any group size (see the issue note).
ACCURACY_BARS = {
    "int8": (0.03, 0.05),
    "int4": (0.25, 0.3),
    "int4_1": (0.25, 0.3),
    "int4_kgroup": (0.2, 0.22),
    "int4_1_kgroup": (0.2, 0.22),
    "int8_kgroup": (0.03, 0.05),
}


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_accuracy_against_bf16(fmt):
    case = make_case(seed=11, T=48, E=4, k=2, H=256, I=256, r=0)
    ref_out, ref_grads = run_reference(case)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, fmt, group_size=128)
    out, grads = run_ops(case, experts)
    fwd_bar, bwd_bar = ACCURACY_BARS[fmt]
    assert rel_mae(out, ref_out) <= fwd_bar
    assert rel_mae(grads[0], ref_grads[0]) <= bwd_bar
    # LoRA stays in full precision: its gradients see only the base weights' rounding.
    assert grads[1] is not None


def test_quantized_error_ordering():
    """More bits or finer groups never lose accuracy on the same weights."""
    case = make_case(seed=5, T=32, E=3, k=2, H=256, I=256, r=0)
    ref_out, _ = run_reference(case, with_grads=False)
    err = {}
    for fmt in ("int8", "int4", "int4_kgroup"):
        experts = kt_ops.pack_experts(case.gate, case.up, case.down, fmt, group_size=32)
        err[fmt] = rel_mae(run_ops(case, experts, with_grads=False)[0], ref_out)
    assert err["int8"] < err["int4_kgroup"] < err["int4"]


@pytest.mark.parametrize("fmt", ("bf16",) + QUANTIZED)
def test_packing_is_deterministic_and_compact(fmt):
    gen = torch.Generator().manual_seed(0)
    E, H, I = 3, 128, 96
    gate, up, down = (torch.randn(*s, generator=gen) for s in ((E, I, H), (E, I, H), (E, H, I)))
    a = kt_ops.pack_experts(gate, up, down, fmt, group_size=32)
    b = kt_ops.pack_experts(gate, up, down, fmt, group_size=32)
    for name in ("gate", "up", "down", "gate_scale", "up_scale", "down_scale"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), name
    bits = 16 if fmt == "bf16" else 8 if fmt.startswith("int8") else 4
    raw = 3 * E * H * I * bits // 8
    scales = sum(t.numel() * 4 for t in (a.gate_scale, a.up_scale, a.down_scale) if t is not None)
    assert a.nbytes() - scales == raw  # H, I multiples of 16: no padding
    assert a.nbytes() <= 1.05 * raw + scales


def vm_flags(address: int) -> list:
    """The VmFlags of this process's mapping that holds `address`."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="the kernel has no transparent huge pages"
)
@pytest.mark.parametrize("fmt", ("bf16", "int8", "int4_kgroup"))
def test_large_blobs_are_on_huge_page_aligned_advised_pages(fmt):
    """Every op call streams the weights: a blob of 2 MiB or more starts on a 2 MiB boundary and its
    mapping is advised for transparent huge pages ("hg"), whatever torch's allocator does."""
    gen = torch.Generator().manual_seed(1)
    E, N, K = 8, 512, 1024  # bf16 8 MiB, int8 4 MiB, int4 2 MiB per matrix
    w = torch.randn(E, N, K, generator=gen) * 0.05
    blob, scales = torch.ops.kt.pack_weights(w, fmt, 64)
    assert blob.data_ptr() % (2 << 20) == 0 and "hg" in vm_flags(blob.data_ptr())
    unpacked = torch.ops.kt.unpack_weights(blob, scales if fmt != "bf16" else None, fmt, N, K)
    if fmt == "bf16":
        assert torch.equal(unpacked, w.to(torch.bfloat16))
    else:  # the codes' values: what a blob in ordinary memory unpacks to
        small, small_scales = torch.ops.kt.pack_weights(w[:1].contiguous(), fmt, 64)  # 1/8 of it: under 2 MiB
        assert torch.equal(unpacked[:1], torch.ops.kt.unpack_weights(small, small_scales, fmt, N, K))
    del blob, unpacked  # released with its tensor (munmap)


@pytest.mark.parametrize("fmt", ("bf16",) + QUANTIZED)
def test_save_load_round_trip_is_bit_identical(tmp_path, fmt):
    case = make_case(seed=2, T=10, E=3, k=2, H=64, I=32, r=2)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, fmt, group_size=32)
    path = str(tmp_path / "experts.safetensors")
    kt_ops.save_packed_experts(path, {7: experts})
    loaded = kt_ops.load_packed_experts(path, 7)
    assert loaded.weight_format == fmt and loaded.hidden_size == 64 and loaded.intermediate_size == 32
    for name in ("gate", "up", "down", "gate_scale", "up_scale", "down_scale"):
        x, y = getattr(experts, name), getattr(loaded, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), name
    assert torch.equal(run_ops(case, experts)[0], run_ops(case, loaded)[0])
    assert kt_ops.packed_layers(path) == [7]
    with pytest.raises(FileExistsError):
        kt_ops.save_packed_experts(path, {7: experts})
    with pytest.raises(KeyError, match="layer 3"):
        kt_ops.load_packed_experts(path, 3)


@pytest.mark.parametrize("method", list(METHODS))
def test_layer_methods(method):
    E, H, I = 4, 64, 64
    layer = kt_ops.KTMoELayer(E, H, I, lora_rank=4, method=method, group_size=32, lora_dtype=torch.float32)
    assert layer.weight_format == METHODS[method]
    gen = torch.Generator().manual_seed(1)
    gate, up, down = (torch.randn(*s, generator=gen) * 0.1 for s in ((E, I, H), (E, I, H), (E, H, I)))
    layer.load_weights_from_tensors(gate, up, down)
    x = torch.randn(5, H, generator=gen, requires_grad=True)
    ids = torch.randint(0, E, (5, 2), generator=gen)
    y = layer(x, ids, torch.rand(5, 2, generator=gen))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert layer.gate_lora_b.grad is not None


def test_bad_group_size_and_method():
    E, H, I = 2, 64, 96
    w = torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I)
    with pytest.raises(ValueError, match="group_size"):
        kt_ops.pack_experts(*w, "int4_kgroup", group_size=40)  # divides neither
    with pytest.raises(ValueError, match="group_size"):
        kt_ops.pack_experts(*w, "int4_1_kgroup", group_size=3)
    with pytest.raises(ValueError, match="weight_format"):
        kt_ops.pack_experts(*w, "int3")
    with pytest.raises(ValueError, match="AMXINT8_SFT"):
        kt_ops.KTMoELayer(E, H, I, method="AMXINT3_SFT")


def test_scales_are_checked():
    case = make_case(seed=0, T=4, E=2, k=1, H=32, I=32, r=1)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, "int8")
    bad = [
        dataclasses.replace(experts, gate_scale=None),
        dataclasses.replace(experts, up_scale=experts.up_scale[:, :-1].contiguous()),
        dataclasses.replace(experts, down_scale=experts.down_scale.double()),
    ]
    for wrong, name in zip(bad, ("gate_scale", "up_scale", "down_scale")):
        with pytest.raises((ValueError, TypeError), match=name):
            run_ops(case, wrong)
    with pytest.raises(ValueError, match="gate_scale"):
        run_ops(
            case, dataclasses.replace(kt_ops.pack_experts(case.gate, case.up, case.down), gate_scale=experts.gate_scale)
        )


# ---- packing already-quantized codes exactly (GGUF Q8_0 / Q4_0 / Q4_1 blocks) ------------------


def _random_codes(fmt, E, N, K, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-128, 128) if fmt.startswith("int8") else (0, 16)
    codes = torch.randint(lo, hi, (E, N, K), generator=gen)
    shape = (E, N, groups, 2) if fmt in ("int4_1", "int4_1_kgroup") else (E, N, groups)
    scales = torch.randn(shape, generator=gen)  # negative scales too, as GGUF's Q4_0 has
    return codes, scales


def _dequantize(fmt, codes, scales):
    E, N, K = codes.shape
    groups = scales.shape[2]
    c = codes.double().view(E, N, groups, K // groups)
    if fmt in ("int4_1", "int4_1_kgroup"):
        w = c * scales[..., 0:1].double() + scales[..., 1:2].double()
    elif fmt.startswith("int8"):
        w = c * scales.double().unsqueeze(-1)
    else:
        w = (c - 8) * scales.double().unsqueeze(-1)
    return w.view(E, N, K)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_pack_codes_is_exact(fmt):
    grouped = fmt.endswith("kgroup")
    N, K = (40, 64) if grouped else (19, 33)  # padded rows; odd K for the per-row formats
    codes, scales = _random_codes(fmt, 3, N, K, 2 if grouped else 1, seed=len(fmt))
    packed, padded_scales = torch.ops.kt.pack_codes(codes, scales, fmt)
    values = torch.ops.kt.unpack_weights(packed, padded_scales, fmt, N, K)
    torch.testing.assert_close(values.double(), _dequantize(fmt, codes, scales), rtol=1e-6, atol=1e-6)


def test_pack_codes_matches_pack_weights_layout():
    """Codes read back from pack_weights' own output pack to the same bytes."""
    w = torch.randn(2, 20, 64)
    packed, scales = torch.ops.kt.pack_weights(w, "int4_1_kgroup", 32)
    lows = packed.view(2, -1)
    values = torch.ops.kt.unpack_weights(packed, scales, "int4_1_kgroup", 20, 64).view(2, 20, 2, 32).double()
    s = scales[:, :20].double()
    codes = torch.round((values - s[..., 1:2]) / s[..., 0:1]).view(2, 20, 64).to(torch.int64)
    repacked, rescales = torch.ops.kt.pack_codes(codes, scales[:, :20], "int4_1_kgroup")
    assert torch.equal(repacked, lows) and torch.equal(rescales, scales)


def test_packed_codes_run_through_the_op(isa):
    case = make_case(seed=5, T=6, E=3, k=2, H=64, I=64, r=2)
    pairs = [_random_codes("int8_kgroup", 3, n, k, k // 32, seed=i) for i, (n, k) in enumerate(((64, 64),) * 3)]
    pairs = [(c, s.abs() * 0.01) for c, s in pairs]
    experts = kt_ops.core.packed.pack_experts_from_codes(*pairs, "int8_kgroup")
    out, grads = run_ops(case, experts)
    _compare_quantized(_dequantized_case(case, experts), out, grads, experts)


@pytest.mark.parametrize("fmt", ["int8_kgroup", "int4_1_kgroup"])
def test_nan_scale_gives_nan_not_numbers(isa, fmt):
    """A NaN scale or min with a full payload: rounding its products to bf16 once carried the payload into
    the sign, so the weights became -0 and the expert's outputs finite. Enough rows per expert that the
    prefill path dequantizes panels."""
    case = make_case(seed=7, T=40, E=3, k=1, H=64, I=64, r=2)
    pairs = [_random_codes(fmt, 3, 64, 64, 2, seed=i) for i in range(3)]
    pairs = [(c, s.abs() * 0.01) for c, s in pairs]
    gate_scales = pairs[0][1]
    gate_scales.view(torch.int32)[0, 5, 1] = 0x7FFFFFFF  # expert 0, row 5, K group 1 (the min for int4_1)
    experts = kt_ops.core.packed.pack_experts_from_codes(*pairs, fmt)
    out, _ = run_ops(case, experts, with_grads=False)
    on_expert0 = (case.ids == 0).any(dim=1)
    assert on_expert0.sum() > 4 and (~on_expert0).sum() > 0
    assert out[on_expert0].isnan().all()
    assert out[~on_expert0].isfinite().all()


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(fmt="bf16"), "quantized weight_format"),
        (dict(codes=torch.full((1, 16, 32), 16)), r"must lie in \[0, 15\]"),
        (dict(codes=torch.zeros(1, 16, 32, dtype=torch.float32)), "integer"),
        (dict(scales=torch.ones(1, 16, 3)), "groups per row"),
        (dict(scales=torch.ones(1, 15, 1)), "scales must have shape"),
    ],
)
def test_pack_codes_bad_input(bad, match):
    args = dict(codes=torch.zeros(1, 16, 32, dtype=torch.int64), scales=torch.ones(1, 16, 1), fmt="int4_kgroup")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.kt.pack_codes(args["codes"], args["scales"], args["fmt"])
