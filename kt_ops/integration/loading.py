"""Bounded-memory loading: a transformers MoE model with its routed experts on kt_ops, built without
ever holding the float experts of the whole model.

`from_pretrained(path, ...)` builds the model on the meta device, reads the non-expert tensors of the
safetensors shards straight to where `device_map` puts them, and fills each MoE layer's experts,
one layer at a time, from (in this order of preference) `kt_weight_path` or `path`:

* a KTransformers converted directory (INT8 / INT4, NUMA-split or not): packed code for code;
* kt_ops' own pre-quantized form (`python -m kt_ops.convert_weights`): packed as stored;
* a HuggingFace checkpoint: bf16/fp16/fp32 experts are read one layer at a time and packed into
  `kt_backend`'s format (fused tensors are read in the experts module's own layout: gpt-oss' and
  Llama-4's [E, H, 2I], gpt-oss' interleaved gate/up; expert biases are small and read with the
  non-expert tensors); DeepSeek-style block-FP8 experts are kept as they are (codes and block
  scales) with an fp8 backend (AMXFP8), and requantized to int8_kgroup (group 128) otherwise.

With `kt_shared_experts=<file>` the packed experts live in one file that every process of a node
maps read-only and shared (`share_kt_experts` does the same for a model already converted): N
training processes on a node hold the experts once; LoRA stays per process (DDP all-reduces it).

Peak host memory is therefore the packed experts + the non-expert weights + one layer's source
tensors (plus the reader's page cache of that layer), instead of the whole float model
(`benchmarks/bench_load.py` measures both).
"""
from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch
from torch import nn

from ..core.formats import GROUPED_FORMATS, SFT_METHOD_FORMATS
from ..core.packed import PackedExperts
from ..core.runtime import set_num_threads
from ..weights.sources import ExpertSource
from .custom_experts import adopt_custom_experts, install_custom_forward
from .hf import (KT_BACKENDS, KTExperts, check_convertible, LAYER_INDEX, check_tp_enabled, expert_dims,
                 expert_variant, fuse_gate_up, method_for_packed, register_kt_implementation,
                 find_moe_experts, finish_kt_conversion, install_kt_experts)
from .peft_lora import weights_transposed

_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def _config_of(path, trust_remote_code: bool):
    from transformers import AutoConfig

    if not os.path.isdir(os.fspath(path)):
        raise FileNotFoundError(f"path {path!r} must be a local checkpoint directory (config.json and *.safetensors)")
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def _devices(device_map):
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
    raise TypeError(f"device_map must be None, 'auto', a device or a dict of module names to devices, "
                    f"got {type(device_map).__name__}")


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
    candidates = [renamed, key, key.replace("model.language_model.", "model."), key.replace("language_model.", ""),
                  key.replace("model.", "model.language_model.", 1)]
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


def _load_non_experts(model: nn.Module, path: str, skip: set, device_of, dtype: torch.dtype) -> None:
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
            current = model.get_parameter_or_buffer(targets[key]) if hasattr(model, "get_parameter_or_buffer") \
                else None
            if current is not None and tuple(current.shape) != tuple(tensor.shape):
                raise ValueError(f"{path}: tensor {key!r} is {tuple(tensor.shape)}, but the model's {targets[key]} is "
                                 f"{tuple(current.shape)}")
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
        raise ValueError(f"{path}: tensor {key!r} is {tensor.dtype} without a block scale {scale_key!r}; only "
                         "block-FP8 checkpoints (DeepSeek-V3 style) are read")
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
        raise ValueError(f"the checkpoint lacks {len(params_missing)} non-expert tensor(s) of the model, e.g. "
                         f"{params_missing[:5]}")
    for module_name, names in owners.items():
        module = model.get_submodule(module_name)
        if any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"cannot recompute buffers {names} of {module_name}: it also holds parameters")
        for name in names:
            _set_tensor(model, name, torch.empty_like(buffers[name], device=device_of(name)))
        model._init_weights(module)


