"""kt-sft: LoRA fine-tuning of MoE models with the routed experts on kt_ops, from a YAML config.

    kt-sft train config.yaml        (or: python -m kt_ops.cli train config.yaml)
    kt-sft generate config.yaml --prompt "..."     kt-sft score config.yaml     kt-sft plan config.yaml

Keys are LLaMA-Factory's, with its meanings and defaults (CONFIG_KEYS; NO_EFFECT_KEYS are accepted
and say why they change nothing here). Writes to `output_dir`: the adapter
(`adapter_model.safetensors` + `adapter_config.json`, expert LoRA included), the tokenizer, the
resolved config (`kt_sft_config.yaml`), the loss per logged step (`loss.csv`) and, with
`plot_loss`, `loss.png`.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Any, Optional

# key -> (default, type or tuple of allowed values, help). Names, meanings and defaults follow
# LLaMA-Factory (and transformers' TrainingArguments) wherever they overlap.
CONFIG_KEYS: dict[str, tuple[Any, Any, str]] = {
    "model_name_or_path": (None, str, "local model directory, or a built-in tiny model (tiny-qwen3-moe, ...)"),
    "dataset": (None, str, "comma-separated dataset names from dataset_dir/dataset_info.json, or .json/.jsonl "
                           "files (relative paths: relative to the config file)"),
    "dataset_dir": ("data", str, "directory holding dataset_info.json (relative: to the working directory, else "
                                 "to the config file's directory)"),
    "template": (None, str, "LLaMA-Factory chat template (qwen3, qwen3_5, qwen3_vl, deepseek, deepseek3, ...); "
                            "unset: the tokenizer's chat template, else 'empty'"),
    "max_samples": (None, int, "use at most this many records of each dataset"),
    "identity_name": (None, str, "fills {{name}} in the data (LLaMA-Factory's identity.json)"),
    "identity_author": (None, str, "fills {{author}} in the data"),
    "stage": ("sft", ("sft", "dpo"), "training stage"),
    "finetuning_type": ("lora", ("lora",), "only LoRA is supported"),
    "use_kt": (True, bool, "run the routed experts on kt_ops (with expert LoRA)"),
    "kt_config": (None, dict, "LLaMA-Factory's nested block of kt_* settings (each may also be given at the top "
                              "level)"),
    "kt_backend": ("auto", str, "kt_ops expert backend: AMXBF16, AMXINT8, AMXINT4, AMXFP8, ..., or auto (from "
                                "kt_expert_weight_format, or the format of kt_weight_path)"),
    "kt_expert_weight_format": (None, ("bf16", "int8", "int4", "fp8"), "routed expert weight format (default "
                                                                        "bf16, or kt_weight_path's)"),
    "kt_num_threads": (None, int, "kt_ops worker threads (default: physical cores; capped at the usable CPUs)"),
    "kt_cpu_activation": (None, ("retain", "recompute"), "recompute: keep no expert activations, recompute the "
                                                         "expert layer in backward (default: recompute with "
                                                         "gradient checkpointing, else retain)"),
    "torch_num_threads": (None, int, "threads for torch's own ops (default: torch's choice)"),
    "kt_tp_enabled": (False, bool, "accepted for compatibility; kt_ops uses one pool"),
    "kt_num_gpu_experts": (0, int, "experts per layer kept in transformers (the first N)"),
    "kt_weight_path": (None, str, "pre-quantized kt_ops experts (file or directory of blk.{L}.safetensors)"),
    "lora_rank": (8, int, "LoRA rank (attention and experts)"),
    "lora_alpha": (None, float, "LoRA alpha (default: 2 x lora_rank)"),
    "lora_dropout": (0.0, float, "dropout on the attention LoRA input"),
    "lora_target": ("all", str, "comma-separated module names for peft LoRA, 'all' for every linear layer "
                                "outside the experts, or 'none'"),
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
    "save_steps": (500, int, "save a resumable checkpoint (Trainer state + adapter) every N steps (0: only the "
                             "adapter, at the end)"),
    "save_only_model": (False, bool, "checkpoints without optimizer/scheduler state (not resumable)"),
    "save_total_limit": (None, int, "keep at most this many checkpoints (the oldest are deleted)"),
    "resume_from_checkpoint": (None, (str, bool), "a checkpoint-N directory of an earlier run (with save_steps) to "
                                                  "resume, or true for the newest complete one in output_dir"),
    "gradient_checkpointing": (None, bool, "activation checkpointing per decoder layer (default: on, as in "
                                           "LLaMA-Factory, unless disable_gradient_checkpointing)"),
    "disable_gradient_checkpointing": (False, bool, "LLaMA-Factory's switch to turn gradient checkpointing off"),
    "bf16": (False, bool, "load the model in bfloat16 and train with bf16 autocast"),
    "plot_loss": (False, bool, "also draw the loss curve to loss.png (loss.csv is always written)"),
    "report_to": ("none", (str, list), "none or tensorboard (event files under output_dir/runs)"),
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
    "kt_threadpool_count": "the experts of a layer run on one kt_ops worker pool",
    "kt_max_cache_depth": "autograd keeps each expert forward's state, so any number may be in flight",
    "kt_share_backward_bb": "kt_ops's backward allocates its buffers per call",
    "kt_model_max_length": "kt_ops sizes its buffers per call, not for a maximum length",
}
# Keys of LLaMA-Factory's nested kt_config block; each may also be given at the top level.
KT_CONFIG_BLOCK_KEYS = ("kt_expert_weight_format", "kt_backend", "kt_weight_lifecycle", "kt_num_threads",
                        "kt_tp_enabled", "kt_threadpool_count", "kt_max_cache_depth", "kt_share_backward_bb",
                        "kt_model_max_length")
_FORMAT_BACKENDS = {"bf16": "AMXBF16", "int8": "AMXINT8", "int4": "AMXINT4", "fp8": "AMXFP8"}


class ConfigError(ValueError):
    pass


def _check_value(key: str, value, kind):
    if kind == (str, bool):  # resume_from_checkpoint: a path or true/false
        if not isinstance(value, (str, bool)):
            raise ConfigError(f"{key} must be a path or true/false, got {value!r}")
        return value
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


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
        raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(set(CONFIG_KEYS) | set(NO_EFFECT_KEYS))}")
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
    for key in ("kt_num_threads", "torch_num_threads", "max_samples"):
        if config[key] is not None and config[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {config[key]}")
    if config["lora_rank"] < 1:
        raise ConfigError(f"lora_rank must be >= 1, got {config['lora_rank']}")
    if config["lora_alpha"] is None:
        config["lora_alpha"] = float(2 * config["lora_rank"])  # LLaMA-Factory's default
    if not 0.0 <= config["warmup_ratio"] < 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {config['warmup_ratio']}")
    report = [r for r in config["report_to"] if r != "none"]
    if any(r != "tensorboard" for r in report):
        raise ConfigError(f"report_to must be none or tensorboard here, got {config['report_to']!r}")
    config["report_to"] = report
    _resolve_gradient_checkpointing(config)
    _resolve_kt_backend(config)
    cpus = _usable_cpus()
    if config["kt_num_threads"] is not None and config["kt_num_threads"] > cpus:
        import warnings

        warnings.warn(f"kt_num_threads={config['kt_num_threads']} exceeds the {cpus} CPUs this process may use; "
                      f"using {cpus}", stacklevel=2)
        config["kt_num_threads"] = cpus
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


def _resolve_kt_backend(config: dict) -> None:
    """kt_backend 'auto' takes the format from kt_expert_weight_format (or, with kt_weight_path, from the
    file); an explicit backend must agree with an explicit format."""
    from .integration import KT_BACKENDS
    from .core.formats import SFT_METHOD_FORMATS

    backend, fmt = config["kt_backend"], config["kt_expert_weight_format"]
    if backend not in KT_BACKENDS:
        raise ConfigError(f"kt_backend must be one of {sorted(KT_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if fmt is not None:
            config["kt_backend"] = _FORMAT_BACKENDS[fmt]
        elif config["kt_weight_path"] is None:
            config["kt_backend"] = "AMXBF16"
    elif fmt is not None and SFT_METHOD_FORMATS[KT_BACKENDS[backend]] != fmt:
        raise ConfigError(f"kt_backend {backend!r} computes {SFT_METHOD_FORMATS[KT_BACKENDS[backend]]!r} experts "
                          f"but kt_expert_weight_format is {fmt!r}")


def load_rows(config: dict) -> list[dict]:
    """The records of every dataset in `config["dataset"]`, in LLaMA-Factory's conversation form."""
    from .integration import llamafactory as lf

    identity = {k: config[f"identity_{k}"] for k in ("name", "author") if config[f"identity_{k}"] is not None}
    try:
        specs = lf.resolve_datasets(config["dataset"], config["dataset_dir"])
        return [row for spec in specs for row in lf.load_rows(spec, config["max_samples"], identity)]
    except lf.DataError as e:
        raise ConfigError(str(e)) from None


