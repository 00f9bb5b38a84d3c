"""kt-sft: LoRA fine-tuning of MoE models with the routed experts on kt_ops, from a YAML config.

    kt-sft train config.yaml        (or: python -m kt_ops.cli train config.yaml)

Keys follow LLaMA-Factory's names where they overlap (see CONFIG_KEYS). Writes to `output_dir`: the
adapter (`adapter_model.safetensors` + `adapter_config.json`, expert LoRA included), the resolved
config (`kt_sft_config.yaml`), the loss per logged step (`loss.csv`) and, when matplotlib is
installed, `loss.png`.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Any, Optional

# key -> (default, type or tuple of allowed values, help)
CONFIG_KEYS: dict[str, tuple[Any, Any, str]] = {
    "model_name_or_path": (None, str, "local model directory, or a built-in tiny model (tiny-qwen3-moe, ...)"),
    "dataset": (None, str, "a .json/.jsonl file (relative paths are relative to the config file)"),
    "dataset_format": ("auto", ("auto", "alpaca", "text", "preference"), "record layout of the dataset"),
    "stage": ("sft", ("sft", "dpo"), "training stage"),
    "finetuning_type": ("lora", ("lora",), "only LoRA is supported"),
    "use_kt": (True, bool, "run the routed experts on kt_ops (with expert LoRA)"),
    "kt_backend": ("AMXBF16", str, "kt_ops expert weight format: AMXBF16, AMXINT8, AMXINT4, ..., auto"),
    "kt_num_threads": (None, int, "kt_ops worker threads (default: physical cores)"),
    "torch_num_threads": (None, int, "threads for torch's own ops (default: torch's choice)"),
    "kt_tp_enabled": (False, bool, "accepted for compatibility; kt_ops uses one pool"),
    "kt_num_gpu_experts": (0, int, "experts per layer kept in transformers (the first N)"),
    "kt_weight_path": (None, str, "pre-quantized kt_ops experts (file or directory of blk.{L}.safetensors)"),
    "lora_rank": (16, int, "LoRA rank (attention and experts)"),
    "lora_alpha": (32.0, float, "LoRA alpha"),
    "lora_dropout": (0.0, float, "dropout on the attention LoRA input"),
    "lora_target": ("all", str, "comma-separated module names for peft LoRA, 'all' for every linear layer "
                                "outside the experts, or 'none'"),
    "cutoff_len": (1024, int, "maximum tokens per example"),
    "per_device_train_batch_size": (1, int, "batch size"),
    "gradient_accumulation_steps": (1, int, "micro-batches per optimizer step"),
    "learning_rate": (1e-4, float, "peak learning rate"),
    "num_train_epochs": (1.0, float, "epochs (ignored when max_steps > 0)"),
    "max_steps": (-1, int, "optimizer steps (overrides epochs when > 0)"),
    "lr_scheduler_type": ("cosine", str, "transformers scheduler name"),
    "warmup_steps": (0, int, "warm-up steps"),
    "logging_steps": (1, int, "log (and record the loss) every N steps"),
    "save_steps": (0, int, "also save a resumable checkpoint (Trainer state + adapter) every N steps (0: only the "
                           "adapter, at the end)"),
    "resume_from_checkpoint": (None, str, "a checkpoint-N directory of an earlier run (with save_steps) to resume"),
    "gradient_checkpointing": (False, bool, "activation checkpointing per decoder layer"),
    "bf16": (False, bool, "load the model in bfloat16 and train with bf16 autocast"),
    "pref_beta": (0.1, float, "DPO beta"),
    "seed": (42, int, "random seed"),
    "output_dir": (None, str, "where the adapter, config and loss curve go"),
}
_REQUIRED = ("model_name_or_path", "dataset", "output_dir")


class ConfigError(ValueError):
    pass


def load_config(path_or_dict) -> dict:
    """Validate a config (a YAML file path or a dict) and fill in defaults. Relative `dataset`,
    `output_dir` and `kt_weight_path` are resolved against the config file's directory."""
    base_dir = os.getcwd()
    if isinstance(path_or_dict, dict):
        raw = dict(path_or_dict)
    elif isinstance(path_or_dict, (str, os.PathLike)):
        import yaml

        path = os.fspath(path_or_dict)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {type(raw).__name__}")
        base_dir = os.path.dirname(os.path.abspath(path))
    else:
        raise ConfigError(f"config must be a YAML path or a dict, got {type(path_or_dict).__name__}")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(CONFIG_KEYS)}")
    missing = [k for k in _REQUIRED if raw.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"missing required config keys {missing}")
    config = {}
    for key, (default, kind, _) in CONFIG_KEYS.items():
        value = raw.get(key, default)
        if value is None:
            config[key] = None
        elif isinstance(kind, tuple):
            if value not in kind:
                raise ConfigError(f"{key} must be one of {list(kind)}, got {value!r}")
            config[key] = value
        elif kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false, got {value!r}")
            config[key] = value
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key} must be an integer, got {value!r}")
            config[key] = value
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key} must be a number, got {value!r}")
            config[key] = float(value)
        else:
            if not isinstance(value, str):
                raise ConfigError(f"{key} must be a string, got {value!r}")
            config[key] = value
    for key in ("dataset", "output_dir", "kt_weight_path", "resume_from_checkpoint"):
        if config[key] is not None and not os.path.isabs(config[key]):
            config[key] = os.path.normpath(os.path.join(base_dir, config[key]))
    model = config["model_name_or_path"]
    if not model.startswith("tiny-") and not os.path.isabs(model) and os.path.isdir(os.path.join(base_dir, model)):
        config["model_name_or_path"] = os.path.join(base_dir, model)
    for key in ("kt_num_threads", "torch_num_threads"):
        if config[key] is not None and config[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {config[key]}")
    if config["lora_rank"] < 1:
        raise ConfigError(f"lora_rank must be >= 1, got {config['lora_rank']}")
    return config


def read_records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ConfigError(f"dataset {path!r} does not exist")
    with open(path) as f:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = json.load(f)
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"dataset {path}: expected a non-empty list of JSON objects")
    return records


