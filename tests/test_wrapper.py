"""The wrapper Python API: KTMoEWrapper, the SFT
and inference wrappers, buffers, cache depth, the sub-pool split and the error table."""

import threading
import warnings

import pytest
import torch

import kt_ops
from kt_ops import KExpertsSFTBuffer, KTMoEWrapper
from kt_ops.core.packed import intermediate_split
from kt_ops.experts_base import _MoEBase
from kt_testing import GRAD_NAMES, LORA_NAMES, assert_tight, make_case, run_ops, run_reference

pytestmark = pytest.mark.filterwarnings("ignore:the process's CPUInfer already exists")


def sft_wrapper(
    case, method="AMXBF16_SFT", threadpool_count=1, max_cache_depth=1, weight_path=None, layer_idx=0, group_size=128
):
    E, I, H = case.gate.shape
    r = case.lora[0].shape[1]
    return KTMoEWrapper(
        layer_idx=layer_idx,
        num_experts=E,
        num_experts_per_tok=case.ids.shape[1],
        hidden_size=H,
        moe_intermediate_size=I,
        num_gpu_experts=0,
        cpuinfer_threads=2,
        threadpool_count=threadpool_count,
        weight_path=weight_path,
        chunked_prefill_size=512,
        mode="sft",
        method=method,
        lora_rank=r,
        lora_alpha=case.scaling * r,
        max_cache_depth=max_cache_depth,
        group_size=group_size,
    )


def loaded(case, lora=None, **kwargs):
    wrapper = sft_wrapper(case, **kwargs)
    wrapper.load_weights_from_tensors(case.gate, case.up, case.down)
    wrapper.load_weights(torch.arange(case.gate.shape[0]))
    wrapper.init_lora_weights(*(lora if lora is not None else case.lora))
    return wrapper


def wrapper_grads(wrapper, case):
    out = wrapper.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=True)
    grad_input, grads = wrapper.backward(case.grad_out)
    return out, [grad_input, grads["grad_weights"]] + [grads[f"grad_{name}"] for name in LORA_NAMES]


def test_spec_training_example_equals_the_ops_bit_for_bit():
    """On small sizes the wrapper is a thin layer, so its results are the ops' own."""
    case = make_case(seed=1, T=9, E=6, k=2, H=32, I=64, r=4)
    wrapper = loaded(case)
    out, grads = wrapper_grads(wrapper, case)
    ref_out, ref_grads = run_ops(case)
    assert torch.equal(out, ref_out)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        assert torch.equal(got.to(want.dtype), want), name
    assert wrapper._cache_depth == 0


def test_spec_inference_example_with_bf16_lora():
    """forward_sft(save_for_backward=False) with bf16 inputs and LoRA."""
    case = make_case(seed=2, T=5, E=4, k=2, H=32, I=32, r=4, hidden_dtype=torch.bfloat16)
    wrapper = loaded(case)
    out = wrapper.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=False)
    assert out.dtype == torch.bfloat16 and wrapper._cache_depth == 0
    ref, _ = run_reference(case, with_grads=False)
    assert (out.double() - ref).abs().mean() / ref.abs().mean() < 0.01


def test_optimizer_step_reaches_the_next_forward():
    case = make_case(seed=3, T=6, E=4, k=2, H=32, I=32, r=4)
    lora = [torch.nn.Parameter(t.clone()) for t in case.lora]
    wrapper = loaded(case, lora=lora)
    before = wrapper.forward_sft(case.hidden, case.ids, case.weights)
    _, grads = wrapper.backward(case.grad_out)
    for p, name in zip(lora, LORA_NAMES):
        p.grad = grads[f"grad_{name}"]
    torch.optim.SGD(lora, lr=0.5).step()
    wrapper.update_lora_weights()
    after = wrapper.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=False)
    stepped = make_case(seed=3, T=6, E=4, k=2, H=32, I=32, r=4)
    stepped = type(case)(**{**case.__dict__, "lora": tuple(p.detach() for p in lora)})
    assert not torch.equal(before, after)
    assert torch.equal(after, run_ops(stepped, with_grads=False)[0])