def chat_template(config: dict, tokenizer):
    """The config's template (see kt_ops.integration.llamafactory.get_template); None means the
    tokenizer's own chat template."""
    from .integration import llamafactory as lf

    try:
        return lf.get_template(config["template"], tokenizer)
    except lf.DataError as e:
        raise ConfigError(str(e)) from None


def sft_examples(rows: list[dict], template, tokenizer, cutoff_len: int) -> list[dict]:
    """input_ids / labels per record: prompts are masked (-100) so only answers are learned."""
    from .integration import llamafactory as lf

    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token; answers need one to end on")
    examples = []
    for row in rows:
        if "chosen" in row:
            raise ConfigError("stage sft needs alpaca or text records (or a sharegpt dataset); the dataset has "
                              "preference records (chosen / rejected)")
        if "text" in row:
            ids = (tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            example = {"input_ids": ids[:cutoff_len], "labels": ids[:cutoff_len]}
        else:
            try:
                example = lf.encode_conversation(template, row["messages"], row["system"], tokenizer, cutoff_len)
            except lf.DataError as e:
                raise ConfigError(str(e)) from None
        if example is not None:  # None: the prompt alone fills cutoff_len, nothing to learn
            examples.append(example)
    if not examples:
        raise ConfigError(f"no example keeps any answer token within cutoff_len={cutoff_len}")
    return examples


def unigram_entropy(examples: list[dict]) -> float:
    """Entropy (nats) of the learned tokens' frequencies: the loss of a model that predicts every answer
    token from those frequencies alone, i.e. learned nothing about which answer goes with which prompt."""
    import math
    from collections import Counter

    counts = Counter(t for e in examples for t, label in zip(e["input_ids"], e["labels"]) if label != -100)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def preference_records(rows: list[dict], template, tokenizer) -> list[dict]:
    from .integration import llamafactory as lf

    out = []
    for i, row in enumerate(rows):
        if "chosen" not in row or "rejected" not in row:
            raise ConfigError(f"stage dpo needs preference records (chosen / rejected); record {i} has none")
        prompt = row["prompt"] if "prompt" in row else lf.prompt_text(template, row["messages"], row["system"],
                                                                       tokenizer)
        out.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
    return out


class _PadCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load_model_and_tokenizer(config: dict):
    import torch

    from .integration.tiny import ALL_TINY_MODELS, tiny_model, tiny_tokenizer

    dtype = torch.bfloat16 if config["bf16"] else torch.float32
    name = config["model_name_or_path"]
    if name in ALL_TINY_MODELS:
        model, tokenizer = tiny_model(name, dtype=dtype, seed=config["seed"]), tiny_tokenizer()
    elif not os.path.isdir(name):
        raise ConfigError(f"model_name_or_path {name!r} is neither a local model directory nor one of "
                          f"{list(ALL_TINY_MODELS)}")
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        # Vision-language MoE checkpoints (Qwen3-VL-MoE, Qwen3.5-MoE) load whole, so the weights' names
        # match; kt-sft trains their language model on text.
        model_config = AutoConfig.from_pretrained(name, local_files_only=True)
        multimodal = hasattr(model_config, "vision_config")
        if config["use_kt"] and not multimodal:
            # Bounded host memory: the float experts are never held whole; each layer's are streamed
            # from the shards (or kt_weight_path) straight into their packed form.
            from .integration import from_pretrained

            model = from_pretrained(name, dtype=dtype, **_kt_arguments(config))
        else:
            auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
            model = auto.from_pretrained(name, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    from .integration import llamafactory as lf

    # The template's markup tokens and stop word (as eos) must be single tokens the model can embed.
    lf.add_template_tokens(chat_template(config, tokenizer), tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def _lora_targets(model, target: str):
    if target == "none":
        return None
    if target == "all":
        import torch

        from .integration import find_moe_experts

        # Every linear layer outside the routed experts and the router / output head.
        expert_names = [name for name, _ in find_moe_experts(model)]
        names = set()
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or any(name.startswith(e + ".") for e in expert_names):
                continue
            leaf = name.rsplit(".", 1)[-1]
            # LongCat-Flash's router is a module holding a `classifier` Linear.
            if leaf in ("lm_head", "gate", "router", "shared_expert_gate") or ".router." in name:
                continue
            names.add(leaf)
        return sorted(names) or None
    return [t.strip() for t in target.split(",") if t.strip()]


def _check_expert_format(model, config: dict) -> None:
    from .integration import kt_experts_modules

    fmt = config["kt_expert_weight_format"]
    found = {kt.weight_format for _, _, kt in kt_experts_modules(model)}
    if fmt is not None and found and found != {fmt}:
        raise ConfigError(f"kt_expert_weight_format is {fmt!r} but kt_weight_path holds {sorted(found)} experts")


def _recompute_experts_in_backward(model) -> None:
    """kt_cpu_activation: recompute without decoder-layer checkpointing: each expert layer keeps only its
    inputs and runs its forward again in backward (with gradient checkpointing on, the whole decoder
    layer, experts included, is recomputed already)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from .integration import kt_experts_modules

    for _, _, kt in kt_experts_modules(model):
        forward = kt.forward

        def recomputed(hidden_states, topk_ids, topk_weights, lora=None, _forward=forward, _kt=kt):
            # `lora`: peft's adapter factors, handed in by the experts forward when peft holds the LoRA.
            if _kt.training and torch.is_grad_enabled():
                return checkpoint(_forward, hidden_states, topk_ids, topk_weights, lora=lora, use_reentrant=False)
            return _forward(hidden_states, topk_ids, topk_weights, lora=lora)

        kt.forward = recomputed


def _kt_arguments(config: dict) -> dict:
    """The kt settings of a validated config, as apply_kt and from_pretrained take them."""
    return dict(kt_backend=config["kt_backend"], kt_num_threads=config["kt_num_threads"],
                kt_tp_enabled=config["kt_tp_enabled"], kt_num_gpu_experts=config["kt_num_gpu_experts"],
                kt_weight_path=config["kt_weight_path"], lora_rank=config["lora_rank"],
                lora_alpha=config["lora_alpha"])


def build_model(config: dict):
    """The model with kt experts (when use_kt) wrapped by peft, and its tokenizer."""
    import peft

    from .integration import apply_kt, get_peft_model, kt_experts_modules, set_kt_lora_trainable

    model, tokenizer = load_model_and_tokenizer(config)
    if config["use_kt"]:
        if not kt_experts_modules(model):  # loaded whole (tiny or multimodal models): convert now
            apply_kt(model, **_kt_arguments(config))
        _check_expert_format(model, config)
        if config["kt_cpu_activation"] == "recompute" and not config["gradient_checkpointing"]:
            _recompute_experts_in_backward(model)
    targets = _lora_targets(model, config["lora_target"])
    if targets is None:
        if not config["use_kt"]:
            raise ConfigError("lora_target 'none' with use_kt false leaves nothing to train")
        model.requires_grad_(False)
        set_kt_lora_trainable(model, True)
        return model, tokenizer
    lora_config = peft.LoraConfig(r=config["lora_rank"], lora_alpha=config["lora_alpha"],
                                  lora_dropout=config["lora_dropout"], target_modules=targets,
                                  task_type="CAUSAL_LM")
    return get_peft_model(model, lora_config), tokenizer


def _training_kwargs(config: dict) -> dict:
    return dict(
        output_dir=config["output_dir"], per_device_train_batch_size=config["per_device_train_batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"], learning_rate=config["learning_rate"],
        num_train_epochs=config["num_train_epochs"], max_steps=config["max_steps"],
        lr_scheduler_type=config["lr_scheduler_type"],
        # transformers reads a float below 1 as a fraction of all steps (LLaMA-Factory's warmup_ratio).
        warmup_steps=config["warmup_steps"] or config["warmup_ratio"],
        logging_steps=config["logging_steps"], activation_checkpointing=config["gradient_checkpointing"],
        bf16=config["bf16"], seed=config["seed"], report_to=config["report_to"], use_cpu=_no_accelerator(),
        save_strategy="steps" if config["save_steps"] else "no", save_steps=config["save_steps"] or 500,
        save_only_model=config["save_only_model"], save_total_limit=config["save_total_limit"],
        remove_unused_columns=False, disable_tqdm=True, include_num_input_tokens_seen="all")


def _progress_printer():
    """One line per logged step: a progress bar, the loss and the token throughput so far."""
    import time

    from transformers import TrainerCallback

    class ProgressPrinter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            total = max(state.max_steps, 1)
            done = int(24 * state.global_step / total)
            elapsed = time.perf_counter() - self.start
            tokens = state.num_input_tokens_seen
            rate = f"{tokens / elapsed:8.0f} tokens/s" if tokens and elapsed > 0 else ""
            print(f"[{'#' * done}{'.' * (24 - done)}] step {state.global_step}/{total}  "
                  f"loss {float(logs['loss']):.4f}  {rate}", flush=True)

    return ProgressPrinter()


def _no_accelerator() -> bool:
    import torch

    return not torch.cuda.is_available()


def _adapter_saver(config: dict):
    # Trainer's checkpoints hold the expert LoRA (a peft adapter); the final adapter is written in the
    # per-expert layout that convert_moe_lora reads, where that layout can describe it.
    from .integration import save_kt_adapter
    from .integration.adapter import per_expert_layout_fits

    def save(model, directory):
        if config["use_kt"] and per_expert_layout_fits(model):
            save_kt_adapter(model, directory)
        else:
            if config["use_kt"]:
                print("kt-sft: the expert LoRA has a larger rank on gate_up_proj than on down_proj (peft maps the "
                      "lora_target names gate_proj/up_proj/down_proj onto the experts so); the adapter is saved "
                      "in peft's own layout, which convert_moe_lora does not read")
            model.save_pretrained(directory)

    return save


def write_loss_curve(log_history: list[dict], output_dir: str, plot: bool = True) -> list[str]:
    """loss.csv (always) and loss.png (when `plot` and matplotlib is installed); returns the files."""
    rows = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    written = [os.path.join(output_dir, "loss.csv")]
    with open(written[0], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows(rows)
    if not plot:
        return written
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("kt-sft: plot_loss needs matplotlib; wrote loss.csv only")
        return written
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    written.append(os.path.join(output_dir, "loss.png"))
    fig.savefig(written[-1])
    plt.close(fig)
    return written


def _check_report_to(config: dict) -> None:
    if "tensorboard" in config["report_to"]:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("report_to tensorboard needs the tensorboard package (pip install tensorboard)")


def train(config) -> dict:
    """Run one training job; `config` is a YAML path or a dict. Returns a summary (losses, files)."""
    config = load_config(config)
    import yaml
    from transformers import Trainer, TrainingArguments, set_seed

    from .core.durable import atomic_files
    from .integration.checkpoints import CheckpointError, atomic_checkpoints, resume_checkpoint

    _check_report_to(config)
    try:  # before the model loads, which takes long for a big one
        resume = resume_checkpoint(config["resume_from_checkpoint"], config["output_dir"])
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    set_seed(config["seed"])
    if config["torch_num_threads"] is not None:
        import torch

        torch.set_num_threads(config["torch_num_threads"])
    rows = load_rows(config)
    model, tokenizer = build_model(config)
    template = chat_template(config, tokenizer)
    save = _adapter_saver(config)
    os.makedirs(config["output_dir"], exist_ok=True)
    floor = None
    if config["stage"] == "sft":
        examples = sft_examples(rows, template, tokenizer, config["cutoff_len"])
        floor = unigram_entropy(examples)
        print(f"kt-sft: {len(examples)} examples; a model that knew only how often each answer token occurs "
              f"would reach loss {floor:.2f}")
        trainer = Trainer(model=model, args=TrainingArguments(**_training_kwargs(config)), train_dataset=examples,
                          data_collator=_PadCollator(tokenizer.pad_token_id))
    else:
        import datasets
        import trl

        # The reference pass is the model with its adapters disabled, the expert LoRA included.
        args = trl.DPOConfig(**_training_kwargs(config), beta=config["pref_beta"], max_length=config["cutoff_len"])
        trainer = trl.DPOTrainer(model=model, args=args, processing_class=tokenizer,
                                 train_dataset=datasets.Dataset.from_list(preference_records(rows, template,
                                                                                             tokenizer)))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the progress printer reports the same logs, one line each
    trainer.add_callback(_progress_printer())
    atomic_checkpoints(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    with atomic_files(config["output_dir"]) as staging:  # one set: this run's outputs or the earlier run's
        save(model, staging)
        tokenizer.save_pretrained(staging)  # with the template's tokens, for generate
        with open(os.path.join(staging, "kt_sft_config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=True)
        files = write_loss_curve(trainer.state.log_history, staging, config["plot_loss"])
    files = [os.path.join(config["output_dir"], os.path.basename(f)) for f in files]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "files": files, "output_dir": config["output_dir"], "steps": trainer.state.global_step,
            "train_loss": result.training_loss, "unigram_entropy": floor}


def _trained_model(config: dict, adapter_dir: Optional[str]):
    """The config's model with the adapter from `adapter_dir` (default output_dir; "none": the base
    model as training starts, LoRA B = 0), in eval mode, its tokenizer and template."""
    from .core.durable import recover
    from .integration import load_kt_adapter

    model, tokenizer = build_model(config)
    adapter_dir = adapter_dir or config["output_dir"]
    if adapter_dir != "none":
        if not os.path.isdir(adapter_dir):
            raise ConfigError(f"no adapter directory {adapter_dir}: run `kt-sft train` first or pass --adapter")
        recover(adapter_dir)  # completes a final save that a kill interrupted
        if config["use_kt"]:
            load_kt_adapter(model, adapter_dir)
        else:
            import peft

            peft.set_peft_model_state_dict(model, peft.load_peft_weights(adapter_dir))
    model.eval()
    return model, tokenizer, chat_template(config, tokenizer)


def _greedy_answers(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuations of `texts` (batched, left-padded), each up to its first eos."""
    import torch

    answers, side = [], tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(texts), batch_size):
            inputs = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=False)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def generate(config, prompt: str, max_new_tokens: int = 32, adapter_dir: Optional[str] = None) -> str:
    """Greedy answer to `prompt` (a user message, formatted with the config's template) by the base
    model with the trained adapter (from `adapter_dir`, default the config's output_dir; "none" for
    the untrained model), its experts computed by kt_ops when use_kt."""
    from .integration import llamafactory as lf

    config = load_config(config, quiet=True)
    model, tokenizer, template = _trained_model(config, adapter_dir)
    text = lf.prompt_text(template, [{"role": "user", "content": prompt}], None, tokenizer)
    return _greedy_answers(model, tokenizer, [text], max_new_tokens)[0]


