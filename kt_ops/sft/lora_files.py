"""What kt_ops.sft saves beside a PEFT adapter (kt-kernel's files): `fused_expert_lora.safetensors`
(the layers' own fused expert LoRA, keys `layers.{L}.experts.{gate,up,down}_lora_{a,b}`), the LoRA
experts' weights inside `adapter_model.safetensors`, and the full-weight checkpoint
(kt_ops.sft.checkpoint). PEFT saves its own LoRA. Loads restore tensors in place, checking the
exact key set, shapes and dtypes first."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Dict, List

import torch

from ..core.formats import LORA_NAMES
from .arch import find_kt_wrappers
from .checkpoint import load_full_weight_checkpoint, save_full_weight_checkpoint

logger = logging.getLogger(__name__)

FUSED_EXPERT_LORA_NAME = "fused_expert_lora.safetensors"
_LORA_EXPERT_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.mlp\.lora_experts\.(\d+)\.(le_gate|le_up|le_down)\.weight"
)


def _wrappers(model) -> list:
    return find_kt_wrappers(model) or []


def save_fused_expert_lora(wrappers: List, output_dir: str) -> None:
    """Write every layer's fused LoRA to fused_expert_lora.safetensors, atomically (a temporary file
    in the same directory, then a rename): a failed save leaves the previous file as it was."""
    from safetensors import torch as safetensors_torch

    tensors = {}
    for wrapper in wrappers:
        for name, param in zip(LORA_NAMES, getattr(wrapper, "_fused_expert_lora_params", None) or ()):
            tensors[f"layers.{wrapper.layer_idx}.experts.{name}"] = param.detach().clone()
    if not tensors:
        return
    path = os.path.join(output_dir, FUSED_EXPERT_LORA_NAME)
    with tempfile.NamedTemporaryFile(
        dir=output_dir, prefix=".fused_expert_lora.", suffix=".safetensors.tmp", delete=False
    ) as handle:
        temporary = handle.name
    try:
        safetensors_torch.save_file(tensors, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    logger.info("Saved %d fused expert LoRA tensors to %s", len(tensors), path)


def load_fused_expert_lora(wrappers: List, adapter_path: str) -> int:
    """Restore the fused LoRA of the layers this rank owns (those with parameters) in place from
    fused_expert_lora.safetensors, whose keys must be exactly theirs; the count loaded."""
    expected: Dict[str, tuple] = {}
    owned = set()
    for wrapper in wrappers:
        fused = getattr(wrapper, "_fused_expert_lora_params", None)
        if not fused:
            continue
        if len(fused) != len(LORA_NAMES):
            raise RuntimeError(
                f"Layer {wrapper.layer_idx}: expected 6 fused expert LoRA parameters, found {len(fused)}"
            )
        if wrapper.layer_idx in owned:
            raise RuntimeError(f"Duplicate owned fused expert LoRA layer {wrapper.layer_idx}")
        owned.add(wrapper.layer_idx)
        for name, param in zip(LORA_NAMES, fused):
            expected[f"layers.{wrapper.layer_idx}.experts.{name}"] = (wrapper, param)
    if not expected:
        return 0
    path = os.path.join(adapter_path, FUSED_EXPERT_LORA_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing {FUSED_EXPERT_LORA_NAME} in adapter {adapter_path}")
    from safetensors.torch import load_file

    saved = load_file(path)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        details = [f"missing={missing}"] * bool(missing) + [f"unexpected={unexpected}"] * bool(unexpected)
        raise RuntimeError(f"Invalid {FUSED_EXPERT_LORA_NAME} key set: {', '.join(details)}")
    for key, (_, param) in expected.items():
        if saved[key].shape != param.shape:
            raise RuntimeError(f"{key} shape mismatch: expected {tuple(param.shape)}, got {tuple(saved[key].shape)}")
        if saved[key].dtype != param.dtype:
            raise RuntimeError(f"{key} dtype mismatch: expected {param.dtype}, got {saved[key].dtype}")
    with torch.no_grad():
        for key, (wrapper, param) in expected.items():
            param.copy_(saved[key])
            wrapper._lora_pointers_dirty = True
    return len(expected)


def save_lora_experts_to_adapter(model, output_dir: str) -> None:
    """Add the LoRA experts' weights to adapter_model.safetensors (keeping what PEFT wrote)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapter = os.path.join(output_dir, "adapter_model.safetensors")
    state = {}
    if os.path.exists(adapter):
        with safe_open(adapter, framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    for wrapper in _wrappers(model):
        if getattr(wrapper, "lora_experts", None) is None:
            continue
        for e, expert in enumerate(wrapper.lora_experts.experts):
            base = f"base_model.model.model.layers.{wrapper.layer_idx}.mlp.lora_experts.{e}"
            for name in ("le_gate", "le_up", "le_down"):
                state[f"{base}.{name}.weight"] = getattr(expert, name).weight.detach().cpu().clone()
    save_file(state, adapter, metadata={"format": "pt"})


def load_lora_experts_from_adapter(model, adapter_path: str) -> None:
    """Restore the LoRA experts' weights from lora_experts.safetensors or adapter_model.safetensors."""
    from safetensors import safe_open

    owners = {w.layer_idx: w for w in _wrappers(model) if getattr(w, "lora_experts", None) is not None}
    candidates = [os.path.join(adapter_path, n) for n in ("lora_experts.safetensors", "adapter_model.safetensors")]
    path = next((p for p in candidates if os.path.exists(p)), None)
    if not owners or path is None:
        logger.warning("No LoRA experts to load from %s", adapter_path)
        return
    with safe_open(path, framework="pt") as handle, torch.no_grad():
        for key in handle.keys():
            match = _LORA_EXPERT_KEY.fullmatch(key)
            if not match or int(match.group(1)) not in owners:
                continue
            experts = owners[int(match.group(1))].lora_experts.experts
            if int(match.group(2)) < len(experts):
                weight = getattr(experts[int(match.group(2))], match.group(3)).weight
                weight.copy_(handle.get_tensor(key).to(weight.device))


def save_kt_moe_to_adapter(model, output_dir: str) -> None:
    """Save what kt_ops.sft owns beside PEFT's adapter: full-weight experts, LoRA experts, fused LoRA."""
    wrappers = _wrappers(model)
    if any(getattr(w, "_full_weight_grad", False) for w in wrappers):
        save_full_weight_checkpoint(wrappers, output_dir)
    if any(getattr(w, "lora_experts", None) is not None for w in wrappers):
        save_lora_experts_to_adapter(model, output_dir)
    if any(getattr(w, "_fused_expert_lora_params", None) for w in wrappers):
        save_fused_expert_lora(wrappers, output_dir)


def load_kt_moe_from_adapter(model, adapter_path: str) -> None:
    """Restore what save_kt_moe_to_adapter saved, in place."""
    wrappers = _wrappers(model)
    if any(getattr(w, "_full_weight_grad", False) for w in wrappers):
        load_full_weight_checkpoint(wrappers, adapter_path)
    if any(getattr(w, "lora_experts", None) is not None for w in wrappers):
        load_lora_experts_from_adapter(model, adapter_path)
    if any(getattr(w, "_fused_expert_lora_params", None) for w in wrappers):
        load_fused_expert_lora(wrappers, adapter_path)