@pytest.mark.parametrize("kind", ["zero_copy", "fp16_copy", "non_contiguous_copy"])
def test_in_place_updates_are_never_stale(kind):
    """Even without update_lora_weights(), an in-place change is seen: zero-copy tensors directly,
    converted copies through the source's version counter."""
    case = make_case(seed=4, T=6, E=4, k=2, H=32, I=32, r=4)
    lora = [t.clone() for t in case.lora]
    if kind == "fp16_copy":
        lora = [t.half() for t in lora]
    elif kind == "non_contiguous_copy":
        lora = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in lora]
    wrapper = loaded(case, lora=lora)
    before = wrapper.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=False)
    with torch.no_grad():
        lora[1].add_(0.25)
    after = wrapper.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=False)
    current = type(case)(**{**case.__dict__, "lora": tuple(t.float() for t in lora)})
    assert not torch.equal(before, after)
    assert_tight("output", after, run_reference(current, with_grads=False)[0], rtol=1e-4)
    assert (wrapper._lora_kernel[1].data_ptr() == lora[1].data_ptr()) == (kind == "zero_copy")


def test_physical_to_logical_map_permutes_experts():
    case = make_case(seed=5, T=10, E=5, k=2, H=32, I=32, r=4)
    mapping = torch.tensor([3, 0, 4, 1, 2])
    wrapper = sft_wrapper(case)
    wrapper.load_weights_from_tensors(case.gate, case.up, case.down)
    wrapper.load_weights(mapping)
    wrapper.init_lora_weights(*case.lora)
    out, grads = wrapper_grads(wrapper, case)
    # physical slot p holds logical expert mapping[p]; LoRA is indexed by physical slot
    physical = type(case)(
        **{**case.__dict__, "gate": case.gate[mapping], "up": case.up[mapping], "down": case.down[mapping]}
    )
    ref_out, ref_grads = run_ops(physical)
    assert torch.equal(out, ref_out)
    assert all(torch.equal(g.to(r.dtype), r) for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("method,group_size", [("AMXBF16_SFT", 128), ("AMXINT8_SFT", 128), ("AMXINT4_KGroup_SFT", 32)])
def test_threadpool_split_equals_one_pool(method, group_size):
    """threadpool_count=2 splits the intermediate dimension; partial outputs and the gradients of
    the unsplit LoRA tensors are sums, which equal the single pool's within fp32 rounding."""
    case = make_case(seed=6, T=12, E=4, k=2, H=64, I=64, r=4)
    one = loaded(case, method=method, group_size=group_size)
    two = loaded(case, method=method, group_size=group_size, threadpool_count=2)
    assert [(p.intermediate_size) for p in two.experts_parts] == [32, 32]
    out1, grads1 = wrapper_grads(one, case)
    out2, grads2 = wrapper_grads(two, case)
    if method == "AMXBF16_SFT":
        assert_tight("output", out2, out1, rtol=1e-5)
        for name, a, b in zip(GRAD_NAMES, grads2, grads1):
            assert_tight(name, a, b, rtol=1e-5)
    else:  # down's quantization now covers each part's columns separately
        for name, a, b in zip(("output",) + GRAD_NAMES, [out2] + grads2, [out1] + grads1):
            assert (a - b).abs().mean() <= 0.05 * b.abs().mean() + 1e-12, name


def test_threadpool_split_bf16_rounds_once():
    case = make_case(seed=7, T=8, E=4, k=2, H=32, I=64, r=4, hidden_dtype=torch.bfloat16)
    one, two = loaded(case), loaded(case, threadpool_count=2)
    out1, grads1 = wrapper_grads(one, case)
    out2, grads2 = wrapper_grads(two, case)
    assert out2.dtype == torch.bfloat16 and grads2[0].dtype == torch.bfloat16
    assert (out2.float() - out1.float()).abs().max() <= 2 * 2**-8 * out1.float().abs().max()


def test_intermediate_split_alignment_and_errors():
    assert intermediate_split(1408, 4, "bf16", 128) == [(0, 352), (352, 704), (704, 1056), (1056, 1408)]
    assert intermediate_split(512, 2, "int4_kgroup", 128) == [(0, 256), (256, 512)]
    with pytest.raises(ValueError, match="threadpool_count=3"):
        intermediate_split(256, 3, "int4_kgroup", 128)


def test_cache_depth_two_micro_batches_and_checkpointing():
    """Two forwards in flight; backward consumes the most recent one; each equals its own single
    forward/backward."""
    a = make_case(seed=8, T=7, E=4, k=2, H=32, I=32, r=4)
    b = make_case(seed=9, T=5, E=4, k=2, H=32, I=32, r=4)
    b = type(a)(**{**b.__dict__, "lora": a.lora, "gate": a.gate, "up": a.up, "down": a.down})
    wrapper = loaded(a, max_cache_depth=2)
    wrapper.forward_sft(a.hidden, a.ids, a.weights)
    wrapper.forward_sft(b.hidden, b.ids, b.weights)
    with pytest.raises(RuntimeError, match="Forward cache full"):
        wrapper.forward_sft(a.hidden, a.ids, a.weights)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        wrapper.backward(a.grad_out)  # the most recent forward is b's (5 tokens)
    grad_b, _ = wrapper.backward(b.grad_out)
    grad_a, _ = wrapper.backward(a.grad_out)
    assert torch.equal(grad_a, run_ops(a)[1][0]) and torch.equal(grad_b, run_ops(b)[1][0])
    with pytest.raises(RuntimeError, match="No forward cache available"):
        wrapper.backward(a.grad_out)
    # an explicit index picks an older forward
    wrapper.forward_sft(a.hidden, a.ids, a.weights)
    wrapper.forward_sft(b.hidden, b.ids, b.weights)
    with pytest.raises(RuntimeError, match="Invalid cache index"):
        wrapper.backward(a.grad_out, cache_idx=2)
    grad_a2, _ = wrapper.backward(a.grad_out, cache_idx=0)
    assert torch.equal(grad_a2, grad_a) and wrapper._cache_depth == 1
    wrapper.clear_cache()
    assert wrapper._cache_depth == 0


def test_buffer_cached_thread_safe_and_holds_latest_grads():
    KExpertsSFTBuffer.clear_cache()
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(KExpertsSFTBuffer.get_buffer(4, 32, 32, 4, 2, 4))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(b is got[0] for b in got)
    assert got[0].input_cpu.shape == (4, 32) and got[0].expert_ids_cpu.dtype == torch.int64
    before = got[0].get_lora_grads()  # preallocated zeros before any backward, as the specification's
    assert [tuple(before[f"grad_{n}"].shape) for n in LORA_NAMES] == [(4, 4, 32), (4, 32, 4)] * 3
    assert all(not t.any() for t in before.values())
    KExpertsSFTBuffer.clear_cache()
    assert KExpertsSFTBuffer.get_buffer(4, 32, 32, 4, 2, 4) is not got[0]

    case = make_case(seed=10, T=4, E=4, k=2, H=32, I=32, r=4)
    wrapper = loaded(case)
    wrapper.forward_sft(case.hidden, case.ids, case.weights)
    _, grads = wrapper.backward(case.grad_out)
    buffer = KExpertsSFTBuffer.get_buffer(4, 32, 32, 4, 2, 4, torch.float32)
    held = buffer.get_lora_grads()
    assert sorted(held) == sorted(f"grad_{n}" for n in LORA_NAMES)
    assert all(held[k] is grads[k] for k in held)


def test_cpu_infer_is_one_per_process():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an earlier test may have made it with other settings
        first = _MoEBase._get_cpu_infer(2, 1)
    # settings other than the existing instance's: reported, not applied
    other = 1 if first.config.max_threads_per_subpool != 1 else 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _MoEBase._get_cpu_infer(other * first.config.subpool_count, first.config.subpool_count) is first
    assert any("already exists" in str(w.message) for w in caught)


# ---- misuse: each raises with a message that says what to do ----------------------------------------------

BASE = dict(
    layer_idx=0,
    num_experts=4,
    num_experts_per_tok=2,
    hidden_size=32,
    moe_intermediate_size=32,
    num_gpu_experts=0,
    cpuinfer_threads=2,
    threadpool_count=1,
    weight_path=None,
    chunked_prefill_size=64,
)


def test_unknown_mode():
    with pytest.raises(ValueError, match="Unknown mode"):
        KTMoEWrapper(**BASE, mode="train")


@pytest.mark.parametrize("mode,method", [("sft", "AMXINT4"), ("inference", "AMXBF16_SFT"), ("sft", "bogus")])
def test_method_mode_mismatch(mode, method):
    with pytest.raises(ValueError, match=f"Method '{method}' not supported in {mode} mode"):
        KTMoEWrapper(**BASE, mode=mode, method=method)


def test_sft_mode_refuses_inference_methods():
    """forward / submit_forward / sync_forward are kt-kernel 0.7's SFT calls too; deferral is not."""
    wrapper = KTMoEWrapper(**BASE, mode="sft", method="AMXBF16_SFT")
    with pytest.raises(RuntimeError, match="select_deferred_experts\\(\\) is not available in SFT mode"):
        wrapper.select_deferred_experts()
    with pytest.raises(RuntimeError, match="No pending forward"):
        wrapper.sync_forward()


@pytest.mark.parametrize("name", ["forward_sft", "backward", "init_lora_weights", "update_lora_weights"])
def test_inference_mode_refuses_sft_methods(name):
    wrapper = KTMoEWrapper(**BASE, mode="inference", method="AMXINT8")
    with pytest.raises(RuntimeError, match=f"{name}\\(\\) is not available in inference mode"):
        getattr(wrapper, name)()


def test_runtime_state_errors():
    case = make_case(seed=11, T=3, E=4, k=2, H=32, I=32, r=4)
    wrapper = sft_wrapper(case)
    with pytest.raises(RuntimeError, match="Weights not loaded"):
        wrapper.forward_sft(case.hidden, case.ids, case.weights)
    with pytest.raises(RuntimeError, match="weight_path is not set"):
        wrapper.load_weights(torch.arange(4))
    wrapper.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
    with pytest.raises(RuntimeError, match="LoRA weights not initialized"):
        wrapper.forward_sft(case.hidden, case.ids, case.weights)
    with pytest.raises(RuntimeError, match="LoRA weights not initialized"):
        wrapper.backward(case.grad_out)
    with pytest.raises(RuntimeError, match="LoRA weights not initialized"):
        wrapper.update_lora_weights()
    # without LoRA and without saving, the base experts alone run
    no_lora = type(case)(**{**case.__dict__, "lora": tuple(torch.zeros_like(t) for t in case.lora)})
    out = wrapper.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=False)
    assert_tight("output", out, run_reference(no_lora, with_grads=False)[0])


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (dict(num_experts=0), ValueError, "num_experts must be positive"),
        (dict(num_experts_per_tok=5), ValueError, "cannot exceed num_experts"),
        (dict(hidden_size=-1), ValueError, "hidden_size must be positive"),
        (dict(lora_rank=0), ValueError, "lora_rank must be positive"),
        (dict(lora_alpha=0.0), ValueError, "lora_alpha must be positive"),
        (dict(max_cache_depth=0), ValueError, "max_cache_depth must be positive"),
        (dict(threadpool_count=0), ValueError, "threadpool_count must be positive"),
        (dict(cpuinfer_threads=1, threadpool_count=2), ValueError, "cpuinfer_threads"),
        (dict(num_experts_per_tok=1.5), TypeError, "num_experts_per_tok must be an int"),
        (dict(cpuinfer_threads=3, threadpool_count=3), ValueError, "threadpool_count=3 cannot split"),
    ],
)
def test_bad_config(bad, error, match):
    with pytest.raises(error, match=match):
        KTMoEWrapper(**{**BASE, **bad}, mode="sft", method="AMXBF16_SFT")