def score(config, adapter_dir: Optional[str] = None, show: int = 3) -> dict:
    """Greedy answers to every single-turn training question, compared exactly with the dataset's
    answers (surrounding whitespace and an empty thought aside). Prints the first `show` side by side;
    returns {"exact": n, "total": n, "rows": [(question, expected, answer)]}."""
    from .integration import llamafactory as lf

    config = load_config(config, quiet=True)
    rows = [r for r in load_rows(config) if "messages" in r and "chosen" not in r and len(r["messages"]) == 2]
    if not rows:
        raise ConfigError("score needs single-turn question/answer records in the dataset")
    model, tokenizer, template = _trained_model(config, adapter_dir)
    texts = [lf.prompt_text(template, row["messages"][:1], row["system"], tokenizer) for row in rows]
    budget = max(len(tokenizer(r["messages"][1]["content"], add_special_tokens=False)["input_ids"]) for r in rows)
    answers = _greedy_answers(model, tokenizer, texts, budget + 8)
    results = [(row["messages"][0]["content"], row["messages"][1]["content"], answer.strip())
               for row, answer in zip(rows, answers)]
    exact = sum(expected.strip() == answer for _, expected, answer in results)
    for question, expected, answer in results[:show]:
        print(f"  Q: {question!r}\n     expected {expected!r}\n     model    {answer!r}")
    print(f"kt-sft: {exact}/{len(results)} training answers reproduced exactly ({100 * exact / len(results):.0f}%)")
    return {"exact": exact, "total": len(results), "rows": results}


