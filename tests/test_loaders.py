"""Safetensors loaders (pre-quantized form and HuggingFace float checkpoints) and the
convert_weights tool, on tiny checkpoints written into tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import kt_ops
from kt_ops.weights import convert as convert_weights
from kt_ops.weights.convert import MANIFEST_NAME, main
from kt_ops.weights.loaders import INDEX_NAME, BF16SafeTensorLoader, SafeTensorLoader

E, H, I = 4, 64, 32
MOE_LAYERS = (0, 2)  # layer 1 is dense, so moe_layers() must skip it


def make_layer(seed: int, dtype=torch.bfloat16, num_experts: int = E):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        (torch.randn(shape, generator=g) / 8).to(dtype)
        for shape in ((num_experts, I, H), (num_experts, I, H), (num_experts, H, I))
    )


def layer_tensors(fmt: str, base: str, gate, up, down) -> dict:
    if fmt == "fused":
        return {
            f"{base}.mlp.experts.gate_up_proj": torch.cat([gate, up], dim=1).contiguous(),
            f"{base}.mlp.experts.down_proj": down.contiguous(),
        }
    module, names = {
        "deepseek": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
        "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2")),
    }[fmt]
    return {
        f"{base}.{module}.{e}.{name}.weight": t[e].clone()
        for e in range(gate.shape[0])
        for name, t in zip(names, (gate, up, down))
    }


def write_checkpoint(root, fmt="deepseek", prefix="model.layers", shards=1, dtype=torch.bfloat16, extra=None):
    """A HuggingFace-style checkpoint; returns {layer: (gate, up, down)} as written."""
    os.makedirs(root, exist_ok=True)
    layers = {L: make_layer(L, dtype) for L in MOE_LAYERS}
    tensors = {
        "model.embed_tokens.weight": torch.randn(8, H).to(dtype),
        f"{prefix}.1.mlp.gate_proj.weight": torch.randn(I, H).to(dtype),
    }  # a dense layer
    for L, weights in layers.items():
        tensors.update(layer_tensors(fmt, f"{prefix}.{L}", *weights))
    tensors.update(extra or {})
    if shards == 1:
        save_file(tensors, os.path.join(root, "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: v for i, (k, v) in enumerate(sorted(tensors.items())) if i % shards == s}
            save_file(part, os.path.join(root, name))
            weight_map.update(dict.fromkeys(part, name))
        with open(os.path.join(root, INDEX_NAME), "w") as fh:
            json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return layers


def assert_same(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


CASES = {
    "deepseek": ("deepseek", "model.layers", 1),
    "mixtral": ("mixtral", "model.layers", 1),
    "fused": ("fused", "model.layers", 1),
    "model.language_model": ("deepseek", "model.language_model.layers", 1),
    "language_model.model": ("mixtral", "language_model.model.layers", 1),
    "fused+language_model": ("fused", "model.language_model.layers", 2),
    "sharded": ("deepseek", "model.layers", 2),
}


@pytest.mark.parametrize("case", CASES)
def test_bf16_loader_key_formats(tmp_path, case):
    fmt, prefix, shards = CASES[case]
    layers = write_checkpoint(tmp_path, fmt, prefix, shards)
    with BF16SafeTensorLoader(str(tmp_path)) as loader:
        assert loader.moe_layers() == list(MOE_LAYERS) == loader.layers()
        for L, (gate, up, down) in layers.items():
            base = f"model.layers.{L}"
            assert loader.num_experts(base) == E
            got = loader.load_experts(base)
            assert set(got) == {"gate", "up", "down", "gate_scale", "up_scale", "down_scale"}
            assert got["gate_scale"] is got["up_scale"] is got["down_scale"] is None
            for name, ref in (("gate", gate), ("up", up), ("down", down)):
                assert len(got[name]) == E
                for e in range(E):
                    assert_same(got[name][e], ref[e])
            for t, ref in zip(loader.load_stacked(base), (gate, up, down)):
                assert_same(t, ref)
                assert t.is_contiguous()
            # The prefix as stored is accepted as a base key too.
            assert_same(loader.load_stacked(f"{prefix}.{L}")[2], down)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bf16_loader_keeps_stored_dtype_and_reads_single_file(tmp_path, dtype):
    layers = write_checkpoint(tmp_path, "mixtral", dtype=dtype)
    loader = BF16SafeTensorLoader(str(tmp_path / "model.safetensors"))
    got = loader.load_experts("model.layers.2", device="cpu")
    assert got["up"][3].dtype == dtype and torch.equal(got["up"][3], layers[2][1][3])
    assert_same(loader.load_stacked("model.layers.0")[0], layers[0][0])


def _drop(tmp_path, key_part):
    """Rewrite the single-file checkpoint without the keys containing `key_part`."""
    from safetensors.torch import load_file

    path = str(tmp_path / "model.safetensors")
    tensors = {k: v for k, v in load_file(path).items() if key_part not in k}
    save_file(tensors, path)


def test_missing_expert_id_is_value_error(tmp_path):
    write_checkpoint(tmp_path)
    _drop(tmp_path, "layers.0.mlp.experts.2.")
    loader = BF16SafeTensorLoader(str(tmp_path))
    with pytest.raises(ValueError, match=r"'model\.layers\.0'.*missing expert ids \[2\]"):
        loader.load_experts("model.layers.0")
    with pytest.raises(ValueError, match=r"missing expert ids \[2\]"):
        loader.load_stacked("model.layers.0")
    assert loader.load_stacked("model.layers.2")[0].shape == (E, I, H)  # other layers still load


def test_missing_projection_is_value_error(tmp_path):
    write_checkpoint(tmp_path, "mixtral")
    _drop(tmp_path, "layers.2.block_sparse_moe.experts.3.w2.")
    with pytest.raises(ValueError, match=r"'model\.layers\.2'.*\{3: \['w2'\]\}"):
        BF16SafeTensorLoader(str(tmp_path)).num_experts("model.layers.2")


def test_no_experts_is_value_error_listing_formats(tmp_path):
    write_checkpoint(tmp_path)
    loader = BF16SafeTensorLoader(str(tmp_path))
    for base in ("model.layers.1", "model.layers.7"):
        with pytest.raises(ValueError, match=r"no experts found for base_key.*deepseek.*mixtral.*fused"):
            loader.load_experts(base)


def test_tensor_missing_from_indexed_shard_is_key_error(tmp_path):
    write_checkpoint(tmp_path, shards=2)
    with open(tmp_path / INDEX_NAME) as fh:
        index = json.load(fh)
    ghost = "model.layers.0.mlp.experts.4.gate_proj.weight"  # named by the index, in no shard
    index["weight_map"].update(
        {
            ghost: "model-00001-of-00002.safetensors",
            ghost.replace("gate", "up"): "model-00001-of-00002.safetensors",
            ghost.replace("gate", "down"): "model-00002-of-00002.safetensors",
        }
    )
    with open(tmp_path / INDEX_NAME, "w") as fh:
        json.dump(index, fh)
    loader = BF16SafeTensorLoader(str(tmp_path))
    with pytest.raises(KeyError, match=r"experts\.4\.(gate|up|down)_proj\.weight"):
        loader.load_experts("model.layers.0")
    assert loader.num_experts("model.layers.0") == E + 1  # the index is trusted until a tensor is read
    assert loader.load_experts("model.layers.2")["gate"][0].shape == (I, H)


def test_loader_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BF16SafeTensorLoader(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"without \*\.safetensors"):
        BF16SafeTensorLoader(str(tmp_path))
    with pytest.raises(TypeError, match="path must be"):
        SafeTensorLoader(3)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        BF16SafeTensorLoader(str(tmp_path))
    os.remove(tmp_path / "junk.safetensors")
    fp8 = {
        f"model.layers.0.mlp.experts.0.{p}.weight": torch.zeros(2, 2).to(torch.float8_e4m3fn)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    save_file(fp8, str(tmp_path / "model.safetensors"))
    loader = BF16SafeTensorLoader(str(tmp_path))
    with pytest.raises(TypeError, match=r"gate_proj\.weight' has dtype torch\.float8_e4m3fn"):
        loader.load_experts("model.layers.0")
    with pytest.raises(TypeError, match="base_key must be"):
        loader.load_experts(0)
    with pytest.raises(ValueError, match="device must be"):
        loader.load_experts("model.layers.0", device="no-such-device")
    (tmp_path / INDEX_NAME).write_text("{}")
    with pytest.raises(ValueError, match="weight_map"):
        BF16SafeTensorLoader(str(tmp_path))


def test_fused_shape_mismatch(tmp_path):
    gate, up, down = make_layer(0)
    tensors = layer_tensors("fused", "model.layers.0", gate, up, down)
    tensors["model.layers.0.mlp.experts.down_proj"] = down[:, :, :-2].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"down_proj' must be \[E, H, I\]"):
        BF16SafeTensorLoader(str(tmp_path)).load_stacked("model.layers.0")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_file_handle_stays_open(tmp_path):
    write_checkpoint(tmp_path / "hf", shards=2)
    experts = kt_ops.pack_experts(*make_layer(0), "int8")
    kt_ops.save_packed_experts(str(tmp_path / "q.safetensors"), {0: experts})
    before = _open_fds()
    loader = BF16SafeTensorLoader(str(tmp_path / "hf"))
    loader.load_experts("model.layers.0")
    loader.load_stacked("model.layers.2")
    loader.moe_layers()
    with pytest.raises(ValueError):
        loader.load_experts("model.layers.1")
    packed = SafeTensorLoader(str(tmp_path / "q.safetensors"))
    packed.load_experts("blk.0")
    packed.load_packed(0)
    assert _open_fds() == before


def test_safetensor_loader_reads_packed_form(tmp_path):
    packs = {0: kt_ops.pack_experts(*make_layer(0), "int8"), 3: kt_ops.pack_experts(*make_layer(3), "bf16")}
    kt_ops.save_packed_experts(str(tmp_path / "a.safetensors"), {0: packs[0]})
    kt_ops.save_packed_experts(str(tmp_path / "b.safetensors"), {3: packs[3]})
    for path in (str(tmp_path), str(tmp_path / "a.safetensors")):
        loader = SafeTensorLoader(path)
        assert loader.layers() == ([0, 3] if path == str(tmp_path) else [0])
        got = loader.load_experts("blk.0")
        for name in ("gate", "up", "down", "gate_scale", "up_scale", "down_scale"):
            assert_same(got[name], getattr(packs[0], name))
        with pytest.raises(KeyError, match=r"blk\.5\.ffn_gate_exps\.weight.*available layers: blk\.0"):
            loader.load_experts("blk.5")
        with pytest.raises(KeyError, match=r"layer 5 .*available layers: \[0"):
            loader.load_packed(5)
    loader = SafeTensorLoader(str(tmp_path))
    assert loader.load_experts("blk.3")["gate_scale"] is None
    assert _packed_equal(loader.load_packed(3), packs[3])
    with pytest.raises(ValueError, match="blk.<layer>"):
        loader.load_experts("model.layers.0")


def _packed_equal(a, b) -> bool:
    meta = ("weight_format", "num_experts", "hidden_size", "intermediate_size")
    if any(getattr(a, m) != getattr(b, m) for m in meta):
        return False
    for name in ("gate", "up", "down", "gate_scale", "up_scale", "down_scale"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not (x.dtype == y.dtype and torch.equal(x, y))):
            return False
    return True


# --- convert_weights ---------------------------------------------------------------------------


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("method,group_size", [("AMXBF16_SFT", 128), ("AMXINT8_SFT", 128), ("AMXINT4_KGroup_SFT", 32)])
def test_convert_round_trip_is_bit_identical(tmp_path, capsys, method, group_size):
    layers = write_checkpoint(tmp_path / "hf", "fused" if method == "AMXINT8_SFT" else "deepseek", shards=2)
    out = tmp_path / "out"
    code, err = run(capsys, "--input", tmp_path / "hf", "--output", out, "--method", method, "--group-size", group_size)
    assert code == 0, err
    assert f"layer {len(MOE_LAYERS)}/{len(MOE_LAYERS)} [" in err and "s/layer" in err
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    fmt = kt_ops.SFT_METHOD_FORMATS[method]
    assert manifest["method"] == method and manifest["weight_format"] == fmt and manifest["layers"] == list(MOE_LAYERS)
    assert manifest["source"] == os.path.abspath(tmp_path / "hf")
    loader = SafeTensorLoader(str(out))
    assert loader.layers() == list(MOE_LAYERS)
    for L, weights in layers.items():
        assert _packed_equal(loader.load_packed(L), kt_ops.pack_experts(*weights, fmt, group_size))


def _mtimes(out) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("blk.*.safetensors")}


def test_convert_resume_overwrite_and_refusals(tmp_path, capsys, monkeypatch):
    write_checkpoint(tmp_path / "hf", "mixtral")
    hf, out = tmp_path / "hf", tmp_path / "out"
    packed_layers = []
    real_pack = convert_weights.pack_experts

    def counting_pack(gate, *args):
        packed_layers.append(gate.shape)
        return real_pack(gate, *args)

    monkeypatch.setattr(convert_weights, "pack_experts", counting_pack)
    base = ("--input", hf, "--output", out, "--quiet")
    code, err = run(capsys, *base, "--method", "AMXINT8_SFT")
    assert (code, err) == (0, "") and len(packed_layers) == 2

    # Resume: only the deleted layer is rewritten; a crashed write's temp file is cleaned up.
    before = _mtimes(out)
    os.remove(out / "blk.2.safetensors")
    (out / "blk.2.safetensors.tmp-12345").write_bytes(b"partial")
    code, _ = run(capsys, *base, "--method", "AMXINT8_SFT")
    assert code == 0 and len(packed_layers) == 3
    after = _mtimes(out)
    assert after["blk.0.safetensors"] == before["blk.0.safetensors"] and "blk.2.safetensors" in after
    assert not list(out.glob("*.tmp-*"))
    assert json.loads((out / MANIFEST_NAME).read_text())["layers"] == [0, 2]

    # A truncated layer file is not complete: it is rewritten.
    (out / "blk.0.safetensors").write_bytes(b"\0" * 10)
    assert run(capsys, *base, "--method", "int8")[0] == 0 and len(packed_layers) == 4
    assert SafeTensorLoader(str(out)).load_packed(0).weight_format == "int8"

    # Other settings: refused without --overwrite, nothing touched.
    code, err = run(capsys, *base, "--method", "AMXINT4_SFT")
    assert code == 2 and "weight_format: 'int8' there, 'int4' now" in err and "--overwrite" in err
    assert len(packed_layers) == 4 and SafeTensorLoader(str(out)).load_packed(2).weight_format == "int8"
    code, _ = run(capsys, *base, "--method", "AMXINT4_SFT", "--overwrite")
    assert code == 0 and len(packed_layers) == 6
    assert {SafeTensorLoader(str(out)).load_packed(L).weight_format for L in MOE_LAYERS} == {"int4"}

    # --layers converts a subset into a fresh directory.
    sub = tmp_path / "sub"
    assert run(capsys, "--input", hf, "--output", sub, "--quiet", "--method", "int8", "--layers", "2")[0] == 0
    assert SafeTensorLoader(str(sub)).layers() == [2]

    # A non-empty directory that is not a kt_ops output is refused; --overwrite keeps foreign files.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, err = run(capsys, "--input", hf, "--output", foreign, "--quiet", "--method", "int8")
    assert code == 2 and "not a kt_ops conversion" in err
    assert run(capsys, "--input", hf, "--output", foreign, "--quiet", "--method", "int8", "--overwrite")[0] == 0
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "args,message",
    [
        (("--method", "AMXFP4_SFT"), "unknown --method 'AMXFP4_SFT'; supported: AMXBF16_SFT, AMXINT8_SFT"),
        (("--method", "int4_kgroup", "--group-size", "48"), "group_size 48"),
        (("--method", "int8", "--group-size", "0"), "--group-size must be positive"),
        (("--method", "int8", "--layers", "1"), "--layers [1] have no experts"),
        (("--method", "int8", "--layers", "a,b"), "--layers must be comma-separated"),
    ],
)
def test_convert_bad_arguments(tmp_path, capsys, args, message):
    write_checkpoint(tmp_path / "hf")
    code, err = run(capsys, "--input", tmp_path / "hf", "--output", tmp_path / "out", "--quiet", *args)
    assert code == 2 and message in err, err


def test_convert_failed_run_does_not_block_a_corrected_one(tmp_path, capsys):
    write_checkpoint(tmp_path / "hf")
    base = ("--input", tmp_path / "hf", "--output", tmp_path / "out", "--quiet", "--method", "int4_kgroup")
    assert run(capsys, *base, "--group-size", "48")[0] == 2
    assert run(capsys, *base, "--group-size", "32")[0] == 0


def test_convert_as_module(tmp_path):
    write_checkpoint(tmp_path / "hf", "fused")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kt_ops.convert_weights",
            "--input",
            str(tmp_path / "hf"),
            "--output",
            str(out),
            "--method",
            "AMXINT8_SFT",
            "--layers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(kt_ops.__file__))),
    )
    assert proc.returncode == 0, proc.stderr
    assert "layer 1/1 [" in proc.stderr and SafeTensorLoader(str(out)).layers() == [0]
