"""The fp8 weight format (AMXFP8_SFT): float8 E4M3 codes with one fp32 scale per row and K group,
DeepSeek-V3's block-FP8 experts kept at ~1 byte per weight. Decoding, exact packing of checkpoint
codes, the op against the reference on the dequantized weights on every ISA, loading a block-FP8
checkpoint with from_pretrained, and a few training steps."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch

import kt_ops
from kt_testing import (
    assert_rel_mae,
    assert_tight,
    compare_with_reference,
    isa_rounds_activations,
    make_case,
    rel_mae,
    run_ops,
    run_reference,
)

from kt_ops.core.packed import pack_experts_from_codes, unpack_experts


def _dequantized_case(case, experts):
    gate, up, down = unpack_experts(experts)
    return dataclasses.replace(case, gate=gate, up=up, down=down)


def _block_fp8(w: torch.Tensor, block: int = 128):
    """DeepSeek-V3's quantization of one [N, K] matrix: per 128x128 block scale_inv = amax / 448,
    codes = w / scale_inv as float8_e4m3fn. Returns (codes, scale_inv [ceil(N/128), ceil(K/128)])."""
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    padded = torch.nn.functional.pad(w.float(), (0, kb * block - K, 0, nb * block - N))
    blocks = padded.view(nb, block, kb, block)
    scale_inv = blocks.abs().amax(dim=(1, 3)) / 448.0
    scale_inv = torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))
    full = scale_inv.repeat_interleave(block, 0)[:N].repeat_interleave(block, 1)[:, :K]
    return (w.float() / full).to(torch.float8_e4m3fn), scale_inv


def _expand(scale_inv, N, K, group):
    """Block scales [ceil(N/128), ceil(K/128)] as the format's per-row scales [N, K / group]."""
    return scale_inv.repeat_interleave(128, 0)[:N].repeat_interleave(128 // group, 1)[:, : K // group]


# ---- decoding and packing ---------------------------------------------------------------------------


def test_every_e4m3_code_decodes_exactly():
    """All 256 bytes through pack_codes / unpack_weights (the exact fp32 decode) against torch's
    float8_e4m3fn -> float32, NaN codes included."""
    codes = torch.arange(256, dtype=torch.uint8).view(16, 16).repeat(1, 2)  # [16, 32]
    packed, scales = torch.ops.kt.pack_codes(codes[None], torch.ones(1, 16, 1), "fp8")
    got = torch.ops.kt.unpack_weights(packed, scales, "fp8", 16, 32)[0]
    want = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).sum() == 4  # 0x7F, 0xFF twice
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite], want[finite])
    assert torch.equal(torch.signbit(got[finite]), torch.signbit(want[finite]))  # -0.0 stays -0.0


