"""The saved pre-quantized form: packed experts of one or more layers in a safetensors file.

Keys per layer L: `blk.{L}.ffn_{gate,up,down}_exps.weight` (the uint8 blobs, [E, bytes]) and, for
quantized formats, `blk.{L}.ffn_{gate,up,down}_exps.scale` (fp32). The file's metadata records each
layer's `weight_format`, `num_experts`, `hidden_size` and `intermediate_size`. Loading gives back the
packed tensors bit for bit, so a checkpoint is quantized once and memory-mapped afterwards.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch

from .ops import WEIGHT_FORMATS, PackedExperts

_PROJECTIONS = ("gate", "up", "down")
_METADATA_KEY = "kt_ops.layers"


def _key(layer_idx: int, projection: str, kind: str) -> str:
    return f"blk.{layer_idx}.ffn_{projection}_exps.{kind}"


def save_packed_experts(path: str, layers: Mapping[int, PackedExperts], overwrite: bool = False) -> None:
    """Write `layers` ({layer_idx: PackedExperts}) to the safetensors file `path`. The file appears
    whole or not at all (written beside it, then renamed); an existing file is kept unless
    `overwrite=True`."""
    from safetensors.torch import save_file

    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors, meta = {}, {}
    for layer_idx, experts in layers.items():
        if not isinstance(experts, PackedExperts):
            raise TypeError(f"layers[{layer_idx}] must be a PackedExperts, got {type(experts).__name__}")
        for projection in _PROJECTIONS:
            tensors[_key(layer_idx, projection, "weight")] = getattr(experts, projection).contiguous()
            scale = getattr(experts, projection + "_scale")
            if scale is not None:
                tensors[_key(layer_idx, projection, "scale")] = scale.contiguous()
        meta[str(layer_idx)] = {"weight_format": experts.weight_format, "num_experts": experts.num_experts,
                                "hidden_size": experts.hidden_size, "intermediate_size": experts.intermediate_size}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def packed_layers(path: str) -> list[int]:
    """Layer indices stored in a file written by save_packed_experts."""
    return sorted(int(k) for k in _read_metadata(path))


def _read_metadata(path: str) -> dict:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no packed-experts file at {path}")
    with safe_open(path, framework="pt") as f:
        meta = (f.metadata() or {}).get(_METADATA_KEY)
    if meta is None:
        raise ValueError(f"{path} is not a kt_ops packed-experts file (no '{_METADATA_KEY}' metadata)")
    return json.loads(meta)


def load_packed_experts(path: str, layer_idx: int) -> PackedExperts:
    """The PackedExperts of layer `layer_idx` saved in `path`."""
    from safetensors import safe_open

    meta = _read_metadata(path).get(str(layer_idx))
    if meta is None:
        raise KeyError(f"layer {layer_idx} is not in {path}; it holds layers {packed_layers(path)}")
    if meta["weight_format"] not in WEIGHT_FORMATS:
        raise ValueError(f"{path}: layer {layer_idx} has unknown weight_format {meta['weight_format']!r}")
    fields = {}
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
        for projection in _PROJECTIONS:
            weight_key, scale_key = _key(layer_idx, projection, "weight"), _key(layer_idx, projection, "scale")
            if weight_key not in names:
                raise KeyError(f"{path}: missing tensor {weight_key}")
            fields[projection] = f.get_tensor(weight_key)
            quantized = meta["weight_format"] != "bf16"
            if quantized and scale_key not in names:
                raise KeyError(f"{path}: missing tensor {scale_key}")
            fields[projection + "_scale"] = f.get_tensor(scale_key) if quantized else None
    return PackedExperts(**fields, weight_format=meta["weight_format"], num_experts=meta["num_experts"],
                         hidden_size=meta["hidden_size"], intermediate_size=meta["intermediate_size"])
