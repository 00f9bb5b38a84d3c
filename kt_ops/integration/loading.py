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
from typing import List, Optional, Union

import torch
from torch import nn

from ..core.formats import GROUPED_FORMATS
from ..core.packed import PackedExperts
from ..core.runtime import set_num_threads
from ..core.settings import KTSettings
from ..weights.sources import ExpertSource
from .apply import layer_index, new_kt_experts, set_variant
from .checkpoint import config_of, device_resolver, load_non_experts
from .custom_experts import adopt_custom_experts, install_custom_forward
from .hf import KTExperts, check_convertible, expert_dims, find_moe_experts, fuse_gate_up, register_kt_implementation
from .install import finish_kt_conversion, install_kt_experts, kt_experts_modules
from .peft_lora import weights_transposed


def _pack_projection(read, E: int, weight_format: str, group_size: int, shape, split, intermediate_dim: int) -> list:
    """[(blob, scales or None)] per part of `split` of one projection of E experts of `shape` [N, K],
    `read(lo, hi)` giving experts [lo, hi): what pack_split does per projection, an eighth of the
    experts at a time into preallocated outputs (packed blobs and scales are rows per expert), so
    neither the source nor quantization's fp32 temporaries ever cover the whole projection. Part p
    holds the intermediate range split[p] (dimension `intermediate_dim` of the [n, N, K] chunks)."""
    if weight_format in GROUPED_FORMATS and (shape[0] % group_size or shape[1] % group_size):
        raise ValueError(
            f"group_size {group_size} must divide the experts' sizes {tuple(shape)} for weight format {weight_format!r}"
        )
    step = max(1, E // 8)
    out: List[list] = [[None, None] for _ in split]
    with torch.no_grad():
        for lo in range(0, E, step):
            hi = min(E, lo + step)
            chunk = read(lo, hi)
            for part, (start, stop) in zip(out, split):
                b, s = torch.ops.kt.pack_weights(
                    chunk.narrow(intermediate_dim, start, stop - start), weight_format, int(group_size)
                )
                if part[0] is None:
                    part[0] = torch.empty((E, *b.shape[1:]), dtype=b.dtype)
                    if weight_format != "bf16":
                        part[1] = torch.empty((E, *s.shape[1:]), dtype=s.dtype)
                part[0][lo:hi].copy_(b)
                if part[1] is not None:
                    part[1][lo:hi].copy_(s)
    return [tuple(part) for part in out]


def _meta_model(path: str, dtype: Optional[torch.dtype], trust_remote_code: bool):
    """(the model of `path`'s config built on the meta device, the dtype of its non-expert weights)."""
    from transformers import AutoModelForCausalLM

    config = config_of(path, trust_remote_code)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.bfloat16
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, dtype


def _experts_to_stream(model: nn.Module, settings: KTSettings) -> list:
    """(name, module, layer index) of every experts module of the meta model, each checked for kt."""
    adopt_custom_experts(model)  # Llama-4, LongCat-Flash: experts transformers does not dispatch
    found = find_moe_experts(model)
    if not found:
        raise ValueError(f"from_pretrained: {type(model).__name__} has no transformers experts module to put on kt_ops")
    layers = []
    for name, module in found:
        try:
            check_convertible(name, module)
        except ValueError as e:
            if "meta device" not in str(e):  # the experts are meta on purpose: they are streamed below
                raise
        if settings.kt_num_gpu_experts >= module.num_experts:
            raise ValueError(
                f"kt_num_gpu_experts ({settings.kt_num_gpu_experts}) must be smaller than the number of "
                f"experts of {name} ({module.num_experts})"
            )
        layer = layer_index(name)
        if layer is None:
            raise ValueError(f"from_pretrained: cannot tell the layer index of {name}")
        layers.append((name, module, layer))
    return layers


class _LayerReader:
    """Builds each layer's KTExperts from the source: pre-quantized experts as stored, float ones
    read, a projection and a few experts at a time, and packed into the settings' format."""

    def __init__(self, source: ExpertSource, settings: KTSettings, lora_dtype: torch.dtype, device_of):
        self.source, self.settings, self.lora_dtype, self.device_of = source, settings, lora_dtype, device_of

    def build(self, name: str, module: nn.Module, layer: int):
        """(KTExperts, (gate_up, down) kept in the module or None) of one layer."""
        E, (H, I) = module.num_experts, expert_dims(module)
        settings = self.settings
        if self.source.is_quantized_source():
            packed = self.source.packed_layer(layer, E, H, I, settings.weight_format)
            kt = new_kt_experts(
                settings,
                E,
                H,
                I,
                settings.format_of_stored(packed.weight_format, self.source.path),
                layer,
                lora_dtype=self.lora_dtype,
            )
            kt.experts = packed
            return kt, None
        N = settings.kt_num_gpu_experts
        kt = new_kt_experts(settings, E - N, H, I, settings.weight_format, layer, N, lora_dtype=self.lora_dtype)
        kept, parts = {}, [{} for _ in kt.split]
        for proj in ("gate", "up", "down"):
            checked = self._reader(name, module, layer, proj)
            if N:
                kept[proj] = checked(0, N).clone()
            want = (H, I) if proj == "down" else (I, H)
            packed = _pack_projection(
                lambda lo, hi: checked(N + lo, N + hi),
                E - N,
                kt.weight_format,
                kt.group_size,
                want,
                kt.split,
                2 if proj == "down" else 1,
            )
            for part, (blob, scales) in zip(parts, packed):
                part[proj], part[proj + "_scale"] = blob, scales
        kt.set_parts(
            [
                PackedExperts(
                    **part, weight_format=kt.weight_format, num_experts=E - N, hidden_size=H, intermediate_size=hi - lo
                )
                for part, (lo, hi) in zip(parts, kt.split)
            ]
        )
        return kt, (self._kept(name, module, kept) if N else None)

    def _reader(self, name: str, module: nn.Module, layer: int, proj: str):
        """read(lo, hi): experts [lo, hi) of one projection, checked, in the model's expert dtype."""
        E, (H, I) = module.num_experts, expert_dims(module)
        # A fused checkpoint tensor is laid out as the module holds it (transformers saves it so).
        read = self.source.projection_reader(
            layer,
            proj,
            num_experts=E,
            hidden_major=weights_transposed(module),
            interleaved=not getattr(module, "is_concatenated", True),
        )
        want = (H, I) if proj == "down" else (I, H)
        expert_dtype = module.gate_up_proj.dtype

        def checked(lo: int, hi: int) -> torch.Tensor:
            weight = read(lo, hi)
            if tuple(weight.shape) != (hi - lo, *want):
                raise ValueError(
                    f"{self.source.path}: layer {layer} {proj} experts {lo}..{hi - 1} are "
                    f"{tuple(weight.shape)}; {name} needs {(hi - lo, *want)}"
                )
            # Packed from the values transformers would hold (an fp32 checkpoint loaded as bf16 is
            # rounded first), so the packed experts equal apply_kt's.
            return weight.to(expert_dtype)

        return checked

    def _kept(self, name: str, module: nn.Module, kept: dict):
        """The first experts' weights in the module's own layout, on its device."""
        gate_up, down = fuse_gate_up(module, kept["gate"], kept["up"], dim=1), kept["down"]
        if weights_transposed(module):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        device, dtype = self.device_of(name), module.gate_up_proj.dtype
        return gate_up.to(device, dtype).contiguous(), down.to(device, dtype).contiguous()


def _shared_file(path: str, reader: _LayerReader, layers: list, settings: KTSettings) -> str:
    """The packed experts file every process of the node maps; local rank 0 writes it when missing."""
    if settings.kt_num_gpu_experts:
        raise ValueError("kt_shared_experts shares the CPU experts; it cannot be combined with kt_num_gpu_experts")
    if settings.kt_threadpool_count > 1:
        raise ValueError(
            "kt_shared_experts maps the experts of each layer whole; it cannot be combined with kt_threadpool_count > 1"
        )
    if not os.path.exists(path) and _local_rank() == 0:
        # The node's writer packs once and writes the file; every process then maps it.
        from ..weights.packed_io import save_packed_experts

        save_packed_experts(
            path, {layer: reader.build(name, module, layer)[0].experts for name, module, layer in layers}
        )
    _barrier()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"kt_shared_experts {path!r} does not exist: local rank 0 writes it; initialise "
            "torch.distributed first so the other processes wait for it"
        )
    return path


