#!/usr/bin/env python3
"""End-to-end LoRA fine-tuning throughput and peak memory on a small Qwen3-MoE built from a config.

Three set-ups train the same model (same seed, same batches), each in its own process so that peak
memory (max RSS) is its own:
  kt_ops      experts on kt_ops (apply_kt: bf16 packed experts, fp32 expert LoRA in the kt layer),
              the rest of the model in fp32 (bf16 matmuls on a CPU without AVX512-BF16/AMX take
              torch's slow path), attention LoRA through stock peft
  kt_ops-bf16 the same with the rest of the model in bf16 (peft keeps its LoRA weights in fp32):
              the set-up for CPUs with native bf16 (AVX512_BF16, AMX)
  eager-bf16  transformers' eager experts in bf16, LoRA on attention (target_modules) and on the
              experts' fused parameters (peft target_parameters)
  eager-fp32  the same in fp32
Each runs warm-up steps, then timed steps of forward+backward+AdamW; tokens/s = batch * seq / step.

  .venv/bin/python benchmarks/bench_train.py [--layers 8 --hidden 1024 --experts 32 ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from common import ChildFailed, MarkdownTable, machine_line, measure, run_child


def build(args, dtype):
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.moe_intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.topk,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def run_one(args) -> dict:
    import peft

    torch.set_num_threads(args.threads)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if args.setup.startswith("kt_ops"):
        import kt_ops
        from kt_ops.integration import apply_kt

        kt_ops.set_num_threads(args.threads)
        model = build(args, torch.bfloat16 if args.setup == "kt_ops-bf16" else torch.float32)
        apply_kt(model, kt_backend="AMXBF16", lora_rank=args.rank, lora_alpha=2.0 * args.rank)
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=attention)
        )
    else:
        dtype = torch.bfloat16 if args.setup == "eager-bf16" else torch.float32
        model = build(args, dtype)
        config = peft.LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            target_modules=attention,
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )
        model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen) for _ in range(4)]
    losses = []

    def step():
        batch = batches[len(losses) % len(batches)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    step_s = measure(step, warmup=args.warmup, repeats=args.steps).med
    return {
        "setup": args.setup,
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "trainable_params": sum(p.numel() for p in params),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per set-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--setups", default="kt_ops,kt_ops-bf16,eager-fp32,eager-bf16")
    parser.add_argument("--quick", action="store_true", help="2 layers, hidden 256, 8 experts, seq 64")
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.experts, args.moe_intermediate, args.vocab, args.seq = 2, 256, 8, 128, 1000, 64
    if args.setup:
        print(json.dumps(run_one(args)))
        return
    model = build(args, torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    del model
    print(
        f"# Qwen3-MoE {total / 1e6:.0f}M params: layers={args.layers} hidden={args.hidden} experts={args.experts} "
        f"top-k={args.topk} moe_intermediate={args.moe_intermediate} vocab={args.vocab}; LoRA r={args.rank} on "
        f"attention and experts; batch={args.batch} x seq={args.seq}; median of {args.steps} steps after "
        f"{args.warmup} warm-up; {machine_line()}"
    )
    table = MarkdownTable(
        "setup",
        "step s",
        "tokens/s",
        "x eager-fp32",
        "x eager-bf16",
        "peak RSS GiB",
        "trainable params",
        "loss first -> last",
        align="lrrrrrrl",
    )
    results = []
    for setup in args.setups.split(","):
        try:
            results.append(run_child([__file__, *sys.argv[1:], "--setup", setup], timeout=args.timeout))
        except subprocess.TimeoutExpired:
            table.row(setup, f"over {args.timeout} s, stopped")
        except ChildFailed as exc:
            table.row(setup, f"failed: {exc}")
    bases = [
        next((r["tokens_per_s"] for r in results if r["setup"] == name), None) for name in ("eager-fp32", "eager-bf16")
    ]
    for r in results:
        table.row(
            r["setup"],
            f"{r['step_s']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            *(f"{r['tokens_per_s'] / base:.2f}" if base else "-" for base in bases),
            f"{r['peak_rss_gib']:.2f}",
            f"{r['trainable_params'] / 1e6:.1f}M",
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}",
        )


if __name__ == "__main__":
    main()
