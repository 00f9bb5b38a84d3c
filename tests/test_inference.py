"""Inference loaders and deferred experts: GGUF files (LlamafileMoEWrapper), FP8 and compressed-tensors
int4 safetensors checkpoints (NativeMoEWrapper), select_deferred_experts and the deferred forward.
Every file is written here into tmp_path: GGUF with gguf's GGUFWriter, checkpoints with safetensors."""

import numpy as np
import pytest
import torch

from kt_ops import KTMoEWrapper
from kt_ops.core.packed import unpack_experts
from kt_ops.reference import moe_sft_reference
from kt_testing import assert_tight, rel_mae

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

pytestmark = pytest.mark.filterwarnings("ignore:the process's CPUInfer already exists")

E, H, I, K_TOP = 4, 256, 256, 2  # K-quant super-blocks are 256 wide
SHAPES = {"gate": (E, I, H), "up": (E, I, H), "down": (E, H, I)}


def wrapper(method, weight_path=None, **overrides):
    kwargs = dict(
        layer_idx=0,
        num_experts=E,
        num_experts_per_tok=K_TOP,
        hidden_size=H,
        moe_intermediate_size=I,
        num_gpu_experts=0,
        cpuinfer_threads=2,
        threadpool_count=1,
        weight_path=weight_path,
        chunked_prefill_size=512,
    )
    kwargs.update(overrides)
    return KTMoEWrapper(**kwargs, mode="inference", method=method)


def routing(seed=0, qlen=6, num_experts=E, k=K_TOP):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(qlen, H, generator=gen)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(qlen)])
    weights = torch.rand(qlen, k, generator=gen) + 0.1
    return x, ids, weights


def reference(x, ids, weights, gate, up, down):
    zeros = [torch.zeros(s) for s in ((E, 0, H), (E, I, 0), (E, 0, H), (E, I, 0), (E, 0, I), (E, H, 0))]
    return moe_sft_reference(
        x.double(),
        ids,
        weights.double(),
        gate.double(),
        up.double(),
        down.double(),
        *zeros,
        0.0,
        compute_dtype=torch.float64,
    )


# ---- GGUF ---------------------------------------------------------------------------------------


def random_weights(seed, shape, scale=0.05):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


def k_quant_blocks(qtype, shape, seed):
    """Valid K-quant blocks (gguf can dequantize but not quantize these): random codes and sub-scales,
    small finite fp16/fp32 super-block scales."""
    rng = np.random.default_rng(seed)
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) // block_elems
    blocks = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    if qtype == T.Q6_K:  # ... int8 sub-scales [192:208], fp16 d [208:210]
        blocks[:, 208:210] = (rng.uniform(1e-4, 1e-3, (n, 1)).astype(np.float16)).view(np.uint8)
    elif qtype == T.Q8_K:  # fp32 d, int8 codes, int16 sums
        blocks[:, 0:4] = rng.uniform(1e-4, 1e-3, (n, 1)).astype(np.float32).view(np.uint8)
    else:  # Q4_K / Q5_K: fp16 d, fp16 dmin first
        blocks[:, 0:4] = rng.uniform(1e-4, 1e-3, (n, 2)).astype(np.float16).view(np.uint8)
    return blocks.reshape(*shape[:-1], shape[-1] // block_elems * block_bytes)


def encode(qtype, x, seed):
    """GGUF data of fp32 `x` in `qtype`, and the fp32 weights it stands for (gguf's own dequantize)."""
    if qtype in (T.F32, T.F16):
        data = x.astype(np.float32 if qtype == T.F32 else np.float16)
        return data, data.astype(np.float32)
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K):
        data = k_quant_blocks(qtype, x.shape, seed)
    else:
        data = gguf.quants.quantize(x, qtype)
    if qtype == T.Q8_K:
        blocks = data.reshape(-1, 292)
        d = blocks[:, 0:4].copy().view(np.float32)
        values = (blocks[:, 4:260].view(np.int8).astype(np.float32) * d).reshape(x.shape)
    else:
        values = gguf.quants.dequantize(data, qtype).reshape(x.shape)
    return data, values


