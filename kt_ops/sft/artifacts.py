"""kt-kernel 0.7's KT artifacts (`kt_kernel.sft.artifacts`): what a KT run loads and publishes
besides the model's own checkpoint.

- The non-expert cache (kt_non_expert_weight_path): for a DeepSeek-V3-style FP8 checkpoint trained
  with INT8 experts, the non-expert tensors converted once to BF16 (the routers' score-correction
  bias stays FP32) in safetensors shards with their index, and `kt_non_expert_manifest.json`, which
  records the source checkpoint (sha256 of its config.json and index), every file's size and sha256
  and the tensors' count, bytes and dtypes under one fingerprint. resolve_kt_pretrained_artifacts
  checks the cache and the INT8 experts against the source and returns the KTPretrainedLoadPlan
  from_pretrained follows; validate_kt_pretrained_load checks what was loaded and attaches the
  plan's provenance to the model. Under torch.distributed every rank checks the structure and rank
  0 alone reads the large files for their hashes; the ranks then agree on the outcome and the
  artifacts' identity.
- Which parameters KT owns (kt_ops.sft.ownership) and the adapter bundle (kt_ops.sft.adapter_bundle),
  re-exported here under kt-kernel's module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from safetensors import safe_open

from .adapter_bundle import (
    FUSED_EXPERT_LORA_NAME,
    KT_ADAPTER_MANIFEST_NAME,
    KTAdapterManifest,
    load_kt_adapter_artifacts,
    save_kt_adapter_artifacts,
)
from .artifact_common import (
    KTArtifactError,
    KTNonExpertCache,
    KTPretrainedLoadPlan,
    read_json,
    write_json_atomic,
)
from .artifact_common import sha256_file as _sha256_file
from .ownership import (
    RUNTIME_MODULE_MARKER,
    RUNTIME_MODULE_PATHS,
    claim_kt_routed_expert_subtrees,
    hide_kt_int8_routed_experts_from_dispatch,
    hide_kt_routed_experts_from_dispatch,
    is_kt_int8_routed_expert_base_parameter,
    is_kt_routed_expert_base_parameter,
    is_kt_supported_moe_model,
    mark_kt_int8_routed_expert_base_parameters,
    prepare_kt_int8_non_expert_device_map,
    prepare_kt_non_expert_device_map,
    project_kt_int8_routed_experts_out_of_device_map,
    project_kt_routed_experts_out_of_device_map,
)
from .weight_manifest import validate_persistent_int8_weights

KT_NON_EXPERT_MANIFEST_NAME = "kt_non_expert_manifest.json"
KT_NON_EXPERT_INDEX_NAME = "model.safetensors.index.json"
KT_NON_EXPERT_MANIFEST_VERSION = 2
# manifest version -> the converter that writes it (1: LLaMA-Factory's, read only)
_PRODUCERS = {1: "llamafactory.prepare-kt-cache", 2: "kt-kernel.prepare-non-expert-cache"}
_FP32_EXCEPTIONS = ["model.layers.*.mlp.gate.e_score_correction_bias"]
_FP32_TENSOR = re.compile(r"model\.layers\.\d+\.mlp\.gate\.e_score_correction_bias")
_ROUTED_EXPERT = re.compile(r"(?:^|\.)experts(?:\.|$)")
_ROUTED_EXPERT_PARAMETER = re.compile(r"(?:^|\.)experts\.(?:\d+\.[^.]+\.weight|gate_up_proj|down_proj)$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# kt-kernel's names of the attributes a routed-expert claim sets
_RUNTIME_MODULE_MARKER, _RUNTIME_MODULE_PATHS = RUNTIME_MODULE_MARKER, RUNTIME_MODULE_PATHS

__all__ = [
    "FUSED_EXPERT_LORA_NAME",
    "KT_ADAPTER_MANIFEST_NAME",
    "KT_NON_EXPERT_MANIFEST_NAME",
    "KTAdapterManifest",
    "KTArtifactError",
    "KTNonExpertCache",
    "KTPretrainedLoadPlan",
    "claim_kt_routed_expert_subtrees",
    "hide_kt_int8_routed_experts_from_dispatch",
    "hide_kt_routed_experts_from_dispatch",
    "is_kt_int8_routed_expert_base_parameter",
    "is_kt_routed_expert_base_parameter",
    "is_kt_routed_expert_parameter_name",
    "is_kt_supported_moe_model",
    "load_kt_adapter_artifacts",
    "mark_kt_int8_routed_expert_base_parameters",
    "prepare_kt_int8_non_expert_device_map",
    "prepare_kt_non_expert_device_map",
    "project_kt_int8_routed_experts_out_of_device_map",
    "project_kt_routed_experts_out_of_device_map",
    "resolve_kt_pretrained_artifacts",
    "save_kt_adapter_artifacts",
    "validate_kt_prequantized_loading_info",
    "validate_kt_pretrained_load",
    "write_kt_non_expert_cache_manifest",
]


# ---- fingerprints ---------------------------------------------------------------------------------


def _source_fingerprint(config_sha256: str, index_sha256: str) -> str:
    return hashlib.sha256(f"kt-source-checkpoint-v2\0{config_sha256}\0{index_sha256}".encode()).hexdigest()


def _cache_fingerprint(version: int, source_fingerprint: str, files, tensor_count: int, tensor_bytes: int, dtypes):
    """The fingerprint of a cache: its version, its source, its tensors' count, bytes and dtype
    histogram, and each file's name, size and sha256 (by name)."""
    parts = [f"kt-non-expert-cache-v{version}", source_fingerprint, str(tensor_count), str(tensor_bytes)]
    parts.append(json.dumps(dict(dtypes), sort_keys=True, separators=(",", ":")))
    digest = hashlib.sha256("\0".join(parts).encode() + b"\0")
    for record in sorted(files, key=lambda r: r["name"]):
        digest.update(f"{record['name']}\0{record['size']}\0{record['sha256']}\0".encode())
    return digest.hexdigest()


