"""A KT adapter as a standard per-expert PEFT LoRA adapter that SGLang (or PEFT) serves
(`kt_kernel.sft.convert_kt_to_sglang_adapter`, also its script).

A KT adapter keeps the routed experts' LoRA fused, one tensor per projection and layer:
`layers.{L}.experts.{gate|up|down}_lora_{a|b}` in fused_expert_lora.safetensors, [E, r, K] for A and
[E, N, r] for B. The converted adapter has one tensor per expert,
`model.layers.{L}.mlp.experts.{e}.{gate|up|down}_proj.lora_{A|B}.weight` ([r, K] / [N, r], the same
numbers and dtype), merged with the adapter's ordinary PEFT tensors (their `base_model.model.` prefix
removed), and an adapter_config.json whose target_modules add gate_proj, up_proj and down_proj. The
LoRA alpha is the input adapter_config.json's when there is one, else the one given. Optionally the
expert and non-expert halves are also written as two adapters of their own.

    python -m kt_ops.sft.convert_kt_to_sglang_adapter INPUT OUTPUT --base-model PATH [--lora-alpha A]
        [--expert-output-dir D] [--nonexpert-output-dir D] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

FUSED_EXPERT_LORA_FILE = "fused_expert_lora.safetensors"
ADAPTER_MODEL_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
KT_FUSED_KEY_RE = re.compile(r"^layers\.(\d+)\.experts\.([A-Za-z0-9_]+)$")
# KT fused name -> (projection module, PEFT LoRA name, the dimension of the rank in the fused tensor)
KT_NAME_MAP = {
    "gate_lora_a": ("gate_proj", "lora_A", 1),
    "gate_lora_b": ("gate_proj", "lora_B", 2),
    "up_lora_a": ("up_proj", "lora_A", 1),
    "up_lora_b": ("up_proj", "lora_B", 2),
    "down_lora_a": ("down_proj", "lora_A", 1),
    "down_lora_b": ("down_proj", "lora_B", 2),
}
EXPERT_TARGET_MODULES = ["gate_proj", "up_proj", "down_proj"]
_PEFT_PREFIX = "base_model.model."

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_MODEL_FILE",
    "FUSED_EXPERT_LORA_FILE",
    "KT_FUSED_KEY_RE",
    "KT_NAME_MAP",
    "convert_kt_to_sglang_adapter",
    "main",
]


def _load_json(path: Path) -> dict:
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: Path, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _expert_tensors(path: Path) -> tuple:
    """({converted key: tensor}, the LoRA rank) of a fused expert LoRA file."""
    fused = load_file(str(path))
    out: Dict[str, torch.Tensor] = {}
    ranks = set()
    for key in sorted(fused):
        match = KT_FUSED_KEY_RE.match(key)
        if match is None or match.group(2) not in KT_NAME_MAP:
            raise ValueError(f"Unsupported KT fused expert LoRA tensor {key!r} in {path}")
        layer, name = match.groups()
        tensor = fused[key]
        if tensor.dim() != 3:
            raise ValueError(f"{key} in {path} must be [experts, rows, columns], got shape {tuple(tensor.shape)}")
        projection, lora, rank_dim = KT_NAME_MAP[name]
        ranks.add(int(tensor.shape[rank_dim]))
        for expert in range(tensor.shape[0]):
            out[f"model.layers.{layer}.mlp.experts.{expert}.{projection}.{lora}.weight"] = tensor[expert].contiguous()
    if not out:
        raise ValueError(f"{path} holds no fused expert LoRA tensors")
    if len(ranks) != 1:
        raise ValueError(f"Inconsistent LoRA ranks in {path}: {sorted(ranks)}")
    return out, ranks.pop()


def _peft_tensors(input_dir: Path, rank: int) -> tuple:
    """(the input adapter's own tensors with their PEFT prefix removed, its config or None)."""
    config_path, model_path = input_dir / ADAPTER_CONFIG_FILE, input_dir / ADAPTER_MODEL_FILE
    config = _load_json(config_path) if config_path.is_file() else None
    tensors = {}
    if model_path.is_file():
        for key, tensor in load_file(str(model_path)).items():
            tensors[key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key] = tensor
    if config is not None and config.get("r") not in (None, rank):
        raise ValueError(
            f"LoRA rank mismatch: {config_path} has r={config.get('r')}, the fused expert LoRA rank {rank}"
        )
    for key, tensor in tensors.items():
        size = tensor.shape[0] if ".lora_A." in key else tensor.shape[-1] if ".lora_B." in key else rank
        if size != rank:
            raise ValueError(f"LoRA rank mismatch: {key} has rank {size}, the fused expert LoRA rank {rank}")
    return tensors, config


def _check_directories(input_dir: Path, outputs: List[Path]) -> None:
    """Every output differs from the input and from each other, and none contains another (a
    cleared output must never hold the input or another output)."""
    named = [("input", input_dir)] + [(f"output {p}", p) for p in outputs]
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1 :]:
            if a == b:
                raise ValueError(f"{name_b} must be different from {name_a} ({a})")
            if a in b.parents or b in a.parents:
                raise ValueError(f"{name_a} ({a}) and {name_b} ({b}) must not be in an ancestor/descendant relation")


