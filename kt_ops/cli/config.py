"""kt-sft's config: LLaMA-Factory's keys with its meanings and defaults (CONFIG_KEYS), the keys
accepted without an effect here (NO_EFFECT_KEYS), and load_config, which validates a YAML file or a
dict and fills in the defaults. The kt_* keys are kt_ops.core.settings.KTSettings' fields, checked
and resolved there (kt_settings)."""

from __future__ import annotations

import os
from typing import Any

from ..core.settings import KTSettings, setting_fields

# The kt keys a config gives KTSettings (kt_max_cache_depth is a wrapper's: see NO_EFFECT_KEYS).
KT_SETTINGS = {
    key: field for key, field in setting_fields().items() if key.startswith("kt_") and key != "kt_max_cache_depth"
}

# key -> (default, type or tuple of allowed values, help). Names, meanings and defaults follow
# LLaMA-Factory (and transformers' TrainingArguments) wherever they overlap.
CONFIG_KEYS: dict[str, tuple[Any, Any, str]] = {
    "model_name_or_path": (None, str, "local model directory, or a built-in tiny model (tiny-qwen3-moe, ...)"),
    "dataset": (
        None,
        str,
        "comma-separated dataset names from dataset_dir/dataset_info.json, or .json/.jsonl "
        "files (relative paths: relative to the config file)",
    ),
    "dataset_dir": (
        "data",
        str,
        "directory holding dataset_info.json (relative: to the working directory, else to the config file's directory)",
    ),
    "template": (
        None,
        str,
        "LLaMA-Factory chat template (qwen3, qwen3_5, qwen3_vl, deepseek, deepseek3, ...); "
        "unset: the tokenizer's chat template, else 'empty'",
    ),
    "max_samples": (None, int, "use at most this many records of each dataset"),
    "identity_name": (None, str, "fills {{name}} in the data (LLaMA-Factory's identity.json)"),
    "identity_author": (None, str, "fills {{author}} in the data"),
    "stage": ("sft", ("sft", "dpo"), "training stage"),
    "finetuning_type": ("lora", ("lora",), "only LoRA is supported"),
    "use_kt": (True, bool, "run the routed experts on kt_ops (with expert LoRA)"),
    "kt_config": (
        None,
        dict,
        "LLaMA-Factory's nested block of kt_* settings (each may also be given at the top level)",
    ),
    **{key: (field.default, KTSettings, field.metadata["help"]) for key, field in KT_SETTINGS.items()},
    "kt_cpu_activation": (
        None,
        ("retain", "recompute"),
        "recompute: keep no expert activations, recompute the "
        "expert layer in backward (default: recompute with "
        "gradient checkpointing, else retain)",
    ),
    "torch_num_threads": (None, int, "threads for torch's own ops (default: torch's choice)"),
    "lora_rank": (8, int, "LoRA rank (attention and experts)"),
    "lora_alpha": (None, float, "LoRA alpha (default: 2 x lora_rank)"),
    "lora_dropout": (0.0, float, "dropout on the attention LoRA input"),
    "lora_target": (
        "all",
        str,
        "comma-separated module names for peft LoRA, 'all' for every linear layer outside the experts, or 'none'",
    ),
    "cutoff_len": (2048, int, "maximum tokens per example"),
    "per_device_train_batch_size": (8, int, "batch size"),
    "gradient_accumulation_steps": (1, int, "micro-batches per optimizer step"),
    "learning_rate": (5e-5, float, "peak learning rate"),
    "num_train_epochs": (3.0, float, "epochs (ignored when max_steps > 0)"),
    "max_steps": (-1, int, "optimizer steps (overrides epochs when > 0)"),
    "lr_scheduler_type": ("linear", str, "transformers scheduler name"),
    "warmup_steps": (0, int, "warm-up steps (overrides warmup_ratio when > 0)"),
    "warmup_ratio": (0.0, float, "warm-up as a fraction of all steps"),
    "logging_steps": (1, int, "log (and record the loss) every N steps"),
    "save_steps": (
        500,
        int,
        "save a resumable checkpoint (Trainer state + adapter) every N steps (0: only the adapter, at the end)",
    ),
    "save_only_model": (False, bool, "checkpoints without optimizer/scheduler state (not resumable)"),
    "save_total_limit": (None, int, "keep at most this many checkpoints (the oldest are deleted)"),
    "resume_from_checkpoint": (
        None,
        (str, bool),
        "a checkpoint-N directory of an earlier run (with save_steps) to resume, or true for the newest "
        "complete one in output_dir",
    ),
    "gradient_checkpointing": (
        None,
        bool,
        "activation checkpointing per decoder layer (default: on, as in "
        "LLaMA-Factory, unless disable_gradient_checkpointing)",
    ),
    "disable_gradient_checkpointing": (False, bool, "LLaMA-Factory's switch to turn gradient checkpointing off"),
    "bf16": (False, bool, "load the model in bfloat16 and train with bf16 autocast"),
    "plot_loss": (False, bool, "also draw the loss curve to loss.png (loss.csv is always written)"),
    "report_to": ("none", (str, list), "none or tensorboard (event files under output_dir/runs)"),
    "fsdp": (
        None,
        (str, list, bool),
        "FSDP2 over the torchrun processes (TrainingArguments' option string): full_shard or shard_grad_op, "
        "and auto_wrap; true is full_shard auto_wrap",
    ),
    "fsdp_config": (
        None,
        dict,
        "FSDP2 settings (TrainingArguments' keys, with or without the fsdp_ prefix): version (2), "
        "transformer_layer_cls_to_wrap, reshard_after_forward, auto_wrap_policy, state_dict_type",
    ),
    "pref_beta": (0.1, float, "DPO beta"),
    "seed": (42, int, "random seed"),
    "output_dir": (None, str, "where the adapter, config and loss curve go"),
}
_REQUIRED = ("model_name_or_path", "dataset", "output_dir")

