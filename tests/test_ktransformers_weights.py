"""KTransformers' converted CPU weights (kt-kernel convert_cpu_weights.py, AMX INT8 / INT4, NUMA-split
or not) read by kt_ops, and the kt-kernel API names kt_ops provides for code written for kt-kernel."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import kt_ops
from kt_testing import assert_rel_mae
from kt_ops.core.packed import unpack_experts
from kt_ops.utils.loader import BF16SafeTensorLoader, SafeTensorLoader
from kt_ops.weights import ktransformers as ktw

E, H, I, K = 4, 256, 256, 2


def weights(seed=0, E=E, H=H, I=I):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(E, I, H, generator=g) * 0.05).bfloat16()
    up = (torch.randn(E, I, H, generator=g) * 0.05).bfloat16()
    down = (torch.randn(E, H, I, generator=g) * 0.05).bfloat16()
    gate[0, 3] = 0  # an all-zero row: scale 0
    return gate, up, down


def reference_quant(w, method):
    """kt-kernel's per-row quantization written out plainly: the fp32 values the codes stand for."""
    w = w.float()
    d = w.abs().amax(-1) / (127.0 if method == "INT8" else 112.0)
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.round(w * inv[..., None]).clamp(-128, 127)
    if method == "INT4":
        q = torch.sign(q) * torch.div(q.abs() + 8, 16, rounding_mode="floor") * 16
    return q * d[..., None]


def reference_values(gate, up, down, method, parts):
    """Each NUMA part quantized on its own, as kt-kernel does."""
    Ip = gate.shape[1] // parts
    sl = [slice(p * Ip, (p + 1) * Ip) for p in range(parts)]
    return (
        torch.cat([reference_quant(gate[:, s], method) for s in sl], 1),
        torch.cat([reference_quant(up[:, s], method) for s in sl], 1),
        torch.cat([reference_quant(down[:, :, s], method) for s in sl], 2),
    )


