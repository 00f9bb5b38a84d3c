"""kt-kernel 0.7's wrapper API on kt_ops: the constructor (0.7's signature and the specification's),
the SFT protocol (forward / backward with gradient buffers, optimizer_grad_scale, accumulation
across micro-batches, authoritative optimizer gradients, async backward, the checkpoint cache),
full-weight fine-tuning against torch.autograd, and the checkpoint-native bases (RAWINT4, MXFP4,
block FP8) against the reference on their dequantized values."""

import math

import pytest
import torch
from safetensors.torch import save_file

import kt_ops
from kt_ops import KTMoEWrapper
from kt_ops.experts_base import generate_gpu_experts_masks
from kt_ops.reference import moe_sft_reference
from kt_ops.sft.weights import RAWINT4ExpertWeights
from kt_testing import LORA_NAMES, make_case, rel_l2, rel_mae, run_ops

pytestmark = [
    pytest.mark.filterwarnings("ignore:the process.s CPUInfer already exists"),
    pytest.mark.filterwarnings("ignore:cpuinfer_threads asks for"),
]


def sft(case, method="AMXBF16_SFT", **kwargs):
    E, I, H = case.gate.shape
    args = dict(
        layer_idx=0,
        num_experts=E,
        num_experts_per_tok=case.k,
        hidden_size=H,
        moe_intermediate_size=I,
        gpu_experts_mask=None,
        cpuinfer_threads=1,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=64,
        mode="sft",
        method=method,
        lora_rank=case.r,
        lora_alpha=case.scaling * case.r,
    )
    args.update(kwargs)
    return KTMoEWrapper(**args)


def lora_and_buffers(case, parameters=True):
    weights = [t.detach().clone().contiguous() for t in case.lora]
    if parameters:
        weights = [torch.nn.Parameter(t) for t in weights]
    return weights, [torch.zeros_like(t) for t in weights]


# ---- the constructor ---------------------------------------------------------------------------