def test_every_code_through_the_kernels(isa):
    """The dequantized bf16 panels the GEMMs read (ref or AVX2 dequantizer): all 256 codes as gate
    weights (NaN codes swapped for 0), up all ones, down the identity, one-hot inputs e_j: output
    row j is silu(gate[:, j]) on the weights rounded to bf16."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = torch.where((codes & 0x7F) == 0x7F, torch.zeros_like(codes), codes)
    E, I, H = 1, 16, 16  # gate: 16 x 16 = 256 codes
    gate = codes.view(1, I, H)
    up = torch.full((E, I, H), 0x38, dtype=torch.uint8)  # 1.0
    down = torch.zeros(E, H, I, dtype=torch.uint8)
    down[0].fill_diagonal_(0x38)
    scale = torch.full((E, I, 1), 0.75)  # one multiplication per weight, then bf16 rounding
    experts = pack_experts_from_codes((gate, scale), (up, torch.ones(E, I, 1)), (down, torch.ones(E, H, 1)), "fp8")
    got_gate = unpack_experts(experts)[0][0]
    torch.testing.assert_close(got_gate, gate[0].view(torch.float8_e4m3fn).float() * 0.75, rtol=0, atol=0)
    out = kt_ops.moe_sft(torch.eye(H), torch.zeros(H, 1, dtype=torch.int64), torch.ones(H, 1), experts, None, 1.0)
    want = torch.nn.functional.silu(got_gate.to(torch.bfloat16).float().T)
    # ISAs that round activations to bf16 round h = silu(g) once more before down.
    rtol = 2.0**-8 if isa_rounds_activations() else 1e-6
    torch.testing.assert_close(out, want, rtol=rtol, atol=1e-6)


def test_pack_codes_is_exact_from_a_block_fp8_checkpoint():
    gen = torch.Generator().manual_seed(0)
    E, N, K = 3, 200, 256  # 200 rows: a partial row block and panel padding
    codes, scales, values = [], [], []
    for _ in range(E):
        c, s = _block_fp8(torch.randn(N, K, generator=gen) * 0.02)
        codes.append(c)
        scales.append(_expand(s, N, K, 128))
        values.append(c.float() * s.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1))
    packed, padded = torch.ops.kt.pack_codes(torch.stack(codes), torch.stack(scales), "fp8")
    assert packed.shape == (E, 208 * K) and padded.shape == (E, 208, 2)
    back = torch.ops.kt.unpack_weights(packed, padded, "fp8", N, K)
    assert torch.equal(back, torch.stack(values))
    # integer bytes give the same blob
    again, _ = torch.ops.kt.pack_codes(torch.stack(codes).view(torch.uint8).to(torch.int64), torch.stack(scales), "fp8")
    assert torch.equal(again, packed)


def test_pack_weights_rounds_to_nearest_e4m3():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 48, 64, generator=gen)
    packed, scales = torch.ops.kt.pack_weights(w, "fp8", 32)
    assert scales.shape == (2, 48, 2)
    torch.testing.assert_close(scales, w.abs().view(2, 48, 2, 32).amax(-1) / 448, rtol=0, atol=0)
    back = torch.ops.kt.unpack_weights(packed, scales, "fp8", 48, 64)
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 of each weight (plus the subnormal step)
    step = scales.repeat_interleave(32, -1) * 2.0**-9
    assert ((back - w).abs() <= w.abs() * 2.0**-4 + step / 2 + 1e-12).all()
    assert rel_mae(back, w) < 0.03
    # the group max is the code 448 (to the fp32 rounding of max / 448 * 448)
    torch.testing.assert_close(
        back.abs().view(2, 48, 2, 32).amax(-1), w.abs().view(2, 48, 2, 32).amax(-1), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(codes=torch.zeros(1, 16, 32, dtype=torch.float8_e4m3fn), fmt="int8_kgroup"), "float8_e4m3fn codes need"),
        (dict(codes=torch.full((1, 16, 32), 256)), r"must lie in \[0, 255\]"),
        (dict(scales=torch.ones(1, 16, 3)), "groups per row"),
    ],
)
def test_pack_codes_bad_input(bad, match):
    args = dict(codes=torch.zeros(1, 16, 32, dtype=torch.uint8), scales=torch.ones(1, 16, 1), fmt="fp8")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.kt.pack_codes(args["codes"], args["scales"], args["fmt"])


def test_memory_is_about_one_byte_per_weight():
    E, H, I = 4, 256, 128
    zeros = torch.zeros(E, I, H), torch.zeros(E, I, H), torch.zeros(E, H, I)
    fp8 = kt_ops.pack_experts(*zeros, "fp8", group_size=128)
    weights = 3 * E * H * I
    assert fp8.nbytes() == weights + 4 * weights // 128  # codes + one fp32 per 128 weights
    assert fp8.nbytes() / weights == pytest.approx(1.03125)


# ---- the op on fp8 weights -------------------------------------------------------------------------

SHAPES = {
    "grouped": dict(T=20, E=4, k=3, H=64, I=96, r=2),
    "multi_task": dict(T=90, E=3, k=2, H=96, I=160, r=4, ids_mode="hot", neg_frac=0.1),
    "decode": dict(T=3, E=3, k=1, H=64, I=64, r=2),  # few rows per expert: the dequantized path too
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_op_matches_reference_on_dequantized_weights(isa, shape):
    """The kernels compute with the fp8 weights rounded to bf16 (2^-9 relative): the output and
    every gradient agree with the float64 reference on the exact dequantized weights at bf16 level,
    as for the other buffered formats (test_formats.py)."""
    case = make_case(seed=len(shape), **SHAPES[shape])
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, "fp8", group_size=32)
    assert experts.weight_format == "fp8"
    out, grads = run_ops(case, experts)
    ref_out, ref_grads = run_reference(_dequantized_case(case, experts))
    # With 1-3 tokens the mean is over few values: test_formats.py's few-row bar.
    fwd_bar, bwd_bar = (5e-3, 6e-3) if shape == "decode" else (3e-3, 4e-3)
    assert_rel_mae("output", out, ref_out, fwd_bar)
    for name, g, rg in zip(("hidden_states", "topk_weights", *kt_ops.LORA_NAMES), grads, ref_grads):
        if rg is not None:
            assert_rel_mae(f"grad {name}", g, rg, bwd_bar)


@pytest.mark.parametrize("T", [1, 2, 7])
def test_few_row_path_on_codes(isa, T):
    """Up to 4 rows per expert (decode) the AVX2 table multiplies the exact E4M3 values and applies
    the scales once per group in fp32 (no bf16 rounding of the weights): the reference on the exact
    dequantized weights to fp32 rounding there; bf16-rounded weights (2^-9 relative) on ref."""
    case = make_case(seed=T, T=T, E=3, k=1, H=64, I=64, r=2)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, "fp8", group_size=32)
    out, _ = run_ops(case, experts, with_grads=False)
    ref_out, _ = run_reference(_dequantized_case(case, experts), with_grads=False)
    if kt_ops.get_isa() == "avx2":
        assert_tight("output", out, ref_out, rtol=1e-4)
    else:
        assert_rel_mae("output", out, ref_out, 5e-3)


def test_bf16_inputs(isa):
    case = make_case(seed=3, T=16, E=4, k=2, H=64, I=64, r=4, hidden_dtype=torch.bfloat16)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, "fp8", group_size=32)
    out, grads = run_ops(case, experts)
    compare_with_reference(_dequantized_case(case, experts), out, grads, "bf16")


def test_ref_and_avx2_agree():
    """ref and AVX2 dequantize to the same bf16 panels: the ISAs' outputs differ only by their GEMMs,
    so ref and avx2 (both fp32 GEMMs) agree to fp32 summation order."""
    case = make_case(seed=4, T=24, E=3, k=2, H=64, I=64, r=2)
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, "fp8", group_size=64)
    outs = {}
    previous = kt_ops.get_isa()
    try:
        for isa in ("ref", "avx2"):
            if isa in kt_ops.cpu_info()["available_isas"]:
                kt_ops.set_isa(isa)
                outs[isa] = run_ops(case, experts, with_grads=False)[0]
    finally:
        kt_ops.set_isa(previous)
    if len(outs) < 2:
        pytest.skip("needs ref and avx2")
    torch.testing.assert_close(outs["avx2"], outs["ref"], rtol=1e-5, atol=1e-6)


def test_accuracy_against_bf16():
    """fp8 (3 mantissa bits) sits between int8 and the 4-bit formats on Gaussian weights."""
    case = make_case(seed=11, T=48, E=4, k=2, H=256, I=256, r=0)
    ref_out, ref_grads = run_reference(case)
    err = {}
    for fmt in ("fp8", "int8_kgroup", "int4_kgroup"):
        experts = kt_ops.pack_experts(case.gate, case.up, case.down, fmt, group_size=128)
        out, grads = run_ops(case, experts)
        err[fmt] = (rel_mae(out, ref_out), rel_mae(grads[0], ref_grads[0]))
    assert err["fp8"][0] < 0.05 and err["fp8"][1] < 0.05
    assert err["int8_kgroup"][0] < err["fp8"][0] < err["int4_kgroup"][0]


def test_layer_method_and_save_load(tmp_path):
    E, H, I = 4, 64, 64
    layer = kt_ops.KTMoELayer(E, H, I, lora_rank=4, method="AMXFP8_SFT", group_size=32, lora_dtype=torch.float32)
    assert layer.weight_format == "fp8"
    gen = torch.Generator().manual_seed(1)
    gate, up, down = (torch.randn(*s, generator=gen) * 0.1 for s in ((E, I, H), (E, I, H), (E, H, I)))
    layer.load_weights_from_tensors(gate, up, down)
    x = torch.randn(5, H, generator=gen, requires_grad=True)
    ids = torch.randint(0, E, (5, 2), generator=gen)
    y = layer(x, ids, torch.rand(5, 2, generator=gen))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and layer.gate_lora_b.grad is not None
    path = str(tmp_path / "experts.safetensors")
    kt_ops.save_packed_experts(path, {0: layer.experts})
    loaded = kt_ops.load_packed_experts(path, 0)
    assert loaded.weight_format == "fp8" and torch.equal(loaded.gate, layer.experts.gate)


# ---- a DeepSeek-V3 style checkpoint with block-FP8 experts -----------------------------------------

_EXPERT_KEY = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")


def fp8_expert_checkpoint(path, pattern=None, **model_kwargs):
    """A tiny DeepSeek-V3 saved with its routed experts (or the weights `pattern` matches) as
    float8_e4m3fn + weight_scale_inv (128x128 blocks), the rest in fp32. Returns {fp8 weight key: the
    fp32 weight the codes stand for}."""
    pattern = pattern or _EXPERT_KEY
    from safetensors.torch import load_file, save_file

    from kt_ops.integration.tiny import tiny_model

    model = tiny_model("tiny-deepseek-v3", **model_kwargs)
    model.save_pretrained(path, max_shard_size="400KB")
    truth = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        tensors = load_file(os.path.join(path, name))
        for key in [k for k in tensors if pattern.fullmatch(k)]:
            codes, scale_inv = _block_fp8(tensors[key])
            tensors[key] = codes
            tensors[key + "_scale_inv"] = scale_inv
            N, K = codes.shape
            truth[key] = codes.float() * scale_inv.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):  # the scale tensors live beside their weights
        import json

        with open(index) as f:
            data = json.load(f)
        for key in list(data["weight_map"]):
            if pattern.fullmatch(key):
                data["weight_map"][key + "_scale_inv"] = data["weight_map"][key]
        with open(index, "w") as f:
            json.dump(data, f)
    assert truth, "the tiny model saved no weights to store as FP8"
    return truth


def test_from_pretrained_keeps_fp8_experts_and_trains(tmp_path):
    from kt_ops.integration import find_moe_experts, from_pretrained

    # H = 256: two 128-wide K blocks; I = 192: K groups of gcd(128, 192) = 64 for down, and a
    # partial 64-row block for gate / up.
    truth = fp8_expert_checkpoint(tmp_path, hidden_size=256, moe_intermediate_size=192)
    model = from_pretrained(tmp_path, kt_backend="AMXFP8", lora_rank=4, dtype=torch.float32)
    found = find_moe_experts(model)
    assert found
    total_weights = 0
    for name, module in found:
        kt = module.kt_experts
        experts = kt.experts
        assert experts.weight_format == "fp8" and kt.weight_format == "fp8"
        gate, up, down = unpack_experts(experts)
        for e in range(experts.num_experts):
            base = f"model.layers.{kt.layer_idx}.mlp.experts.{e}"
            assert torch.equal(gate[e], truth[f"{base}.gate_proj.weight"])
            assert torch.equal(up[e], truth[f"{base}.up_proj.weight"])
            assert torch.equal(down[e], truth[f"{base}.down_proj.weight"])
        weights = 3 * experts.num_experts * experts.hidden_size * experts.intermediate_size
        total_weights += weights
        # codes (192 rows pad to 192: no panel padding) + fp32 scales per row and K group
        assert experts.nbytes() <= 1.07 * weights
    assert total_weights > 0

    # A few training steps of the expert LoRA through the fp8 base.
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    params = [p for n, p in model.named_parameters() if "lora" in n]
    assert params
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_other_backends_still_requantize_to_int8(tmp_path):
    """Without an fp8 backend a block-FP8 checkpoint becomes int8_kgroup (group 128, which must
    divide H and I there), as before; with AMXFP8 it agrees with that to int8's rounding."""
    from kt_ops.integration import find_moe_experts, from_pretrained

    fp8_expert_checkpoint(tmp_path, hidden_size=128, moe_intermediate_size=128)
    int8 = from_pretrained(tmp_path, kt_backend="AMXINT8", lora_rank=0, dtype=torch.float32)
    fp8 = from_pretrained(tmp_path, kt_backend="AMXFP8", lora_rank=0, dtype=torch.float32)
    (_, a), (_, b) = find_moe_experts(int8)[0], find_moe_experts(fp8)[0]
    assert a.kt_experts.experts.weight_format == "int8_kgroup" and b.kt_experts.experts.weight_format == "fp8"
    for x, y in zip(unpack_experts(a.kt_experts.experts), unpack_experts(b.kt_experts.experts)):
        assert rel_mae(x, y) < 0.01
    # apply_kt's kt_weight_path reads the checkpoint the same way
    from kt_ops.integration import apply_kt
    from kt_ops.integration.tiny import tiny_model

    applied = apply_kt(
        tiny_model("tiny-deepseek-v3", hidden_size=128, moe_intermediate_size=128),
        kt_backend="AMXFP8",
        kt_weight_path=str(tmp_path),
        lora_rank=0,
    )
    c = find_moe_experts(applied)[0][1].kt_experts.experts
    assert c.weight_format == "fp8"
    for name in ("gate", "up", "down", "gate_scale", "up_scale", "down_scale"):
        assert torch.equal(getattr(c, name), getattr(b.kt_experts.experts, name)), name