def _pack_projection(read, E: int, weight_format: str, group_size: int, shape):
    """(blob, scales or None) of one projection of E experts of `shape` [N, K], `read(lo, hi)` giving
    experts [lo, hi): what pack_experts does per projection, an eighth of the experts at a time into
    preallocated outputs (packed blobs and scales are rows per expert), so neither the source nor
    quantization's fp32 temporaries ever cover the whole projection."""
    if weight_format in GROUPED_FORMATS and (shape[0] % group_size or shape[1] % group_size):
        raise ValueError(f"group_size {group_size} must divide the experts' sizes {tuple(shape)} for "
                         f"weight format {weight_format!r}")
    step = max(1, E // 8)
    blob = scales = None
    with torch.no_grad():
        for lo in range(0, E, step):
            hi = min(E, lo + step)
            b, s = torch.ops.kt.pack_weights(read(lo, hi), weight_format, int(group_size))
            if blob is None:
                blob = torch.empty((E, *b.shape[1:]), dtype=b.dtype)
                if weight_format != "bf16":
                    scales = torch.empty((E, *s.shape[1:]), dtype=s.dtype)
            blob[lo:hi].copy_(b)
            if scales is not None:
                scales[lo:hi].copy_(s)
    return blob, scales


def from_pretrained(path: Union[str, os.PathLike], kt_backend: str = "AMXBF16", lora_rank: int = 16,
                    lora_alpha: float = 32.0, device_map=None, kt_weight_path: Optional[Union[str, os.PathLike]] = None,
                    kt_num_threads: Optional[int] = None, kt_num_gpu_experts: int = 0,
                    dtype: Optional[torch.dtype] = None, lora_dtype: torch.dtype = torch.float32,
                    kt_shared_experts: Optional[Union[str, os.PathLike]] = None,
                    trust_remote_code: bool = False, kt_tp_enabled: bool = False) -> nn.Module:
    """A transformers v5 MoE causal LM from the local checkpoint `path` with its routed experts on
    kt_ops (as `apply_kt` leaves it), loaded with bounded host memory (see the module docstring).

    `dtype` is the non-expert weights' dtype (default: the config's, else bf16); `device_map` puts
    them (None: CPU; 'auto': the first GPU when present; a device; or {module prefix: device} with ''
    for the rest); LoRA of the experts lives where the layer's activations do. `kt_weight_path`
    supplies the experts instead of `path` (a KTransformers or kt_ops converted directory).
    `kt_shared_experts` (a file path on the node's local disk or /dev/shm): the experts are mapped
    read-only from that packed file, which local rank 0 writes first when it does not exist."""
    from transformers import AutoModelForCausalLM

    path = os.fspath(path)
    if not isinstance(kt_backend, str) or kt_backend not in KT_BACKENDS:
        raise ValueError(f"kt_backend must be one of {sorted(KT_BACKENDS)}, got {kt_backend!r}")
    if isinstance(kt_num_gpu_experts, bool) or not isinstance(kt_num_gpu_experts, int) or kt_num_gpu_experts < 0:
        raise ValueError(f"kt_num_gpu_experts must be an int >= 0, got {kt_num_gpu_experts!r}")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an int >= 0, got {lora_rank!r}")
    check_tp_enabled(kt_tp_enabled)
    config = _config_of(path, trust_remote_code)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.bfloat16
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    adopt_custom_experts(model)  # Llama-4, LongCat-Flash: experts transformers does not dispatch
    found = find_moe_experts(model)
    if not found:
        raise ValueError(f"from_pretrained: {type(model).__name__} has no transformers experts module to put on kt_ops")
    for name, module in found:
        try:
            check_convertible(name, module)
        except ValueError as e:
            if "meta device" not in str(e):  # the experts are meta on purpose: they are streamed below
                raise
        if kt_num_gpu_experts >= module.num_experts:
            raise ValueError(f"kt_num_gpu_experts ({kt_num_gpu_experts}) must be smaller than the number of experts "
                             f"of {name} ({module.num_experts})")

    device_of = _devices(device_map)
    expert_params = {f"{name}.{p}" for name, _ in found for p in ("gate_up_proj", "down_proj")}
    _load_non_experts(model, path, expert_params, device_of, dtype)

    register_kt_implementation()
    if kt_num_threads is not None:
        set_num_threads(kt_num_threads)
    source = ExpertSource(os.fspath(kt_weight_path) if kt_weight_path is not None else path)
    if kt_num_gpu_experts and source.is_quantized_source():
        raise ValueError("kt_num_gpu_experts > 0 needs float experts (a bf16 checkpoint) to keep on the GPU; "
                         f"{source.path} holds pre-quantized experts")
    method = KT_BACKENDS[kt_backend]
    N = kt_num_gpu_experts
    layers = []
    for name, module in found:
        match = LAYER_INDEX.search(name + ".")
        if match is None:
            raise ValueError(f"from_pretrained: cannot tell the layer index of {name}")
        layers.append((name, module, int(match.group(1))))

    def build(name, module, layer):
        """(KTExperts, experts kept in the module or None) of one layer, from the source."""
        E, (H, I) = module.num_experts, expert_dims(module)
        if source.is_quantized_source():
            packed = source.packed_layer(layer, E, H, I, SFT_METHOD_FORMATS[method])
            kt = KTExperts(E, H, I, lora_rank=lora_rank, lora_alpha=lora_alpha,
                           method=method_for_packed(kt_backend, packed.weight_format, source.path),
                           lora_dtype=lora_dtype, layer_idx=layer)
            kt.experts = packed
            return kt, None
        kt = KTExperts(E - N, H, I, lora_rank=lora_rank, lora_alpha=lora_alpha, method=method,
                       lora_dtype=lora_dtype, first_expert=N, layer_idx=layer)
        kept, packed = {}, {}
        expert_dtype = module.gate_up_proj.dtype
        # A projection and a few experts at a time: read, pack, drop.
        # A fused checkpoint tensor is laid out as the module holds it (transformers saves it so).
        layout = dict(num_experts=E, hidden_major=weights_transposed(module),
                      interleaved=not getattr(module, "is_concatenated", True))
        for proj in ("gate", "up", "down"):
            read = source.projection_reader(layer, proj, **layout)
            want = (H, I) if proj == "down" else (I, H)

            def checked(lo, hi, read=read, want=want, proj=proj):
                weight = read(lo, hi)
                if tuple(weight.shape) != (hi - lo, *want):
                    raise ValueError(f"{source.path}: layer {layer} {proj} experts {lo}..{hi - 1} are "
                                     f"{tuple(weight.shape)}; {name} needs {(hi - lo, *want)}")
                # Packed from the values transformers would hold (an fp32 checkpoint loaded as bf16
                # is rounded first), so the packed experts equal apply_kt's.
                return weight.to(expert_dtype)
            if N:
                kept[proj] = checked(0, N).clone()
            packed[proj], packed[proj + "_scale"] = _pack_projection(
                lambda lo, hi: checked(N + lo, N + hi), E - N, kt.weight_format, kt.group_size, want)
        kt.experts = PackedExperts(**packed, weight_format=kt.weight_format, num_experts=E - N, hidden_size=H,
                                   intermediate_size=I)
        keep = None
        if N:
            gate_up, down_n = fuse_gate_up(module, kept["gate"], kept["up"], dim=1), kept["down"]
            if weights_transposed(module):
                gate_up, down_n = gate_up.transpose(1, 2), down_n.transpose(1, 2)
            device = device_of(name)
            keep = (gate_up.to(device, dtype).contiguous(), down_n.to(device, dtype).contiguous())
        return kt, keep

    shared = os.fspath(kt_shared_experts) if kt_shared_experts is not None else None
    if shared is not None:
        if N:
            raise ValueError("kt_shared_experts shares the CPU experts; it cannot be combined with kt_num_gpu_experts")
        if not os.path.exists(shared) and _local_rank() == 0:
            # The node's writer packs once and writes the file; every process then maps it.
            from ..weights.packed_io import save_packed_experts
            save_packed_experts(shared, {layer: build(name, module, layer)[0].experts
                                         for name, module, layer in layers})
        _barrier()
        if not os.path.exists(shared):
            raise FileNotFoundError(f"kt_shared_experts {shared!r} does not exist: local rank 0 writes it; initialise "
                                    "torch.distributed first so the other processes wait for it")

    prefixes = set()
    for name, module, layer in layers:
        E, (H, I) = module.num_experts, expert_dims(module)
        if shared is not None:
            kt = _mapped_kt_experts(shared, layer, (E, H, I), kt_backend, lora_rank, lora_alpha, lora_dtype)
            keep = None
        else:
            kt, keep = build(name, module, layer)
        # Files hold weights only; the biases (read with the non-expert tensors) and a custom gate's
        # activation (gpt-oss', DeepSeek-V4's clamps) are the module's, as apply_kt takes them.
        variant = expert_variant(module, kt.first_expert)
        if variant:
            kt.experts = kt.experts.with_variant(**variant)
        device = torch.device(device_of(name))
        kt.to(device)
        keep_gate_up, keep_down = keep if keep is not None else (None, None)
        prefixes.add(install_kt_experts(model, name, module, kt, keep_gate_up, keep_down, device))
        install_custom_forward(model, name, module)
    finish_kt_conversion(model, found, tuple(sorted(prefixes)), lora_rank, lora_alpha)
    model.eval()
    return model


def _local_rank() -> int:
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()  # one node: the global rank is the local one
    return 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _mapped_kt_experts(path: str, layer: int, shape, kt_backend: str, lora_rank: int, lora_alpha: float,
                       lora_dtype: torch.dtype) -> KTExperts:
    from ..weights.packed_io import load_packed_experts

    packed = load_packed_experts(path, layer, mmap=True)
    got = (packed.num_experts, packed.hidden_size, packed.intermediate_size)
    if got != tuple(shape):
        raise ValueError(f"shared experts file {path}: layer {layer} has (num_experts, hidden_size, "
                         f"intermediate_size) = {got}; the model needs {tuple(shape)}")
    kt = KTExperts(shape[0], shape[1], shape[2], lora_rank=lora_rank, lora_alpha=lora_alpha,
                   method=method_for_packed(kt_backend, packed.weight_format, path), lora_dtype=lora_dtype, layer_idx=layer)
    kt.experts = packed
    return kt


def share_kt_experts(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Make every process of a node use one read-only copy of `model`'s packed experts (a model
    converted by apply_kt or from_pretrained): local rank 0 writes them to `path` (unless it exists),
    then every process maps the file shared and drops its own copy. With torch.distributed
    initialised the other processes wait for the file. LoRA parameters are untouched."""
    from ..weights.packed_io import load_packed_experts, save_packed_experts
    from .hf import kt_experts_modules

    path = os.fspath(path)
    modules = kt_experts_modules(model)
    if not modules:
        raise ValueError("share_kt_experts: the model has no kt experts; convert it with apply_kt first")
    unknown = [name for name, _, kt in modules if kt.layer_idx is None]
    if unknown:
        raise ValueError(f"share_kt_experts: cannot tell the layer index of {unknown[0]}")
    if not os.path.exists(path) and _local_rank() == 0:
        save_packed_experts(path, {kt.layer_idx: kt.experts for _, _, kt in modules})
    _barrier()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist: local rank 0 writes it; initialise torch.distributed "
                                "first so the other processes wait for it")
    for name, _, kt in modules:
        mapped = load_packed_experts(path, kt.layer_idx, mmap=True)
        mine = kt.experts
        if (mapped.weight_format, mapped.num_experts, mapped.hidden_size, mapped.intermediate_size) != (
                mine.weight_format, mine.num_experts, mine.hidden_size, mine.intermediate_size):
            raise ValueError(f"{path}: layer {kt.layer_idx} holds {mapped.weight_format} experts "
                             f"{(mapped.num_experts, mapped.hidden_size, mapped.intermediate_size)}, but {name} has "
                             f"{mine.weight_format} {(mine.num_experts, mine.hidden_size, mine.intermediate_size)}")
        kt.experts = mapped.with_variant(**mine.variant())  # the file holds the weights, not biases/activation
    return model