def test_bad_inputs_name_the_argument():
    case = make_case(seed=12, T=3, E=4, k=2, H=32, I=32, r=4)
    wrapper = loaded(case)
    bad_lora = list(case.lora)
    bad_lora[4] = torch.zeros(4, 4, 31)
    with pytest.raises(ValueError, match=r"down_lora_a shape mismatch: expected \(4, 4, 32\)"):
        wrapper.init_lora_weights(*bad_lora)
    with pytest.raises(TypeError, match="up_lora_b must be a floating-point tensor"):
        wrapper.init_lora_weights(*case.lora[:3], torch.zeros(4, 32, 4, dtype=torch.int32), *case.lora[4:])
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        wrapper.forward_sft(case.hidden[:, :16], case.ids, case.weights)
    with pytest.raises(ValueError, match="expert_ids must have shape"):
        wrapper.forward_sft(case.hidden, case.ids[:, :1], case.weights)
    with pytest.raises(ValueError, match="topk_ids"):
        wrapper.forward_sft(case.hidden, torch.full_like(case.ids, 7), case.weights)
    assert wrapper._cache_depth == 0  # a failed forward saves nothing
    with pytest.raises(ValueError, match="permutation"):
        wrapper.load_weights_from_tensors(case.gate, case.up, case.down, torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="gate_proj must have shape"):
        wrapper.load_weights_from_tensors(case.gate[:3], case.up, case.down)