def test_kt_sft_config_and_plan(tmp_path):
    """`kt_expert_weight_format: fp8` selects AMXFP8; `kt-sft plan` sizes DeepSeek-V3's experts at
    1.03 bytes per weight (half of bf16 plus the scales)."""
    import shutil

    from kt_ops import cli
    from kt_ops.plan import plan_from_config

    model_dir = tmp_path / "DeepSeek-V3"
    model_dir.mkdir()
    shutil.copy(
        os.path.join(os.path.dirname(__file__), "data", "deepseek_v3_671b_config.json"), model_dir / "config.json"
    )
    config = cli.load_config(
        {
            "model_name_or_path": str(model_dir),
            "dataset": "identity",
            "output_dir": str(tmp_path),
            "kt_expert_weight_format": "fp8",
            "bf16": True,
        },
        quiet=True,
    )
    assert config["kt_backend"] == "AMXFP8"
    plan = plan_from_config(config)
    assert plan.weight_format == "fp8"
    assert plan.packed_bytes["fp8"] == pytest.approx(plan.expert_params * (1 + 4 / 128), rel=1e-6)
    with pytest.raises(cli.ConfigError, match="computes 'bf16' experts but kt_expert_weight_format is 'fp8'"):
        cli.load_config(
            {
                "model_name_or_path": str(model_dir),
                "dataset": "identity",
                "output_dir": str(tmp_path),
                "kt_expert_weight_format": "fp8",
                "kt_backend": "AMXBF16",
            },
            quiet=True,
        )


