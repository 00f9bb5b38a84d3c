"""What kt_ops.sft's artifact modules share: the error type, hashing and atomic JSON, and the load
plan of a pretrained model whose non-expert weights come from a KT cache (made by
kt_ops.sft.artifacts.resolve_kt_pretrained_artifacts, read by the adapter bundle's provenance)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple


class KTArtifactError(RuntimeError):
    """A KT artifact is missing, inconsistent, unsafe or does not match the running model."""


@dataclass(frozen=True)
class KTNonExpertCache:
    """A validated BF16 non-expert cache (kt_non_expert_weight_path)."""

    path: str
    manifest_path: str
    manifest: Mapping[str, Any]
    checkpoint_files: Tuple[str, ...]
    weight_keys: frozenset
    source_config: Mapping[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])


@dataclass(frozen=True)
class KTPretrainedLoadPlan:
    """How from_pretrained loads a model whose non-expert weights come from a KT cache and whose
    routed experts are pre-quantized INT8 files: only the weight source changes."""

    source_model_name_or_path: str
    weight_path: str
    checkpoint_files: Tuple[str, ...]
    weight_keys: frozenset
    manifest: Mapping[str, Any]
    manifest_path: str
    routed_weight_path: str
    routed_manifest: Mapping[str, Any]
    routed_manifest_path: str
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    disable_source_quantizer: bool = True


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a regular file, or KTArtifactError naming `what`."""
    if path.is_symlink() or not path.is_file():
        raise KTArtifactError(f"{what} must be a regular file: {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise KTArtifactError(f"cannot read {what} {path}: {error}") from error
    if not isinstance(payload, dict):
        raise KTArtifactError(f"{what} {path} must hold a JSON object")
    return payload


def write_json_atomic(path: Path, payload: Mapping) -> None:
    """Write a JSON file so that readers see the old one or the whole new one (synced, renamed)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def walk_model(model, attribute: str):
    """(type name, value of `attribute`, object) for the model and what it wraps (base_model,
    model, module), breadth first."""
    queue, seen = [model], set()
    while queue:
        candidate = queue.pop(0)
        if candidate is None or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        yield type(candidate).__name__, getattr(candidate, attribute, None), candidate
        queue.extend(getattr(candidate, a, None) for a in ("base_model", "model", "module"))


def find_load_plan(model) -> Optional[KTPretrainedLoadPlan]:
    """The KTPretrainedLoadPlan validate_kt_pretrained_load attached to the model, if any."""
    return next(
        (v for _, v, _ in walk_model(model, "_kt_pretrained_load_plan") if isinstance(v, KTPretrainedLoadPlan)), None
    )
