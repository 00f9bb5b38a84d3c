"""kt-sft train: the Trainer (sft) or trl's DPOTrainer (dpo) over the config's model and data, and
what a run writes to output_dir (adapter, tokenizer, resolved config, loss curve)."""

from __future__ import annotations

import contextlib
import csv
import os
import warnings

from .config import ConfigError, load_config
from .data import chat_template, load_rows, preference_records, sft_examples, unigram_entropy
from .launch import Processes, release_shared_experts, shared_experts_file, split_threads
from .model import build_model


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


def _training_kwargs(config: dict) -> dict:
    return dict(
        output_dir=config["output_dir"],
        per_device_train_batch_size=config["per_device_train_batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        learning_rate=config["learning_rate"],
        num_train_epochs=config["num_train_epochs"],
        max_steps=config["max_steps"],
        lr_scheduler_type=config["lr_scheduler_type"],
        # transformers reads a float below 1 as a fraction of all steps (LLaMA-Factory's warmup_ratio).
        warmup_steps=config["warmup_steps"] or config["warmup_ratio"],
        logging_steps=config["logging_steps"],
        activation_checkpointing=config["gradient_checkpointing"],
        bf16=config["bf16"],
        seed=config["seed"],
        report_to=config["report_to"],
        use_cpu=_no_accelerator(),
        save_strategy="steps" if config["save_steps"] else "no",
        save_steps=config["save_steps"] or 500,
        save_only_model=config["save_only_model"],
        save_total_limit=config["save_total_limit"],
        remove_unused_columns=False,
        disable_tqdm=True,
        include_num_input_tokens_seen="all",
    )


def _progress_printer():
    """One line per logged step: a progress bar, the loss and the token throughput so far."""
    import time

    from transformers import TrainerCallback

    class ProgressPrinter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            total = max(state.max_steps, 1)
            done = int(24 * state.global_step / total)
            elapsed = time.perf_counter() - self.start
            tokens = state.num_input_tokens_seen
            rate = f"{tokens / elapsed:8.0f} tokens/s" if tokens and elapsed > 0 else ""
            print(
                f"[{'#' * done}{'.' * (24 - done)}] step {state.global_step}/{total}  "
                f"loss {float(logs['loss']):.4f}  {rate}",
                flush=True,
            )

    return ProgressPrinter()


def _no_accelerator() -> bool:
    import torch

    return not torch.cuda.is_available()


def _adapter_saver(config: dict):
    # Trainer's checkpoints hold the expert LoRA (a peft adapter); the final adapter is written in the
    # per-expert layout that convert_moe_lora reads, where that layout can describe it.
    from ..integration import save_kt_adapter
    from ..integration.adapter import embedding_layers_to_save, per_expert_layout_fits

    def save(model, directory):
        if config["use_kt"] and per_expert_layout_fits(model):
            save_kt_adapter(model, directory)
        else:
            if config["use_kt"]:
                print(
                    "kt-sft: the expert LoRA has a larger rank on gate_up_proj than on down_proj (peft maps the "
                    "lora_target names gate_proj/up_proj/down_proj onto the experts so); the adapter is saved "
                    "in peft's own layout, which convert_moe_lora does not read"
                )
            model.save_pretrained(directory, save_embedding_layers=embedding_layers_to_save(model))

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


def check_report_to(config: dict) -> None:
    if "tensorboard" in config["report_to"]:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("report_to tensorboard needs the tensorboard package (pip install tensorboard)")


def _arguments(config: dict):
    """Trainer's arguments (trl's DPOConfig for dpo). Under torchrun, asking them for the device starts
    torch.distributed (accelerate: gloo on CPUs, nccl on GPUs), which the model's loading needs."""
    if config["stage"] == "sft":
        from transformers import TrainingArguments

        args = TrainingArguments(**_training_kwargs(config))
    else:
        import trl

        args = trl.DPOConfig(**_training_kwargs(config), beta=config["pref_beta"], max_length=config["cutoff_len"])
    _ = args.device
    return args


def _check_fsdp(config: dict, processes: Processes) -> None:
    if not config["fsdp"]:
        return
    if not processes.distributed:
        raise ConfigError(
            "fsdp shards the model over several processes: launch kt-sft with torchrun "
            "(torchrun --nproc-per-node N -m kt_ops.cli train config.yaml)"
        )
    if config["stage"] == "dpo":
        raise ConfigError(
            "stage dpo does not run with fsdp: trl's DPOTrainer copies the adapter into a reference adapter "
            "tensor by tensor, which FSDP2's sharded parameters refuse; train DPO data-parallel (no fsdp)"
        )


def _trainer(config: dict, args, model, tokenizer, rows: list, processes: Processes):
    """Trainer (sft) or trl's DPOTrainer (dpo) over the config's records; the unigram floor for sft."""
    floor = None
    template = chat_template(config, tokenizer)
    if config["stage"] == "sft":
        from transformers import Trainer

        examples = sft_examples(rows, template, tokenizer, config["cutoff_len"])
        floor = unigram_entropy(examples)
        if processes.main:
            print(
                f"kt-sft: {len(examples)} examples; a model that knew only how often each answer token occurs "
                f"would reach loss {floor:.2f}"
            )
        trainer = Trainer(
            model=model, args=args, train_dataset=examples, data_collator=_PadCollator(tokenizer.pad_token_id)
        )
    else:
        import datasets
        import trl

        # The reference pass is the model with its adapters disabled, the expert LoRA included.
        trainer = trl.DPOTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(preference_records(rows, template, tokenizer)),
        )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the progress printer reports the same logs, one line each
    trainer.add_callback(_progress_printer())
    return trainer, floor


