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

from .. import _C
from ..core.durable import atomic_file, exclusive
from ..core.formats import PROJECTIONS, WEIGHT_FORMATS
from ..core.packed import PackedExperts

_METADATA_KEY = "kt_ops.layers"


_META_FIELDS = ("weight_format", "num_experts", "hidden_size", "intermediate_size")
_PANEL_ROWS = 16  # rows are packed in panels of 16; a matrix's last panel is zero-padded


def packed_key(layer_idx: int, projection: str, kind: str) -> str:
    return f"blk.{layer_idx}.ffn_{projection}_exps.{kind}"


def save_packed_experts(path: str, layers: Mapping[int, PackedExperts], overwrite: bool = False) -> None:
    """Write `layers` ({layer_idx: PackedExperts}) to the safetensors file `path`. The file appears
    whole or not at all (core/durable.py: written beside it, flushed, renamed); an existing file is
    kept unless `overwrite=True`."""
    from safetensors.torch import save_file

    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors, meta = {}, {}
    for layer_idx, experts in layers.items():
        if not isinstance(experts, PackedExperts):
            raise TypeError(f"layers[{layer_idx}] must be a PackedExperts, got {type(experts).__name__}")
        for projection in PROJECTIONS:
            tensors[packed_key(layer_idx, projection, "weight")] = getattr(experts, projection).contiguous()
            scale = getattr(experts, projection + "_scale")
            if scale is not None:
                tensors[packed_key(layer_idx, projection, "scale")] = scale.contiguous()
        meta[str(layer_idx)] = {
            "weight_format": experts.weight_format,
            "num_experts": experts.num_experts,
            "hidden_size": experts.hidden_size,
            "intermediate_size": experts.intermediate_size,
        }
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(meta)})


def save_packed_layer(path: str, layer_idx: int, experts: PackedExperts) -> None:
    """Add or replace layer `layer_idx` in the packed-experts file `path`, keeping its other layers
    (what `cpu_save` writes). A directory gets its own file `blk.{L}.safetensors` for the layer. An
    existing file that is not a kt_ops packed-experts file (a HuggingFace checkpoint, anything
    else) is the user's and is never replaced: FileExistsError."""
    if os.path.isdir(path):
        path = os.path.join(path, f"blk.{layer_idx}.safetensors")
    with exclusive(path):
        layers = {}
        if os.path.exists(path):
            try:
                kept = [layer for layer in packed_layers(path) if layer != layer_idx]
            except ValueError as e:
                raise FileExistsError(
                    f"{path} exists and is not a kt_ops packed-experts file ({e}); it is left as "
                    "it is: point weight_path at a new file or a directory for the quantized "
                    "experts"
                ) from None
            layers = {layer: load_packed_experts(path, layer) for layer in kept}
        layers[layer_idx] = experts
        save_packed_experts(path, layers, overwrite=True)


def packed_layers(path: str) -> list[int]:
    """Layer indices stored in a file written by save_packed_experts."""
    return sorted(int(k) for k in _read_metadata(path))


def _read_metadata(path: str) -> dict:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no packed-experts file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = (f.metadata() or {}).get(_METADATA_KEY)
    except Exception as e:  # safetensors' own error type for a bad or truncated header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if meta is None:
        raise ValueError(f"{path} is not a kt_ops packed-experts file (no '{_METADATA_KEY}' metadata)")
    try:
        layers = json.loads(meta)
        if not isinstance(layers, dict):
            raise ValueError("not an object")
        return {str(int(layer)): value for layer, value in layers.items()}
    except ValueError as e:
        raise ValueError(
            f"{path}: the '{_METADATA_KEY}' metadata must be a JSON object keyed by layer index ({e})"
        ) from None