# ---- the non-expert cache -------------------------------------------------------------------------


def _directory(path, what: str) -> Path:
    root = Path(path)
    if not root.is_absolute() or root.is_symlink() or not root.is_dir():
        raise KTArtifactError(f"{what} must be an absolute path to a real directory: {root}")
    return root.resolve()


def _fp8_block_size(config: Mapping, where) -> list:
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "fp8":
        raise KTArtifactError(f"{where}: the source config must describe an FP8 checkpoint")
    block = quantization.get("weight_block_size")
    if not isinstance(block, (list, tuple)) or len(block) != 2 or not all(_positive(v) for v in block):
        raise KTArtifactError(f"{where}: the source FP8 weight_block_size must be two positive integers")
    return list(block)


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _inspect_shards(root: Path, records: Mapping[str, Mapping], source_config: Mapping, verify_hashes: bool):
    """(tensor names, bytes, dtype histogram, shard paths) of a cache, after checking its files
    against `records` ({name: {size, sha256}}) and its tensors against the cache's rules."""
    index = read_json(root / KT_NON_EXPERT_INDEX_NAME, "cache safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise KTArtifactError(f"{root / KT_NON_EXPERT_INDEX_NAME}: weight_map must be a non-empty object")
    shards = set(weight_map.values())
    if any(not isinstance(s, str) or s != os.path.basename(s) or not s.endswith(".safetensors") for s in shards):
        raise KTArtifactError(f"{root / KT_NON_EXPERT_INDEX_NAME}: every shard must be a plain .safetensors name")
    if set(records) != shards | {KT_NON_EXPERT_INDEX_NAME}:
        raise KTArtifactError(f"the cache's file inventory {sorted(records)} differs from its index")
    layers = source_config.get("num_hidden_layers")
    mtp = f"model.layers.{layers}." if source_config.get("model_type") == "deepseek_v3" and _positive(layers) else None
    keys, total, dtypes, files = set(), 0, {}, []
    for name in sorted(records):
        path = root / name
        if path.is_symlink() or not path.is_file() or path.stat().st_size != records[name].get("size"):
            raise KTArtifactError(f"cache size mismatch for {name} (or not a regular file)")
        if verify_hashes and _sha256_file(path) != records[name].get("sha256"):
            raise KTArtifactError(f"cache SHA256 mismatch for {name}")
        if name == KT_NON_EXPERT_INDEX_NAME:
            continue
        files.append(str(path))
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                piece, want = handle.get_slice(key), "F32" if _FP32_TENSOR.fullmatch(key) else "BF16"
                if key in keys or piece.get_dtype() != want:
                    raise KTArtifactError(f"cache tensor {key!r} is duplicated or not {want}")
                if _ROUTED_EXPERT.search(key) or key.endswith(".weight_scale_inv") or (mtp and key.startswith(mtp)):
                    raise KTArtifactError(f"the cache holds a routed, quantized or MTP tensor {key!r}")
                count = 1
                for size in piece.get_shape():
                    count *= size
                keys.add(key)
                total += count * (4 if want == "F32" else 2)
                dtypes[want] = dtypes.get(want, 0) + 1
    if keys != set(weight_map):
        raise KTArtifactError("the cache shards' tensors differ from the safetensors index")
    return frozenset(keys), total, dtypes, tuple(files)


def _source_records(source: Path) -> Tuple[dict, str, str]:
    config_path, index_path = source / "config.json", source / KT_NON_EXPERT_INDEX_NAME
    config = read_json(config_path, "source config")
    read_json(index_path, "source safetensors index")
    return config, _sha256_file(config_path), _sha256_file(index_path)


def write_kt_non_expert_cache_manifest(cache_path, source_model_name_or_path) -> Dict[str, Any]:
    """Publish the (version 2) manifest of a converted non-expert cache of an FP8 source checkpoint;
    refuses to replace an existing one."""
    root = _directory(cache_path, "KT non-expert cache")
    source = _directory(source_model_name_or_path, "source model")
    if (root / KT_NON_EXPERT_MANIFEST_NAME).exists():
        raise KTArtifactError(f"the cache manifest already exists: {root / KT_NON_EXPERT_MANIFEST_NAME}")
    source_config, config_sha, index_sha = _source_records(source)
    index = read_json(root / KT_NON_EXPERT_INDEX_NAME, "cache safetensors index")
    names = [KT_NON_EXPERT_INDEX_NAME, *sorted(set(index.get("weight_map", {}).values()))]
    records = {}
    for name in names:
        path = root / name
        if path.is_symlink() or not path.is_file():
            raise KTArtifactError(f"cache artifact is not a regular file: {path}")
        records[name] = {"name": name, "size": path.stat().st_size, "sha256": _sha256_file(path)}
    keys, total, dtypes, _ = _inspect_shards(root, records, source_config, verify_hashes=False)
    block = _fp8_block_size(source_config, source)
    files = [records[name] for name in sorted(records)]
    version, fingerprint = KT_NON_EXPERT_MANIFEST_VERSION, _source_fingerprint(config_sha, index_sha)
    payload = {
        "version": version,
        "status": "ready",
        "fingerprint": _cache_fingerprint(version, fingerprint, files, len(keys), total, dtypes),
        "source": {
            "model_name_or_path": str(source),
            "fingerprint": fingerprint,
            "config_sha256": config_sha,
            "index_sha256": index_sha,
        },
        "converter": _converter(version, block),
        "files": files,
        "tensors": {"count": len(keys), "bytes": total, "dtypes": dtypes},
    }
    write_json_atomic(root / KT_NON_EXPERT_MANIFEST_NAME, payload)
    return payload


def _converter(version: int, block: list) -> dict:
    return {
        "name": _PRODUCERS[version],
        "version": version,
        "default_dtype": "BF16",
        "fp32_exceptions": list(_FP32_EXCEPTIONS),
        "weight_block_size": block,
    }


def _same_path(recorded: str, actual: Path) -> bool:
    return os.path.realpath(recorded) == str(actual) if os.path.exists(recorded) else recorded == str(actual)


def _validate_cache(cache_path, source_model_name_or_path, verify_hashes: bool) -> KTNonExpertCache:
    """The cache, after checking its manifest against the source checkpoint and its own files."""
    root = _directory(cache_path, "KT non-expert cache")
    source = _directory(source_model_name_or_path, "source model")
    path = root / KT_NON_EXPERT_MANIFEST_NAME
    manifest = read_json(path, "KT non-expert cache manifest")
    version = manifest.get("version")
    if version not in _PRODUCERS or manifest.get("status") != "ready":
        raise KTArtifactError(f"{path}: expected a ready manifest of version 1 or 2")
    recorded = manifest.get("source")
    if not isinstance(recorded, dict) or not _same_path(str(recorded.get("model_name_or_path")), source):
        raise KTArtifactError(f"{path}: the cache was made from another source than {source}")
    source_config, config_sha, index_sha = _source_records(source)
    if (recorded.get("config_sha256"), recorded.get("index_sha256")) != (config_sha, index_sha):
        raise KTArtifactError(f"{path}: the source's config.json or index changed since the cache was made")
    fingerprint = recorded.get("fingerprint")
    if not isinstance(fingerprint, str) or not _SHA256.fullmatch(fingerprint):
        raise KTArtifactError(f"{path}: source.fingerprint must be a sha256")
    if version == 2 and fingerprint != _source_fingerprint(config_sha, index_sha):
        raise KTArtifactError(f"{path}: the source fingerprint is invalid")
    if manifest.get("converter") != _converter(version, _fp8_block_size(source_config, path)):
        raise KTArtifactError(f"{path}: the converter contract is unsupported")
    files = manifest.get("files")
    if not isinstance(files, list) or not files or not all(_file_record(r) for r in files):
        raise KTArtifactError(f"{path}: files must be a non-empty list of {{name, size, sha256}}")
    records = {r["name"]: r for r in files}
    if len(records) != len(files):
        raise KTArtifactError(f"{path}: a file is listed twice")
    keys, total, dtypes, shards = _inspect_shards(root, records, source_config, verify_hashes)
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict) or (tensors.get("count"), tensors.get("bytes"), tensors.get("dtypes")) != (
        len(keys),
        total,
        dtypes,
    ):
        raise KTArtifactError(f"{path}: the tensor metadata does not match the cache shards")
    if manifest.get("fingerprint") != _cache_fingerprint(version, fingerprint, files, len(keys), total, dtypes):
        raise KTArtifactError(f"{path}: the fingerprint does not match its records")
    return KTNonExpertCache(str(root), str(path), manifest, shards, keys, source_config)


