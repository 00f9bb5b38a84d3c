"""Serving a fine-tuned MoE LoRA: the PEFT -> kt conversion script and the engine-facing
KTConfig / KTEPWrapperMethod lifecycle, on tiny adapters written into tmp_path."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from kt_ops import KTMoEWrapper
from kt_ops.convert_moe_lora import main
from kt_ops.weights.moe_lora import convert_moe_lora, convert_peft_to_kt_format, parse_moe_key
from kt_ops.serving import KTConfig, KTEPWrapperMethod, clear_moe_lora_cache, get_sft_weight_path, load_moe_lora_layer
from kt_testing import LORA_NAMES, compare_with_reference, make_case, run_reference

pytestmark = pytest.mark.filterwarnings("ignore:the process's CPUInfer already exists")

E, H, I, R, K = 4, 32, 32, 4, 2
LAYERS = (0, 1)
PREFIX = "base_model.model.model.layers"
NAMING = {  # naming -> (module between layer and expert id, gate/up/down projection names)
    "deepseek": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "original_moe": ("mlp.original_moe.experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2")),
}
# (in, out) of each projection: PEFT stores lora_A.weight as [r, in], lora_B.weight as [out, r].
IN_OUT = {"gate": (H, I), "up": (H, I), "down": (I, H)}


def expert_key(naming, layer, expert, proj, ab):
    module, names = NAMING[naming]
    name = dict(zip(("gate", "up", "down"), names))[proj]
    return f"{PREFIX}.{layer}.{module}.{expert}.{name}.lora_{ab}.weight"


def write_adapter(
    root,
    naming="deepseek",
    layers=LAYERS,
    num_experts=E,
    rank=R,
    config=None,
    drop=(),
    dtype=torch.float32,
    extra=None,
    seed=0,
):
    """adapter_model.safetensors + adapter_config.json; returns (paths, {(L, e, proj, "A"|"B"): tensor})."""
    g = torch.Generator().manual_seed(seed)
    written = {}
    tensors = {
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(rank, H, generator=g),
        f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.randn(H, rank, generator=g),
    }
    for layer in layers:
        for e in range(num_experts):
            for proj, (fan_in, fan_out) in IN_OUT.items():
                a = (torch.randn(rank, fan_in, generator=g) * fan_in**-0.5).to(dtype)
                b = (torch.randn(fan_out, rank, generator=g) * 0.5 * rank**-0.5).to(dtype)
                for ab, t in (("A", a), ("B", b)):
                    if (layer, e, proj, ab) not in drop:
                        written[(layer, e, proj, ab)] = t
                        tensors[expert_key(naming, layer, e, proj, ab)] = t
    tensors.update(extra or {})
    os.makedirs(root, exist_ok=True)
    paths = (str(root / "adapter_model.safetensors"), str(root / "adapter_config.json"))
    save_file(tensors, paths[0])
    with open(paths[1], "w") as f:
        json.dump({"r": rank, "lora_alpha": 8, "peft_type": "LORA"} if config is None else config, f)
    return paths, written


def convert(tmp_path, *args, naming="deepseek", **adapter):
    (weights, config), written = write_adapter(tmp_path / "adapter", naming=naming, **adapter)
    out = str(tmp_path / "moe_lora.pt")
    rc = main(["--input", weights, "--config", config, "--output", out, *args])
    return rc, out, written


# ---- conversion -----------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", sorted(NAMING))
def test_convert_stacks_each_expert_in_kt_orientation(tmp_path, naming, capsys):
    rc, out, written = convert(tmp_path, "--verbose", naming=naming)
    assert rc == 0
    data = torch.load(out, weights_only=True)
    assert sorted(data) == ["layer_0", "layer_1", "metadata"]
    for layer in LAYERS:
        got = data[f"layer_{layer}"]
        assert sorted(got) == sorted(LORA_NAMES)
        for proj in ("gate", "up", "down"):
            for ab in ("a", "b"):
                stacked = got[f"{proj}_lora_{ab}"]
                assert stacked.dtype == torch.float32
                for e in range(E):
                    assert torch.equal(stacked[e], written[(layer, e, proj, ab.upper())]), (layer, e, proj, ab)
        # A: [E, r, in], B: [E, out, r]
        assert tuple(got["gate_lora_a"].shape) == (E, R, H) and tuple(got["gate_lora_b"].shape) == (E, I, R)
        assert tuple(got["down_lora_a"].shape) == (E, R, I) and tuple(got["down_lora_b"].shape) == (E, H, R)
    meta = data["metadata"]
    assert {
        k: meta[k]
        for k in ("lora_rank", "lora_alpha", "num_layers", "num_experts", "hidden_size", "intermediate_size", "layers")
    } == {
        "lora_rank": R,
        "lora_alpha": 8.0,
        "num_layers": 2,
        "num_experts": E,
        "hidden_size": H,
        "intermediate_size": I,
        "layers": [0, 1],
    }
    assert "self_attn.q_proj.lora_A.weight" in capsys.readouterr().err  # --verbose lists ignored keys


def test_parse_moe_key_names():
    assert parse_moe_key("base_model.model.model.layers.12.mlp.original_moe.experts.7.down_proj.lora_B.weight") == (
        12,
        7,
        "down",
        "b",
    )
    assert parse_moe_key("model.layers.3.block_sparse_moe.experts.0.w3.lora_A.weight") == (3, 0, "up", "a")
    assert parse_moe_key("model.layers.3.mlp.shared_experts.gate_proj.lora_A.weight") is None
    assert parse_moe_key("model.layers.3.self_attn.q_proj.lora_A.weight") is None


def test_alpha_sources_and_bf16_kept(tmp_path):
    rc, out, _ = convert(tmp_path, "--lora-alpha", "12", dtype=torch.bfloat16)
    data = torch.load(out, weights_only=True)
    assert rc == 0 and data["metadata"]["lora_alpha"] == 12.0 and data["metadata"]["lora_scaling"] == 3.0
    assert data["layer_0"]["up_lora_b"].dtype == torch.bfloat16
    # peft's alpha_pattern for the expert modules wins over the config's lora_alpha
    (weights, config), _ = write_adapter(
        tmp_path / "p", config={"r": R, "lora_alpha": 8, "alpha_pattern": {r"experts\.\d+\.\w+_proj": 2}}
    )
    stats = convert_moe_lora(weights, str(tmp_path / "p.pt"), config_path=config)
    assert stats["lora_alpha"] == 2.0 and stats["total_keys"] == 2 * E * 6
    # no config: alpha defaults to 32
    assert convert_moe_lora(weights, str(tmp_path / "d.pt"))["lora_alpha"] == 32.0


def test_missing_expert_or_projection_exit_2(tmp_path, capsys):
    rc, out, _ = convert(tmp_path / "gap", drop=[(1, 2, p, ab) for p in IN_OUT for ab in "AB"])
    assert rc == 2 and not os.path.exists(out)
    assert "layer 1: experts must be numbered 0..3, but expert(s) [2] have no LoRA" in capsys.readouterr().err
    rc, out, _ = convert(tmp_path / "half", drop=[(0, 3, "down", "B")])
    assert rc == 2 and not os.path.exists(out)
    assert "layer 0, expert 3: down projection has no lora_B weight" in capsys.readouterr().err


def test_rank_disagreeing_with_config_and_bad_shapes_exit_2(tmp_path, capsys):
    rc, _, _ = convert(tmp_path / "r", config={"r": 8, "lora_alpha": 16})
    assert rc == 2 and "config says rank r=8" in capsys.readouterr().err
    bad = {expert_key("deepseek", 0, 1, "up", "A"): torch.zeros(R, H + 1)}
    rc, _, _ = convert(tmp_path / "s", extra=bad)
    assert rc == 2 and "layer 0, expert 1: up lora_A has shape (4, 33), expected (4, 32)" in capsys.readouterr().err
    dora = {expert_key("deepseek", 0, 1, "up", "A").replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(I)}
    rc, _, _ = convert(tmp_path / "m", extra=dora)
    assert rc == 2 and "cannot apply" in capsys.readouterr().err
    weights = str(tmp_path / "r" / "adapter" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter config not found"):
        convert_moe_lora(weights, str(tmp_path / "x.pt"), config_path=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="lora_alpha must be positive"):
        convert_moe_lora(weights, str(tmp_path / "x.pt"), lora_alpha=0)
    assert main(["--input", weights, "--output", str(tmp_path / "no" / "dir.pt")]) == 2
    assert "output directory does not exist" in capsys.readouterr().err


def test_no_moe_keys_is_a_clean_no_op(tmp_path, capsys):
    rc, out, _ = convert(tmp_path, layers=())
    assert rc == 0 and not os.path.exists(out)
    assert "nothing to convert" in capsys.readouterr().err
    weights = str(tmp_path / "adapter" / "adapter_model.safetensors")
    assert convert_peft_to_kt_format(weights, out) == {"status": "skipped", "reason": "no_moe_keys"}
    assert not os.path.exists(out)


# ---- KTConfig -------------------------------------------------------------------------------------

BASE_CONFIG = dict(
    layer_idx=1,
    num_gpu_experts=0,
    cpuinfer_threads=2,
    threadpool_count=1,
    weight_path=None,
    chunked_prefill_size=512,
    max_deferred_experts_per_token=None,
    method="AMXINT8",
)


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (dict(layer_idx=-1), ValueError, "KTConfig.layer_idx must be >= 0"),
        (dict(cpuinfer_threads=1.0), TypeError, "KTConfig.cpuinfer_threads must be an int"),
        (dict(cpuinfer_threads=1, threadpool_count=2), ValueError, "cpuinfer_threads"),
        (dict(method="AMXBF16_SFT"), ValueError, "KTConfig.method must be one of"),
        (dict(sft_method="AMXINT8"), ValueError, "KTConfig.sft_method must be one of"),
        (dict(moe_lora_enabled=True), ValueError, "needs moe_lora_path"),
        (dict(moe_lora_path="x.pt"), ValueError, "moe_lora_enabled is False"),
        (dict(lora_alpha=0), ValueError, "KTConfig.lora_alpha must be positive"),
        (dict(lora_rank=0), ValueError, "KTConfig.lora_rank must be positive"),
        (dict(num_layers=1), ValueError, "layer_idx \\(1\\) must be below num_layers \\(1\\)"),
        (dict(weight_path=3), TypeError, "KTConfig.weight_path must be a path"),
    ],
)
def test_kt_config_validation(bad, error, match):
    with pytest.raises(error, match=match):
        KTConfig(**{**BASE_CONFIG, **bad})


def test_get_sft_weight_path():
    bf16 = KTConfig(**{**BASE_CONFIG, "weight_path": "/kt", "model_path": "/hf"})
    assert get_sft_weight_path(bf16) == "/hf"
    assert get_sft_weight_path(KTConfig(**{**BASE_CONFIG, "weight_path": "/kt", "sft_method": "AMXINT8_SFT"})) == "/kt"
    with pytest.raises(ValueError, match="KTConfig.model_path is not set: sft_method AMXBF16_SFT"):
        get_sft_weight_path(KTConfig(**{**BASE_CONFIG, "weight_path": "/kt"}))
    with pytest.raises(ValueError, match="KTConfig.weight_path is not set"):
        get_sft_weight_path(KTConfig(**{**BASE_CONFIG, "sft_method": "AMXINT4_SFT"}))


# ---- lifecycle ------------------------------------------------------------------------------------


@pytest.fixture
def lora_file(tmp_path):
    rc, out, _ = convert(tmp_path)
    assert rc == 0
    yield out
    clear_moe_lora_cache()


def layer_method(config=None, **overrides):
    cfg = config or KTConfig(**{**BASE_CONFIG, **overrides})
    method = KTEPWrapperMethod(cfg, num_experts_per_tok=K)
    method.create_weights(None, E, H, I, torch.bfloat16)
    return method


def serving_case(lora_file, layer=1, seed=7, T=6):
    """Base weights and tokens from make_case, LoRA and scaling from the converted file."""
    case = make_case(seed=seed, T=T, E=E, k=K, H=H, I=I, r=R)
    lora, meta = load_moe_lora_layer(lora_file, layer)
    return type(case)(
        **{
            **case.__dict__,
            "lora": tuple(lora[n] for n in LORA_NAMES),
            "scaling": meta["lora_alpha"] / meta["lora_rank"],
        }
    )


def direct_sft_wrapper(case, layer=1):
    w = KTMoEWrapper(
        layer_idx=layer,
        num_experts=E,
        num_experts_per_tok=K,
        hidden_size=H,
        moe_intermediate_size=I,
        num_gpu_experts=0,
        cpuinfer_threads=2,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=512,
        mode="sft",
        method="AMXBF16_SFT",
        lora_rank=R,
        lora_alpha=case.scaling * R,
    )
    w.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(E))
    w.init_lora_weights(*case.lora)
    return w


def test_lora_lifecycle_matches_direct_wrapper_and_reference(lora_file):
    case = serving_case(lora_file)
    method = layer_method(moe_lora_enabled=True, moe_lora_path=lora_file)
    assert method.wrapper.method == "AMXBF16_SFT" and method.wrapper.lora_alpha == 8.0
    method.process_weights_after_loading(None, gate_proj=case.gate, up_proj=case.up, down_proj=case.down)
    other = make_case(seed=8, T=3, E=E, k=K, H=H, I=I, r=R)
    hidden = case.hidden.clone()
    method.submit(hidden, case.ids, case.weights)
    hidden.zero_()  # the engine may reuse its buffer before sync(): submit() must have taken a copy
    method.submit(other.hidden, other.ids.to(torch.int32), other.weights)  # engines route with int32 ids
    out, out_other = method.sync(case.hidden), method.sync(other.hidden)
    direct = direct_sft_wrapper(case)
    assert torch.equal(out, direct.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=False))
    assert torch.equal(out_other, direct.forward_sft(other.hidden, other.ids, other.weights, save_for_backward=False))
    compare_with_reference(case, out, None, "tight", ref=run_reference(case, with_grads=False))
    # the LoRA is really applied: the base experts alone differ
    no_lora = type(case)(**{**case.__dict__, "lora": tuple(torch.zeros_like(t) for t in case.lora)})
    assert (out.double() - run_reference(no_lora, with_grads=False)[0]).abs().max() > 1e-2
    assert direct._cache_depth == 0 and method.wrapper._cache_depth == 0
    with pytest.raises(RuntimeError, match="without a pending submit"):
        method.sync(case.hidden)


def test_lora_follows_the_physical_to_logical_map(lora_file):
    case = serving_case(lora_file, seed=9)
    mapping = torch.tensor([2, 0, 3, 1])
    method = layer_method(moe_lora_enabled=True, moe_lora_path=lora_file)
    method.process_weights_after_loading(None, mapping, gate_proj=case.gate, up_proj=case.up, down_proj=case.down)
    out = method.apply(case.hidden, case.ids, case.weights)
    # ids are physical slots; slot p runs logical expert mapping[p], base and LoRA alike
    logical = type(case)(**{**case.__dict__, "ids": mapping[case.ids]})
    compare_with_reference(logical, out, None, "tight", ref=run_reference(logical, with_grads=False))


def test_base_weights_from_model_path_equal_tensors(tmp_path, lora_file):
    case = serving_case(lora_file, seed=10)
    tensors = {
        f"model.layers.1.mlp.experts.{e}.{name}.weight": t[e].clone()
        for e in range(E)
        for name, t in zip(("gate_proj", "up_proj", "down_proj"), case.base())
    }
    os.makedirs(tmp_path / "hf")
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    from_file = layer_method(
        moe_lora_enabled=True,
        moe_lora_path=lora_file,
        model_path=str(tmp_path / "hf"),
        weight_path="/not/used/for/bf16",
    )
    from_file.process_weights_after_loading(None)
    from_tensors = layer_method(moe_lora_enabled=True, moe_lora_path=lora_file)
    from_tensors.process_weights_after_loading(None, gate_proj=case.gate, up_proj=case.up, down_proj=case.down)
    assert torch.equal(
        from_file.apply(case.hidden, case.ids, case.weights), from_tensors.apply(case.hidden, case.ids, case.weights)
    )
    no_path = layer_method(moe_lora_enabled=True, moe_lora_path=lora_file)
    with pytest.raises(ValueError, match="KTConfig.model_path is not set"):
        no_path.process_weights_after_loading(None)


def test_gpu_experts_are_skipped_in_lora_mode(lora_file):
    case = serving_case(lora_file, seed=11)
    with pytest.warns(RuntimeWarning, match="GPU experts are skipped"):
        method = layer_method(moe_lora_enabled=True, moe_lora_path=lora_file, num_gpu_experts=2)
    method.process_weights_after_loading(None, gate_proj=case.gate, up_proj=case.up, down_proj=case.down)
    out = method.apply(case.hidden, case.ids, case.weights)
    cpu_only = type(case)(**{**case.__dict__, "ids": torch.where(case.ids < 2, -1, case.ids)})
    assert torch.equal(
        out,
        direct_sft_wrapper(case).forward_sft(cpu_only.hidden, cpu_only.ids, cpu_only.weights, save_for_backward=False),
    )


def test_inference_mode_without_lora():
    case = make_case(seed=12, T=5, E=E, k=K, H=H, I=I, r=R)
    method = layer_method()
    assert method.wrapper.method == "AMXINT8" and not method.lora_mode
    method.process_weights_after_loading(None, gate_proj=case.gate, up_proj=case.up, down_proj=case.down)
    method.submit(case.hidden, case.ids, case.weights)
    out = method.sync(case.hidden)
    direct = KTMoEWrapper(
        layer_idx=1,
        num_experts=E,
        num_experts_per_tok=K,
        hidden_size=H,
        moe_intermediate_size=I,
        num_gpu_experts=0,
        cpuinfer_threads=2,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=512,
        mode="inference",
        method="AMXINT8",
    )
    direct.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(E))
    assert torch.equal(out, direct.forward(case.hidden, case.ids, case.weights))
    no_lora = type(case)(**{**case.__dict__, "lora": tuple(torch.zeros_like(t) for t in case.lora)})
    ref = run_reference(no_lora, with_grads=False)[0]
    assert (out.double() - ref).abs().mean() / ref.abs().mean() < 0.02  # int8 weights
    with pytest.raises(ValueError, match="KTConfig.weight_path is not set"):
        layer_method().process_weights_after_loading(None)


def test_lifecycle_errors(tmp_path, lora_file):
    case = serving_case(lora_file)
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="MoE LoRA file not found: .*missing.pt"):
        layer_method(moe_lora_enabled=True, moe_lora_path=missing)
    with pytest.raises(
        KeyError,
        match=r"layer 5 not found in MoE LoRA file .*"
        r"available layers: \['layer_0', 'layer_1'\]",
    ):
        layer_method(moe_lora_enabled=True, moe_lora_path=lora_file, layer_idx=5)
    with pytest.raises(ValueError, match="KTConfig.lora_rank=8 but MoE LoRA file .* has rank 4"):
        layer_method(moe_lora_enabled=True, moe_lora_path=lora_file, lora_rank=8)
    with pytest.raises(ValueError, match="KTConfig.lora_alpha=32.0 but .* converted with lora_alpha=8.0"):
        layer_method(moe_lora_enabled=True, moe_lora_path=lora_file, lora_alpha=32.0)
    # a layer wider than the adapter
    method = KTEPWrapperMethod(KTConfig(**{**BASE_CONFIG, "moe_lora_enabled": True, "moe_lora_path": lora_file}), K)
    method.create_weights(None, E, H, 2 * I)
    with pytest.raises(ValueError, match=r"layer_1.gate_lora_b has shape \(4, 32, 4\), this layer needs \(4, 64, 4\)"):
        method.process_weights_after_loading(
            None,
            gate_proj=torch.zeros(E, 2 * I, H),
            up_proj=torch.zeros(E, 2 * I, H),
            down_proj=torch.zeros(E, H, 2 * I),
        )
    method = layer_method(moe_lora_enabled=True, moe_lora_path=lora_file)
    with pytest.raises(RuntimeError, match="submit\\(\\) before process_weights_after_loading"):
        method.submit(case.hidden, case.ids, case.weights)
    with pytest.raises(ValueError, match="pass all of gate_proj, up_proj, down_proj"):
        method.process_weights_after_loading(None, gate_proj=case.gate)
    method.process_weights_after_loading(None, gate_proj=case.gate, up_proj=case.up, down_proj=case.down)
    with pytest.raises(RuntimeError, match="already ran"):
        method.process_weights_after_loading(None, gate_proj=case.gate, up_proj=case.up, down_proj=case.down)
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        method.submit(case.hidden[:, :8], case.ids, case.weights)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot be read as a converted MoE LoRA"):
        layer_method(moe_lora_enabled=True, moe_lora_path=str(corrupt))


def test_other_tp_ranks_contribute_zeros(lora_file):
    cfg = KTConfig(**{**BASE_CONFIG, "moe_lora_enabled": True, "moe_lora_path": lora_file})
    method = KTEPWrapperMethod(cfg, K, tp_rank=1, tp_size=2)
    method.create_weights(None, E, H, I // 2)
    method.process_weights_after_loading(None)
    x = torch.randn(3, H)
    method.submit(x, torch.zeros(3, K, dtype=torch.int64), torch.ones(3, K))
    assert method.wrapper is None and torch.equal(method.sync(x), torch.zeros_like(x))


def test_fill_missing_experts(tmp_path, capsys):
    # what save_kt_adapter writes when the first experts stayed on the GPU while training
    drop = [(layer, 0, p, ab) for layer in LAYERS for p in IN_OUT for ab in "AB"]
    rc, out, _ = convert(tmp_path / "strict", drop=drop)
    assert rc == 2 and "pass --fill-missing-experts" in capsys.readouterr().err
    rc, out, written = convert(tmp_path / "filled", "--fill-missing-experts", drop=drop)
    data = torch.load(out, weights_only=True)
    assert rc == 0 and data["metadata"]["filled_experts"] == {0: [0], 1: [0]}
    assert not data["layer_1"]["down_lora_b"][0].any()
    assert torch.equal(data["layer_1"]["down_lora_b"][3], written[(1, 3, "down", "B")])
    # an expert with only some of its tensors is never filled
    rc, _, _ = convert(tmp_path / "partial", "--fill-missing-experts", drop=[(0, 2, "up", "A")])
    assert rc == 2 and "layer 0, expert 2: up projection has no lora_A weight" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_adapter_saved_by_kt_training_serves_like_the_trained_experts(tmp_path, name):
    """kt-sft's save_kt_adapter -> convert_moe_lora -> KTEPWrapperMethod gives the trained layer's output."""
    pytest.importorskip("transformers")
    import kt_ops
    from kt_ops.integration import apply_kt, kt_experts_modules, kt_lora_parameters, save_kt_adapter
    from kt_ops.integration.tiny import tiny_model

    model = apply_kt(tiny_model(name), lora_rank=4, lora_alpha=8.0)
    with torch.no_grad():
        for p in kt_lora_parameters(model):
            p.normal_(std=0.3)
    save_kt_adapter(model, str(tmp_path / "adapter"))
    out = str(tmp_path / "moe_lora.pt")
    assert (
        main(
            [
                "--input",
                str(tmp_path / "adapter" / "adapter_model.safetensors"),
                "--config",
                str(tmp_path / "adapter" / "adapter_config.json"),
                "--output",
                out,
            ]
        )
        == 0
    )
    _, _, kt = kt_experts_modules(model)[-1]
    layer_idx = kt.layer_idx
    gate, up, down = kt_ops.unpack_experts(kt.experts)
    cfg = KTConfig(**{**BASE_CONFIG, "layer_idx": layer_idx, "moe_lora_enabled": True, "moe_lora_path": out})
    method = KTEPWrapperMethod(cfg, num_experts_per_tok=2)
    method.create_weights(None, kt.num_experts, kt.hidden_size, kt.intermediate_size)
    method.process_weights_after_loading(None, gate_proj=gate, up_proj=up, down_proj=down)
    assert (method.wrapper.lora_rank, method.wrapper.lora_alpha) == (4, 8.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, kt.hidden_size, generator=g).to(torch.bfloat16).float()
    ids = torch.stack([torch.randperm(kt.num_experts, generator=g)[:2] for _ in range(5)])
    w = torch.rand(5, 2, generator=g) + 0.1
    with torch.no_grad():
        expected = kt(x, ids, w)
    got = method.apply(x, ids, w)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    clear_moe_lora_cache()