# ---- inference mode ----------------------------------------------------------------------------


def inference_wrapper(case, method="AMXINT8", **overrides):
    E, I, H = case.gate.shape
    kwargs = {
        **BASE,
        "num_experts": E,
        "hidden_size": H,
        "moe_intermediate_size": I,
        "num_experts_per_tok": case.ids.shape[1],
        **overrides,
    }
    wrapper = KTMoEWrapper(**kwargs, mode="inference", method=method)
    return wrapper


def test_inference_forward_is_submit_plus_sync_and_in_order():
    case = make_case(seed=13, T=6, E=4, k=2, H=32, I=32, r=4)
    wrapper = inference_wrapper(case)
    wrapper.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
    direct = wrapper.forward(case.hidden, case.ids, case.weights, None)
    other = make_case(seed=14, T=3, E=4, k=2, H=32, I=32, r=4)
    wrapper.submit_forward(case.hidden, case.ids, case.weights, None)
    wrapper.submit_forward(other.hidden, other.ids, other.weights, None)
    first = wrapper.sync_forward(case.hidden, None)
    second = wrapper.sync_forward(other.hidden, None)
    assert torch.equal(first, direct)
    assert torch.equal(second, wrapper.forward(other.hidden, other.ids, other.weights, None))
    experts = kt_ops.pack_experts(case.gate, case.up, case.down, "int8")
    assert torch.equal(direct, kt_ops.moe_sft(case.hidden, case.ids, case.weights, experts, None, 0.0))
    with pytest.raises(RuntimeError, match="without a pending submit_forward"):
        wrapper.sync_forward(case.hidden, None)


