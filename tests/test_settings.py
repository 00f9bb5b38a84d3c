"""KTSettings: each kt setting parsed, defaulted and checked once, with one exception type per kind of
mistake, and the same settings reaching apply_kt, kt-sft's config and the SFT wrapper."""

import dataclasses

import pytest
import torch

import kt_ops
from kt_ops import KTSettings
from kt_testing import make_case

pytestmark = pytest.mark.filterwarnings("ignore:the process's CPUInfer already exists")


@pytest.mark.parametrize(
    "fields,error,match",
    [
        (dict(kt_backend=8), TypeError, "kt_backend must be a str"),
        (dict(kt_backend="AMXFP4"), ValueError, "kt_backend must be one of"),
        (dict(kt_expert_weight_format="int2"), ValueError, "kt_expert_weight_format must be one of"),
        (dict(kt_num_threads=1.5), TypeError, "kt_num_threads must be an int or None"),
        (dict(kt_num_threads=0), ValueError, "kt_num_threads must be positive"),
        (dict(kt_threadpool_count=0), ValueError, "kt_threadpool_count must be positive"),
        (dict(kt_num_threads=1, kt_threadpool_count=2), ValueError, "every sub-pool needs a thread"),
        (dict(kt_tp_enabled="yes"), TypeError, "kt_tp_enabled must be True or False"),
        (dict(kt_num_gpu_experts=-1), ValueError, "kt_num_gpu_experts must be >= 0"),
        (dict(kt_weight_path=3), TypeError, "kt_weight_path must be a path"),
        (dict(kt_max_cache_depth=0), ValueError, "kt_max_cache_depth must be positive"),
        (dict(lora_rank="8"), TypeError, "lora_rank must be an int"),
        (dict(lora_rank=-1), ValueError, "lora_rank must be >= 0"),
        (dict(lora_alpha=0.0), ValueError, "lora_alpha must be positive"),
        (dict(lora_alpha=True), TypeError, "lora_alpha must be a number"),
        (dict(kt_backend="AMXBF16", kt_expert_weight_format="int8"), ValueError, "computes 'bf16' experts"),
    ],
)
def test_each_mistake_is_named_with_its_kind(fields, error, match):
    with pytest.raises(error, match=match):
        KTSettings(**fields)


def test_defaults_that_depend_on_other_fields_resolve_again_on_replace():
    settings = KTSettings()
    assert (settings.backend, settings.weight_format, settings.alpha, settings.lora_scaling) == (
        "AMXBF16",
        "bf16",
        32.0,
        2.0,
    )
    settings = settings.replace(lora_rank=4, kt_expert_weight_format="int8")
    assert (settings.backend, settings.weight_format, settings.alpha) == ("AMXINT8", "int8", 8.0)
    # 'auto' with a weight path: the stored format decides
    with_file = KTSettings(kt_weight_path="/some/dir")
    assert with_file.backend == "auto" and with_file.format_of_stored("int4_kgroup", "x") == "int4_kgroup"
    with pytest.raises(ValueError, match="kt_backend 'AMXINT8' means 'int8'"):
        with_file.replace(kt_backend="AMXINT8").format_of_stored("int4", "x")
    assert KTSettings.of(settings, lora_rank=2).alpha == 4.0  # a default alpha follows the rank
    assert KTSettings.of(KTSettings(lora_alpha=8.0), lora_rank=2).alpha == 8.0  # an explicit one stays
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lora_rank = 2


def test_kt_num_threads_is_capped_at_the_usable_cpus():
    cpus = kt_ops.core.runtime.usable_cpus()
    with pytest.warns(UserWarning, match=f"kt_num_threads={cpus + 1} exceeds"):
        assert KTSettings(kt_num_threads=cpus + 1).kt_num_threads == cpus


def test_the_sft_wrapper_the_settings_describe():
    case = make_case(seed=5, T=6, E=4, k=2, H=32, I=32, r=4)
    settings = KTSettings(
        kt_backend="AMXBF16", lora_rank=4, lora_alpha=case.scaling * 4, kt_max_cache_depth=2, kt_num_threads=2
    )
    wrapper = kt_ops.KTMoEWrapper.from_settings(
        settings, layer_idx=0, num_experts=4, num_experts_per_tok=2, hidden_size=32, moe_intermediate_size=32
    )
    assert (wrapper.method, wrapper.lora_rank, wrapper.max_cache_depth) == ("AMXBF16_SFT", 4, 2)
    explicit = kt_ops.KTMoEWrapper(
        layer_idx=0,
        num_experts=4,
        num_experts_per_tok=2,
        hidden_size=32,
        moe_intermediate_size=32,
        num_gpu_experts=0,
        cpuinfer_threads=2,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=512,
        mode="sft",
        method="AMXBF16_SFT",
        lora_rank=4,
        lora_alpha=case.scaling * 4,
        max_cache_depth=2,
    )
    outputs = []
    for w in (wrapper, explicit):
        w.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
        w.init_lora_weights(*case.lora)
        outputs.append(w.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=False))
    assert torch.equal(*outputs)
    with pytest.raises(TypeError, match="settings must be a KTSettings"):
        kt_ops.KTMoEWrapper.from_settings({"lora_rank": 4}, 0, 4, 2, 32, 32)


def test_apply_kt_takes_settings_and_fields():
    pytest.importorskip("transformers")
    from kt_ops.integration import apply_kt, kt_experts_modules
    from kt_ops.integration.tiny import tiny_model

    settings = KTSettings(kt_backend="AMXINT8", lora_rank=4)
    model = apply_kt(tiny_model("tiny-qwen3-moe"), settings, lora_alpha=2.0)
    for _, _, kt in kt_experts_modules(model):
        assert (kt.weight_format, kt.lora_rank, kt.lora_scaling) == ("int8", 4, 0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'kt_bakend'"):
        apply_kt(tiny_model("tiny-qwen3-moe"), kt_bakend="AMXINT8")