def from_pretrained(
    path: Union[str, os.PathLike],
    settings: Optional[KTSettings] = None,
    *,
    device_map=None,
    dtype: Optional[torch.dtype] = None,
    lora_dtype: torch.dtype = torch.float32,
    kt_shared_experts: Optional[Union[str, os.PathLike]] = None,
    trust_remote_code: bool = False,
    **kt_settings,
) -> nn.Module:
    """A transformers v5 MoE causal LM from the local checkpoint `path` with its routed experts on
    kt_ops (as `apply_kt` leaves it), loaded with bounded host memory (see the module docstring).

    The kt settings are a `KTSettings` and/or its fields as keywords, as apply_kt takes them.
    `dtype` is the non-expert weights' dtype (default: the config's, else bf16); `device_map` puts
    them (None: CPU; 'auto': the first GPU when present; a device; or {module prefix: device} with ''
    for the rest); LoRA of the experts lives where the layer's activations do. `kt_weight_path`
    supplies the experts instead of `path` (a KTransformers or kt_ops converted directory).
    `kt_shared_experts` (a file path on the node's local disk or /dev/shm): the experts are mapped
    read-only from that packed file, which local rank 0 writes first when it does not exist."""
    settings = KTSettings.of(settings, **kt_settings)
    path = os.fspath(path)
    model, dtype = _meta_model(path, dtype, trust_remote_code)
    layers = _experts_to_stream(model, settings)
    device_of = device_resolver(device_map)
    expert_params = {f"{name}.{p}" for name, _, _ in layers for p in ("gate_up_proj", "down_proj")}
    load_non_experts(model, path, expert_params, device_of, dtype)

    register_kt_implementation()
    if settings.kt_num_threads is not None:
        set_num_threads(settings.kt_num_threads)
    source = ExpertSource(settings.kt_weight_path or path)
    if settings.kt_num_gpu_experts and source.is_quantized_source():
        raise ValueError(
            "kt_num_gpu_experts > 0 needs float experts (a bf16 checkpoint) to keep on the GPU; "
            f"{source.path} holds pre-quantized experts"
        )
    reader = _LayerReader(source, settings, lora_dtype, device_of)
    shared = None
    if kt_shared_experts is not None:
        shared = _shared_file(os.fspath(kt_shared_experts), reader, layers, settings)
    prefixes = set()
    for name, module, layer in layers:
        if shared is not None:
            kt, keep = _mapped_kt_experts(shared, layer, module, settings, lora_dtype), None
        else:
            kt, keep = reader.build(name, module, layer)
        # Files hold weights only; the biases (read with the non-expert tensors) and a custom gate's
        # activation (gpt-oss', DeepSeek-V4's clamps) are the module's, as apply_kt takes them.
        set_variant(kt, module)
        device = torch.device(device_of(name))
        kt.to(device)
        keep_gate_up, keep_down = keep if keep is not None else (None, None)
        prefixes.add(install_kt_experts(model, name, module, kt, keep_gate_up, keep_down, device))
        install_custom_forward(model, name, module)
    finish_kt_conversion(
        model,
        [(name, module) for name, module, _ in layers],
        tuple(sorted(prefixes)),
        settings.lora_rank,
        settings.alpha,
    )
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


