"""The manifest of an INT8 expert directory (`kt_kernel.sft.weight_manifest`): `_layer_{L}/_numa_{N}/
INT8_{gate|up|down}_{E}_{bytes}Byte_{quant|scale}_.kt`, the KTransformers files kt_ops reads
(kt_ops.weights.ktransformers), listed with their sizes in `kt-weight-manifest.json` (schema 2: a
hardware-neutral layout and each file's sha256) or `kt-ephemeral-manifest.json` (schema 1, also the
ephemeral lifecycle's, kt_ops.sft.ephemeral). validate_persistent_int8_weights checks a directory
against the model before any layer is loaded: the geometry (each file's size follows from it), the
exact file set, and the bytes; a directory without a manifest is checked through its files.

The helpers below (expected_int8_files, scan_int8_layer, check_int8_layer) are the ephemeral
lifecycle's too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..weights.ktransformers import KTWeightDirectory, is_kt_directory
from .backend import INT8_WEIGHT_LAYOUT

MANIFEST_NAME = "kt-weight-manifest.json"
LEGACY_MANIFEST_NAME = "kt-ephemeral-manifest.json"
_KT_FILE = re.compile(r"^INT8_(gate|up|down)_(\d+)_(\d+)Byte_(quant|scale)_\.kt$")
__all__ = [
    "INT8_WEIGHT_LAYOUT",
    "LEGACY_MANIFEST_NAME",
    "MANIFEST_NAME",
    "PersistentINT8Weights",
    "validate_persistent_int8_weights",
]


@dataclass(frozen=True)
class PersistentINT8Weights:
    root: Path  # the weight directory
    path: Path  # its manifest (the directory itself when it has none)
    schema_version: int
    is_legacy: bool
    layout: str
    layer_indices: Tuple[int, ...]
    file_count: int
    size_bytes: int


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_int8_geometry(numa_count: int, expert_num: int, hidden_size: int, intermediate_size: int) -> None:
    for name, value in (
        ("threadpool_count", numa_count),
        ("expert_num", expert_num),
        ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"INT8 weights: {name} must be a positive int, got {value!r}")
    if intermediate_size % numa_count:
        raise ValueError(
            f"INT8 weights: intermediate_size {intermediate_size} must be divisible by threadpool_count {numa_count}"
        )


def expected_int8_files(
    layer_idx: int, numa_count: int, expert_num: int, hidden_size: int, intermediate_size: int
) -> Dict[Tuple[int, str, int, str], int]:
    """{(numa, projection, expert, quant|scale): bytes} of one layer: one int8 code per weight (each
    sub-pool holds intermediate_size / numa_count rows of gate and up and as many columns of down)
    and one fp32 scale per output row."""
    rows = intermediate_size // numa_count
    sizes = {
        ("gate", "quant"): rows * hidden_size,
        ("up", "quant"): rows * hidden_size,
        ("down", "quant"): hidden_size * rows,
        ("gate", "scale"): rows * 4,
        ("up", "scale"): rows * 4,
        ("down", "scale"): hidden_size * 4,
    }
    return {
        (numa, projection, expert, kind): size
        for numa in range(numa_count)
        for (projection, kind), size in sizes.items()
        for expert in range(expert_num)
    }


def _identity(layer_idx: int, relative: str) -> Tuple[Tuple[int, str, int, str], int]:
    """((numa, projection, expert, kind), the size its name states) of `_layer_L/_numa_N/<name>`."""
    parts = Path(relative).parts
    match = _KT_FILE.fullmatch(parts[-1]) if len(parts) == 3 else None
    numa = parts[1].removeprefix("_numa_") if len(parts) == 3 else ""
    if match is None or parts[0] != f"_layer_{layer_idx}" or not numa.isdigit():
        raise ValueError(f"layer {layer_idx}: {relative!r} is not an INT8 .kt file of this layer")
    projection, expert, stated, kind = match.groups()
    return (int(numa), projection, int(expert), kind), int(stated)


def _entries(directory: Path) -> List[str]:
    """Every file under `directory`, relative to its parent's parent (the weight root)."""
    return sorted(
        Path(current, name).relative_to(directory.parent).as_posix()
        for current, _, names in os.walk(directory, followlinks=False)
        for name in names
    )


