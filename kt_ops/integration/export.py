"""Merged export: a plain transformers checkpoint of a kt model with all its LoRA folded in, for
engines that serve without LoRA.

The experts are unpacked one layer at a time (the weights the kernels compute with, dequantized for
quantized formats), W + scaling·B·A is added per expert in fp32 and the result stored in bf16 under
transformers' own names (`...experts.gate_up_proj` / `down_proj`); other LoRA layers of a peft model
add their delta to the base weight. Tensors are written in shards of at most `max_shard_size` bytes
as soon as a shard fills, so memory holds one shard plus one layer's experts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterator, Optional

import torch
from torch import nn

from ..core.checks import check_int
from ..core.durable import STAGING_PREFIX, atomic_directory
from ..core.packed import unpack_parts
from .hf import fuse_gate_up
from .install import holder_of, kt_experts_modules
from .peft_lora import EXPERT_PARAMS, adapter_factors, weights_transposed, wrapper_chain


def _base_and_adapters(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The transformers model inside `model` and the peft adapters whose LoRA is to be merged."""
    from .adapter import is_peft_model

    if not is_peft_model(model):
        return model, []
    base = model.get_base_model()
    return base, list(model.active_adapters)


def _expert_deltas(
    module: nn.Module, kt, wrappers: dict, adapters: list[str]
) -> Iterator[tuple[int, Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """(expert, gate_up delta [2I, H], down delta [H, I]) in fp32 for every expert with LoRA."""
    factors = {
        p: [adapter_factors(w, a) for a in adapters if a in w.lora_A and not w.disable_adapters]
        for p, w in wrappers.items()
    }
    own = kt.lora_rank and kt.lora_enabled
    for expert in range(kt.first_expert + kt.num_experts):
        gate_up = down = None
        for A, B, s in factors.get("gate_up_proj", []):
            d = s * (B[expert].float() @ A[expert].float())
            gate_up = d if gate_up is None else gate_up + d
        for A, B, s in factors.get("down_proj", []):
            d = s * (B[expert].float() @ A[expert].float())
            down = d if down is None else down + d
        if own and expert >= kt.first_expert:
            j, s = expert - kt.first_expert, kt.lora_scaling
            d = s * fuse_gate_up(
                module,
                kt.gate_lora_b[j].float() @ kt.gate_lora_a[j].float(),
                kt.up_lora_b[j].float() @ kt.up_lora_a[j].float(),
                dim=0,
            )
            gate_up = d if gate_up is None else gate_up + d
            d = s * (kt.down_lora_b[j].float() @ kt.down_lora_a[j].float())
            down = d if down is None else down + d
        yield expert, gate_up, down


def _expert_biases(module: nn.Module, kt, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """gate_up_proj_bias and down_proj_bias in the module's layout (the kept experts' biases live in the
    module, the others in kt.experts)."""
    experts = kt.experts_parts[0]  # experts with biases are in one part
    if experts.down_bias is None:
        return
    kept_gate_up, kept_down = module.kt_gpu_gate_up_proj_bias.cpu(), module.kt_gpu_down_proj_bias.cpu()
    gate_up = fuse_gate_up(module, experts.gate_bias, experts.up_bias, dim=1)
    yield "gate_up_proj_bias", torch.cat([kept_gate_up.to(dtype), gate_up.to(dtype)])
    yield "down_proj_bias", torch.cat([kept_down.to(dtype), experts.down_bias.to(dtype)])


def _merged_experts(
    module: nn.Module, kt, wrappers: dict, adapters: list[str], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up_proj and down_proj of one experts module in the module's own layout, LoRA merged."""
    gate, up, down = unpack_parts(kt.experts_parts)  # [E', I, H], [E', I, H], [E', H, I]
    gate_up = fuse_gate_up(module, gate, up, dim=1)
    del gate, up
    N = kt.first_expert
    if N:
        kept_gate_up, kept_down = module.kt_gpu_gate_up_proj.cpu(), module.kt_gpu_down_proj.cpu()
        if weights_transposed(module):
            kept_gate_up, kept_down = kept_gate_up.transpose(1, 2), kept_down.transpose(1, 2)
        gate_up = torch.cat([kept_gate_up.to(gate_up.dtype), gate_up])
        down = torch.cat([kept_down.to(down.dtype), down])
    gate_up_out = torch.empty(gate_up.shape, dtype=dtype)
    down_out = torch.empty(down.shape, dtype=dtype)
    for expert, d_gate_up, d_down in _expert_deltas(module, kt, wrappers, adapters):
        w = gate_up[expert].float()
        gate_up_out[expert] = (w if d_gate_up is None else w + d_gate_up.cpu()).to(dtype)
        w = down[expert].float()
        down_out[expert] = (w if d_down is None else w + d_down.cpu()).to(dtype)
    rows = module.gate_up_proj.shape[0]  # the placeholder keeps the original shape
    if rows > gate_up_out.shape[0]:
        # LongCat-Flash's identity experts have gate_up_proj rows that are never read: zeros.
        gate_up_out = torch.cat(
            [gate_up_out, gate_up_out.new_zeros(rows - gate_up_out.shape[0], *gate_up_out.shape[1:])]
        )
    if weights_transposed(module):
        gate_up_out, down_out = gate_up_out.transpose(1, 2).contiguous(), down_out.transpose(1, 2).contiguous()
    return gate_up_out, down_out


def _lora_delta(wrapper: nn.Module, adapters: list[str]) -> Optional[torch.Tensor]:
    if wrapper.disable_adapters or wrapper.merged:
        return None
    deltas = [wrapper.get_delta_weight(a).float() for a in adapters if a in wrapper.lora_A]
    return sum(deltas) if deltas else None


def _merged_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, merged tensor) of every weight of the model, in module order."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    base, adapters = _base_and_adapters(model)
    kt_modules = {}
    for name, module, kt in kt_experts_modules(base):
        holder_name, child = holder_of(name)
        _, wrappers = wrapper_chain(getattr(base.get_submodule(holder_name), child))
        kt_modules[id(module)] = (kt, wrappers)
    for name, module in base.named_modules():
        parts = name.split(".") if name else []
        if any(p.startswith("lora_") or p == "kt_experts" for p in parts) or isinstance(module, BaseTunerLayer):
            continue  # LoRA containers and the kt layer are merged below; wrappers hold only those
        plain = name.replace(".base_layer", "")
        prefix = plain + "." if plain else ""
        wrapper = None
        if name.endswith(".base_layer"):
            wrapper = base.get_submodule(name[: -len(".base_layer")])
        if id(module) in kt_modules:
            kt, wrappers = kt_modules[id(module)]
            gate_up, down = _merged_experts(module, kt, wrappers, adapters, dtype)
            yield prefix + "gate_up_proj", gate_up
            yield prefix + "down_proj", down
            del gate_up, down
            for bname, bias in _expert_biases(module, kt, dtype):
                yield prefix + bname, bias
        tensors = list(module.named_parameters(recurse=False))
        tensors += [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
        for pname, tensor in tensors:
            if id(module) in kt_modules and pname in EXPERT_PARAMS:
                continue
            value = tensor.detach()
            if pname == "weight" and isinstance(wrapper, LoraLayer):
                delta = _lora_delta(wrapper, adapters)
                if delta is not None:
                    value = (value.float() + delta.to(value.device)).to(value.dtype)
            yield prefix + pname, value.to("cpu", dtype if value.is_floating_point() else value.dtype)


def export_merged(
    model: nn.Module,
    save_directory: str,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int = 2 * 1024**3,
    *,
    tokenizer=None,
) -> list[str]:
    """Write `model` (converted with `apply_kt`, optionally a peft model) with every active LoRA merged
    as a plain transformers checkpoint in `save_directory`: config.json, generation_config.json when the
    model has one, and safetensors shards (with model.safetensors.index.json when there are several),
    plus `tokenizer` when given. It loads with `AutoModelForCausalLM.from_pretrained` and no kt_ops.
    The directory is built beside `save_directory` and switched into place in one step, so a crash
    leaves the earlier export or this one, never a mix; what the directory held besides an earlier
    export (a README, a tokenizer this call does not replace) is kept. Returns the files written."""
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    check_int(max_shard_size, "max_shard_size (bytes)", 1)
    base, _ = _base_and_adapters(model)
    if not kt_experts_modules(base):
        raise ValueError(
            f"{type(base).__name__} has no kt experts; export_merged is for models converted by "
            "kt_ops.integration.apply_kt (a plain model saves with save_pretrained)"
        )
    save_directory = os.path.realpath(os.fspath(save_directory))
    os.makedirs(os.path.dirname(save_directory), exist_ok=True)

    with atomic_directory(save_directory) as staging:
        names = _write_export(base, model, staging, dtype, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _keep_other_files(save_directory, staging)
    return [os.path.join(save_directory, name) for name in names]


# The files an export writes: an earlier export's are replaced as a whole, never carried over.
_EXPORT_FILE = re.compile(
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json|"
    r"generation_config\.json"
)


def _write_export(
    base: nn.Module, model: nn.Module, directory: str, dtype: torch.dtype, max_shard_size: int
) -> list[str]:
    """The shards, index, config and generation config in `directory`; returns their names."""
    from safetensors.torch import save_file

    shards, shard, size, total = [], {}, 0, 0

    def flush():
        nonlocal shard, size
        if shard:
            path = os.path.join(directory, f".shard-{len(shards):05d}.tmp")  # renamed once the count is known
            save_file(shard, path, metadata={"format": "pt"})
            shards.append((path, list(shard)))
        shard, size = {}, 0

    with torch.no_grad():
        for key, tensor in _merged_tensors(model, dtype):
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > max_shard_size:
                flush()
            shard[key] = tensor.contiguous()
            size += nbytes
            total += nbytes
        flush()

    written, weight_map = [], {}
    for i, (path, keys) in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path, os.path.join(directory, name))
        written.append(name)
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        written.append("model.safetensors.index.json")
        with open(os.path.join(directory, written[-1]), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)

    config = base.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("_experts_implementation", None)
    written.append("config.json")
    with open(os.path.join(directory, written[-1]), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    generation = getattr(base, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
        written.append("generation_config.json")
    return written


def _keep_other_files(old: str, new: str) -> None:
    """Hard-link (else copy) into `new` what `old` holds besides an earlier export and `new` lacks."""
    if not os.path.isdir(old):
        return

    def link_or_copy(source, target):
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError:
            shutil.copy2(source, target, follow_symlinks=False)

    for name in os.listdir(old):
        source, target = os.path.join(old, name), os.path.join(new, name)
        if _EXPORT_FILE.fullmatch(name) or name.startswith(STAGING_PREFIX) or os.path.lexists(target):
            continue
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, target, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(source, target)