def _file_record(record) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and record["name"] == os.path.basename(record["name"])
        and _positive(record.get("size"))
        and isinstance(record.get("sha256"), str)
        and bool(_SHA256.fullmatch(record["sha256"]))
    )


# ---- the load plan ----------------------------------------------------------------------------------


def _distributed_validation_context():
    """(process group, rank, world size) of an initialized torch.distributed run, else (None, 0, 1)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() <= 1:
        return None, 0, 1
    return dist, int(dist.get_rank()), int(dist.get_world_size())


def _synchronize_artifact_validation(dist, rank: int, world_size: int, error, signature) -> None:
    """Every rank raises when any rank failed (naming it) or when the ranks resolved different
    artifacts; alone, just this rank's error."""
    if dist is None or world_size <= 1:
        if error is not None:
            raise error
        return
    local = None if error is None else f"rank {rank}: {type(error).__name__}: {error}"
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (local, signature))
    failures = [entry[0] for entry in gathered if entry is not None and entry[0] is not None]
    if failures:
        raise KTArtifactError("distributed KT artifact validation failed: " + "; ".join(failures))
    if len({entry[1] for entry in gathered if entry is not None}) != 1:
        raise KTArtifactError("the distributed ranks resolved different KT artifacts")


def _config_value(config, name: str, default=None):
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def _expert_weight_format(config) -> str:
    fmt = _config_value(config, "kt_expert_weight_format")
    if isinstance(fmt, str) and fmt.strip():
        return fmt.strip().lower()
    backend = str(_config_value(config, "kt_backend") or "").strip().lower()
    aliases = {"int8": "int8", "amxint8": "int8", "fp8": "fp8", "amxfp8": "fp8", "rawint4": "rawint4"}
    aliases.update(amxint4_kgroup="rawint4", mxfp4="mxfp4")
    return aliases.get(backend, "")