def _mapped_kt_experts(
    path: str, layer: int, module: nn.Module, settings: KTSettings, lora_dtype: torch.dtype
) -> KTExperts:
    from ..weights.packed_io import load_packed_experts

    packed = load_packed_experts(path, layer, mmap=True)
    got = (packed.num_experts, packed.hidden_size, packed.intermediate_size)
    shape = (module.num_experts, *expert_dims(module))
    if got != shape:
        raise ValueError(
            f"shared experts file {path}: layer {layer} has (num_experts, hidden_size, "
            f"intermediate_size) = {got}; the model needs {shape}"
        )
    kt = new_kt_experts(
        settings, *shape, settings.format_of_stored(packed.weight_format, path), layer, lora_dtype=lora_dtype
    )
    kt.experts = packed
    return kt


def share_kt_experts(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Make every process of a node use one read-only copy of `model`'s packed experts (a model
    converted by apply_kt or from_pretrained): local rank 0 writes them to `path` (unless it exists),
    then every process maps the file shared and drops its own copy. With torch.distributed
    initialised the other processes wait for the file. LoRA parameters are untouched."""
    from ..weights.packed_io import load_packed_experts, save_packed_experts

    path = os.fspath(path)
    modules = kt_experts_modules(model)
    if not modules:
        raise ValueError("share_kt_experts: the model has no kt experts; convert it with apply_kt first")
    split = [name for name, _, kt in modules if len(kt.experts_parts) > 1]
    if split:
        raise ValueError(
            f"share_kt_experts: {split[0]} is split over sub-pools (kt_threadpool_count > 1); the "
            "shared file holds each layer whole: convert with kt_threadpool_count=1"
        )
    unknown = [name for name, _, kt in modules if kt.layer_idx is None]
    if unknown:
        raise ValueError(f"share_kt_experts: cannot tell the layer index of {unknown[0]}")
    if not os.path.exists(path) and _local_rank() == 0:
        save_packed_experts(path, {kt.layer_idx: kt.experts for _, _, kt in modules})
    _barrier()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} does not exist: local rank 0 writes it; initialise torch.distributed "
            "first so the other processes wait for it"
        )
    for name, _, kt in modules:
        mapped = load_packed_experts(path, kt.layer_idx, mmap=True)
        mine = kt.experts
        if (mapped.weight_format, mapped.num_experts, mapped.hidden_size, mapped.intermediate_size) != (
            mine.weight_format,
            mine.num_experts,
            mine.hidden_size,
            mine.intermediate_size,
        ):
            raise ValueError(
                f"{path}: layer {kt.layer_idx} holds {mapped.weight_format} experts "
                f"{(mapped.num_experts, mapped.hidden_size, mapped.intermediate_size)}, but {name} has "
                f"{mine.weight_format} {(mine.num_experts, mine.hidden_size, mine.intermediate_size)}"
            )
        kt.experts = mapped.with_variant(**mine.variant())  # the file holds the weights, not biases/activation
    return model