# LLaMA-Factory keys that kt-sft accepts but that change nothing here, and why.
NO_EFFECT_KEYS: dict[str, str] = {
    "do_train": "kt-sft train always trains",
    "trust_remote_code": "kt-sft loads only architectures transformers implements natively",
    "overwrite_cache": "kt-sft keeps no dataset cache",
    "overwrite_output_dir": "kt-sft always writes into output_dir",
    "preprocessing_num_workers": "the data is tokenized in-process (small datasets)",
    "dataloader_num_workers": "batches come from pre-tokenized in-memory data",
    "ddp_timeout": "applies to multi-process runs started by LLaMA-Factory's launcher",
    "image_max_pixels": "kt-sft trains on text only",
    "video_max_pixels": "kt-sft trains on text only",
    "kt_non_expert_weight_path": "non-expert weights come from model_name_or_path",
    "kt_weight_lifecycle": "kt_ops keeps the packed experts resident for the whole run",
    "kt_max_cache_depth": "autograd keeps each expert forward's state, so any number may be in flight",
    "kt_share_backward_bb": "kt_ops's backward allocates its buffers per call",
    "kt_model_max_length": "kt_ops sizes its buffers per call, not for a maximum length",
}
# Keys of LLaMA-Factory's nested kt_config block; each may also be given at the top level.
KT_CONFIG_BLOCK_KEYS = (
    "kt_expert_weight_format",
    "kt_backend",
    "kt_weight_lifecycle",
    "kt_num_threads",
    "kt_tp_enabled",
    "kt_threadpool_count",
    "kt_max_cache_depth",
    "kt_share_backward_bb",
    "kt_model_max_length",
)


class ConfigError(ValueError):
    pass


