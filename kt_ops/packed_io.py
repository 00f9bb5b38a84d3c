"""The saved pre-quantized form: packed experts of one or more layers in a safetensors file.

Keys per layer L: `blk.{L}.ffn_{gate,up,down}_exps.weight` (the uint8 blobs, [E, bytes]) and, for
quantized formats, `blk.{L}.ffn_{gate,up,down}_exps.scale` (fp32). The file's metadata records each
layer's `weight_format`, `num_experts`, `hidden_size` and `intermediate_size`. Loading gives back the
packed tensors bit for bit, so a checkpoint is quantized once and memory-mapped afterwards.

`load_packed_experts(..., mmap=True)` returns read-only views of one shared mapping of the file
instead of copies: every process of a node that maps the same file uses the same page-cache pages,
so N training processes hold the experts once (their PSS splits the pages between them).
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


_MAPPED: dict = {}  # (real path, size, mtime) -> (read-only np.memmap of the file, its header)
_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I32": torch.int32, "I64": torch.int64}


def _mapped_file(path: str):
    """One read-only shared mapping per file and process (a second mapping of the same pages would
    count them twice in this process's PSS)."""
    import numpy as np

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _MAPPED:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        for old in [k for k in _MAPPED if k[0] == key[0]]:
            del _MAPPED[old]  # the file was replaced: later loads map the new one
        # mode "r": MAP_SHARED with PROT_READ, so the pages are the page cache's, shared by every
        # process mapping the file, and a stray write faults instead of changing another process's weights.
        _MAPPED[key] = (np.memmap(path, dtype=np.uint8, mode="r"), header, 8 + header_len)
    return _MAPPED[key]


def _mapped_tensor(path: str, name: str) -> torch.Tensor:
    import warnings

    data, header, base = _mapped_file(path)
    entry = header[name]
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which the mapped reader does not handle")
    begin, end = entry["data_offsets"]
    raw = data[base + begin:base + end]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": intended, the mapping is read-only
        t = torch.from_numpy(raw)
    if t.data_ptr() % torch.empty((), dtype=dtype).element_size():
        return t.clone().view(dtype).reshape(entry["shape"])  # unaligned (small scale tensors): a private copy
    return t.view(dtype).reshape(entry["shape"])


def load_packed_experts(path: str, layer_idx: int, mmap: bool = False) -> PackedExperts:
    """The PackedExperts of layer `layer_idx` saved in `path`. With `mmap=True` the tensors are
    read-only views of a shared mapping of the file (see the module docstring); writing to them
    faults."""
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
            read = (lambda key: _mapped_tensor(path, key)) if mmap else f.get_tensor
            fields[projection] = read(weight_key)
            quantized = meta["weight_format"] != "bf16"
            if quantized and scale_key not in names:
                raise KeyError(f"{path}: missing tensor {scale_key}")
            fields[projection + "_scale"] = read(scale_key) if quantized else None
    return PackedExperts(**fields, weight_format=meta["weight_format"], num_experts=meta["num_experts"],
                         hidden_size=meta["hidden_size"], intermediate_size=meta["intermediate_size"])