def scan_int8_layer(root: Path, layer_idx: int, geometry: Tuple[int, int, int, int], check_sizes: bool = True) -> dict:
    """The manifest entry of layer `layer_idx` as it is on disk: exactly the expected files, regular,
    non-empty and, with check_sizes, of the sizes the geometry gives."""
    layer_dir = root / f"_layer_{layer_idx}"
    if layer_dir.is_symlink() or not layer_dir.is_dir():
        raise ValueError(f"layer {layer_idx}: {layer_dir} is missing or not a directory")
    expected = expected_int8_files(layer_idx, *geometry)
    files, found = [], set()
    for relative in _entries(layer_dir):
        identity, stated = _identity(layer_idx, relative)
        path = root / relative
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"layer {layer_idx}: {relative} is a non-regular entry")
        size = path.stat().st_size
        if identity not in expected or identity in found or size <= 0:
            raise ValueError(f"layer {layer_idx}: {relative} is empty, duplicated or not a file of this model")
        if check_sizes and not stated == size == expected[identity]:
            raise ValueError(
                f"layer {layer_idx}: {relative} size contract mismatch: the model needs {expected[identity]}"
            )
        found.add(identity)
        files.append({"path": relative, "size_bytes": size})
    missing = sorted(set(expected) - found)
    if missing:
        raise ValueError(f"layer {layer_idx} is missing {len(missing)} INT8 files, e.g. {missing[:3]}")
    entry = {"index": layer_idx, "numa_count": geometry[0], "state": "ready", "files": files}
    entry["bytes"] = sum(item["size_bytes"] for item in files)
    return entry


def check_int8_layer(
    root: Path, entry: dict, geometry: Tuple[int, int, int, int], verify_hashes: bool, check_sizes: bool = True
) -> list:
    """Check one manifest layer entry against the model (with check_sizes, each file's size too) and
    the disk; its file list."""
    index = entry.get("index")
    if entry.get("numa_count") != geometry[0]:
        raise ValueError(f"layer {index}: numa_count mismatch: manifest {entry.get('numa_count')}, model {geometry[0]}")
    expected = expected_int8_files(index, *geometry)
    listed = entry.get("files")
    if not isinstance(listed, list):
        raise ValueError(f"layer {index}: the manifest's files must be a list")
    seen = set()
    for item in listed:
        relative = str(item.get("path", ""))
        identity, stated = _identity(index, relative)
        if identity in seen or identity not in expected:
            raise ValueError(f"layer {index}: {relative} is duplicated or not a file of this model")
        seen.add(identity)
        if check_sizes and not item.get("size_bytes") == stated == expected[identity]:
            raise ValueError(
                f"layer {index}: {relative} size contract mismatch: the model needs {expected[identity]} bytes, "
                f"the manifest says {item.get('size_bytes')}"
            )
        path = root / relative
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"layer {index}: {relative} is missing or a non-regular file")
        if not isinstance(item.get("size_bytes"), int) or path.stat().st_size != item["size_bytes"]:
            raise ValueError(f"layer {index}: {relative} size mismatch: {path.stat().st_size} bytes on disk")
        if verify_hashes and _sha256(path) != item.get("sha256"):
            raise ValueError(f"layer {index}: {relative} SHA256 mismatch")
    if len(seen) != len(expected):
        raise ValueError(f"layer {index}: the manifest lists {len(seen)} of the {len(expected)} INT8 files")
    on_disk = _entries(root / f"_layer_{index}")
    if on_disk != sorted(str(item["path"]) for item in listed):
        raise ValueError(f"layer {index}: layer entries differ from the manifest")
    return listed