def test_from_pretrained_dequantizes_fp8_non_expert_weights(tmp_path):
    """A real DeepSeek-V3/R1 checkpoint is block-FP8 in its attention and dense layers too: those load
    as the values their codes and block scales stand for."""
    from safetensors.torch import load_file

    from kt_ops.integration import from_pretrained

    linear = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(?!experts\.|gate\.|[a-z_]*norm)[a-z_]+\.weight")
    truth = fp8_expert_checkpoint(tmp_path, pattern=linear, hidden_size=256, moe_intermediate_size=128)
    assert any(".self_attn." in k for k in truth) and any(".mlp." in k for k in truth)
    model = from_pretrained(tmp_path, kt_backend="AMXBF16", lora_rank=0, dtype=torch.float32)
    weights = dict(model.named_parameters())
    for key, want in truth.items():
        assert torch.equal(weights[key].detach(), want), key
    # A float8 tensor without its block scale is refused by name.
    shard = next(p for p in sorted(os.listdir(tmp_path)) if p.endswith(".safetensors"))
    tensors = load_file(os.path.join(tmp_path, shard))
    scale_key = next(k for k in tensors if k.endswith("_scale_inv"))
    from safetensors.torch import save_file

    del tensors[scale_key]
    save_file(tensors, os.path.join(tmp_path, shard), metadata={"format": "pt"})
    index = os.path.join(tmp_path, "model.safetensors.index.json")
    if os.path.exists(index):
        import json

        with open(index) as f:
            data = json.load(f)
        del data["weight_map"][scale_key]
        with open(index, "w") as f:
            json.dump(data, f)
    with pytest.raises(ValueError, match="without a block scale"):
        from_pretrained(tmp_path, kt_backend="AMXBF16", lora_rank=0, dtype=torch.float32)
