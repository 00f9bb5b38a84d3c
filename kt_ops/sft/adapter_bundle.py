"""A KT adapter as one published bundle (`kt_kernel.sft.artifacts`' adapter half, same files): PEFT's
adapter (adapter_config.json and adapter_model.safetensors / .bin), `fused_expert_lora.safetensors`,
and `kt_adapter_manifest.json`, written last, which records each file's size and sha256, the fused
tensors' shapes and dtypes, the LoRA rank and alpha, the base model and the experts' weight format
(and, for a model loaded through a KT non-expert cache, the cache's and the INT8 experts' identity).
A save first withdraws the old manifest, so a half-replaced bundle is never taken for a ready one; a
load checks all of it against the running model before any tensor changes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from safetensors import safe_open

from ..core.formats import LORA_NAMES
from .arch import find_kt_wrappers
from .artifact_common import (
    KTArtifactError,
    KTPretrainedLoadPlan,
    find_load_plan,
    read_json,
    sha256_file,
    walk_model,
    write_json_atomic,
)
from .lora import kt_adapt_peft_lora
from .lora_files import FUSED_EXPERT_LORA_NAME, load_kt_moe_from_adapter, save_kt_moe_to_adapter

KT_ADAPTER_MANIFEST_NAME = "kt_adapter_manifest.json"
KT_ADAPTER_MANIFEST_VERSION = 1
_STANDARD_ADAPTERS = ("adapter_model.safetensors", "adapter_model.bin")
_FORMATS = ("bf16", "int8", "fp8", "rawint4", "mxfp4")
_DTYPE_NAMES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32", "torch.float64": "F64"}


@dataclass(frozen=True)
class KTAdapterManifest:
    path: str
    payload: Dict[str, Any]
    artifact_paths: Tuple[str, ...]


def _fused_contract(model) -> Dict[str, Dict[str, Any]]:
    """{key: {shape, dtype}} of every fused LoRA tensor the model has (or would have)."""
    contract = {}
    for wrapper in find_kt_wrappers(model) or ():
        fused = getattr(wrapper, "_fused_expert_lora_params", None)
        rank = getattr(wrapper, "_lora_rank", 0)
        uses_fused = (
            isinstance(rank, int)
            and not isinstance(rank, bool)
            and rank > 0
            and (
                getattr(wrapper, "_use_fused_expert_lora", False) or getattr(wrapper, "_fused_experts", False) or fused
            )
        )
        if not fused and not uses_fused:
            continue
        prefix = f"layers.{wrapper.layer_idx}.experts"
        if fused:
            if len(fused) != len(LORA_NAMES):
                raise KTArtifactError(
                    f"layer {wrapper.layer_idx}: expected six fused LoRA parameters, got {len(fused)}"
                )
            for name, p in zip(LORA_NAMES, fused):
                if str(p.dtype) not in _DTYPE_NAMES:
                    raise KTArtifactError(f"unsupported fused expert LoRA dtype {p.dtype}")
                contract[f"{prefix}.{name}"] = {"shape": list(p.shape), "dtype": _DTYPE_NAMES[str(p.dtype)]}
            continue
        E, I, H = wrapper.moe_config.expert_num, wrapper.moe_config.intermediate_size, wrapper.hidden_size
        shapes = ((E, rank, H), (E, I, rank), (E, rank, H), (E, I, rank), (E, rank, I), (E, H, rank))
        contract.update({f"{prefix}.{n}": {"shape": list(s), "dtype": "BF16"} for n, s in zip(LORA_NAMES, shapes)})
    return dict(sorted(contract.items()))


def _expert_weight_format(model, plan: Optional[KTPretrainedLoadPlan]) -> str:
    """The experts' weight format the model, its wrappers and its load plan declare (they must
    agree); bf16 when none does."""
    seen = [(name, value) for name, value, _ in walk_model(model, "_kt_expert_weight_format") if value is not None]
    seen += [
        (f"{name}.config", value)
        for name, config, _ in walk_model(model, "config")
        if (value := getattr(config, "kt_expert_weight_format", None)) is not None
    ]
    seen += [
        (f"KT wrapper layer {w.layer_idx}", w._kt_expert_weight_format)
        for w in find_kt_wrappers(model) or ()
        if getattr(w, "_kt_expert_weight_format", None) is not None
    ]
    if plan is not None:
        seen.append(("routed expert manifest", plan.routed_manifest.get("expert_weight_format")))
    for source, value in seen:
        if not isinstance(value, str) or value.strip().lower() not in _FORMATS:
            raise KTArtifactError(f"invalid {source} expert_weight_format {value!r}")
    formats = {value.strip().lower() for _, value in seen}
    if len(formats) > 1:
        details = ", ".join(f"{source}={value}" for source, value in seen)
        raise KTArtifactError(f"conflicting KT expert weight provenance: {details}")
    return formats.pop() if formats else "bf16"


def _provenance(model) -> Dict[str, Any]:
    wrappers = [w for w in find_kt_wrappers(model) or () if getattr(w, "_lora_rank", 0)]
    ranks = {w._lora_rank for w in wrappers}
    alphas = {getattr(w, "_lora_alpha", getattr(getattr(w, "wrapper", None), "lora_alpha", None)) for w in wrappers}
    if len(ranks) != 1:
        raise KTArtifactError(f"fused wrappers have inconsistent LoRA ranks: {sorted(ranks, key=str)}")
    alpha = next(iter(alphas))
    if len(alphas) != 1 or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise KTArtifactError(f"fused wrappers have invalid or inconsistent LoRA alpha: {sorted(alphas, key=str)}")
    rank, plan = next(iter(ranks)), find_load_plan(model)
    if plan is not None and (plan.lora_rank not in (None, rank) or plan.lora_alpha not in (None, float(alpha))):
        raise KTArtifactError(
            f"the wrappers' LoRA (rank {rank}, alpha {alpha}) differs from the pretrained load plan's "
            f"(rank {plan.lora_rank}, alpha {plan.lora_alpha})"
        )
    base = next((os.fspath(v) for _, c, _ in walk_model(model, "config") for v in _names(c) if v), None)
    payload = {
        "expert_weight_format": _expert_weight_format(model, plan),
        "base": {"model_name_or_path": plan.source_model_name_or_path if plan is not None else base},
        "lora": {"rank": rank, "alpha": float(alpha)},
    }
    if plan is not None:
        payload.update(_plan_provenance(plan, payload))
    return payload


def _plan_provenance(plan: KTPretrainedLoadPlan, payload: Dict[str, Any]) -> Dict[str, Any]:
    """The identity of the non-expert cache and the INT8 experts a plan loaded the model from."""
    if payload["expert_weight_format"] != "int8":
        raise KTArtifactError("a KT non-expert load plan needs INT8 routed experts")
    source = plan.manifest.get("source")
    if not isinstance(source, Mapping) or not isinstance(source.get("fingerprint"), str):
        raise KTArtifactError("the validated non-expert manifest lost its source fingerprint")
    payload["base"]["fingerprint"] = source["fingerprint"]
    routed = Path(plan.routed_manifest_path)
    digest = sha256_file(routed)
    return {
        "non_expert_cache": {"path": plan.weight_path, "fingerprint": plan.manifest["fingerprint"]},
        "int8_experts": {
            "path": plan.routed_weight_path,
            "manifest": routed.name,
            "manifest_sha256": digest,
            "fingerprint": plan.routed_manifest.get("fingerprint") or digest,
        },
    }


def _names(config):
    return (getattr(config, "_name_or_path", None), getattr(config, "name_or_path", None))


def _record(path: Path, contract: Optional[Mapping] = None) -> Dict[str, Any]:
    if path.is_symlink() or not path.is_file():
        raise KTArtifactError(f"adapter artifact must be a regular file: {path}")
    record = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if contract is not None:
        record.update(tensor_count=len(contract), tensors=dict(contract))
    return record


def _check_fused_file(path: Path, contract: Mapping) -> None:
    if path.is_symlink() or not path.is_file():
        raise KTArtifactError(f"missing regular fused expert LoRA file: {path}")
    with safe_open(path, framework="pt", device="cpu") as handle:
        keys = set(handle.keys())
        if keys != set(contract):
            raise KTArtifactError(
                f"invalid fused LoRA keys: missing={sorted(set(contract) - keys)}, "
                f"unexpected={sorted(keys - set(contract))}"
            )
        for key, want in contract.items():
            piece = handle.get_slice(key)
            if list(piece.get_shape()) != want["shape"] or piece.get_dtype() != want["dtype"]:
                raise KTArtifactError(f"{key} shape or dtype does not match the runtime")


def save_kt_adapter_artifacts(model, output_dir) -> Optional[KTAdapterManifest]:
    """Publish the KT files of an adapter whose PEFT files (adapter_config.json and one adapter
    model file) are already in `output_dir`: staged in a private directory, moved in, and the
    manifest written last. Without fused LoRA only save_kt_moe_to_adapter's files are written."""
    contract = _fused_contract(model)
    output = Path(output_dir).absolute()
    if output.is_symlink():
        raise KTArtifactError(f"adapter output must not be a symlink: {output}")
    output.mkdir(parents=True, exist_ok=True)
    manifest_path = output / KT_ADAPTER_MANIFEST_NAME
    if manifest_path.exists():  # withdraw the old ready marker before any file of the bundle changes
        manifest_path.unlink()
    if not contract:
        save_kt_moe_to_adapter(model, str(output))
        return None
    config = output / "adapter_config.json"
    standard = [name for name in _STANDARD_ADAPTERS if (output / name).is_file()]
    if config.is_symlink() or not config.is_file():
        raise KTArtifactError(f"KT adapter save requires {config}")
    if len(standard) != 1:
        raise KTArtifactError(f"KT adapter save requires exactly one standard adapter file, got {standard}")
    provenance = _provenance(model)
    staging = Path(tempfile.mkdtemp(dir=output, prefix=".kt-adapter-stage."))
    try:
        shutil.copy2(output / standard[0], staging / standard[0])
        save_kt_moe_to_adapter(model, str(staging))
        _check_fused_file(staging / FUSED_EXPERT_LORA_NAME, contract)
        produced = sorted(entry.name for entry in staging.iterdir())
        for name in produced:
            os.replace(staging / name, output / name)
        artifacts = {"adapter_config.json": _record(config)}
        artifacts.update(
            (name, _record(output / name, contract if name == FUSED_EXPERT_LORA_NAME else None)) for name in produced
        )
        payload = {"version": KT_ADAPTER_MANIFEST_VERSION, "status": "ready", **provenance, "artifacts": artifacts}
        write_json_atomic(manifest_path, payload)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return KTAdapterManifest(str(manifest_path), payload, tuple(str(output / name) for name in sorted(artifacts)))