def _manifest_path(root: Path) -> Optional[Path]:
    found = [root / name for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME) if (root / name).exists()]
    if len(found) > 1:
        raise ValueError(f"{root} must hold exactly one manifest, found {[p.name for p in found]}")
    return found[0] if found else None


def _check_header(manifest: dict, manifest_path: Path, geometry: Tuple[int, int, int, int]) -> int:
    schema = manifest.get("schema_version")
    if schema not in (1, 2) or manifest.get("state") != "ready" or manifest.get("expert_weight_format") != "int8":
        raise ValueError(f"{manifest_path}: not a ready INT8 weight manifest (schema 1 or 2)")
    if schema == 2 and (manifest.get("layout") != INT8_WEIGHT_LAYOUT or manifest.get("backend", "INT8") != "INT8"):
        raise ValueError(
            f"{manifest_path}: schema 2 records the hardware-neutral layout {INT8_WEIGHT_LAYOUT!r} (backend INT8 or "
            f"none), got layout {manifest.get('layout')!r}, backend {manifest.get('backend')!r}"
        )
    names = ("threadpool_count", "expert_num", "hidden_size", "intermediate_size")
    for name, want in zip(names, geometry):
        if manifest.get(name) != want:
            raise ValueError(f"{manifest_path}: {name} mismatch: manifest {manifest.get(name)}, model {want}")
    return schema


def validate_persistent_int8_weights(
    path,
    *,
    layer_indices: Sequence[int],
    numa_count: int,
    expert_num: int,
    hidden_size: int,
    intermediate_size: int,
    verify_hashes: Optional[bool] = None,
) -> PersistentINT8Weights:
    """Check the INT8 directory at `path` against the model (its layers, sub-pool count, expert
    count and sizes) and its files against the manifest (exactly the listed ones, regular, of the
    listed size and, with verify_hashes or by default for schema 2, the listed sha256). ValueError
    names the first mismatch."""
    root = Path(path)
    geometry = (numa_count, expert_num, hidden_size, intermediate_size)
    check_int8_geometry(*geometry)
    if not root.is_dir():
        raise ValueError(f"INT8 SFT weights directory {root} does not exist")
    manifest_path = _manifest_path(root)
    if manifest_path is None:
        if not is_kt_directory(root):
            raise ValueError(f"{root} holds no INT8 .kt weights (_layer_{{L}}/_numa_{{N}}/*.kt) nor a manifest")
        missing = sorted(set(layer_indices) - set(KTWeightDirectory(root).layers()))
        if missing:
            raise ValueError(f"{root} lacks the INT8 layers {missing}")
        return PersistentINT8Weights(root, root, 0, True, INT8_WEIGHT_LAYOUT, tuple(sorted(set(layer_indices))), 0, 0)
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise ValueError(f"{manifest_path} is a non-regular file")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    schema = _check_header(manifest, manifest_path, geometry)
    layers = {entry.get("index"): entry for entry in manifest.get("layers", ())}
    if sorted(layers) != sorted(set(layer_indices)):
        raise ValueError(f"{manifest_path}: layers {sorted(layers)} do not match the model's {sorted(layer_indices)}")
    wanted = {manifest_path.name, *(f"_layer_{i}" for i in layers)}
    actual = {entry.name for entry in root.iterdir()}
    if actual != wanted:
        raise ValueError(f"{root}: root entries differ from the manifest: {sorted(actual ^ wanted)}")
    check_hashes = schema == 2 if verify_hashes is None else bool(verify_hashes)
    listed = [item for i in sorted(layers) for item in check_int8_layer(root, layers[i], geometry, check_hashes)]
    size = sum(item["size_bytes"] for item in listed)
    return PersistentINT8Weights(
        root, manifest_path, schema, schema == 1, INT8_WEIGHT_LAYOUT, tuple(sorted(layers)), len(listed), size
    )