def _shard(config: dict, model):
    """FSDP2 over every process (kt_ops.integration.fsdp.shard_model): each decoder layer, unless
    auto_wrap_policy is NO_WRAP, then the root."""
    from ..integration.fsdp import shard_model

    settings = config["fsdp_config"]
    layers = settings["transformer_layer_cls_to_wrap"]
    if settings["auto_wrap_policy"] == "NO_WRAP":
        layers = []
    try:
        return shard_model(model, layer_classes=layers, reshard_after_forward=settings["reshard_after_forward"])
    except ValueError as e:
        raise ConfigError(f"fsdp_config: {e}") from None


def _prepare_sharded(trainer) -> None:
    """Trainer over a model FSDP2 already shards: accelerate applies its mixed precision only (it would
    wrap the DTensor parameters in DDP), and checkpoints hold each rank's shards."""
    from ..integration.checkpoints import sharded_checkpoints

    trainer.accelerator.prepare_model(trainer.model, device_placement=False, evaluation_mode=True)
    sharded_checkpoints(trainer)


def _write_outputs(config: dict, trainer, model, tokenizer, processes: Processes) -> list:
    """Rank 0 writes the adapter, tokenizer, resolved config and loss curve to output_dir as one set
    (every process takes part in gathering a sharded model's LoRA). Returns the files' paths."""
    import yaml

    from ..core.durable import atomic_files
    from ..integration.fsdp import gathered_adapter_params

    save = _adapter_saver(config)
    files = []
    with gathered_adapter_params(model) if config["fsdp"] else contextlib.nullcontext():
        if processes.main:
            with atomic_files(config["output_dir"]) as staging:  # this run's outputs or the earlier run's
                save(model, staging)
                tokenizer.save_pretrained(staging)  # with the template's tokens, for generate
                with open(os.path.join(staging, "kt_sft_config.yaml"), "w") as f:
                    yaml.safe_dump(config, f, sort_keys=True)
                files = write_loss_curve(trainer.state.log_history, staging, config["plot_loss"])
    return [os.path.join(config["output_dir"], os.path.basename(f)) for f in files]


def _end_processes() -> None:
    """Every process waits for rank 0's writes, then the process group is torn down in order: a process
    that left while others still used it could abort at exit (a gloo thread destroyed unjoined)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def train(config) -> dict:
    """Run one training job; `config` is a YAML path or a dict. Returns a summary (losses, files).
    Under torchrun every process runs it: data parallel (each process its share of every batch; DDP,
    or FSDP2 with `fsdp`), one copy of the experts per node, and rank 0 alone logs and writes."""
    processes = Processes.from_env()
    if not processes.main:
        # Every process would repeat rank 0's warnings (the same code on the same model); errors still raise.
        warnings.simplefilter("ignore")
    config = load_config(config, quiet=not processes.main)
    from transformers import set_seed

    from ..integration.checkpoints import CheckpointError, atomic_checkpoints, resume_checkpoint

    check_report_to(config)
    _check_fsdp(config, processes)
    try:  # before the model loads, which takes long for a big one
        resume = resume_checkpoint(
            config["resume_from_checkpoint"], config["output_dir"], processes.world_size, bool(config["fsdp"])
        )
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    set_seed(config["seed"])
    if config["torch_num_threads"] is not None:
        import torch

        torch.set_num_threads(config["torch_num_threads"])
    split_threads(config, processes)
    rows = load_rows(config)
    args = _arguments(config)
    os.makedirs(config["output_dir"], exist_ok=True)  # where the node's experts file goes without room in /dev/shm
    shared = shared_experts_file(config, processes)
    model, tokenizer = build_model(config, shared)
    release_shared_experts(shared, processes)
    if config["fsdp"]:
        model = _shard(config, model)
    trainer, floor = _trainer(config, args, model, tokenizer, rows, processes)
    if config["fsdp"]:
        _prepare_sharded(trainer)
    atomic_checkpoints(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    files = _write_outputs(config, trainer, model, tokenizer, processes)
    if processes.distributed:
        _end_processes()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "losses": losses,
        "files": files,
        "output_dir": config["output_dir"],
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "unigram_entropy": floor,
    }
