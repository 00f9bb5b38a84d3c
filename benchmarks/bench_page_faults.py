#!/usr/bin/env python3
"""Minor page faults per kt_ops call in steady state: getrusage(RUSAGE_SELF).ru_minflt before and
after 5 calls, after 3 warm-up calls. A fault means memory the call took fresh from the OS (or pages
of a buffer it had not touched before); a steady state that reuses its buffers has none.

Measured on the DeepSeek-V2-Lite layer (E=64 H=2048 I=1408 k=6, LoRA r=16), bf16 weights and
hidden states, for: the forward op without and with save_for_backward, the backward op on saved
tensors, and a training step through autograd (forward + backward, LoRA grads dropped after each
step as zero_grad(set_to_none=True) does).

Usage (from the repository root):
  .venv/bin/python benchmarks/bench_page_faults.py [--qlens 1,512] [--root DIR]
--root imports kt_ops from another checkout (e.g. an older build) for a before/after comparison.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlens", default="1,512")
    ap.add_argument("--root", default=None, help="directory to import kt_ops from (default: installed / cwd)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.root:
        sys.path.insert(0, args.root)
    import torch
    import kt_ops

    torch.set_num_threads(args.threads)
    kt_ops.set_num_threads(args.threads)
    info = kt_ops.cpu_info()
    print(f"kt_ops from {kt_ops.__file__}; CPU {info['model']}; isa {info['isa']}; {args.threads} threads")
    E, H, I, k, r = 64, 2048, 1408, 6, 16
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    experts = kt_ops.pack_experts(rnd(E, I, H), rnd(E, I, H), rnd(E, H, I))
    lora = [rnd(E, r, H, std=H ** -0.5).float(), rnd(E, I, r).float(), rnd(E, r, H, std=H ** -0.5).float(),
            rnd(E, I, r).float(), rnd(E, r, I, std=I ** -0.5).float(), rnd(E, H, r).float()]
    leaves = [t.clone().requires_grad_() for t in lora]
    op_fwd, op_bwd = torch.ops.kt.moe_sft_forward, torch.ops.kt.moe_sft_backward
    packed = (experts.gate, experts.up, experts.down, experts.gate_scale, experts.up_scale, experts.down_scale,
              experts.weight_format, I)
    print("| qlen | call | minor faults / call | ms / call |\n|---:|---|---:|---:|")
    for q in [int(s) for s in args.qlens.split(",")]:
        x = torch.randn(q, H, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(q)])
        w = torch.softmax(torch.randn(q, k, generator=g), -1)
        go = torch.randn(q, H, generator=g).to(torch.bfloat16)
        saved = op_fwd(x, ids, w, *packed, *lora, 2.0, True)

        def step():
            for t in leaves:
                t.grad = None
            kt_ops.ops.moe_sft(x, ids, w, experts, tuple(leaves), 2.0).backward(go)

        calls = (("forward", lambda: op_fwd(x, ids, w, *packed, *lora, 2.0, False)),
                 ("forward, save_for_backward", lambda: op_fwd(x, ids, w, *packed, *lora, 2.0, True)),
                 ("backward", lambda: op_bwd(go, x, ids, w, *packed, *lora, 2.0, saved[1], saved[2])),
                 ("training step (autograd)", step))
        for name, fn in calls:
            for _ in range(3):
                fn()
            n = 5
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            seconds = (time.perf_counter() - t0) / n
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n
            print(f"| {q} | {name} | {faults:.0f} | {seconds * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