def write_gguf(path, types, layers=(0,), seed=0, split_max_tensors=0, extra=None):
    """blk.{L}.ffn_{p}_exps.weight for each layer; `types` maps projection -> GGUF type. Returns
    {layer: {projection: fp32 weights as gguf decodes them}}."""
    writer = gguf.GGUFWriter(str(path), "kt_test", split_max_tensors=split_max_tensors)
    truth = {}
    for layer in layers:
        truth[layer] = {}
        for i, (p, shape) in enumerate(SHAPES.items()):
            data, values = encode(types[p], random_weights(seed + 10 * layer + i, shape), seed + i)
            raw = types[p] if data.dtype == np.uint8 else None
            writer.add_tensor(f"blk.{layer}.ffn_{p}_exps.weight", data, raw_dtype=raw)
            truth[layer][p] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return truth


def load_gguf(path, **overrides):
    w = wrapper("LLAMAFILE", weight_path=str(path), **overrides)
    w.load_weights(torch.arange(E))
    return w


def packed_weights(w):
    parts = [unpack_experts(p) for p in w.experts_parts]
    return {
        "gate": torch.cat([p[0] for p in parts], 1).float(),
        "up": torch.cat([p[1] for p in parts], 1).float(),
        "down": torch.cat([p[2] for p in parts], 2).float(),
    }


def assert_forward_matches(w, truth, seed=1, tol=0.02):
    x, ids, weights = routing(seed)
    ref = reference(x, ids, weights, truth["gate"], truth["up"], truth["down"])
    assert rel_mae(w.forward(x, ids, weights), ref) <= tol


@pytest.mark.parametrize(
    "qtype,fmt",
    [
        (T.Q8_0, "int8_kgroup"),
        (T.Q4_0, "int4_kgroup"),
        (T.Q4_1, "int4_1_kgroup"),
        (T.Q8_K, "int8_kgroup"),
        (T.Q4_K, "int4_1_kgroup"),
    ],
)
def test_gguf_types_with_exact_codes(tmp_path, qtype, fmt):
    truth = write_gguf(tmp_path / "m.gguf", dict.fromkeys(SHAPES, qtype))[0]
    w = load_gguf(tmp_path / "m.gguf")
    assert w.weight_format == fmt
    got = packed_weights(w)
    for p in SHAPES:
        assert torch.equal(got[p], truth[p]), p
    assert_forward_matches(w, truth)


def test_gguf_block_decoding_matches_gguf_dequantize():
    """Our Q8_0 / Q4_0 / Q4_1 block readers against gguf's, on values with awkward signs and scales."""
    from kt_ops.weights.gguf import _decode

    x = random_weights(3, (2, 3, 64), scale=3.0)
    x[0, 0, :32] = 0.0  # an all-zero block (d = 0)
    x[1, 2, 32:] = -np.abs(x[1, 2, 32:])
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
        data = gguf.quants.quantize(x, qtype)
        decoded = _decode(data, qtype, (2, 3, 64))
        assert torch.equal(decoded.dequantized(), torch.from_numpy(gguf.quants.dequantize(data, qtype))), qtype.name


@pytest.mark.parametrize("qtype,fmt,tol", [(T.Q5_K, "int8_kgroup", 0.01), (T.Q6_K, "int8_kgroup", 0.01)])
def test_gguf_k_quants_are_requantized(tmp_path, qtype, fmt, tol):
    truth = write_gguf(tmp_path / "m.gguf", dict.fromkeys(SHAPES, qtype), seed=4)[0]
    w = load_gguf(tmp_path / "m.gguf")
    assert w.weight_format == fmt
    got = packed_weights(w)
    for p in SHAPES:
        assert rel_mae(got[p], truth[p]) <= tol, p
    assert_forward_matches(w, truth, tol=0.03)


@pytest.mark.parametrize(
    "types,fmt,exact",
    [
        ({"gate": T.F16, "up": T.F32, "down": T.F16}, "bf16", False),
        ({"gate": T.Q4_0, "up": T.Q4_0, "down": T.Q8_0}, "int8_kgroup", True),
        ({"gate": T.Q4_K, "up": T.Q4_K, "down": T.Q6_K}, "int8_kgroup", False),
        ({"gate": T.Q4_1, "up": T.Q4_1, "down": T.Q8_0}, "int8_kgroup", False),
        ({"gate": T.Q8_0, "up": T.F16, "down": T.Q4_1}, "bf16", False),
    ],
)
def test_gguf_mixed_types_share_one_format(tmp_path, types, fmt, exact):
    truth = write_gguf(tmp_path / "m.gguf", types, seed=5)[0]
    w = load_gguf(tmp_path / "m.gguf")
    assert w.weight_format == fmt
    got = packed_weights(w)
    for p in SHAPES:
        if exact:
            assert torch.equal(got[p], truth[p]), p
        elif fmt == "bf16":  # exactly the decoded values, rounded once to bf16
            assert torch.equal(got[p], truth[p].bfloat16().float()), p
        else:  # int8 requantization of 4-bit / 6-bit blocks
            assert rel_mae(got[p], truth[p]) <= 0.01, p
    assert_forward_matches(w, truth)