def _check_value(key: str, value, kind):
    if kind is KTSettings:  # checked with the others by KTSettings (kt_settings)
        return value
    if kind == (str, bool):  # resume_from_checkpoint: a path or true/false
        if not isinstance(value, (str, bool)):
            raise ConfigError(f"{key} must be a path or true/false, got {value!r}")
        return value
    if kind == (str, list, bool):  # fsdp: an option string, a list of options or true/false
        if isinstance(value, bool):
            return ["full_shard", "auto_wrap"] if value else []
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{key} must be an option string, a list of options or true/false, got {value!r}")
        return list(items)
    if isinstance(kind, tuple) and all(isinstance(k, type) for k in kind):  # report_to: str or list
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{key} must be a string or a list of strings, got {value!r}")
        return [v.strip() for item in items for v in item.split(",") if v.strip()]
    if isinstance(kind, tuple):
        if value not in kind:
            raise ConfigError(f"{key} must be one of {list(kind)}, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _read_raw(path_or_dict) -> tuple[dict, str]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), os.getcwd()
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise ConfigError(f"config must be a YAML path or a dict, got {type(path_or_dict).__name__}")
    import yaml

    path = os.fspath(path_or_dict)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {type(raw).__name__}")
    return raw, os.path.dirname(os.path.abspath(path))


def _flatten_kt_config(raw: dict) -> dict:
    """Merge LLaMA-Factory's nested kt_config block into the top level (a key given in both places must
    agree)."""
    block = raw.pop("kt_config", None)
    if block is None:
        return raw
    if not isinstance(block, dict):
        raise ConfigError(f"kt_config must be a mapping of kt_* keys, got {block!r}")
    unknown = sorted(set(block) - set(KT_CONFIG_BLOCK_KEYS))
    if unknown:
        raise ConfigError(f"unknown kt_config keys {unknown}; valid kt_config keys: {sorted(KT_CONFIG_BLOCK_KEYS)}")
    for key, value in block.items():
        if key in raw and raw[key] != value:
            raise ConfigError(f"{key} is {raw[key]!r} at the top level but {value!r} in kt_config")
        raw[key] = value
    return raw


def load_config(path_or_dict, quiet: bool = False) -> dict:
    """Validate a config (a YAML file path or a dict) and fill in defaults. Relative `dataset` files,
    `output_dir` and `kt_weight_path` are resolved against the config file's directory. LLaMA-Factory
    keys without an effect here are accepted with one line saying so (unless `quiet`)."""
    raw, base_dir = _read_raw(path_or_dict)
    raw = _flatten_kt_config(raw)
    unknown = sorted(set(raw) - set(CONFIG_KEYS) - set(NO_EFFECT_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown config keys {unknown}; valid keys: {sorted(set(CONFIG_KEYS) | set(NO_EFFECT_KEYS))}"
        )
    for key in sorted(set(raw) & set(NO_EFFECT_KEYS)):
        if raw[key] is not None and not quiet:
            print(f"kt-sft: {key} has no effect: {NO_EFFECT_KEYS[key]}")
    if raw.get("do_train") is False:
        raise ConfigError("do_train is false: kt-sft train only trains")
    missing = [k for k in _REQUIRED if raw.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"missing required config keys {missing}")
    config = {}
    for key, (default, kind, _) in CONFIG_KEYS.items():
        value = raw.get(key, default)
        config[key] = None if value is None else _check_value(key, value, kind)
    config.pop("kt_config")
    _resolve_paths(config, base_dir)
    for key in ("torch_num_threads", "max_samples"):
        if config[key] is not None and config[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {config[key]}")
    if config["lora_rank"] < 1:  # peft's LoRA on the other layers has this rank too
        raise ConfigError(f"lora_rank must be >= 1, got {config['lora_rank']}")
    if not 0.0 <= config["warmup_ratio"] < 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {config['warmup_ratio']}")
    report = [r for r in config["report_to"] if r != "none"]
    if any(r != "tensorboard" for r in report):
        raise ConfigError(f"report_to must be none or tensorboard here, got {config['report_to']!r}")
    config["report_to"] = report
    _resolve_gradient_checkpointing(config)
    _resolve_kt_settings(config)
    _resolve_fsdp(config, quiet)
    return config


def _resolve_paths(config: dict, base_dir: str) -> None:
    for key in ("output_dir", "kt_weight_path", "resume_from_checkpoint"):
        if isinstance(config[key], str) and not os.path.isabs(config[key]):
            config[key] = os.path.normpath(os.path.join(base_dir, config[key]))
    entries = []
    for name in (n.strip() for n in config["dataset"].split(",")):
        if name.endswith((".json", ".jsonl")) and not os.path.isabs(name):
            name = os.path.normpath(os.path.join(base_dir, name))
        entries.append(name)
    config["dataset"] = ",".join(entries)
    if not os.path.isabs(config["dataset_dir"]) and not os.path.isdir(config["dataset_dir"]):
        config["dataset_dir"] = os.path.normpath(os.path.join(base_dir, config["dataset_dir"]))
    config["dataset_dir"] = os.path.abspath(config["dataset_dir"])
    model = config["model_name_or_path"]
    if not model.startswith("tiny-") and not os.path.isabs(model) and os.path.isdir(os.path.join(base_dir, model)):
        config["model_name_or_path"] = os.path.join(base_dir, model)


def _resolve_gradient_checkpointing(config: dict) -> None:
    if config["gradient_checkpointing"] and config["disable_gradient_checkpointing"]:
        raise ConfigError("gradient_checkpointing: true contradicts disable_gradient_checkpointing: true")
    if config["gradient_checkpointing"] is None:
        config["gradient_checkpointing"] = not config["disable_gradient_checkpointing"]
    if config["kt_cpu_activation"] is not None and not config["use_kt"]:
        raise ConfigError("kt_cpu_activation is only valid with use_kt: true")
    if config["kt_cpu_activation"] is None:
        config["kt_cpu_activation"] = "recompute" if config["gradient_checkpointing"] else "retain"


def kt_settings(config: dict) -> KTSettings:
    """The kt settings of a config, as apply_kt and from_pretrained take them: its kt_* keys (checked
    there) and the LoRA rank and alpha, which LLaMA-Factory gives the experts too."""
    try:
        return KTSettings(
            **{key: config[key] for key in KT_SETTINGS}, lora_rank=config["lora_rank"], lora_alpha=config["lora_alpha"]
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _resolve_kt_settings(config: dict) -> None:
    """The config's kt keys as KTSettings resolves them: kt_backend 'auto' takes the format from
    kt_expert_weight_format (or, with kt_weight_path, from the file); kt_num_threads is capped at the
    CPUs this process may use."""
    settings = kt_settings(config)
    config["kt_backend"] = settings.backend
    config["kt_num_threads"] = settings.kt_num_threads
    config["lora_alpha"] = settings.alpha


# FSDP2's options and settings as transformers' TrainingArguments reads them (fsdp / fsdp_config);
# kt-sft applies them with torch's fully_shard itself (kt_ops.integration.fsdp).
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "auto_wrap")
_FSDP1_OPTIONS = ("no_shard", "hybrid_shard", "hybrid_shard_zero2")
FSDP_CONFIG_KEYS = (
    "version",
    "transformer_layer_cls_to_wrap",
    "reshard_after_forward",
    "auto_wrap_policy",
    "state_dict_type",
)
# Offloading the shards to host RAM (fully_shard's CPUOffloadPolicy) has not run on GPUs here.
_NOT_SUPPORTED = "kt-sft does not offload FSDP2 shards to host RAM (not verified on GPUs); drop it"
_WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "NO_WRAP")
_STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")


def _fsdp_options(items: list) -> list:
    for item in items:
        if item == "offload":
            raise ConfigError(f"fsdp option 'offload': {_NOT_SUPPORTED}")
        if item in _FSDP1_OPTIONS:
            raise ConfigError(
                f"fsdp option {item!r} exists only in FSDP1; kt-sft runs FSDP2 (torch's fully_shard): "
                "full_shard or shard_grad_op, with auto_wrap and offload"
            )
        if item not in FSDP_OPTIONS:
            raise ConfigError(f"unknown fsdp option {item!r}; valid options: {list(FSDP_OPTIONS)}")
    if "full_shard" in items and "shard_grad_op" in items:
        raise ConfigError("fsdp: full_shard and shard_grad_op exclude each other")
    return items


def _fsdp_setting(raw: dict, key: str, default, allowed):
    value = raw.get(key, default)
    if isinstance(allowed, tuple) and value not in allowed:
        raise ConfigError(f"fsdp_config {key} must be one of {list(allowed)}, got {value!r}")
    if allowed is bool and not isinstance(value, bool):
        raise ConfigError(f"fsdp_config {key} must be true or false, got {value!r}")
    return value


def _resolve_fsdp(config: dict, quiet: bool) -> None:
    """config["fsdp"]: the list of options ([]: no FSDP); config["fsdp_config"]: every setting, resolved
    as transformers resolves them for FSDP2 (fsdp_config wins over the option string)."""
    items = _fsdp_options(config["fsdp"] or [])
    config["fsdp"] = items
    if not items:
        if config["fsdp_config"]:
            raise ConfigError("fsdp_config is set, but fsdp is not: set fsdp (e.g. 'full_shard auto_wrap') to shard")
        config["fsdp_config"] = None
        return
    raw = {k[5:] if k.startswith("fsdp_") else k: v for k, v in (config["fsdp_config"] or {}).items()}
    if raw.get("cpu_offload") or raw.get("offload_params"):
        raise ConfigError(f"fsdp_config cpu_offload: {_NOT_SUPPORTED}")
    raw = {k: v for k, v in raw.items() if k not in ("cpu_offload", "offload_params")}
    unknown = sorted(set(raw) - set(FSDP_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown fsdp_config keys {unknown}; valid keys: {list(FSDP_CONFIG_KEYS)}")
    if raw.get("version", 2) != 2:
        raise ConfigError(
            f"fsdp_config version must be 2, got {raw['version']!r}: kt-sft shards with FSDP2 (torch's fully_shard)"
        )
    layers = raw.get("transformer_layer_cls_to_wrap")
    layers = [layers] if isinstance(layers, str) else layers
    if layers is not None and (not isinstance(layers, list) or not all(isinstance(c, str) for c in layers)):
        raise ConfigError(f"fsdp_config transformer_layer_cls_to_wrap must be class names, got {layers!r}")
    resolved = {
        "version": 2,
        "reshard_after_forward": _fsdp_setting(raw, "reshard_after_forward", "shard_grad_op" not in items, bool),
        "auto_wrap_policy": _fsdp_setting(raw, "auto_wrap_policy", _WRAP_POLICIES[0], _WRAP_POLICIES),
        "transformer_layer_cls_to_wrap": layers,
        "state_dict_type": _fsdp_setting(raw, "state_dict_type", _STATE_DICT_TYPES[0], _STATE_DICT_TYPES),
    }
    if resolved["state_dict_type"] == "FULL_STATE_DICT" and not quiet:
        print(
            "kt-sft: fsdp_config state_dict_type FULL_STATE_DICT has no effect: checkpoints are sharded "
            "(torch.distributed.checkpoint) and the final adapter is written whole"
        )
    config["fsdp_config"] = resolved