def _detect_format(records: list[dict]) -> str:
    keys = set(records[0])
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise ConfigError(f"cannot tell the dataset format from keys {sorted(keys)}; expected alpaca "
                      "(instruction, input, output), text, or preference (prompt/instruction, chosen, rejected)")


def _alpaca_prompt(record: dict) -> str:
    prompt = str(record.get("instruction", "") or "")
    if record.get("input"):
        prompt += "\n" + str(record["input"])
    return prompt + "\n"


def sft_examples(records: list[dict], fmt: str, tokenizer, cutoff_len: int) -> list[dict]:
    """input_ids / labels per record: prompt tokens are masked (-100) so only answers are learned."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token; answers need one to end on")
    examples = []
    for i, record in enumerate(records):
        if fmt == "alpaca":
            if "output" not in record:
                raise ConfigError(f"dataset record {i} has no 'output'")
            prompt, answer = _alpaca_prompt(record), str(record["output"])
        elif fmt == "text":
            if "text" not in record:
                raise ConfigError(f"dataset record {i} has no 'text'")
            prompt, answer = "", str(record["text"])
        else:
            raise ConfigError(f"stage sft needs alpaca or text records, the dataset is {fmt}")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = (prompt_ids + answer_ids)[:cutoff_len]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:cutoff_len]
        if all(label == -100 for label in labels):
            continue  # the prompt alone fills cutoff_len: nothing to learn
        examples.append({"input_ids": input_ids, "labels": labels})
    if not examples:
        raise ConfigError(f"no example keeps any answer token within cutoff_len={cutoff_len}")
    return examples


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


def preference_records(records: list[dict]) -> list[dict]:
    rows = []
    for i, record in enumerate(records):
        if "chosen" not in record or "rejected" not in record:
            raise ConfigError(f"dataset record {i} needs 'chosen' and 'rejected' for stage dpo")
        prompt = record["prompt"] if "prompt" in record else _alpaca_prompt(record)
        rows.append({"prompt": str(prompt), "chosen": str(record["chosen"]), "rejected": str(record["rejected"])})
    return rows


def load_model_and_tokenizer(config: dict):
    import torch

    from .integration.tiny import TINY_MODELS, tiny_model, tiny_tokenizer

    dtype = torch.bfloat16 if config["bf16"] else torch.float32
    name = config["model_name_or_path"]
    if name in TINY_MODELS:
        return tiny_model(name, dtype=dtype, seed=config["seed"]), tiny_tokenizer()
    if not os.path.isdir(name):
        raise ConfigError(f"model_name_or_path {name!r} is neither a local model directory nor one of "
                          f"{list(TINY_MODELS)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
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
            if leaf in ("lm_head", "gate", "router", "shared_expert_gate"):
                continue
            names.add(leaf)
        return sorted(names) or None
    return [t.strip() for t in target.split(",") if t.strip()]


def build_model(config: dict):
    """The model with kt experts (when use_kt) wrapped by peft, and its tokenizer."""
    import peft

    from .integration import apply_kt, get_peft_model, set_kt_lora_trainable

    model, tokenizer = load_model_and_tokenizer(config)
    if config["use_kt"]:
        apply_kt(model, kt_backend=config["kt_backend"], kt_num_threads=config["kt_num_threads"],
                 kt_tp_enabled=config["kt_tp_enabled"], kt_num_gpu_experts=config["kt_num_gpu_experts"],
                 kt_weight_path=config["kt_weight_path"], lora_rank=config["lora_rank"],
                 lora_alpha=config["lora_alpha"])
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
        lr_scheduler_type=config["lr_scheduler_type"], warmup_steps=config["warmup_steps"],
        logging_steps=config["logging_steps"], gradient_checkpointing=config["gradient_checkpointing"],
        bf16=config["bf16"], seed=config["seed"], report_to=[], use_cpu=_no_accelerator(),
        save_strategy="steps" if config["save_steps"] else "no", save_steps=config["save_steps"] or 500,
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
    # per-expert layout that convert_moe_lora reads.
    from .integration import save_kt_adapter

    def save(model, directory):
        if config["use_kt"]:
            save_kt_adapter(model, directory)
        else:
            model.save_pretrained(directory)

    return save


def write_loss_curve(log_history: list[dict], output_dir: str) -> list[str]:
    """loss.csv (always) and loss.png (with matplotlib); returns the files written."""
    rows = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    written = [os.path.join(output_dir, "loss.csv")]
    with open(written[0], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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


def train(config) -> dict:
    """Run one training job; `config` is a YAML path or a dict. Returns a summary (losses, files)."""
    config = load_config(config)
    import yaml
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(config["seed"])
    if config["torch_num_threads"] is not None:
        import torch

        torch.set_num_threads(config["torch_num_threads"])
    records = read_records(config["dataset"])
    fmt = config["dataset_format"] if config["dataset_format"] != "auto" else _detect_format(records)
    model, tokenizer = build_model(config)
    save = _adapter_saver(config)
    os.makedirs(config["output_dir"], exist_ok=True)
    if config["stage"] == "sft":
        trainer = Trainer(model=model, args=TrainingArguments(**_training_kwargs(config)),
                          train_dataset=sft_examples(records, fmt, tokenizer, config["cutoff_len"]),
                          data_collator=_PadCollator(tokenizer.pad_token_id))
    else:
        import datasets
        import trl

        if fmt != "preference":
            raise ConfigError(f"stage dpo needs preference records (chosen / rejected), the dataset is {fmt}")
        args = trl.DPOConfig(**_training_kwargs(config), beta=config["pref_beta"], max_length=config["cutoff_len"])
        trainer = trl.DPOTrainer(model=model, args=args, processing_class=tokenizer,
                                 train_dataset=datasets.Dataset.from_list(preference_records(records)))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the progress printer reports the same logs, one line each
    trainer.add_callback(_progress_printer())
    resume = config["resume_from_checkpoint"]
    if resume is not None:
        if not os.path.isdir(resume):
            raise ConfigError(f"resume_from_checkpoint {resume!r} is not a directory")
    trainer.train(resume_from_checkpoint=resume)
    save(model, config["output_dir"])
    with open(os.path.join(config["output_dir"], "kt_sft_config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=True)
    files = write_loss_curve(trainer.state.log_history, config["output_dir"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "files": files, "output_dir": config["output_dir"]}


def generate(config, prompt: str, max_new_tokens: int = 32, adapter_dir: Optional[str] = None) -> str:
    """Greedy continuation of `prompt` by the base model with the trained adapter (from `adapter_dir`,
    default the config's output_dir), its experts computed by kt_ops when use_kt."""
    import torch

    from .integration import load_kt_adapter

    config = load_config(config)
    adapter_dir = adapter_dir or config["output_dir"]
    if not os.path.isdir(adapter_dir):
        raise ConfigError(f"no adapter directory {adapter_dir}: run `kt-sft train` first or pass --adapter")
    model, tokenizer = build_model(config)
    if config["use_kt"]:
        load_kt_adapter(model, adapter_dir)
    else:
        import peft

        peft.set_peft_model_state_dict(model, peft.load_peft_weights(adapter_dir))
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def export(config, output: Optional[str] = None, adapter_dir: Optional[str] = None) -> list[str]:
    """Write the trained model with its LoRA merged (experts: W + scaling·B·A in bf16) as a plain
    transformers checkpoint in `output` (default: <output_dir>/merged). Returns the files written."""
    from .integration import export_merged

    config = load_config(config)
    adapter_dir = adapter_dir or config["output_dir"]
    if not os.path.isdir(adapter_dir):
        raise ConfigError(f"no adapter directory {adapter_dir}: run `kt-sft train` first or pass --adapter")
    if not config["use_kt"]:
        raise ConfigError("kt-sft export merges a kt model (use_kt: true); peft's merge_and_unload covers the rest")
    model, tokenizer = build_model(config)
    from .integration import load_kt_adapter

    load_kt_adapter(model, adapter_dir)
    output = output or os.path.join(config["output_dir"], "merged")
    files = export_merged(model, output)
    tokenizer.save_pretrained(output)
    return files


def _describe_keys() -> str:
    return "\n".join(f"  {k:28s} {h} (default: {d!r})" for k, (d, _, h) in CONFIG_KEYS.items())


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
    gen_parser.add_argument("--adapter", help="adapter directory (default: the config's output_dir)")
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
