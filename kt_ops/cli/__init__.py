"""kt-sft: LoRA fine-tuning of MoE models with the routed experts on kt_ops, from a YAML config.

    kt-sft train config.yaml        (or: python -m kt_ops.cli train config.yaml)
    torchrun --nproc-per-node N -m kt_ops.cli train config.yaml     (data parallel; FSDP2 with `fsdp`)
    kt-sft generate config.yaml --prompt "..."     kt-sft score config.yaml     kt-sft plan config.yaml

Keys are LLaMA-Factory's, with its meanings and defaults (CONFIG_KEYS; NO_EFFECT_KEYS are accepted
and say why they change nothing here). Writes to `output_dir`: the adapter
(`adapter_model.safetensors` + `adapter_config.json`, expert LoRA included), the tokenizer, the
resolved config (`kt_sft_config.yaml`), the loss per logged step (`loss.csv`) and, with
`plot_loss`, `loss.png`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .config import CONFIG_KEYS, NO_EFFECT_KEYS, ConfigError, kt_settings, load_config
from .data import load_rows, sft_examples
from .infer import export, generate, score
from .launch import Processes
from .model import build_model, lora_targets
from .train import check_report_to, train, write_loss_curve

__all__ = [
    "CONFIG_KEYS",
    "NO_EFFECT_KEYS",
    "ConfigError",
    "build_model",
    "check_report_to",
    "export",
    "generate",
    "kt_settings",
    "load_config",
    "load_rows",
    "lora_targets",
    "main",
    "score",
    "sft_examples",
    "train",
    "write_loss_curve",
]


def _describe_keys() -> str:
    lines = [f"  {k:30s} {h} (default: {d!r})" for k, (d, _, h) in CONFIG_KEYS.items()]
    lines += [f"  {k:30s} accepted, no effect: {why}" for k, why in NO_EFFECT_KEYS.items()]
    return "\n".join(lines)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _plan(args) -> None:
    from ..plan import GiB, plan_from_config, several_gpus

    plan = plan_from_config(load_config(args.config, quiet=True))
    print(plan.report())
    if args.gpus:
        gpu_memory = int(args.gpu_memory * GiB) if args.gpu_memory else None
        host_memory = int(args.host_memory * GiB) if args.host_memory else None
        print(several_gpus(plan, args.gpus, args.nodes, gpu_memory, host_memory))


def _leave_without_teardown() -> None:
    """A rank other than 0 at the end of a finished run: rank 0 holds every output (written and fsynced
    before the ranks' last barrier) and the process group is closed. The interpreter's teardown is
    skipped: there, a C++ thread torch.distributed left behind could now and then abort the process
    ("terminate called without an active exception"), turning a finished run into a failed launch.
    Rank 0 exits normally, so that the atexit work of its loggers (wandb, ...) runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kt-sft",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys:\n" + _describe_keys(),
    )
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
    plan_parser.add_argument(
        "--gpus", type=_positive(int), help="GPUs per node (one process each): plan with and without FSDP2"
    )
    plan_parser.add_argument("--nodes", type=_positive(int), default=1, help="nodes of --gpus GPUs (default 1)")
    plan_parser.add_argument("--gpu-memory", type=_positive(float), help="GiB per GPU (default: this machine's GPU)")
    plan_parser.add_argument(
        "--host-memory", type=_positive(float), help="GiB of host RAM per node (default: this machine's available)"
    )
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
            _plan(args)
            return 0
        summary = train(args.config)
    except ConfigError as e:
        print(f"kt-sft: {e}", file=sys.stderr)
        return 2
    if not Processes.from_env().main:  # under torchrun, rank 0 reports for all
        _leave_without_teardown()
    losses = summary["losses"]
    if losses:
        print(f"kt-sft: {len(losses)} logged steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"kt-sft: wrote {summary['output_dir']}")
    return 0
