"""Peak memory of kt_ops.integration.export_merged: the merged checkpoint is written layer by layer,
so the process grows by about one shard plus one layer's experts, not by the model.

    python benchmarks/bench_export.py [--layers 6] [--experts 32] [--hidden 1024] [--inter 512]

Builds a Qwen3-MoE of that size from a config (bf16, random weights, nothing downloaded), converts it
with apply_kt and wraps it with peft (expert LoRA r=16 + attention LoRA), then resets the peak RSS
(/proc/self/clear_refs) and exports with a 256 MiB shard limit. Linux only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

from common import MarkdownTable, machine_line, proc_status_kib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=512)
    parser.add_argument("--shard-mib", type=int, default=256)
    args = parser.parse_args()

    import peft
    import torch
    import transformers

    from kt_ops.integration import apply_kt, export_merged

    config = transformers.Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=2 * args.inter,
        moe_intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        num_experts=args.experts,
        num_experts_per_tok=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    apply_kt(model, lora_rank=16, lora_alpha=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    layer_experts_mib = 3 * args.experts * args.hidden * args.inter * 2 / 2**20
    with tempfile.TemporaryDirectory() as out:
        baseline = proc_status_kib("VmRSS") / 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        files = export_merged(model, out, max_shard_size=args.shard_mib * 2**20)
        seconds = time.perf_counter() - start
        peak = proc_status_kib("VmHWM") / 1024
        written = sum(os.path.getsize(f) for f in files) / 2**20
    print(
        f"# export_merged, Qwen3-MoE bf16 layers={args.layers} E={args.experts} H={args.hidden} "
        f"I={args.inter}, shard limit {args.shard_mib} MiB; {machine_line()}"
    )
    table = MarkdownTable(
        "checkpoint MiB",
        "one layer's experts MiB",
        "RSS before MiB",
        "peak RSS MiB",
        "growth MiB",
        "seconds",
        align="rrrrrr",
    )
    table.row(
        f"{written:.0f}",
        f"{layer_experts_mib:.0f}",
        f"{baseline:.0f}",
        f"{peak:.0f}",
        f"{peak - baseline:.0f}",
        f"{seconds:.1f}",
    )


if __name__ == "__main__":
    main()
