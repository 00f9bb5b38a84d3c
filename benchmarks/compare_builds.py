#!/usr/bin/env python3
"""The kt_ops layer of two builds side by side: forward (no grad) and forward+backward of the
DeepSeek-V2-Lite layer (E=64 H=2048 I=1408 k=6, LoRA r=16 leaves in fp32 or --lora-dtype bfloat16,
bf16 weights and hidden states), each build in its own child process, the builds alternating round by round. For "no
regression" checks against an older commit on a shared machine: the CPU-time clock (the default)
leaves out the time other processes hold the cores, and alternating spreads what it does not.

    git worktree add /tmp/old <commit> && (cd /tmp/old && python setup.py build_ext --inplace)
    .venv/bin/python benchmarks/compare_builds.py /tmp/old . [--qlens 1,32,512] [--threads 1] [--rounds 3]

Only the public API (`kt_ops.pack_experts`, `kt_ops.moe_sft`) is used, so any build since that API
exists works. Prints the best (min) ms of every round per build and qlen, and new/old of the bests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

E, H, I, K, R = 64, 2048, 1408, 6, 16


def child(threads: int, qlens: list[int], clock: str, lora_dtype: str) -> dict:
    import torch

    import kt_ops

    now = time.process_time if clock == "cpu" else time.perf_counter
    torch.set_num_threads(threads)
    kt_ops.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(E, n, k, generator=gen) * 0.02).bfloat16() for n, k in ((I, H), (I, H), (H, I))]
    experts = kt_ops.pack_experts(*weights)
    del weights
    shapes = [(E, R, H), (E, I, R), (E, R, H), (E, I, R), (E, R, I), (E, H, R)]
    dtype = getattr(torch, lora_dtype)
    leaves = [(torch.randn(*s, generator=gen) * 0.02).to(dtype).requires_grad_() for s in shapes]
    result = {}
    for q in qlens:
        x = torch.randn(q, H, generator=gen).bfloat16()
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(q)])
        w = torch.softmax(torch.randn(q, K, generator=gen), -1)
        go = torch.randn(q, H, generator=gen).bfloat16()

        def fwd():
            with torch.no_grad():
                kt_ops.moe_sft(x, ids, w, experts, leaves, 2.0)

        def step():
            for t in leaves:
                t.grad = None
            kt_ops.moe_sft(x, ids, w, experts, leaves, 2.0).backward(go)

        for name, fn in (("fwd", fwd), ("f+b", step)):
            fn()
            times = []
            for _ in range(20 if q <= 32 else 5):
                t0 = now()
                fn()
                times.append(now() - t0)
            result[f"{q} {name}"] = min(times) * 1e3
    result["kt_ops"] = kt_ops.__file__
    result["isa"] = kt_ops.get_isa()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--qlens", default="1,32,512")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--lora-dtype", choices=("float32", "bfloat16"), default="float32", help="of the LoRA leaves")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    qlens = [int(q) for q in args.qlens.split(",")]
    if args.child:
        print(json.dumps(child(args.threads, qlens, args.clock, args.lora_dtype)))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine_line

    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for label in runs:
            root = os.path.abspath(getattr(args, label))
            # the child imports kt_ops from `root` (PYTHONPATH comes before the installed package)
            env = {**os.environ, "PYTHONPATH": root}
            out = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    root,
                    root,
                    "--child",
                    "--qlens",
                    args.qlens,
                    "--threads",
                    str(args.threads),
                    "--clock",
                    args.clock,
                    "--lora-dtype",
                    args.lora_dtype,
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"# {machine_line()}; {args.threads} thread(s), {args.clock} clock, {args.rounds} alternating rounds, "
        f"LoRA {args.lora_dtype}"
    )
    for label in runs:
        print(f"# {label}: {runs[label][0]['kt_ops']} (isa={runs[label][0]['isa']})")
    print(
        "| call | "
        + " | ".join(f"old round {i + 1}" for i in range(args.rounds))
        + " | "
        + " | ".join(f"new round {i + 1}" for i in range(args.rounds))
        + " | new/old (best) |"
    )
    print("|---|" + "---:|" * (2 * args.rounds + 1))
    for key in (f"{q} {name}" for q in qlens for name in ("fwd", "f+b")):
        old, new = [r[key] for r in runs["old"]], [r[key] for r in runs["new"]]
        cells = [f"{v:.1f}" for v in old + new]
        print(f"| qlen {key} ms | " + " | ".join(cells) + f" | {min(new) / min(old):.2f} |")


if __name__ == "__main__":
    main()
