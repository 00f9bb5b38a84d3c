"""Full fine-tuning checkpoints of the routed experts (`kt_kernel.sft.checkpoint`, same files): one
safetensors shard per layer (gate_proj [E, I, H], up_proj [E, I, H], down_proj [E, H, I], bf16, logical
expert order) and `kt_full_experts.index.json`, which names the shards of one save (its
`generation`), their sizes and shapes. The index is written last, so a save that fails leaves the
previous checkpoint whole; a load checks everything before it changes any Parameter, and changes
them in place (the optimizer's references and state stay valid).

Rank 0 owns the experts: it saves and loads; every rank learns of a failure."""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any, Dict, List, Optional, Tuple

import torch

from .dist_utils import distributed_rank_world_size

logger = logging.getLogger(__name__)

FULL_WEIGHT_CHECKPOINT_FORMAT = "kt_full_experts"
FULL_WEIGHT_CHECKPOINT_VERSION = 1
FULL_WEIGHT_INDEX_NAME = "kt_full_experts.index.json"
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_DTYPE = "BF16"


def resolve_full_weight_checkpoint(path) -> Optional[str]:
    """The directory of the full checkpoint at `path` (the directory or its index file), or None."""
    if path is None:
        return None
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)) if os.path.basename(path) == FULL_WEIGHT_INDEX_NAME else None
    return os.path.abspath(path) if os.path.isfile(os.path.join(path, FULL_WEIGHT_INDEX_NAME)) else None


def _expected_shapes(wrapper) -> Dict[str, Tuple[int, ...]]:
    E, I, H = int(wrapper.moe_config.expert_num), int(wrapper.moe_config.intermediate_size), int(wrapper.hidden_size)
    return {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)}


def _parameters(wrapper) -> Dict[str, torch.nn.Parameter]:
    """The layer's backend Parameters, checked against the layer's shapes."""
    backend = getattr(wrapper, "wrapper", None)
    if backend is None:
        raise RuntimeError(f"Layer {wrapper.layer_idx}: rank 0 does not own the KT full-weight backend")
    params, shapes = {}, _expected_shapes(wrapper)
    for name in _PROJECTIONS:
        p = getattr(backend, f"{name}_buf", None)
        if not isinstance(p, torch.nn.Parameter):
            raise RuntimeError(f"Layer {wrapper.layer_idx}: missing the Parameter {name}_buf")
        if tuple(p.shape) != shapes[name] or p.dtype != torch.bfloat16 or p.device.type != "cpu":
            raise RuntimeError(
                f"Layer {wrapper.layer_idx} {name}_buf must be a CPU bf16 {shapes[name]}, got {p.dtype} "
                f"{tuple(p.shape)} on {p.device}"
            )
        if not p.is_contiguous() or not p.requires_grad:
            raise RuntimeError(f"Layer {wrapper.layer_idx} {name}_buf must be contiguous and require gradients")
        params[name] = p
    return params