def test_gguf_bf16_tensors(tmp_path):
    bits = {
        p: torch.randn(SHAPES[p], generator=torch.Generator().manual_seed(i)).mul(0.05).bfloat16()
        for i, p in enumerate(SHAPES)
    }
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "kt_test")
    for p, t in bits.items():
        writer.add_tensor(
            f"blk.0.ffn_{p}_exps.weight",
            t.view(torch.int16).numpy().view(np.uint8).reshape(*t.shape[:-1], 2 * t.shape[-1]),
            raw_dtype=T.BF16,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    w = load_gguf(tmp_path / "m.gguf")
    got = packed_weights(w)
    assert w.weight_format == "bf16"
    assert all(torch.equal(got[p], bits[p].float()) for p in SHAPES)


def test_gguf_split_files_layers_map_and_subpools(tmp_path):
    """A directory of split files, the second layer, a permuted expert map and two sub-pools."""
    folder = tmp_path / "split"
    folder.mkdir()
    truth = write_gguf(
        folder / "model.gguf", dict.fromkeys(SHAPES, T.Q4_0), layers=(0, 1), seed=6, split_max_tensors=2
    )[1]
    assert len(list(folder.glob("*.gguf"))) == 3
    mapping = torch.tensor([2, 0, 3, 1])
    two = wrapper("LLAMAFILE", weight_path=str(folder), layer_idx=1, threadpool_count=2)
    two.load_weights(mapping)
    assert [p.intermediate_size for p in two.experts_parts] == [128, 128]
    got = packed_weights(two)
    for p in SHAPES:
        assert torch.equal(got[p], truth[p][mapping]), p
    x, ids, weights = routing(7)
    # ids name physical slots; slot p holds logical expert mapping[p]
    ref = reference(x, mapping[ids], weights, truth["gate"], truth["up"], truth["down"])
    assert rel_mae(two.forward(x, ids, weights), ref) <= 0.02


def test_gguf_errors(tmp_path):
    write_gguf(tmp_path / "q5.gguf", {"gate": T.Q5_0, "up": T.Q8_0, "down": T.Q8_0})
    with pytest.raises(ValueError, match=r"Q5_0.*supported: Q8_0"):
        load_gguf(tmp_path / "q5.gguf")
    write_gguf(tmp_path / "ok.gguf", dict.fromkeys(SHAPES, T.Q8_0))
    with pytest.raises(ValueError, match=r"blk\.3\.ffn_gate_exps\.weight.*layers with experts: \[0\]"):
        load_gguf(tmp_path / "ok.gguf", layer_idx=3)
    with pytest.raises(ValueError, match=r"shape \[4, 256, 256\].*built for \[4, 32, 256\]"):
        load_gguf(tmp_path / "ok.gguf", moe_intermediate_size=32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without .gguf files"):
        load_gguf(tmp_path / "empty")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    with pytest.raises(RuntimeError, match="weight_path is not set"):
        wrapper("LLAMAFILE").load_weights(torch.arange(E))


# ---- FP8 and RAWINT4 safetensors checkpoints ------------------------------------------------------


def save_experts(folder, layer, tensors_per_expert, shards=2):
    """{model.layers.L.mlp.experts.e.p_proj.suffix: tensor}, spread over `shards` files by expert."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    files = [{} for _ in range(shards)]
    for e, per_proj in enumerate(tensors_per_expert):
        for p, tensors in per_proj.items():
            for suffix, t in tensors.items():
                files[e % shards][f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.{suffix}"] = t.contiguous()
    for i, content in enumerate(files):
        save_file(content, str(folder / f"model-{i:05d}.safetensors"))


def fp8_checkpoint(folder, layer=0, seed=0):
    """DeepSeek-V3 style block-scaled fp8 experts; returns the fp32 weights they stand for."""
    gen = torch.Generator().manual_seed(seed)
    experts, truth = [], {p: [] for p in SHAPES}
    for e in range(E):
        per_proj = {}
        for p, (_, N, K) in SHAPES.items():
            scale_inv = torch.rand(N // 128, K // 128, generator=gen) * 1e-3 + 1e-4
            full = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)
            weight = (torch.randn(N, K, generator=gen) * 0.05 / full).to(torch.float8_e4m3fn)
            per_proj[p] = {"weight": weight, "weight_scale_inv": scale_inv}
            truth[p].append(weight.float() * full)
        experts.append(per_proj)
    save_experts(folder, layer, experts)
    return {p: torch.stack(v) for p, v in truth.items()}


def pack_int4(q):
    """compressed-tensors pack-quantized: 8 signed nibbles per int32, lowest first."""
    nibbles = (q.to(torch.int64) & 0xF).reshape(*q.shape[:-1], -1, 8)
    words = (nibbles << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def rawint4_checkpoint(folder, layer=0, seed=0, scale_dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    experts, truth = [], {p: [] for p in SHAPES}
    for e in range(E):
        per_proj = {}
        for p, (_, N, K) in SHAPES.items():
            q = torch.randint(-8, 8, (N, K), generator=gen)
            scale = ((torch.rand(N, K // 32, generator=gen) - 0.3) * 0.02).to(scale_dtype)  # some negative
            per_proj[p] = {"weight_packed": pack_int4(q), "weight_scale": scale, "weight_shape": torch.tensor([N, K])}
            truth[p].append(q.float() * scale.float().repeat_interleave(32, 1))
        experts.append(per_proj)
    save_experts(folder, layer, experts)
    return {p: torch.stack(v) for p, v in truth.items()}


def test_pack_int4_helper_roundtrip():
    q = torch.tensor([[-8, -1, 0, 1, 7, 3, -4, 5]])
    word = pack_int4(q)[0, 0].item() & 0xFFFFFFFF
    assert [((word >> (4 * i)) & 0xF) for i in range(8)] == [8, 15, 0, 1, 7, 3, 12, 5]


def test_fp8_checkpoint_requantized_to_int8_groups(tmp_path):
    truth = fp8_checkpoint(tmp_path / "fp8", layer=1)
    w = wrapper("FP8", weight_path=str(tmp_path / "fp8"), layer_idx=1)
    w.load_weights(torch.arange(E))
    assert type(w).__name__ == "NativeMoEWrapper" and w.weight_format == "int8_kgroup"
    got = packed_weights(w)
    assert all(rel_mae(got[p], truth[p]) <= 0.01 for p in SHAPES)
    assert_forward_matches(w, truth)


@pytest.mark.parametrize("scale_dtype,threadpool_count", [(torch.bfloat16, 1), (torch.float16, 2), (torch.float32, 1)])
def test_rawint4_checkpoint_packs_exactly(tmp_path, scale_dtype, threadpool_count):
    truth = rawint4_checkpoint(tmp_path / "int4", scale_dtype=scale_dtype)
    mapping = torch.tensor([1, 3, 0, 2])
    w = wrapper("RAWINT4", weight_path=str(tmp_path / "int4"), threadpool_count=threadpool_count)
    w.load_weights(mapping)
    assert w.weight_format == "int4_kgroup" and len(w.experts_parts) == threadpool_count
    got = packed_weights(w)
    for p in SHAPES:
        assert torch.equal(got[p], truth[p][mapping]), p
    x, ids, weights = routing(2)
    ref = reference(x, mapping[ids], weights, truth["gate"], truth["up"], truth["down"])
    assert rel_mae(w.forward(x, ids, weights), ref) <= 0.02


def test_native_checkpoint_errors(tmp_path):
    rawint4_checkpoint(tmp_path / "int4")
    with pytest.raises(ValueError, match=r"no FP8 experts for layer 0.*weight_scale_inv"):
        wrapper("FP8", weight_path=str(tmp_path / "int4")).load_weights(torch.arange(E))
    with pytest.raises(ValueError, match=r"experts\.4\.gate_proj.*num_experts"):
        wrapper("RAWINT4", weight_path=str(tmp_path / "int4"), num_experts=5).load_weights(torch.arange(5))
    with pytest.raises(ValueError, match=r"weight_shape is \[256, 256\].*built for \[128, 256\]"):
        wrapper("RAWINT4", weight_path=str(tmp_path / "int4"), moe_intermediate_size=128).load_weights(torch.arange(E))
    with pytest.raises(ValueError, match="moe_intermediate_size \\(96\\) must be a multiple of 128"):
        wrapper("FP8", weight_path=str(tmp_path / "int4"), moe_intermediate_size=96).load_weights(torch.arange(E))
    bad = tmp_path / "bf16_as_fp8"
    save_experts(
        bad,
        0,
        [
            {p: {"weight": torch.zeros(SHAPES[p][1:]), "weight_scale_inv": torch.ones(2, 2)} for p in SHAPES}
            for _ in range(E)
        ],
    )
    with pytest.raises(ValueError, match="must be float8_e4m3fn"):
        wrapper("FP8", weight_path=str(bad)).load_weights(torch.arange(E))
    with pytest.raises(FileNotFoundError):
        wrapper("RAWINT4", weight_path=str(tmp_path / "nowhere")).load_weights(torch.arange(E))
    from safetensors.torch import save_file

    save_file(
        {"model.layers.0.mlp.experts.0.gate_proj.weight_zero_point": torch.zeros(256, 8, dtype=torch.int32)},
        str(tmp_path / "int4" / "model-zp.safetensors"),
    )
    with pytest.raises(ValueError, match="asymmetric int4 is not supported"):
        wrapper("RAWINT4", weight_path=str(tmp_path / "int4")).load_weights(torch.arange(E))


# ---- deferred experts -----------------------------------------------------------------------------


def amx_pair(max_deferred, k=3, seed=30):
    """An AMXINT8 wrapper deferring up to `max_deferred` experts per token and a plain one, same weights."""
    gen = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(E, 32, 32, generator=gen) * 0.1 for _ in range(2))
    down = torch.randn(E, 32, 32, generator=gen) * 0.1
    made = []
    for deferred in (max_deferred, None):
        w = wrapper(
            "AMXINT8",
            num_experts_per_tok=k,
            hidden_size=32,
            moe_intermediate_size=32,
            max_deferred_experts_per_token=deferred,
        )
        w.load_weights_from_tensors(gate, up, down, torch.arange(E))
        made.append(w)
    return made


def test_select_deferred_experts_keeps_the_best_immediate():
    w = wrapper("AMXINT8", num_experts_per_tok=4, max_deferred_experts_per_token=2)
    ids = torch.tensor([[0, 1, 2, 3], [3, 2, -1, 0]])
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.5, 0.5, 0.0, 0.9]])
    immediate, deferred = w.select_deferred_experts(ids, scores, protected_k=1)
    # token 0: slot 1 protected, the two lowest of the rest (slots 3, 0) deferred;
    # token 1: slot 3 protected; lowest are slot 2 (a GPU expert, stays -1) and slot 1 (tie -> later slot)
    assert immediate.tolist() == [[-1, 1, 2, -1], [3, -1, -1, 0]]
    assert deferred.tolist() == [[0, -1, -1, 3], [-1, 2, -1, -1]]
    immediate, deferred = w.select_deferred_experts(ids, scores, protected_k=3)
    assert deferred.tolist() == [[0, -1, -1, -1], [-1, -1, -1, -1]]
    with pytest.raises(ValueError, match="protected_k \\(5\\) cannot exceed num_experts_per_tok \\(4\\)"):
        w.select_deferred_experts(ids, scores, protected_k=5)
    with pytest.raises(ValueError, match="scores must be a tensor shaped like expert_ids"):
        w.select_deferred_experts(ids, scores[:, :2], protected_k=1)


def test_deferred_contribution_arrives_with_the_next_call():
    deferring, plain = amx_pair(max_deferred=2)
    x1, ids1, w1 = routing(40, qlen=5, k=3)
    x2, ids2, w2 = routing(41, qlen=5, k=3)
    x1, x2 = x1[:, :32].contiguous(), x2[:, :32].contiguous()
    imm1, def1 = deferring.select_deferred_experts(ids1, w1, protected_k=1)
    imm2, def2 = deferring.select_deferred_experts(ids2, w2, protected_k=1)
    assert (def1 >= 0).sum(1).tolist() == [2] * 5

    out1 = deferring.forward(x1, ids1, w1)  # protected_k defaults to k - max_deferred = 1
    out2 = deferring.forward(x2, ids2, w2)
    owed2 = deferring.flush_deferred(x2)
    assert deferring.flush_deferred() is None

    assert torch.equal(out1, plain.forward(x1, imm1, w1))
    deferred1 = plain.forward(x1, def1, w1)
    assert torch.equal(out2, plain.forward(x2, imm2, w2) + deferred1)
    assert torch.equal(owed2, plain.forward(x2, def2, w2))
    # what a call returns plus what the next one brings = the full MoE output of its tokens (up to the
    # kernel's choice of int8-direct or bf16-panel path, which depends on how many rows an expert gets:
    # the direct path quantizes activations to int8, each off by up to max|x| / 254 (kernels/quant.h),
    # about 1% of these 32-wide projections, against 2^-9 per weight on the panel path)
    assert_tight("call 1", out1 + deferred1, plain.forward(x1, ids1, w1), rtol=2e-2)
    assert_tight("call 2", out2 - deferred1 + owed2, plain.forward(x2, ids2, w2), rtol=2e-2)


def test_deferred_submit_sync_and_qlen_change():
    deferring, plain = amx_pair(max_deferred=1, k=2)
    x, ids, w = routing(42, qlen=4)
    x = x[:, :32].contiguous()
    deferring.submit_forward(x, ids, w, protected_k=2)  # nothing deferred in this call
    assert torch.equal(deferring.sync_forward(x), plain.forward(x, ids, w))
    deferring.forward(x, ids, w)
    with pytest.raises(ValueError, match="cover 4 tokens but this call has 2.*flush_deferred"):
        deferring.forward(x[:2], ids[:2], w[:2])
    imm, dfr = deferring.select_deferred_experts(ids, w, protected_k=1)
    # the failed call's output is still collectable once the owed contribution is taken
    owed = deferring.flush_deferred()
    assert torch.equal(owed, plain.forward(x, dfr, w))
    assert torch.equal(deferring.sync_forward(x[:2]), plain.forward(x[:2], imm[:2], w[:2]))
    deferring.flush_deferred()


def test_deferred_config_errors():
    with pytest.raises(ValueError, match="max_deferred_experts_per_token \\(2\\) must be below num_experts_per_tok"):
        wrapper("AMXINT8", max_deferred_experts_per_token=2)
    with pytest.raises(ValueError, match="max_deferred_experts_per_token must be >= 0"):
        wrapper("AMXINT8", max_deferred_experts_per_token=-1)
    plain = amx_pair(max_deferred=None, k=2)[1]
    with pytest.raises(ValueError, match="protected_k needs deferred experts"):
        plain.forward(torch.zeros(1, 32), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), protected_k=1)


@pytest.mark.parametrize("method", ["LLAMAFILE", "FP8", "RAWINT4"])
def test_checkpoint_methods_refuse_cpu_save(method):
    with pytest.raises(ValueError, match="cpu_save=True is for the AMX methods"):
        wrapper(method, weight_path="model.gguf", cpu_save=True)


@pytest.mark.parametrize(
    "method,fmt", [("LLAMAFILE", "int8_kgroup"), ("FP8", "int8_kgroup"), ("RAWINT4", "int4_kgroup")]
)
def test_checkpoint_methods_also_quantize_online(method, fmt):
    gen = torch.Generator().manual_seed(50)
    weights = [torch.randn(s, generator=gen) * 0.05 for s in ((E, 128, 128),) * 3]
    w = wrapper(method, hidden_size=128, moe_intermediate_size=128)
    w.load_weights_from_tensors(*weights, torch.arange(E))
    assert w.weight_format == fmt
    x, ids, topk = routing(51)
    x = x[:, :128].contiguous()
    zeros = [torch.zeros(s) for s in ((E, 0, 128), (E, 128, 0)) * 2 + ((E, 0, 128), (E, 128, 0))]
    stored = unpack_experts(w.experts_parts[0])
    assert all(rel_mae(s, t) <= (0.01 if fmt == "int8_kgroup" else 0.12) for s, t in zip(stored, weights))
    ref = moe_sft_reference(
        x.double(), ids, topk.double(), *(t.double() for t in stored), *zeros, 0.0, compute_dtype=torch.float64
    )
    assert rel_mae(w.forward(x, ids, topk), ref) <= 0.02


def test_gguf_decoding_in_expert_chunks_changes_nothing(tmp_path):
    from kt_ops.weights.gguf import GGUFLoader

    write_gguf(tmp_path / "m.gguf", {"gate": T.Q4_K, "up": T.Q4_0, "down": T.Q6_K}, seed=8)
    loader = GGUFLoader(str(tmp_path / "m.gguf"))
    whole = loader.load_layer(0, E, H, I)[0]
    one_by_one = loader.load_layer(0, E, H, I, chunk_elements=1)[0]
    for name in ("gate", "up", "down", "gate_scale", "up_scale", "down_scale"):
        assert torch.equal(getattr(whole, name), getattr(one_by_one, name)), name
