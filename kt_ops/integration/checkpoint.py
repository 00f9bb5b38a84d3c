"""The non-expert tensors of a safetensors checkpoint, read into a model built on the meta device,
each straight to where `device_map` puts it and in the dtype transformers would give it (block-FP8
linear layers dequantized); what from_pretrained reads besides the experts."""

from __future__ import annotations

import os
import re
from typing import Optional

import torch
from torch import nn

_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def config_of(path, trust_remote_code: bool):
    from transformers import AutoConfig

    if not os.path.isdir(os.fspath(path)):
        raise FileNotFoundError(f"path {path!r} must be a local checkpoint directory (config.json and *.safetensors)")
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def device_resolver(device_map):
    """{module or tensor name prefix: device} resolver. device_map: None (CPU), 'auto' (the first
    GPU when present), a device, or a dict of module-name prefixes to devices ('' for the rest)."""
    if device_map is None:
        return lambda name: torch.device("cpu")
    if isinstance(device_map, str) and device_map == "auto":
        device_map = "cuda:0" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, (str, torch.device, int)):
        device = torch.device(device_map)
        return lambda name: device
    if isinstance(device_map, dict):
        prefixes = sorted(device_map, key=len, reverse=True)

        def resolve(name):
            for prefix in prefixes:
                if prefix == "" or name == prefix or name.startswith(prefix + "."):
                    return torch.device(device_map[prefix])
            raise ValueError(f"device_map has no entry for {name!r}; add one for it or '' for everything else")

        return resolve
    raise TypeError(
        f"device_map must be None, 'auto', a device or a dict of module names to devices, "
        f"got {type(device_map).__name__}"
    )


def _key_renamer(model: nn.Module):
    """checkpoint key -> the model's name, by transformers' own loading renames (e.g. Mixtral's
    `block_sparse_moe.` -> `mlp.`); keys that only a weight converter consumes (the fused experts)
    map to None."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # other transformers versions: names are used as they are
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()

    def rename(key):
        renamed, converted_by = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        return None if converted_by is not None else renamed

    return rename


def _dtype_of(model: nn.Module, dtype: torch.dtype):
    """name -> the dtype transformers' from_pretrained(dtype=...) gives a floating tensor of `model`:
    fp32 for its `_keep_in_fp32_modules(_strict)` (DeepSeek-V4's norms and hyper-connections in bf16),
    the model's own dtype where it builds a tensor in another one, else `dtype`."""
    try:
        from transformers.core_model_loading import build_glob_alternation

        plan = model._get_dtype_plan(dtype)
    except (ImportError, AttributeError):  # other transformers versions: everything in `dtype`
        plan = {}
    pattern, groups, _ = build_glob_alternation(list(plan)) if plan else (None, None, None)

    def of(name: str, current: Optional[torch.Tensor]) -> torch.dtype:
        match = pattern.search(name) if pattern is not None else None
        if match is not None:
            return plan[groups[match.lastgroup]]
        return current.dtype if current is not None and current.is_floating_point() else dtype

    return of


def _model_key(key: str, wanted: set, rename) -> Optional[str]:
    """The model's name for checkpoint tensor `key`: transformers' renaming of it, with or without a
    `language_model.` level, or from KTransformers' renamed form (`blk.{L}.` for
    `model.layers.{L}.`, top-level tensors without `model.`)."""
    renamed = rename(key)
    if renamed is None:
        return None
    candidates = [
        renamed,
        key,
        key.replace("model.language_model.", "model."),
        key.replace("language_model.", ""),
        key.replace("model.", "model.language_model.", 1),
    ]
    m = _BLK.fullmatch(key)
    if m:
        candidates.append(rename(f"model.layers.{m.group(1)}.{m.group(2)}"))
    elif not key.startswith(("model.", "lm_head.")):
        candidates.append(rename("model." + key))
    return next((c for c in candidates if c in wanted), None)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value


def load_non_experts(model: nn.Module, path: str, skip: set, device_of, dtype: torch.dtype) -> None:
    """Read every tensor of `path`'s shards but the expert weights `skip` (names in the model) into
    the meta model, one file at a time; expert biases (gpt-oss) are small and read here too."""
    from ..weights.loaders import SafeTensorLoader

    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    wanted = names - set(skip)
    loader = SafeTensorLoader(path)
    rename = _key_renamer(model)
    dtype_of = _dtype_of(model, dtype)
    by_file: dict = {}
    for key in loader.keys():
        target = _model_key(key, wanted, rename)
        if target is not None:
            by_file.setdefault(loader.key_to_file[key], []).append((key, target))
    for file_keys in by_file.values():
        targets = dict(file_keys)
        for key, tensor in loader.iter_tensors(targets, "cpu"):
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                tensor = _dequantized_fp8(loader, key, tensor, path)
            current = model.get_parameter_or_buffer(targets[key]) if hasattr(model, "get_parameter_or_buffer") else None
            if current is not None and tuple(current.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{path}: tensor {key!r} is {tuple(tensor.shape)}, but the model's {targets[key]} is "
                    f"{tuple(current.shape)}"
                )
            target_dtype = dtype_of(targets[key], current) if tensor.is_floating_point() else tensor.dtype
            _set_tensor(model, targets[key], tensor.to(device_of(targets[key]), target_dtype))
            wanted.discard(targets[key])
    _materialize_rest(model, wanted, device_of)


def _dequantized_fp8(loader, key: str, tensor: torch.Tensor, path: str) -> torch.Tensor:
    """A block-FP8 checkpoint (DeepSeek-V3/R1) stores its linear layers as float8 codes with a
    `weight_scale_inv` per 128x128 block beside them; the model gets the values they stand for."""
    from ..weights.native import dequantize_fp8

    scale_key = key + "_scale_inv"
    if not loader.has_tensor(scale_key):
        raise ValueError(
            f"{path}: tensor {key!r} is {tensor.dtype} without a block scale {scale_key!r}; only "
            "block-FP8 checkpoints (DeepSeek-V3 style) are read"
        )
    return dequantize_fp8(key, tensor, loader.load_tensor(scale_key))


def _materialize_rest(model: nn.Module, missing: set, device_of) -> None:
    """Tied weights are tied; non-persistent buffers (rotary tables) are recomputed by the model's own
    initialisation; anything else missing from the checkpoint is an error."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = {n for n in missing if model.get_parameter_or_buffer(n).is_meta}
    buffers = dict(model.named_buffers())
    owners = {}
    for name in sorted(still_meta):
        if name in buffers and name not in dict(model.named_parameters()):
            module_name = name.rpartition(".")[0]
            owners.setdefault(module_name, []).append(name)
    params_missing = sorted(still_meta - {n for names in owners.values() for n in names})
    if params_missing:
        raise ValueError(
            f"the checkpoint lacks {len(params_missing)} non-expert tensor(s) of the model, e.g. {params_missing[:5]}"
        )
    for module_name, names in owners.items():
        module = model.get_submodule(module_name)
        if any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"cannot recompute buffers {names} of {module_name}: it also holds parameters")
        for name in names:
            _set_tensor(model, name, torch.empty_like(buffers[name], device=device_of(name)))
        model._init_weights(module)
