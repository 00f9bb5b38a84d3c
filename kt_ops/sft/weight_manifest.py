"""The manifest of a persistent INT8 expert directory (`kt_kernel.sft.weight_manifest`): kt-kernel's
converter writes `kt-weight-manifest.json` (schema 2: layout and sha256 per file; schema 1,
`kt-ephemeral-manifest.json`, without) beside `_layer_{L}/_numa_{N}/*.kt`, the KTransformers files
kt_ops reads (kt_ops.weights.ktransformers). validate_persistent_int8_weights checks that a directory
holds exactly the layers a model needs, in the expected geometry, before any layer is loaded; a
directory without a manifest is checked through its files."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from ..weights.ktransformers import KTWeightDirectory, is_kt_directory
from .backend import INT8_WEIGHT_LAYOUT

MANIFEST_NAME = "kt-weight-manifest.json"
LEGACY_MANIFEST_NAME = "kt-ephemeral-manifest.json"
__all__ = ["INT8_WEIGHT_LAYOUT", "LEGACY_MANIFEST_NAME", "MANIFEST_NAME", "PersistentINT8Weights"]


@dataclass(frozen=True)
class PersistentINT8Weights:
    path: str
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


def _manifest_path(root: Path) -> Optional[Path]:
    found = [root / name for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME) if (root / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{root} holds both {MANIFEST_NAME} and {LEGACY_MANIFEST_NAME}: ambiguous")
    return found[0] if found else None


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
    count and sizes) and its files against the manifest (present, regular, of the listed size, and,
    when verify_hashes or by default for schema 2, of the listed sha256). ValueError names the
    first mismatch."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"INT8 SFT weights directory {root} does not exist")
    manifest_path = _manifest_path(root)
    if manifest_path is None:
        if not is_kt_directory(root):
            raise ValueError(f"{root} holds no INT8 .kt weights (_layer_{{L}}/_numa_{{N}}/*.kt) nor a manifest")
        missing = sorted(set(layer_indices) - set(KTWeightDirectory(root).layers()))
        if missing:
            raise ValueError(f"{root} lacks the INT8 layers {missing}")
        return PersistentINT8Weights(str(root), 0, True, INT8_WEIGHT_LAYOUT, tuple(sorted(layer_indices)), 0, 0)
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    schema = manifest.get("schema_version")
    if schema not in (1, 2) or manifest.get("state") != "ready" or manifest.get("expert_weight_format") != "int8":
        raise ValueError(f"{manifest_path}: not a ready INT8 weight manifest (schema 1 or 2)")
    if schema == 2 and (manifest.get("layout") != INT8_WEIGHT_LAYOUT or "backend" in manifest):
        raise ValueError(f"{manifest_path}: schema 2 needs layout {INT8_WEIGHT_LAYOUT!r} and no hardware backend")
    want = {
        "threadpool_count": numa_count,
        "expert_num": expert_num,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
    }
    wrong = {k: manifest.get(k) for k, v in want.items() if manifest.get(k) != v}
    if wrong or intermediate_size % numa_count:
        raise ValueError(f"{manifest_path}: model contract mismatch {wrong}; expected {want}")
    layers = {entry.get("index"): entry for entry in manifest.get("layers", ())}
    if set(layers) != set(layer_indices):
        raise ValueError(f"{manifest_path}: layers {sorted(layers)} do not match the model's {sorted(layer_indices)}")
    check_hashes = schema == 2 if verify_hashes is None else verify_hashes
    files = size = 0
    for index, entry in sorted(layers.items()):
        listed = _check_layer(root, index, entry, numa_count, check_hashes)
        files, size = files + len(listed), size + sum(item["size_bytes"] for item in listed)
    _check_unlisted(root, {item["path"] for e in layers.values() for item in e["files"]}, manifest_path)
    return PersistentINT8Weights(
        str(manifest_path), schema, schema == 1, INT8_WEIGHT_LAYOUT, tuple(sorted(layers)), files, size
    )


def _check_layer(root: Path, index: int, entry: dict, numa_count: int, check_hashes: bool) -> list:
    if entry.get("state") != "ready" or entry.get("numa_count") != numa_count:
        raise ValueError(f"layer {index}: not ready, or not split over {numa_count} sub-pools")
    listed = entry.get("files") or []
    for item in listed:
        relative = item.get("path", "")
        path = root / relative
        if os.path.isabs(relative) or ".." in Path(relative).parts or not relative.startswith(f"_layer_{index}/"):
            raise ValueError(f"layer {index}: file {relative!r} lies outside its layer directory")
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"layer {index}: {relative} is missing or not a regular file")
        if path.stat().st_size != item.get("size_bytes"):
            raise ValueError(f"layer {index}: {relative} size does not match the manifest")
        if not relative.endswith(f"_{item['size_bytes']}Byte_quant_.kt") and not relative.endswith(
            f"_{item['size_bytes']}Byte_scale_.kt"
        ):
            raise ValueError(f"layer {index}: {relative}'s name does not state its size")
        if check_hashes and _sha256(path) != item.get("sha256"):
            raise ValueError(f"layer {index}: {relative} does not match its sha256")
    return listed


def _check_unlisted(root: Path, listed: set, manifest_path: Path) -> None:
    for directory, _, names in os.walk(root):
        for name in names:
            relative = Path(directory, name).relative_to(root).as_posix()
            if relative not in listed and Path(directory, name) != manifest_path:
                raise ValueError(f"{root}: {relative} is not listed in {manifest_path.name}")