def test_inference_chunks_and_gpu_experts():
    case = make_case(seed=15, T=11, E=4, k=2, H=32, I=32, r=4)
    whole = inference_wrapper(case)
    whole.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
    chunked = inference_wrapper(case, chunked_prefill_size=4)
    chunked.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
    # few-row chunks take the direct int8-code kernel, whole prefill the bf16-dequantized panels; the
    # direct kernel quantizes activations to int8, each off by up to max|x| / 254 (kernels/quant.h),
    # about 1% of these 32-wide projections, against 2^-9 per weight on the panel path
    assert_tight(
        "chunked",
        chunked.forward(case.hidden, case.ids, case.weights),
        whole.forward(case.hidden, case.ids, case.weights),
        rtol=2e-2,
    )
    gpu = inference_wrapper(case, num_gpu_experts=2)
    gpu.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
    skipped = torch.where(case.ids < 2, -1, case.ids)
    assert torch.equal(
        gpu.forward(case.hidden, case.ids, case.weights), whole.forward(case.hidden, skipped, case.weights)
    )


def test_inference_cpu_save_then_load(tmp_path):
    case = make_case(seed=16, T=4, E=4, k=2, H=32, I=32, r=4)
    path = str(tmp_path / "layer0.safetensors")
    first = inference_wrapper(case, cpu_save=True, weight_path=path)
    first.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
    second = inference_wrapper(case, weight_path=path)
    second.load_weights(torch.arange(4))
    assert torch.equal(
        first.forward(case.hidden, case.ids, case.weights), second.forward(case.hidden, case.ids, case.weights)
    )


@pytest.mark.parametrize(
    "method,cls",
    [
        ("LLAMAFILE", "LlamafileMoEWrapper"),
        ("FP8", "NativeMoEWrapper"),
        ("RAWINT4", "NativeMoEWrapper"),
        ("MOE_INT4", "AMXMoEWrapper"),
    ],
)
def test_factory_routes_every_inference_method(method, cls):
    wrapper = KTMoEWrapper(
        **{**BASE, "hidden_size": 128, "moe_intermediate_size": 128}, mode="inference", method=method
    )
    assert type(wrapper).__name__ == cls and wrapper.method == method
    with pytest.raises(RuntimeError, match="Weights not loaded"):
        wrapper.forward(torch.zeros(1, 128), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))


# ---- file mode: base weights read from weight_path ------------------------------------------------------


def file_case(layers, layer_idx, T=6, k=2, r=4, seed=20):
    from test_loaders import E, H, I

    case = make_case(seed=seed, T=T, E=E, k=k, H=H, I=I, r=r)
    gate, up, down = layers[layer_idx]
    return type(case)(**{**case.__dict__, "gate": gate, "up": up, "down": down})