def export(config, output: Optional[str] = None, adapter_dir: Optional[str] = None) -> list[str]:
    """Write the trained model with its LoRA merged (experts: W + scaling·B·A in bf16) as a plain
    transformers checkpoint in `output` (default: <output_dir>/merged). Returns the files written."""
    from .integration import export_merged

    config = load_config(config, quiet=True)
    if not config["use_kt"]:
        raise ConfigError("kt-sft export merges a kt model (use_kt: true); peft's merge_and_unload covers the rest")
    if adapter_dir == "none":
        raise ConfigError("kt-sft export needs a trained adapter; --adapter none has nothing to merge")
    model, tokenizer, _ = _trained_model(config, adapter_dir)
    output = output or os.path.join(config["output_dir"], "merged")
    return export_merged(model, output, tokenizer=tokenizer)


def _describe_keys() -> str:
    lines = [f"  {k:30s} {h} (default: {d!r})" for k, (d, _, h) in CONFIG_KEYS.items()]
    lines += [f"  {k:30s} accepted, no effect: {why}" for k, why in NO_EFFECT_KEYS.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kt-sft", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="config keys:\n" + _describe_keys())
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train", help="fine-tune from a YAML config")
    train_parser.add_argument("config", help="YAML config file")
    gen_parser = sub.add_parser("generate", help="answer a prompt with the base model + the trained adapter")
    gen_parser.add_argument("config", help="the YAML config the adapter was trained with")
    gen_parser.add_argument("--prompt", required=True)
    gen_parser.add_argument("--max-new-tokens", type=int, default=32)
    gen_parser.add_argument("--adapter", help="adapter directory (default: the config's output_dir; none: untrained)")
    score_parser = sub.add_parser("score", help="greedy answers to the training questions vs the dataset's answers")
    score_parser.add_argument("config", help="the YAML config the adapter was trained with")
    score_parser.add_argument("--adapter", help="adapter directory (default: the config's output_dir; none: untrained)")
    score_parser.add_argument("--show", type=int, default=3, help="print this many answers side by side")
    plan_parser = sub.add_parser("plan", help="memory plan for the config's model from its config.json (no weights)")
    plan_parser.add_argument("config", help="YAML config file")
    export_parser = sub.add_parser("export", help="write a plain transformers checkpoint with the LoRA merged")
    export_parser.add_argument("config", help="the YAML config the adapter was trained with")
    export_parser.add_argument("--output", help="checkpoint directory (default: <output_dir>/merged)")
    export_parser.add_argument("--adapter", help="adapter directory (default: the config's output_dir)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            files = export(args.config, args.output, args.adapter)
            print(f"kt-sft: wrote {os.path.dirname(files[0])}")
            return 0
        if args.command == "generate":
            print(generate(args.config, args.prompt, args.max_new_tokens, args.adapter))
            return 0
        if args.command == "score":
            score(args.config, args.adapter, args.show)
            return 0
        if args.command == "plan":
            from .plan import plan_from_config

            print(plan_from_config(load_config(args.config, quiet=True)).report())
            return 0
        summary = train(args.config)
    except ConfigError as e:
        print(f"kt-sft: {e}", file=sys.stderr)
        return 2
    losses = summary["losses"]
    if losses:
        print(f"kt-sft: {len(losses)} logged steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"kt-sft: wrote {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