def write_kt_dir(path, method, parts, layers=(0, 1), seed=0):
    """A directory laid out like convert_cpu_weights.py's output: one shard per layer, then one
    with the renamed non-expert tensors, and the index."""
    os.makedirs(path, exist_ok=True)
    truth, weight_map = {}, {}
    shards = len(layers) + 1
    for i, layer in enumerate(layers):
        gate, up, down = weights(seed + layer)
        truth[layer] = reference_values(gate, up, down, method, parts)
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = ktw.convert_layer(gate, up, down, layer, method, parts)
        save_file(tensors, os.path.join(path, name))
        weight_map.update(dict.fromkeys(tensors, name))
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    other = {"embed_tokens.weight": torch.zeros(8, H), "blk.0.self_attn.q_proj.weight": torch.zeros(H, H)}
    save_file(other, os.path.join(path, name))
    weight_map.update(dict.fromkeys(other, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return truth


def byte_offset(r, c, n, kb, method):
    """kt-kernel BufferB's address arithmetic for byte column c of row r, literally."""
    n_block = ktw.N_BLOCK[method]
    k_block = 3584 if method == "INT8" else 1792
    nb0 = r // n_block * n_block
    nbs = min(n_block, n - nb0)
    kb0 = c // k_block * k_block
    kbs = min(k_block, kb - kb0)
    n_begin = (r - nb0) // 32 * 32
    k_begin = (c - kb0) // 64 * 64
    i, j = (r - nb0) % 32, (c - kb0) % 64
    tile = nb0 * kb + kb0 * nbs + n_begin * kbs + k_begin * 32
    half, ii = divmod(i, 16)
    return tile + half * 1024 + (j // 4) * 64 + ii * 4 + j % 4  # after transpose_16x16_32bit


@pytest.mark.parametrize("method,n,kb", [("INT8", 96, 3712), ("INT4", 160, 1856)])
def test_layout_matches_kt_kernel_address_arithmetic(method, n, kb):
    """Partial row blocks and a k split over two K_BLOCKs, against the index formula of from_mat."""
    g = torch.Generator().manual_seed(0)
    byte_matrix = torch.randint(0, 256, (n, kb), generator=g, dtype=torch.int32).to(torch.uint8)
    stored = ktw.pack_layout(byte_matrix, method)
    rows = torch.arange(n).repeat_interleave(kb)
    cols = torch.arange(kb).repeat(n)
    sample = torch.randint(0, n * kb, (4000,), generator=g)
    for idx in sample.tolist():
        r, c = rows[idx].item(), cols[idx].item()
        assert stored[byte_offset(r, c, n, kb, method)] == byte_matrix[r, c]
    assert torch.equal(ktw.unpack_layout(stored, n, kb, method), byte_matrix)


@pytest.mark.parametrize("method", ["INT8", "INT4"])
def test_quantize_then_dequantize_is_kt_kernels_rule(method):
    w = (torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.1).bfloat16()
    stored, scale = ktw.quantize(w, method)
    assert stored.dtype == torch.int8 and scale.dtype == torch.float32
    assert stored.numel() == 64 * 256 // (1 if method == "INT8" else 2)
    assert torch.equal(ktw.dequantize(stored, scale, 64, 256, method), reference_quant(w, method))
    if method == "INT4":
        assert 0 < ktw.codes(stored, 64, 256, method).abs().max() <= 8


@pytest.mark.parametrize("method", ["INT8", "INT4"])
@pytest.mark.parametrize("parts", [1, 2])
def test_directory_reads_as_packed_experts_equal_to_dequantized_reference(tmp_path, method, parts):
    truth = write_kt_dir(tmp_path, method, parts)
    loader = SafeTensorLoader(str(tmp_path))
    assert loader.layers() == [0, 1]
    for layer in (0, 1):
        packed = loader.load_packed(layer)
        assert (
            packed.weight_format
            == {("INT8", 1): "int8", ("INT4", 1): "int4", ("INT8", 2): "int8_kgroup", ("INT4", 2): "int4_kgroup"}[
                (method, parts)
            ]
        )
        for got, want in zip(unpack_experts(packed), truth[layer]):
            assert torch.equal(got, want)
    # kt-kernel's load_experts shape: [numa part][expert]
    experts = loader.load_experts("blk.1")
    assert len(experts["gate"]) == parts and len(experts["down_scale"][0]) == E
    assert experts["down_scale"][0][0].shape == (H,)


def sft_wrapper(method, **kw):
    args = dict(
        layer_idx=0,
        num_experts=E,
        num_experts_per_tok=K,
        hidden_size=H,
        moe_intermediate_size=I,
        num_gpu_experts=0,
        cpuinfer_threads=1,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=64,
        mode="sft",
        method=method,
        lora_rank=4,
        lora_alpha=8.0,
    )
    args.update(kw)
    args["cpuinfer_threads"] = args["threadpool_count"]
    return kt_ops.KTMoEWrapper(**args)


def routing(T=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return x, ids, w


def lora(seed=5):
    g = torch.Generator().manual_seed(seed)
    shapes = ((E, 4, H), (E, I, 4), (E, 4, H), (E, I, 4), (E, 4, I), (E, H, 4))
    return [torch.randn(s, generator=g) * 0.05 for s in shapes]


def run_sft(w, loras):
    w.init_lora_weights(*loras)
    x, ids, weights_ = routing()
    y = w.forward_sft(x, ids, weights_)
    grad_x, grads = w.backward(torch.ones_like(y))
    return y.float(), grad_x.float(), grads


@pytest.mark.parametrize(
    "method,parts,pools", [("INT8", 1, 1), ("INT8", 2, 2), ("INT8", 2, 1), ("INT4", 2, 2), ("INT4", 1, 1)]
)
def test_sft_wrapper_trains_on_kt_directory(tmp_path, method, parts, pools):
    truth = write_kt_dir(tmp_path, method, parts, layers=(0,))
    perm = torch.tensor([2, 0, 3, 1])
    w = sft_wrapper(f"AMX{method}_SFT", weight_path=str(tmp_path), threadpool_count=pools)
    w.load_weights(perm)
    # reference: the dequantized values as bf16 experts, same permutation and pools. The quantized
    # layer multiplies the same values rounded to bf16, or (fp32 ISAs, an expert's few rows) the exact
    # ones: within 1e-2 relative mean error (measured ~3e-3), where a wrong expert order gives ~0.7.
    ref = sft_wrapper("AMXBF16_SFT", threadpool_count=pools)
    ref.load_weights_from_tensors(*(t.bfloat16() for t in truth[0]), perm)
    loras = lora()
    y, gx, grads = run_sft(w, loras)
    y_ref, gx_ref, grads_ref = run_sft(ref, loras)
    assert_rel_mae("output", y, y_ref, 1e-2)
    assert_rel_mae("grad hidden_states", gx, gx_ref, 1e-2)
    for name in grads_ref:
        assert_rel_mae(name, grads[name], grads_ref[name], 1e-2)


def test_kt_directory_repacked_for_another_numa_split_warns(tmp_path):
    write_kt_dir(tmp_path, "INT8", 2, layers=(0,))
    w = sft_wrapper("AMXINT8_SFT", weight_path=str(tmp_path), threadpool_count=4)
    with pytest.warns(RuntimeWarning, match="requantizes"):
        w.load_weights(torch.arange(E))
    assert len(w.experts_parts) == 4


def test_wrong_method_for_kt_directory_is_named(tmp_path):
    write_kt_dir(tmp_path, "INT8", 1, layers=(0,))
    with pytest.raises(ValueError, match="KTransformers INT8.*AMXINT8_SFT"):
        sft_wrapper("AMXINT4_SFT", weight_path=str(tmp_path)).load_weights(torch.arange(E))
    with pytest.raises(ValueError, match=r"\(num_experts, hidden_size, intermediate_size\)"):
        sft_wrapper("AMXINT8_SFT", weight_path=str(tmp_path), num_experts=8).load_weights(torch.arange(8))


def test_inference_wrapper_reads_kt_directory(tmp_path):
    truth = write_kt_dir(tmp_path, "INT4", 2, layers=(0, 1))
    w = kt_ops.KTMoEWrapper(
        layer_idx=1,
        num_experts=E,
        num_experts_per_tok=K,
        hidden_size=H,
        moe_intermediate_size=I,
        num_gpu_experts=0,
        cpuinfer_threads=2,
        threadpool_count=2,
        weight_path=str(tmp_path),
        chunked_prefill_size=64,
        method="AMXINT4",
    )
    w.load_weights()  # no map: identity, as kt-kernel
    x, ids, weights_ = routing()
    ref = kt_ops.KTMoEWrapper(
        layer_idx=1,
        num_experts=E,
        num_experts_per_tok=K,
        hidden_size=H,
        moe_intermediate_size=I,
        num_gpu_experts=0,
        cpuinfer_threads=2,
        threadpool_count=2,
        weight_path=None,
        chunked_prefill_size=64,
        mode="sft",
        method="AMXBF16_SFT",
        lora_rank=1,
    )
    ref.load_weights_from_tensors(*(t.bfloat16() for t in truth[1]), torch.arange(E))
    torch.testing.assert_close(
        w.forward(x, ids, weights_).float(),
        ref.forward_sft(x, ids, weights_, save_for_backward=False).float(),
        rtol=1e-2,
        atol=1e-2,
    )


def test_unmerged_kt_folders_are_read(tmp_path):
    """--no-merge-safetensor keeps kt-kernel's raw files: _layer_L/_numa_N/INT8_gate_E_<bytes>Byte_quant_.kt."""
    gate, up, down = weights(7)
    tensors = ktw.convert_layer(gate, up, down, 3, "INT8", 2)
    for key, t in tensors.items():
        m = ktw.WEIGHT_KEY.fullmatch(key)
        proj, e, part, kind = m.group(2), m.group(3), m.group(4), m.group(5)
        folder = tmp_path / "_layer_3" / f"_numa_{part}"
        folder.mkdir(parents=True, exist_ok=True)
        nbytes = t.numel() * t.element_size()
        suffix = "quant" if kind == "weight" else "scale"
        t.numpy().tofile(folder / f"INT8_{proj}_{e}_{nbytes}Byte_{suffix}_.kt")
    w = sft_wrapper("AMXINT8_SFT", weight_path=str(tmp_path), layer_idx=3, threadpool_count=2)
    w.load_weights(torch.arange(E))
    want = reference_values(gate, up, down, "INT8", 2)
    got = [torch.cat([unpack_experts(p)[i] for p in w.experts_parts], 1 if i < 2 else 2) for i in range(3)]
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)


def test_awq_directory_is_refused(tmp_path):
    save_file(
        {
            "blk.0.ffn_gate_exps.0.numa.0.weight": torch.zeros(8, dtype=torch.int32),
            "blk.0.ffn_gate_exps.0.numa.0.qzeros": torch.zeros(8, dtype=torch.int32),
        },
        str(tmp_path / "a.safetensors"),
    )
    with pytest.raises(ValueError, match="AWQ"):
        SafeTensorLoader(str(tmp_path)).layers()


def test_mistral_expert_keys_are_read(tmp_path):
    gate, up, down = weights(2)
    tensors = {}
    for e in range(E):
        tensors.update(
            {
                f"model.layers.0.experts.{e}.w1.weight": gate[e],
                f"model.layers.0.experts.{e}.w3.weight": up[e],
                f"model.layers.0.experts.{e}.w2.weight": down[e],
            }
        )
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loader = BF16SafeTensorLoader(str(tmp_path))
    assert loader.layers() == [0]
    for got, want in zip(loader.load_stacked("model.layers.0"), (gate, up, down)):
        assert torch.equal(got, want)


# ---- kt-kernel API names ----------------------------------------------------------------------------


def test_load_weights_after_tensors_with_map_is_a_no_op():
    gate, up, down = weights(3)
    w = sft_wrapper("AMXBF16_SFT")
    perm = torch.tensor([1, 0, 3, 2])
    w.load_weights_from_tensors(gate, up, down, perm)
    parts = w.experts_parts
    w.load_weights(perm)  # the specification's tensor mode: load_weights_from_tensors, then load_weights
    assert w.experts_parts is parts
    # without a map the tensors wait for load_weights(map), as before
    w2 = sft_wrapper("AMXBF16_SFT")
    w2.load_weights_from_tensors(gate, up, down)
    w2.load_weights(perm)
    for a, b in zip(unpack_experts(w2.experts_parts[0]), unpack_experts(parts[0])):
        assert torch.equal(a, b)


def base_only_backward(gate, up, down, loras, scaling, x, ids, w, dy):
    """SkipLoRA's gradient in plain PyTorch: the pre-activations of the LoRA forward, the gradient
    through the base weights only."""
    ga, gb, ua, ub, _, _ = (t.float() for t in loras)
    x, dx = x.float(), torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g = x[t] @ gate[e].float().T + scaling * (x[t] @ ga[e].T) @ gb[e].T
            u = x[t] @ up[e].float().T + scaling * (x[t] @ ua[e].T) @ ub[e].T
            dh = (w[t, j] * dy[t].float()) @ down[e].float()
            sig = torch.sigmoid(g)
            dg, du = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
            dx[t] += dg @ gate[e].float() + du @ up[e].float()
    return dx


@pytest.mark.parametrize("pools", [1, 2])
def test_skip_lora_forward_has_lora_backward_has_base_only(pools):
    """kt-kernel's SkipLoRA: the forward with LoRA, grad_input through the base weights, zero LoRA
    gradients."""
    gate, up, down = weights(4)
    skip = sft_wrapper("AMXBF16_SFT_SkipLoRA", threadpool_count=pools)
    skip.load_weights_from_tensors(gate, up, down, torch.arange(E))
    ref = sft_wrapper("AMXBF16_SFT", threadpool_count=pools)
    ref.load_weights_from_tensors(gate, up, down, torch.arange(E))
    loras = lora()
    y, grad_x, grads = run_sft(skip, loras)
    y_ref, gx_with_lora, grads_ref = run_sft(ref, loras)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    x, ids, w = routing()
    want = base_only_backward(gate, up, down, loras, 2.0, x, ids, w, torch.ones(x.shape))
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(grad_x, want) < 0.01 < rel(gx_with_lora, want)  # bf16 rounding; the LoRA terms are visible
    for name in ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b"):
        assert not grads[f"grad_{name}"].any() and grads_ref[f"grad_{name}"].any(), name


def test_skip_lora_without_lora_is_the_frozen_base():
    gate, up, down = weights(4)
    skip = sft_wrapper("AMXBF16_SFT_SkipLoRA")
    skip.load_weights_from_tensors(gate, up, down, torch.arange(E))
    x, ids, weights_ = routing()
    y = skip.forward_sft(x, ids, weights_)  # no init_lora_weights needed
    grad_x, grads = skip.backward(torch.ones_like(y))
    assert all(not g.any() for name, g in grads.items() if name != "grad_weights")
    ref = sft_wrapper("AMXBF16_SFT")
    ref.load_weights_from_tensors(gate, up, down, torch.arange(E))
    loras = lora()
    for i in (1, 3, 5):
        loras[i].zero_()
    y_ref, gx_ref, grads_ref = run_sft(ref, loras)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x.float(), gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["grad_weights"], grads_ref["grad_weights"], rtol=1e-5, atol=1e-5)


def test_skip_lora_methods_exist_for_every_sft_method():
    for method in kt_ops.SFT_METHODS:  # the weight-format methods (the checkpoint ones have none)
        assert method in kt_ops.KTMoEWrapper.SFT_METHODS
        assert method + "_SkipLoRA" in kt_ops.KTMoEWrapper.SFT_METHODS


def test_capture_batch_sizes_bound_the_sft_buffer_cache():
    from kt_ops.experts_sft import KExpertsSFTBuffer

    W = kt_ops.KTMoEWrapper
    old = W.get_capture_batch_sizes()
    try:
        W.clear_buffer_cache()
        W.set_capture_batch_sizes([8])
        assert W.get_capture_batch_sizes() == [8]
        for qlen in (8, 3, 5, 7):
            KExpertsSFTBuffer.get_buffer(qlen, H, I, E, K, 4)
        assert sorted(k[0] for k in KExpertsSFTBuffer.capture_buffers) == [7, 8]
        W.clear_buffer_cache()
        assert not KExpertsSFTBuffer.capture_buffers
        with pytest.raises(ValueError, match="capture_bs"):
            W.set_capture_batch_sizes([0])
    finally:
        W.set_capture_batch_sizes(old)


def test_llamafile_load_weights_map_is_optional(tmp_path):
    from test_inference import E as GE, write_gguf, wrapper
    import gguf

    write_gguf(tmp_path / "m.gguf", dict.fromkeys(("gate", "up", "down"), gguf.GGMLQuantizationType.Q8_0))
    a = wrapper("LLAMAFILE", weight_path=str(tmp_path / "m.gguf"))
    a.load_weights()
    b = wrapper("LLAMAFILE", weight_path=str(tmp_path / "m.gguf"))
    b.load_weights(torch.arange(GE))
    assert torch.equal(a.experts_parts[0].gate, b.experts_parts[0].gate)