def test_positional_07_signature_and_the_specifications_calls_build_the_same_wrapper():
    case = make_case(seed=1, E=4, H=32, I=32)
    mask = torch.tensor([True, False, False, False])
    newer = KTMoEWrapper(0, 4, 2, 32, 32, mask, 1, 1, None, 64, False, None, "AMXINT8")
    older = KTMoEWrapper(0, 4, 2, 32, 32, 1, 1, 1, None, 64, method="AMXINT8")
    keyword = KTMoEWrapper(
        layer_idx=0,
        num_experts=4,
        num_experts_per_tok=2,
        hidden_size=32,
        moe_intermediate_size=32,
        num_gpu_experts=1,
        cpuinfer_threads=1,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=64,
        method="AMXINT8",
    )
    outputs = []
    for wrapper in (newer, older, keyword):
        assert torch.equal(wrapper.gpu_experts_mask, mask) and wrapper.num_gpu_experts == 1
        wrapper.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
        outputs.append(wrapper.forward(case.hidden, case.ids, case.weights))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="NVFP4"), ValueError, r"kt-kernel method kt_ops does not compute\). Supported methods: \["),
        (dict(gpu_experts_mask=2, num_gpu_experts=1), ValueError, "num_gpu_experts is given twice"),
        (dict(gpu_experts_mask=torch.zeros(3, dtype=torch.bool)), ValueError, r"shape \[4\]"),
        (dict(numa_nodes="sft"), TypeError, "pass mode= by keyword"),
        (dict(mode="sft", method="AMXBF16_SFT", lora_dropout=0.1), ValueError, "no LoRA dropout"),
        (dict(mode="sft", method="AMXINT8_SFT", full_weight_grad=True), ValueError, "AMXBF16_SFT"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    base = dict(
        layer_idx=0,
        num_experts=4,
        num_experts_per_tok=2,
        hidden_size=32,
        moe_intermediate_size=32,
        gpu_experts_mask=None,
        cpuinfer_threads=1,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=64,
    )
    with pytest.raises(error, match=match):
        KTMoEWrapper(**{**base, **kwargs})


def test_bf16_inference_reads_a_checkpoint(tmp_path):
    case = make_case(seed=2, E=4, H=32, I=32)
    tensors = {}
    for e in range(4):
        for name, w in (("gate_proj", case.gate), ("up_proj", case.up), ("down_proj", case.down)):
            tensors[f"model.layers.0.mlp.experts.{e}.{name}.weight"] = w[e].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    args = (0, 4, 2, 32, 32, None, 1, 1)
    from_file = KTMoEWrapper(*args, str(tmp_path), 64, method="BF16")
    from_file.load_weights(torch.arange(4))
    from_tensors = KTMoEWrapper(*args, None, 64, method="BF16")
    from_tensors.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
    out = from_file.forward(case.hidden, case.ids, case.weights)
    assert torch.equal(out, from_tensors.forward(case.hidden, case.ids, case.weights))
    zeros = [torch.zeros_like(t) for t in case.lora]
    want = moe_sft_reference(case.hidden, case.ids, case.weights, *case.base(), *zeros, 0.0)
    assert rel_l2(out, want) < 1e-2  # the kernel rounds activations to bf16 on AMX


def test_gpu_experts_masks_pick_the_most_activated_experts_across_layers():
    freq = torch.tensor([[0.1, 0.5, 0.3, 0.8], [0.2, 0.4, 0.9, 0.1]])
    masks = generate_gpu_experts_masks(freq, 3)
    assert masks.dtype == torch.bool and masks.tolist() == [[False, True, False, True], [False, False, True, False]]
    assert generate_gpu_experts_masks(freq, -1).sum() == 0 and generate_gpu_experts_masks(freq, 99).sum() == 8


# ---- kt-kernel 0.7's SFT protocol ----------------------------------------------------------------


def test_gradients_go_to_the_buffers_and_accumulate_over_micro_batches():
    """With authoritative gradients (AMXBF16_SFT, every expert on the CPU) the first backward after
    an optimizer step overwrites the buffers, the next ones add, each scaled by optimizer_grad_scale,
    and Parameter.grad is the buffer until release."""
    a = make_case(seed=3, T=6, E=4, H=32, I=32)
    b = make_case(seed=4, T=5, E=4, H=32, I=32)
    b = type(a)(**{**b.__dict__, "lora": a.lora, "gate": a.gate, "up": a.up, "down": a.down})
    wrapper = sft(a, max_cache_depth=2)
    assert wrapper._uses_authoritative_optimizer_grads
    wrapper.load_weights_from_tensors(a.gate, a.up, a.down, torch.arange(4))
    params, buffers = lora_and_buffers(a)
    wrapper.init_lora_weights(*params, *buffers)
    assert all(p.grad is None for p in params)
    for case in (a, b):
        wrapper.forward(case.hidden, case.ids, case.weights)
    grad_x_b, grad_w_b = wrapper.backward(b.grad_out, optimizer_grad_scale=0.5)
    grad_x_a, _ = wrapper.backward(a.grad_out, optimizer_grad_scale=0.5, cache_idx=0)
    assert all(p.grad is g for p, g in zip(params, buffers))
    ref_a, ref_b = run_ops(a)[1], run_ops(b)[1]
    torch.testing.assert_close(grad_x_a, ref_a[0])
    torch.testing.assert_close(grad_x_b, ref_b[0])
    torch.testing.assert_close(grad_w_b, ref_b[1].float())
    for buffer, ga, gb in zip(buffers, ref_a[2:], ref_b[2:]):
        torch.testing.assert_close(buffer, 0.5 * (ga + gb), rtol=1e-5, atol=1e-6)
    wrapper.release_authoritative_optimizer_grads()
    assert all(p.grad is None for p in params)
    wrapper.forward(a.hidden, a.ids, a.weights)
    wrapper.backward(a.grad_out)  # the window was closed: this one overwrites
    for buffer, ga in zip(buffers, ref_a[2:]):
        torch.testing.assert_close(buffer, ga, rtol=1e-5, atol=1e-6)


def test_async_backward_and_refused_backwards():
    case = make_case(seed=5, T=4, E=4, H=32, I=32)
    wrapper = sft(case)
    wrapper.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
    params, buffers = lora_and_buffers(case)
    wrapper.init_lora_weights(*params, *buffers)
    wrapper.submit_forward(case.hidden, case.ids, case.weights)
    out = wrapper.sync_forward()
    torch.testing.assert_close(out, run_ops(case, with_grads=False)[0])
    wrapper.submit_backward_async(case.grad_out)
    with pytest.raises(RuntimeError, match="already pending"):
        wrapper.backward(case.grad_out)
    grad_x, _ = wrapper.sync_backward()
    torch.testing.assert_close(grad_x, run_ops(case)[1][0])
    wrapper.forward(case.hidden, case.ids, case.weights)
    with pytest.raises(ValueError, match="finite and positive"):
        wrapper.backward(case.grad_out, optimizer_grad_scale=math.inf)
    kept = [b.clone() for b in buffers[1:]]
    buffers[0].data = torch.zeros_like(buffers[0])  # a replaced buffer is refused, not written blindly
    with pytest.raises(RuntimeError, match="metadata changed"):
        wrapper.backward(case.grad_out)
    assert all(torch.equal(b, k) for b, k in zip(buffers[1:], kept))


def test_the_specifications_calls_answer_in_its_form_with_preallocated_buffers():
    case = make_case(seed=6, T=4, E=4, H=32, I=32)
    wrapper = sft(case)
    wrapper.load_weights_from_tensors(case.gate, case.up, case.down)
    wrapper.load_weights(torch.arange(4))
    wrapper.init_lora_weights(*case.lora)
    held = kt_ops.KExpertsSFTBuffer.get_buffer(4, 32, 32, 4, 2, case.r, torch.float32)
    wrapper.forward_sft(case.hidden, case.ids, case.weights)
    grad_x, grads = wrapper.backward(case.grad_out)
    assert grads["grad_gate_lora_a"] is wrapper.grad_gate_lora_a
    assert held.get_lora_grads()["grad_gate_lora_a"] is wrapper.grad_gate_lora_a
    for name, want in zip(LORA_NAMES, run_ops(case)[1][2:]):
        torch.testing.assert_close(grads[f"grad_{name}"], want)


def test_checkpoint_output_cache_is_ready_then_empty_and_poisoned_for_good():
    case = make_case(seed=7, T=3, E=4, H=32, I=32)
    wrapper = sft(case)
    wrapper.cache_checkpoint_output(case.hidden, 3)
    assert wrapper._kt_has_cached_forward and torch.equal(wrapper.get_checkpoint_output(3), case.hidden)
    wrapper.clear_checkpoint_output()
    wrapper.cache_checkpoint_output(case.hidden, 3)
    with pytest.raises(RuntimeError, match="qlen mismatch"):
        wrapper.get_checkpoint_output(2)
    wrapper.clear_checkpoint_output()
    with pytest.raises(RuntimeError, match="poisoned"):
        wrapper.cache_checkpoint_output(case.hidden, 3)


# ---- full-weight fine-tuning -------------------------------------------------------------------


def autograd_grads(case, mapping, lora: bool):
    """float64 torch.autograd of the reference with trainable base weights: (output, grad_hidden,
    base grads by logical expert, LoRA grads by physical slot)."""
    base = [w.detach().double().requires_grad_() for w in case.base()]
    lora_t = [t.detach().double().requires_grad_() for t in case.lora]
    if not lora:
        lora_t = [torch.zeros_like(t) for t in lora_t]
    x = case.hidden.detach().double().requires_grad_()
    physical = [w[mapping] for w in base]
    out = moe_sft_reference(x, case.ids, case.weights.double(), *physical, *lora_t, case.scaling)
    leaves = [x, *base] + (lora_t if lora else [])
    grads = torch.autograd.grad(out, leaves, case.grad_out.double())
    return out, grads[0], grads[1:4], grads[4:]


@pytest.mark.parametrize("rank", [0, 4], ids=["base-only", "with-lora"])
def test_full_weight_gradients_match_autograd_and_update_base_weights_repacks(rank):
    """full_weight_grad: backward writes the base weights' gradients (logical experts, whatever the
    physical placement, over a split of the intermediate dimension) next to LoRA's, and
    update_base_weights() makes the next forward use the stepped weights."""
    case = make_case(seed=8, T=9, E=4, H=32, I=64, r=4)
    mapping = torch.tensor([2, 0, 3, 1])
    wrapper = sft(case, lora_rank=rank, full_weight_grad=True, cpuinfer_threads=2, threadpool_count=2)
    wrapper.load_weights_from_tensors(case.gate, case.up, case.down, mapping)
    wrapper.init_full_weight_grad_buffers(case.gate, case.up, case.down)
    if rank:
        params, buffers = lora_and_buffers(case)
        wrapper.init_lora_weights(*params, *buffers)
    out = wrapper.forward(case.hidden, case.ids, case.weights)
    grad_x, _ = wrapper.backward(case.grad_out)
    want_out, want_x, want_base, want_lora = autograd_grads(case, mapping, lora=bool(rank))
    assert rel_mae(out, want_out) < 0.01 and rel_mae(grad_x, want_x) < 0.02
    for name, want in zip(("gate", "up", "down"), want_base):
        got = getattr(wrapper, f"grad_{name}_proj_buf")
        assert getattr(wrapper, f"{name}_proj_buf").grad is got, name
        assert rel_mae(got, want) < 0.02, name
    for buffer, want in zip(buffers if rank else (), want_lora):
        assert rel_mae(buffer, want) < 0.02
    with torch.no_grad():
        for name in ("gate", "up", "down"):
            getattr(wrapper, f"{name}_proj_buf").sub_(getattr(wrapper, f"grad_{name}_proj_buf"))
    wrapper.release_authoritative_optimizer_grads()
    wrapper.update_base_weights()
    stepped = type(case)(
        **{**case.__dict__, "gate": wrapper.gate_proj_buf, "up": wrapper.up_proj_buf, "down": wrapper.down_proj_buf}
    )
    after = wrapper.forward(case.hidden, case.ids, case.weights, save_for_backward=False)
    assert rel_mae(after, autograd_grads(stepped, mapping, lora=bool(rank))[0]) < 0.01
    assert rel_mae(after, out) > 0.05  # the step moved the output


# ---- checkpoint-native frozen bases ----------------------------------------------------------------

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
SHAPES = {"gate": (64, 64), "up": (64, 64), "down": (64, 64)}  # [N, K] of each projection, E = 4


def pack_nibbles(codes):
    """uint8 [N, K] of 4-bit codes -> [N, K/2], low nibble first."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def mxfp4_checkpoint(folder, layer=0, seed=0):
    """A DeepSeek-V4 layout (layers.{L}.ffn.experts.{e}.{w1,w3,w2}.weight / .scale, no model. prefix)
    and the weights it holds, [E, N, K] per projection."""
    gen = torch.Generator().manual_seed(seed)
    tensors, truth = {}, {p: [] for p in SHAPES}
    for e in range(4):
        for p, name in zip(SHAPES, ("w1", "w3", "w2")):
            N, K = SHAPES[p]
            codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
            exponents = torch.randint(121, 125, (N, K // 32), generator=gen, dtype=torch.uint8)  # 2^-6 .. 2^-3
            tensors[f"layers.{layer}.ffn.experts.{e}.{name}.weight"] = pack_nibbles(codes)
            tensors[f"layers.{layer}.ffn.experts.{e}.{name}.scale"] = exponents
            scale = torch.ldexp(torch.ones(N, K // 32), exponents.int() - 127).repeat_interleave(32, 1)
            truth[p].append(E2M1[codes.long()] * scale)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    return {p: torch.stack(v) for p, v in truth.items()}


def rawint4_checkpoint(folder, layer=0, seed=0):
    """compressed-tensors pack-quantized int4 (weight_packed int32 [N, K/8], weight_scale bf16
    [N, K/32], weight_shape): (the weights it holds, the same as kt-kernel's staged RAWINT4 bytes)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, truth, staged = {}, {p: [] for p in SHAPES}, {}
    for e in range(4):
        for p in SHAPES:
            N, K = SHAPES[p]
            q = torch.randint(-8, 8, (N, K), generator=gen)
            nibbles = (q & 0xF).reshape(N, K // 8, 8) << torch.arange(0, 32, 4)
            words = nibbles.sum(-1)
            scale = (torch.rand(N, K // 32, generator=gen) * 0.02 + 0.005).to(torch.bfloat16)
            key = f"model.layers.{layer}.mlp.experts.{e}.{p}_proj"
            tensors[f"{key}.weight_packed"] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
            tensors[f"{key}.weight_scale"] = scale
            tensors[f"{key}.weight_shape"] = torch.tensor([N, K])
            truth[p].append(q.float() * scale.float().repeat_interleave(32, 1))
            staged.setdefault(f"{p}_proj", []).append(pack_nibbles((q + 8).to(torch.uint8)))
            staged.setdefault(f"{p}_scale", []).append(scale)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    return {p: torch.stack(v) for p, v in truth.items()}, {k: torch.stack(v) for k, v in staged.items()}


def frozen_case(truth, mapping, seed=9):
    """A case whose base is the checkpoint's weights in physical order."""
    case = make_case(seed=seed, T=10, E=4, H=64, I=64, r=4)
    return type(case)(**{**case.__dict__, **{p: truth[p][mapping] for p in SHAPES}})


def check_against_autograd(wrapper, case, **activation):
    """forward + backward of an SFT wrapper with LoRA against float64 torch.autograd of the
    reference on the (dequantized) base weights."""
    params, buffers = lora_and_buffers(case)
    wrapper.init_lora_weights(*params, *buffers)
    out = wrapper.forward(case.hidden, case.ids, case.weights)
    grad_x, grad_w = wrapper.backward(case.grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (case.hidden, case.weights, *case.lora)]
    base = [w.double() for w in case.base()]
    want = moe_sft_reference(leaves[0], case.ids, leaves[1], *base, *leaves[2:], case.scaling, **activation)
    grads = torch.autograd.grad(want, leaves, case.grad_out.double())
    assert rel_mae(out, want) < 0.01
    for got, ref in zip((grad_x, grad_w, *buffers), grads):
        assert rel_mae(got, ref) < 0.02
    return out


@pytest.mark.parametrize("threadpool_count", [1, 2])
def test_mxfp4_sft_reads_a_deepseek_v4_checkpoint_with_clamped_silu(tmp_path, threadpool_count):
    truth = mxfp4_checkpoint(tmp_path / "v4")
    mapping = torch.tensor([3, 1, 0, 2])
    case = frozen_case(truth, mapping)
    wrapper = sft(
        case,
        method="MXFP4_SFT",
        weight_path=str(tmp_path / "v4"),
        swiglu_limit=0.5,
        cpuinfer_threads=threadpool_count,
        threadpool_count=threadpool_count,
    )
    wrapper.load_weights(mapping)
    with pytest.raises(RuntimeError, match="immutable"):
        wrapper.load_mxfp4_weights({})
    out = check_against_autograd(wrapper, case, activation="clamped_silu", swiglu_limit=0.5)
    plain = moe_sft_reference(case.hidden, case.ids, case.weights, *case.base(), *case.lora, case.scaling)
    assert rel_mae(out, plain) > 0.01  # the limit is reached: the clamp is in effect
    inference = KTMoEWrapper(0, 4, 2, 64, 64, None, 1, 1, str(tmp_path / "v4"), 64, method="MXFP4", swiglu_limit=0.5)
    inference.load_weights(mapping)
    zeros = [torch.zeros_like(t) for t in case.lora]
    base_only = moe_sft_reference(
        case.hidden, case.ids, case.weights, *case.base(), *zeros, 0.0, activation="clamped_silu", swiglu_limit=0.5
    )
    assert rel_mae(inference.forward(case.hidden, case.ids, case.weights), base_only) < 0.01


def test_rawint4_sft_from_a_checkpoint_and_from_kt_kernels_staged_bytes(tmp_path):
    truth, staged = rawint4_checkpoint(tmp_path / "int4")
    mapping = torch.tensor([1, 3, 0, 2])
    case = frozen_case(truth, mapping, seed=10)
    from_file = sft(case, method="RAWINT4_SFT", weight_path=str(tmp_path / "int4"))
    from_file.load_weights(mapping)
    out = check_against_autograd(from_file, case)
    from_bytes = sft(case, method="RAWINT4_SFT")
    from_bytes.load_rawint4_weights(RAWINT4ExpertWeights(**staged), mapping)
    params, buffers = lora_and_buffers(case)
    from_bytes.init_lora_weights(*params, *buffers)
    assert torch.equal(from_bytes.forward(case.hidden, case.ids, case.weights), out)
    with pytest.raises(ValueError, match="group_size=32"):
        from_bytes.load_rawint4_weights(RAWINT4ExpertWeights(**{**staged, "group_size": 64}))