def _prepare_output(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"Output directory is not empty: {path} (pass --overwrite to replace it)")
        for entry in path.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _write_adapter(path: Path, tensors: Dict[str, torch.Tensor], config: dict, overwrite: bool) -> dict:
    _prepare_output(path, overwrite)
    save_file(tensors, str(path / ADAPTER_MODEL_FILE), metadata={"format": "pt"})
    _write_json(path / ADAPTER_CONFIG_FILE, config)
    return {"path": str(path), "tensor_count": len(tensors), "target_modules": list(config["target_modules"])}


def _adapter_config(base: Optional[dict], rank: int, alpha: float, targets: List[str], base_model: str) -> dict:
    config = dict(base or {})
    config.update(
        peft_type="LORA",
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        base_model_name_or_path=base_model,
    )
    config.setdefault("bias", "none")
    config.setdefault("task_type", "CAUSAL_LM")
    return config


def convert_kt_to_sglang_adapter(
    input_dir,
    output_dir,
    *,
    base_model_name_or_path: str,
    lora_alpha: Optional[float] = None,
    overwrite: bool = False,
    expert_output_dir=None,
    nonexpert_output_dir=None,
) -> dict:
    """Convert the KT adapter in `input_dir` into a per-expert PEFT adapter in `output_dir` (and the
    expert / non-expert halves into their own directories when given); returns a summary (tensor
    count, rank, alpha, target modules, and the split outputs')."""
    input_dir = Path(input_dir).resolve()
    outputs = [Path(p).resolve() for p in (output_dir, expert_output_dir, nonexpert_output_dir) if p is not None]
    if (expert_output_dir is None) != (nonexpert_output_dir is None):
        raise ValueError("expert_output_dir and nonexpert_output_dir are given together or not at all")
    _check_directories(input_dir, outputs)
    fused = input_dir / FUSED_EXPERT_LORA_FILE
    if not fused.is_file():
        raise FileNotFoundError(f"{input_dir} has no {FUSED_EXPERT_LORA_FILE}")
    experts, rank = _expert_tensors(fused)
    others, input_config = _peft_tensors(input_dir, rank)
    if input_config is not None and input_config.get("lora_alpha") is not None:
        alpha = input_config["lora_alpha"]  # the alpha the adapter was trained with
    elif lora_alpha is not None:
        alpha = lora_alpha
    else:
        raise ValueError(f"{input_dir} has no {ADAPTER_CONFIG_FILE} to read lora_alpha from; pass --lora-alpha")
    other_targets = list((input_config or {}).get("target_modules") or [])
    targets = other_targets + [m for m in EXPERT_TARGET_MODULES if m not in other_targets]
    collisions = set(experts) & set(others)
    if collisions:
        raise ValueError(f"the adapter already holds per-expert tensors of the fused LoRA: {sorted(collisions)[:4]}")
    merged = {**others, **experts}
    config = _adapter_config(input_config, rank, alpha, targets, base_model_name_or_path)
    summary = _write_adapter(outputs[0], merged, config, overwrite)
    summary.update(rank=rank, lora_alpha=alpha)
    if expert_output_dir is not None:
        expert_config = _adapter_config(input_config, rank, alpha, EXPERT_TARGET_MODULES, base_model_name_or_path)
        other_config = _adapter_config(input_config, rank, alpha, other_targets, base_model_name_or_path)
        summary["split_outputs"] = {
            "expert": _write_adapter(outputs[1], experts, expert_config, overwrite),
            "nonexpert": _write_adapter(outputs[2], others, other_config, overwrite),
        }
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--base-model", required=True, help="base_model_name_or_path of the converted adapter")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha when the input has no adapter_config.json")
    parser.add_argument("--expert-output-dir")
    parser.add_argument("--nonexpert-output-dir")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    summary = convert_kt_to_sglang_adapter(
        args.input_dir,
        args.output_dir,
        base_model_name_or_path=args.base_model,
        lora_alpha=args.lora_alpha,
        overwrite=args.overwrite,
        expert_output_dir=args.expert_output_dir,
        nonexpert_output_dir=args.nonexpert_output_dir,
    )
    print(json.dumps(summary, indent=2, sort_keys=True, default=os.fspath))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
