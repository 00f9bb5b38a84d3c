#!/usr/bin/env python3
"""Minor page faults per kt_ops call in steady state: getrusage(RUSAGE_SELF).ru_minflt before and
after 5 timed calls, after 3 warm-up calls. A fault means memory the call took fresh from the OS (or pages
of a buffer it had not touched before); a steady state that reuses its buffers has none.

Measured on the DeepSeek-V2-Lite layer (E=64 H=2048 I=1408 k=6, LoRA r=16), bf16 weights and
hidden states, for: the forward op without and with save_for_backward, the backward op on saved
tensors, and a training step through autograd (forward + backward, LoRA grads dropped after each
step as zero_grad(set_to_none=True) does).

Usage (from the repository root):
  .venv/bin/python benchmarks/bench_page_faults.py [--qlens 1,512] [--root DIR] [--quick]
--root imports kt_ops from another checkout (e.g. an older build, one with kt_ops/core/formats.py) for a
before/after comparison.
--quick: the small shape (E=8 H=512 I=256 k=2 r=8).
"""

from __future__ import annotations

import argparse
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlens", default="1,512")
    ap.add_argument("--root", default=None, help="directory to import kt_ops from (default: installed / cwd)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.root:
        sys.path.insert(0, args.root)

    import kt_ops
    from kt_ops.ops import backward_op, forward_op
    from common import DSV2_LITE, QUICK, MarkdownTable, Problem, machine_line, measure, parse_ints, set_threads

    set_threads(args.threads)
    print(f"kt_ops from {kt_ops.__file__}; {machine_line()}")
    shape = QUICK if args.quick else DSV2_LITE
    prob = Problem(shape, parse_ints(args.qlens))
    experts = kt_ops.pack_experts(*prob.weights)
    lora = [t.float() for t in prob.lora]
    leaves = [t.clone().requires_grad_() for t in lora]
    s = shape.scaling
    table = MarkdownTable("qlen", "call", "minor faults / call", "ms / call (median)", align="rlrr")
    for q, inp in prob.inputs.items():
        x, ids, w, go = inp.x, inp.ids, inp.w, inp.go
        saved = forward_op(x, ids, w, experts, lora, s, True)

        def step():
            for t in leaves:
                t.grad = None
            kt_ops.moe_sft(x, ids, w, experts, tuple(leaves), s).backward(go)

        calls = (
            ("forward", lambda: forward_op(x, ids, w, experts, lora, s, False)),
            ("forward, save_for_backward", lambda: forward_op(x, ids, w, experts, lora, s, True)),
            ("backward", lambda: backward_op(go, x, ids, w, experts, lora, s, saved[1], saved[2])),
            ("training step (autograd)", step),
        )
        for name, fn in calls:
            t = measure(fn, warmup=3, repeats=5)
            table.row(q, name, f"{t.minor_faults / len(t.times):.0f}", f"{t.med * 1e3:.1f}")


if __name__ == "__main__":
    main()