def _checked_artifacts(kt_config, source, cache_path: str, weight_path: str, rank: int):
    """(cache, validated INT8 experts, their manifest, the identity the ranks compare)."""
    cache = _validate_cache(cache_path, source, verify_hashes=rank == 0)
    config = cache.source_config
    layers, first = config.get("num_hidden_layers"), config.get("first_k_dense_replace", 0)
    if not _positive(layers) or not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise KTArtifactError("the source config needs num_hidden_layers > 0 and first_k_dense_replace >= 0")
    routed = validate_persistent_int8_weights(
        weight_path,
        layer_indices=tuple(range(first, layers)),
        numa_count=int(_config_value(kt_config, "kt_threadpool_count", 1) or 1),
        expert_num=int(config["n_routed_experts"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["moe_intermediate_size"]),
        verify_hashes=None if rank == 0 else False,  # rank 0 alone reads the files through
    )
    manifest = read_json(routed.path, "routed INT8 manifest")
    identity = (cache.fingerprint, cache.path, str(routed.root), json.dumps(manifest, sort_keys=True))
    return cache, routed, manifest, identity


def resolve_kt_pretrained_artifacts(kt_config, pretrained_model_name_or_path, quantization_config=None):
    """The KTPretrainedLoadPlan of a run with kt_non_expert_weight_path (None without one): the
    cache and the INT8 experts at kt_weight_path checked against the source checkpoint. An explicit
    quantization_config cannot be combined with it (the cache replaces the source's quantizer)."""
    cache_path = _config_value(kt_config, "kt_non_expert_weight_path")
    if not cache_path:
        return None
    if _expert_weight_format(kt_config) != "int8":
        raise KTArtifactError(
            "kt_non_expert_weight_path is supported by kt_ops for INT8 routed experts only (kt-kernel also reads "
            "DeepSeek-V4 MXFP4 caches, which kt_ops does not)"
        )
    if quantization_config is not None:
        raise KTArtifactError("kt_non_expert_weight_path cannot be combined with an explicit quantization_config")
    weight_path = _config_value(kt_config, "kt_weight_path")
    if not isinstance(weight_path, str) or not weight_path:
        raise KTArtifactError("loading routed INT8 experts requires kt_weight_path")
    dist, rank, world = _distributed_validation_context()
    checked, error = None, None
    try:
        checked = _checked_artifacts(kt_config, pretrained_model_name_or_path, cache_path, weight_path, rank)
    except Exception as exc:
        error = exc if isinstance(exc, KTArtifactError) else KTArtifactError(f"KT artifact validation failed: {exc}")
    _synchronize_artifact_validation(dist, rank, world, error, None if checked is None else checked[3])
    cache, routed, manifest, _ = checked
    lora_rank, alpha = _config_value(kt_config, "kt_lora_rank"), _config_value(kt_config, "kt_lora_alpha")
    return KTPretrainedLoadPlan(
        source_model_name_or_path=os.fspath(pretrained_model_name_or_path),
        weight_path=cache.path,
        checkpoint_files=cache.checkpoint_files,
        weight_keys=cache.weight_keys,
        manifest=cache.manifest,
        manifest_path=cache.manifest_path,
        routed_weight_path=str(routed.root),
        routed_manifest=manifest,
        routed_manifest_path=str(routed.path),
        lora_rank=lora_rank if _positive(lora_rank) else None,
        lora_alpha=float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None,
    )


def _loading_value(info, name: str):
    return (info.get(name) if isinstance(info, Mapping) else getattr(info, name, None)) or ()


def validate_kt_pretrained_load(plan: Optional[KTPretrainedLoadPlan], loading_info, model):
    """After from_pretrained followed `plan`: only routed experts may be missing, nothing unexpected,
    mismatched or failed, and the model's non-expert tensors are exactly the cache's. Then the model
    records the plan and names its source checkpoint (not the cache) as its origin."""
    if plan is None:
        return None
    if loading_info is None:
        raise KTArtifactError("the pretrained loader returned no loading diagnostics")
    failures = {
        "missing_keys": sorted(k for k in _loading_value(loading_info, "missing_keys") if not _ROUTED_EXPERT.search(k)),
        "unexpected_keys": list(_loading_value(loading_info, "unexpected_keys")),
        "mismatched_keys": [
            v for v in _loading_value(loading_info, "mismatched_keys") if not is_kt_routed_expert_parameter_name(v[0])
        ],
        "error_msgs": list(_loading_value(loading_info, "error_msgs")),
        "conversion_errors": {
            k: v
            for k, v in dict(_loading_value(loading_info, "conversion_errors") or {}).items()
            if not is_kt_routed_expert_parameter_name(k)
        },
    }
    failures = {k: v for k, v in failures.items() if v}
    if failures:
        raise KTArtifactError(f"the non-expert checkpoint did not load exactly: {failures}")
    loaded = {_canonical_key(k) for k in model.state_dict()}
    loaded = {k for k in loaded if k is not None and not _ROUTED_EXPERT.search(k)}
    wanted = set(plan.weight_keys)
    if loaded != wanted:
        raise KTArtifactError(
            f"the loaded non-expert tensors differ from the cache: missing {sorted(wanted - loaded)[:16]}, "
            f"unexpected {sorted(loaded - wanted)[:16]}"
        )
    config = getattr(model, "config", None)
    for name in ("name_or_path", "_name_or_path"):
        if config is not None and hasattr(config, name):
            setattr(config, name, plan.source_model_name_or_path)
    model._kt_pretrained_load_plan = plan
    model._kt_base_model_name_or_path = plan.source_model_name_or_path
    model._kt_non_expert_cache_path = plan.weight_path
    model._kt_non_expert_cache_manifest = plan.manifest
    model._kt_routed_int8_manifest_path = plan.routed_manifest_path
    model._kt_routed_int8_manifest = plan.routed_manifest
    return plan


def _canonical_key(key: str) -> Optional[str]:
    """A loaded state-dict key as the checkpoint names it (a KT layer keeps the original router as
    `_original_router`; its weight is the router's own, its bias the gate's)."""
    if "._original_router.weight" in key:
        return None
    return key.replace("._original_router.e_score_correction_bias", ".gate.e_score_correction_bias")


# ---- which checkpoint keys KT owns --------------------------------------------------------------


def is_kt_routed_expert_parameter_name(name: str) -> bool:
    """Whether a checkpoint / model name is a routed expert's base weight (per-expert Linear or fused)."""
    return bool(_ROUTED_EXPERT_PARAMETER.search(name)) and ".shared_expert" not in name


def validate_kt_prequantized_loading_info(kt_config, loading_info, model) -> None:
    """After from_pretrained skipped the routed experts of a pre-quantized checkpoint: everything
    missing must be a routed expert, nothing mismatched or failed to convert; unexpected keys may
    only be routed experts or layers beyond the model's (DeepSeek's MTP layers)."""
    if getattr(kt_config, "kt_expert_weight_format", None) not in ("int8", "fp8", "rawint4", "mxfp4"):
        return
    layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
    problems = {
        "missing": [
            k for k in _loading_value(loading_info, "missing_keys") if not is_kt_routed_expert_parameter_name(k)
        ],
        "unexpected": [
            k
            for k in _loading_value(loading_info, "unexpected_keys")
            if not is_kt_routed_expert_parameter_name(k) and not _beyond_layers(k, layers)
        ],
        "mismatched": list(_loading_value(loading_info, "mismatched_keys")),
        "errors": list(_loading_value(loading_info, "error_msgs")),
        "conversion_errors": list(dict(_loading_value(loading_info, "conversion_errors") or {})),
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise KTArtifactError(f"a pre-quantized KT checkpoint needs an exact non-expert model match: {problems}")


def _beyond_layers(key: str, num_layers: int) -> bool:
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
    return bool(match) and num_layers > 0 and int(match.group(1)) >= num_layers