@pytest.mark.parametrize(
    "fmt,prefix",
    [
        ("deepseek", "model.layers"),
        ("mixtral", "model.layers"),
        ("fused", "model.layers"),
        ("deepseek", "model.language_model.layers"),
        ("fused", "language_model.model.layers"),
    ],
)
def test_bf16_file_mode_equals_tensor_mode(tmp_path, fmt, prefix):
    from test_loaders import write_checkpoint

    layers = write_checkpoint(tmp_path / "hf", fmt=fmt, prefix=prefix, shards=2)
    case = file_case(layers, 2)
    mapping = torch.tensor([2, 0, 3, 1])
    from_file = sft_wrapper(case, weight_path=str(tmp_path / "hf"), layer_idx=2)
    from_file.load_weights(mapping)
    from_file.init_lora_weights(*case.lora)
    from_tensors = sft_wrapper(case, layer_idx=2)
    from_tensors.load_weights_from_tensors(case.gate, case.up, case.down, mapping)
    from_tensors.init_lora_weights(*case.lora)
    out_file, grads_file = wrapper_grads(from_file, case)
    out_tensors, grads_tensors = wrapper_grads(from_tensors, case)
    assert torch.equal(out_file, out_tensors)
    assert all(torch.equal(a, b) for a, b in zip(grads_file, grads_tensors))


@pytest.mark.parametrize(
    "method,group_size", [("AMXINT8_SFT", 128), ("AMXINT4_KGroup_SFT", 32), ("AMXINT4_1_SFT", 128)]
)
def test_quantized_file_mode_reads_converted_weights(tmp_path, method, group_size):
    from test_loaders import write_checkpoint
    from kt_ops.convert_weights import main as convert

    layers = write_checkpoint(tmp_path / "hf", fmt="deepseek")
    assert (
        convert(
            [
                "--input",
                str(tmp_path / "hf"),
                "--output",
                str(tmp_path / "q"),
                "--method",
                method,
                "--group-size",
                str(group_size),
                "--quiet",
            ]
        )
        == 0
    )
    case = file_case(layers, 0)
    from_file = sft_wrapper(case, method=method, group_size=group_size, weight_path=str(tmp_path / "q"))
    from_file.load_weights(torch.arange(4))
    from_file.init_lora_weights(*case.lora)
    from_tensors = loaded(case, method=method, group_size=group_size)
    assert torch.equal(wrapper_grads(from_file, case)[0], wrapper_grads(from_tensors, case)[0])
    # the file holds another format than the method asks for
    other = "AMXINT8_SFT" if method != "AMXINT8_SFT" else "AMXINT4_SFT"
    wrong = sft_wrapper(case, method=other, weight_path=str(tmp_path / "q"))
    with pytest.raises(ValueError, match="convert_weights"):
        wrong.load_weights(torch.arange(4))


def test_file_mode_errors(tmp_path):
    from test_loaders import write_checkpoint

    layers = write_checkpoint(tmp_path / "hf", fmt="mixtral")
    case = file_case(layers, 0)
    missing_layer = sft_wrapper(case, weight_path=str(tmp_path / "hf"), layer_idx=1)  # layer 1 is dense
    with pytest.raises(ValueError, match="expert"):
        missing_layer.load_weights(torch.arange(4))
    wrong_size = KTMoEWrapper(
        **{**BASE, "hidden_size": 32, "weight_path": str(tmp_path / "hf")}, mode="sft", method="AMXBF16_SFT"
    )
    with pytest.raises(ValueError, match="the wrapper was built for"):
        wrong_size.load_weights(torch.arange(4))


def test_sft_skips_gpu_experts():
    case = make_case(seed=21, T=8, E=4, k=2, H=32, I=32, r=4)
    E, I, H = case.gate.shape
    wrapper = KTMoEWrapper(
        **{**BASE, "num_gpu_experts": 1}, mode="sft", method="AMXBF16_SFT", lora_rank=4, lora_alpha=case.scaling * 4
    )
    wrapper.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(E))
    wrapper.init_lora_weights(*case.lora)
    out, grads = wrapper_grads(wrapper, case)
    skipped = type(case)(**{**case.__dict__, "ids": torch.where(case.ids < 1, -1, case.ids)})
    ref_out, ref_grads = run_ops(skipped)
    assert torch.equal(out, ref_out)
    assert all(torch.equal(g.to(r.dtype), r) for g, r in zip(grads, ref_grads))