def _validated_manifest(model, root: Path) -> KTAdapterManifest:
    manifest_path = root / KT_ADAPTER_MANIFEST_NAME
    payload = read_json(manifest_path, "KT adapter manifest")
    if payload.get("version") != KT_ADAPTER_MANIFEST_VERSION or payload.get("status") != "ready":
        raise KTArtifactError(f"{manifest_path}: expected version=1 and status='ready'")
    expected = _provenance(model)
    saved_format = payload.get("expert_weight_format")
    if saved_format is None and "non_expert_cache" in payload and "int8_experts" in payload:
        saved_format = "int8"  # LLaMA-Factory's first writer predates the field; its fields say INT8
    if saved_format is not None and saved_format != expected["expert_weight_format"]:
        raise KTArtifactError(f"{manifest_path}: expert_weight_format does not match the runtime")
    for field in ("base", "lora", "non_expert_cache", "int8_experts"):
        if payload.get(field) != expected.get(field):
            raise KTArtifactError(f"{manifest_path}: {field} does not match the runtime")
    artifacts = payload.get("artifacts")
    if not isinstance(artifacts, dict) or FUSED_EXPERT_LORA_NAME not in artifacts:
        raise KTArtifactError(f"{manifest_path}: artifacts must include the fused expert LoRA")
    if "adapter_config.json" not in artifacts or len(set(artifacts) & set(_STANDARD_ADAPTERS)) != 1:
        raise KTArtifactError(f"{manifest_path}: invalid standard adapter inventory")
    for name, record in artifacts.items():
        path = root / name
        if name != os.path.basename(name) or not isinstance(record, dict):
            raise KTArtifactError(f"{manifest_path}: invalid artifact record {name!r}")
        size = path.stat().st_size if path.is_file() and not path.is_symlink() else None
        if record.get("size") != size:
            raise KTArtifactError(f"{manifest_path}: size mismatch for {name}")
        if record.get("sha256") != sha256_file(path):
            raise KTArtifactError(f"{manifest_path}: SHA256 mismatch for {name}")
    contract = _fused_contract(model)
    fused = artifacts[FUSED_EXPERT_LORA_NAME]
    if fused.get("tensor_count") != len(contract) or fused.get("tensors") != contract:
        raise KTArtifactError(f"{manifest_path}: fused tensor contract does not match the runtime")
    _check_fused_file(root / FUSED_EXPERT_LORA_NAME, contract)
    return KTAdapterManifest(str(manifest_path), payload, tuple(sorted(str(root / n) for n in artifacts)))


def load_kt_adapter_artifacts(model, adapter_path) -> Optional[KTAdapterManifest]:
    """Restore the KT state of an adapter after PEFT loaded its own: the layers this rank owns are
    adapted first (once), the bundle is checked against the model, then the tensors are loaded in
    place. A model with fused LoRA refuses a directory without a manifest."""
    root = Path(adapter_path).absolute()
    if not root.is_dir():
        raise KTArtifactError(f"KT adapter directory does not exist: {root}")
    if any(getattr(w, "wrapper", None) is not None for w in find_kt_wrappers(model) or ()):
        kt_adapt_peft_lora(model)
    contract = _fused_contract(model)
    manifest = None
    if (root / KT_ADAPTER_MANIFEST_NAME).exists():
        manifest = _validated_manifest(model, root)
    elif contract:
        raise KTArtifactError(f"fused adapter is missing {root / KT_ADAPTER_MANIFEST_NAME}")
    load_kt_moe_from_adapter(model, str(root))
    return manifest