def _read_index(directory: str) -> dict:
    path = os.path.join(directory, FULL_WEIGHT_INDEX_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"Missing KT full checkpoint index: {path}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise RuntimeError(f"Failed to read KT full checkpoint index {path}: {error}") from error
    expected = {"format": FULL_WEIGHT_CHECKPOINT_FORMAT, "version": FULL_WEIGHT_CHECKPOINT_VERSION, "dtype": _DTYPE}
    for key, value in expected.items():
        if index.get(key) != value:
            raise RuntimeError(f"Unsupported KT full checkpoint {key} {index.get(key)!r}; expected {value!r}")
    if not isinstance(index.get("generation"), str) or not index["generation"]:
        raise RuntimeError("KT full checkpoint index must contain a non-empty generation")
    if not isinstance(index.get("layers"), dict):
        raise RuntimeError("KT full checkpoint index must contain a 'layers' object")
    return index


def _shard_path(directory: str, entry: Any, layer_idx: int) -> str:
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name or os.path.basename(name) != name:
        raise RuntimeError(f"Layer {layer_idx}: invalid KT full checkpoint shard name {name!r}")
    return os.path.join(directory, name)


def _inspect_shard(directory: str, layer_idx: int, entry: Any, shapes, generation: str) -> str:
    """The shard of a layer, after checking the index entry, its size, keys, metadata, shapes and dtype."""
    from safetensors import safe_open

    if not isinstance(entry, dict):
        raise RuntimeError(f"Layer {layer_idx}: invalid KT full checkpoint index entry")
    expected = {name: list(shapes[name]) for name in _PROJECTIONS}
    if entry.get("shapes") != expected:
        raise RuntimeError(
            f"Layer {layer_idx}: KT full checkpoint index shapes mismatch: got {entry.get('shapes')!r}, "
            f"expected {expected!r}"
        )
    path = _shard_path(directory, entry, layer_idx)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Layer {layer_idx}: missing KT full checkpoint shard {path}")
    size = entry.get("size_bytes")
    if not isinstance(size, int) or os.path.getsize(path) != size:
        raise RuntimeError(
            f"Layer {layer_idx}: KT full checkpoint shard size mismatch: got {os.path.getsize(path)}, expected {size}"
        )
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            if set(handle.keys()) != set(_PROJECTIONS):
                raise RuntimeError(f"Layer {layer_idx}: KT full checkpoint keys mismatch: got {sorted(handle.keys())}")
            meta = handle.metadata() or {}
            want = {"format": FULL_WEIGHT_CHECKPOINT_FORMAT, "version": str(FULL_WEIGHT_CHECKPOINT_VERSION)}
            want.update(generation=generation, layer_idx=str(layer_idx))
            if any(meta.get(k) != v for k, v in want.items()):
                raise RuntimeError(f"Layer {layer_idx}: the shard's metadata does not match the index")
            for name in _PROJECTIONS:
                piece = handle.get_slice(name)
                if tuple(piece.get_shape()) != shapes[name] or piece.get_dtype() != _DTYPE:
                    raise RuntimeError(
                        f"Layer {layer_idx} {name}: got {piece.get_dtype()} {tuple(piece.get_shape())}, expected "
                        f"{_DTYPE} {shapes[name]}"
                    )
    except (OSError, ValueError) as error:
        raise RuntimeError(f"Layer {layer_idx}: failed to inspect the KT full checkpoint shard: {error}") from error
    return path


def save_full_weight_checkpoint(wrappers: List[Any], output_dir: str) -> bool:
    """Write the full-weight layers' Parameters (rank 0; False elsewhere or without such layers)."""
    full = sorted((w for w in wrappers if getattr(w, "_full_weight_grad", False)), key=lambda w: int(w.layer_idx))
    if not full or distributed_rank_world_size()[0] != 0:
        return False
    from safetensors import torch as safetensors_torch

    os.makedirs(output_dir, exist_ok=True)
    generation = uuid.uuid4().hex
    previous = resolve_full_weight_checkpoint(output_dir)
    try:
        superseded = list(_read_index(previous)["layers"].values()) if previous else []
    except Exception:
        logger.warning("The existing KT full checkpoint index is invalid; its shards are left in place", exc_info=True)
        superseded = []
    entries, written, temporary = {}, [], []
    try:
        for wrapper in full:
            layer_idx = int(wrapper.layer_idx)
            if str(layer_idx) in entries:
                raise RuntimeError(f"Duplicate KT full-weight wrapper for layer {layer_idx}")
            params = _parameters(wrapper)
            name = f"kt_full_experts-{generation}-layer-{layer_idx:05d}.safetensors"
            path = os.path.join(output_dir, name)
            temporary.append(path + ".tmp")
            metadata = {"format": FULL_WEIGHT_CHECKPOINT_FORMAT, "version": str(FULL_WEIGHT_CHECKPOINT_VERSION)}
            metadata.update(generation=generation, layer_idx=str(layer_idx))
            safetensors_torch.save_file({k: p.detach() for k, p in params.items()}, path + ".tmp", metadata=metadata)
            os.replace(path + ".tmp", path)
            written.append(path)
            entries[str(layer_idx)] = {
                "file": name,
                "size_bytes": os.path.getsize(path),
                "shapes": {k: list(p.shape) for k, p in params.items()},
            }
        index = {"format": FULL_WEIGHT_CHECKPOINT_FORMAT, "version": FULL_WEIGHT_CHECKPOINT_VERSION, "dtype": _DTYPE}
        index.update(generation=generation, layers=entries)
        index_path = os.path.join(output_dir, FULL_WEIGHT_INDEX_NAME)
        temporary.append(f"{index_path}.{generation}.tmp")
        with open(temporary[-1], "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary[-1], index_path)  # the save exists from here on
    except BaseException:
        for path in temporary + written:
            _remove(path)
        raise
    for entry in superseded:
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            old = os.path.join(output_dir, os.path.basename(entry["file"]))
            if old not in written:
                _remove(old)
    logger.info("Saved KT full checkpoint generation %s (%d layers) to %s", generation, len(entries), output_dir)
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def load_full_weight_layer(checkpoint_path, *, layer_idx: int, expected_shapes) -> Tuple[torch.Tensor, ...]:
    """One layer's (gate_proj, up_proj, down_proj) from a full checkpoint, checked (for building the
    backend from a checkpoint)."""
    from safetensors import safe_open

    directory = resolve_full_weight_checkpoint(checkpoint_path)
    if directory is None:
        raise FileNotFoundError(f"No {FULL_WEIGHT_INDEX_NAME} found at {checkpoint_path}")
    index = _read_index(directory)
    entry = index["layers"].get(str(int(layer_idx)))
    if entry is None:
        raise RuntimeError(f"Layer {layer_idx}: missing from the KT full checkpoint index")
    shapes = {k: tuple(v) for k, v in expected_shapes.items()}
    path = _inspect_shard(directory, int(layer_idx), entry, shapes, index["generation"])
    with safe_open(path, framework="pt", device="cpu") as handle:
        return tuple(handle.get_tensor(name).contiguous() for name in _PROJECTIONS)


def _load_on_rank0(full: List[Any], directory: str) -> int:
    from safetensors import safe_open

    index = _read_index(directory)
    by_layer = {}
    for wrapper in full:
        if int(wrapper.layer_idx) in by_layer:
            raise RuntimeError(f"Duplicate KT full-weight wrapper for layer {wrapper.layer_idx}")
        by_layer[int(wrapper.layer_idx)] = (wrapper, _parameters(wrapper))
    saved = set()
    for key in index["layers"]:
        if not key.isdigit() or str(int(key)) != key or int(key) in saved:
            raise RuntimeError(f"Non-canonical or duplicate layer key in the KT full checkpoint index: {key!r}")
        saved.add(int(key))
    if saved != set(by_layer):
        raise RuntimeError(
            f"KT full checkpoint layer set mismatch: missing={sorted(set(by_layer) - saved)}, "
            f"unexpected={sorted(saved - set(by_layer))}"
        )
    shards = {
        i: _inspect_shard(directory, i, index["layers"][str(i)], _expected_shapes(w), index["generation"])
        for i, (w, _) in by_layer.items()
    }
    try:
        with torch.no_grad():
            for i in sorted(by_layer):
                with safe_open(shards[i], framework="pt", device="cpu") as handle:
                    for name, param in by_layer[i][1].items():
                        param.copy_(handle.get_tensor(name))
    except BaseException:
        for wrapper, _ in by_layer.values():
            wrapper.wrapper._kt_full_checkpoint_load_failed = True
        raise
    for wrapper, _ in by_layer.values():
        wrapper.wrapper._base_weights_dirty = True  # repacked before the next forward
        wrapper.wrapper._kt_full_checkpoint_load_failed = False
    return len(by_layer)


def load_full_weight_checkpoint(wrappers: List[Any], checkpoint_path) -> bool:
    """Restore the full-weight layers' Parameters in place from `checkpoint_path` (False without
    such layers); raises the same error on every rank when rank 0's load fails."""
    full = [w for w in wrappers if getattr(w, "_full_weight_grad", False)]
    if not full:
        return False
    directory = resolve_full_weight_checkpoint(checkpoint_path)
    rank, world = distributed_rank_world_size()
    error, loaded = None, 0
    if rank == 0:
        if directory is None:
            error = f"No {FULL_WEIGHT_INDEX_NAME} found at {checkpoint_path}"
        else:
            try:
                loaded = _load_on_rank0(full, directory)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            status = [{"error": error, "loaded": loaded} if rank == 0 else None]
            dist.broadcast_object_list(status, src=0)
            error, loaded = status[0]["error"], int(status[0]["loaded"])
    if error is not None:
        raise RuntimeError(f"Failed to load KT full checkpoint: {error}")
    logger.info("Loaded the KT full checkpoint of %d layers from %s", loaded, checkpoint_path)
    return True