def _check_layer(path: str, layer_idx: int, meta, fields: dict) -> None:
    """The metadata must describe the stored tensors: sizes that disagree would make the kernels read
    the blobs with the wrong geometry (wrong results, not an error)."""
    where = f"{path}: layer {layer_idx}"
    if not isinstance(meta, dict) or any(k not in meta for k in _META_FIELDS):
        missing = [k for k in _META_FIELDS if not isinstance(meta, dict) or k not in meta]
        raise ValueError(f"{where}: metadata lacks {missing}; a packed-experts layer records {list(_META_FIELDS)}")
    fmt = meta["weight_format"]
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"{where} has unknown weight_format {fmt!r}; expected one of {WEIGHT_FORMATS}")
    for name in _META_FIELDS[1:]:
        value = meta[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: metadata {name} must be a positive int, got {value!r}")
    E, H, I = meta["num_experts"], meta["hidden_size"], meta["intermediate_size"]
    sizes = f"(num_experts={E}, hidden_size={H}, intermediate_size={I}, {fmt})"
    for projection, rows, cols in (("gate", I, H), ("up", I, H), ("down", H, I)):
        blob = fields[projection]
        expected = (E, _C.packed_bytes(fmt, rows, cols))
        if blob.dtype != torch.uint8 or tuple(blob.shape) != expected:
            raise ValueError(
                f"{where}: {packed_key(layer_idx, projection, 'weight')} is {tuple(blob.shape)} {blob.dtype}, "
                f"but the metadata {sizes} needs uint8 {expected}"
            )
        scale = fields[projection + "_scale"]
        if scale is not None and (
            scale.dim() < 3 or tuple(scale.shape[:2]) != (E, -(-rows // _PANEL_ROWS) * _PANEL_ROWS)
        ):
            raise ValueError(
                f"{where}: {packed_key(layer_idx, projection, 'scale')} is {tuple(scale.shape)}, but the "
                f"metadata {sizes} needs [{E}, {-(-rows // _PANEL_ROWS) * _PANEL_ROWS}, ...]"
            )
    # Sizes alone cannot tell I from the panel-padded I (63 and 64 pack to the same bytes), but the
    # padding rows are stored as zeros: non-zero values there mean the metadata is smaller than the
    # matrices really are. One expert suffices, the metadata is per layer.
    for projection, rows, cols in (("gate", I, H), ("down", H, I)):
        padded = -(-rows // _PANEL_ROWS) * _PANEL_ROWS
        if padded == rows:
            continue
        scale = fields[projection + "_scale"]
        full = torch.ops.kt.unpack_weights(
            fields[projection][:1].contiguous(), None if scale is None else scale[:1].contiguous(), fmt, padded, cols
        )
        if full[0, rows:].any():
            raise ValueError(
                f"{where}: {packed_key(layer_idx, projection, 'weight')} holds non-zero rows beyond the "
                f"metadata's {rows} ({'intermediate_size' if projection == 'gate' else 'hidden_size'}); "
                f"the metadata {sizes} does not describe these tensors"
            )


_MAPPED: dict = {}  # (real path, size, mtime) -> (read-only np.memmap of the file, its header)
_DTYPES = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "I64": torch.int64,
}


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
    raw = data[base + begin : base + end]
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
    quantized = isinstance(meta, dict) and meta.get("weight_format") != "bf16"
    fields = {}
    try:
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            read = (lambda key: _mapped_tensor(path, key)) if mmap else f.get_tensor
            for projection in PROJECTIONS:
                weight_key, scale_key = (
                    packed_key(layer_idx, projection, "weight"),
                    packed_key(layer_idx, projection, "scale"),
                )
                if weight_key not in names:
                    raise KeyError(f"{path}: missing tensor {weight_key}")
                fields[projection] = read(weight_key)
                if quantized and scale_key not in names:
                    raise KeyError(f"{path}: missing tensor {scale_key}")
                fields[projection + "_scale"] = read(scale_key) if quantized else None
    except KeyError:
        raise
    except Exception as e:  # safetensors' own error type for truncated data
        raise ValueError(f"{path}: cannot read layer {layer_idx}: {e}") from None
    _check_layer(path, layer_idx, meta, fields)
    return PackedExperts(
        **fields,
        weight_format=meta["weight_format"],
        num_experts=meta["num_experts"],
        hidden_size=meta["hidden_size"],
        intermediate_size=meta["intermediate_size"],
    )
