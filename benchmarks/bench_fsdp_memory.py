"""Per-process memory of FSDP2 (kt_ops.integration.fsdp.shard_model) against one process: a
Qwen3-MoE with its experts on kt_ops, peft LoRA on attention plus the expert LoRA, two AdamW steps
on the same global batch; N gloo processes with FSDP2, and one process alone.

Each process reports what it holds after the steps: the bytes of its parameters (frozen and LoRA; a
sharded parameter's local shard, padding included) and of Adam's moments, read off the tensors'
storages, and its RSS growth from just before the model is built (VmRSS after malloc_trim; the
packed experts are kept small, so the growth is the non-expert model, LoRA and optimizer state, and
what torch and the process group keep).

    python benchmarks/bench_fsdp_memory.py              # 2 processes, a ~450 MB fp32 model
    python benchmarks/bench_fsdp_memory.py --procs 4 --layers 4
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import machine_line, proc_status_kib  # noqa: E402

MiB = 1024**2


def _model(args):
    import peft

    from kt_ops.integration import apply_kt, get_peft_model
    from kt_ops.integration.tiny import tiny_model

    model = tiny_model(
        "tiny-qwen3-moe",
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=args.hidden // 16,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=128,
        num_experts=4,
    )
    apply_kt(model, lora_rank=16)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, lora)


def _held(tensors) -> int:
    from torch.distributed.tensor import DTensor

    storages = {}
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def _run(rank: int, world: int, args, out_dir: str) -> None:
    import kt_ops
    from kt_ops.integration.fsdp import kt_ignored_params, shard_model

    torch.set_num_threads(1)
    kt_ops.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world)
    before = proc_status_kib("VmRSS")
    model = _model(args)
    if world > 1:
        shard_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(4, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    share = ids[rank * args.batch // world : (rank + 1) * args.batch // world]
    for _ in range(2):
        model(input_ids=share, labels=share).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # What the allocator keeps of freed blocks (the whole model each process built before sharding it)
    # goes back to the system first, so that RSS counts the live tensors.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    ignored = kt_ignored_params(model)
    params = [p for p in model.parameters() if p not in ignored]
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    report = {"params": _held(params), "adam": _held(moments), "rss": (proc_status_kib("VmRSS") - before) * 1024}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if world > 1:
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    print(machine_line())
    rows = []
    for world in (1, args.procs):
        with tempfile.TemporaryDirectory() as out:
            torch.multiprocessing.spawn(_run, args=(world, args, out), nprocs=world, join=True)
            reports = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
        for rank, r in enumerate(reports):
            rows.append((world, rank, r["params"] / MiB, r["adam"] / MiB, r["rss"] / MiB))
    print("| processes | rank | parameters held (MiB) | Adam moments (MiB) | RSS growth (MiB) |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| {} | {} | {:.1f} | {:.1f} | {:.1f} |".format(*row))


if __name__ == "__main__":
    main()
