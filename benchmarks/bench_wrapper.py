#!/usr/bin/env python3
"""Wrapper overhead (spec 001 §4.2: forward_sft/backward within 5% of calling the ops directly).

Same packed experts, LoRA and inputs for both columns; the two are timed alternately, call by call,
so background load hits both alike. Shape: DeepSeek-V2-Lite layer (E=64, H=2048, I=1408, k=6),
LoRA r=16, bf16 weights and hidden states.

  .venv/bin/python benchmarks/bench_wrapper.py [--threads 2] [--qlens 1,512] [--repeats N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import kt_ops


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qlens", default="1,512")
    parser.add_argument("--repeats", type=int, default=0, help="0: 40 at qlen<=32, else 6")
    parser.add_argument("--shape", default="64,2048,1408,6,16", help="E,H,I,k,r")
    args = parser.parse_args()
    E, H, I, k, r = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    gate, up = (torch.randn(E, I, H, dtype=torch.bfloat16) * H ** -0.5 for _ in range(2))
    down = torch.randn(E, H, I, dtype=torch.bfloat16) * I ** -0.5
    lora = [torch.randn(s, dtype=torch.bfloat16) * 0.02 for s in
            ((E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r))]
    wrapper = kt_ops.KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                                  moe_intermediate_size=I, num_gpu_experts=0, cpuinfer_threads=args.threads,
                                  threadpool_count=1, weight_path=None, chunked_prefill_size=4096, mode="sft",
                                  method="AMXBF16_SFT", lora_rank=r, lora_alpha=32.0)
    wrapper.load_weights_from_tensors(gate, up, down, torch.arange(E))
    wrapper.init_lora_weights(*lora)
    experts = wrapper.experts_parts[0]
    scaling = wrapper.lora_scaling
    del gate, up, down

    def op_forward(x, ids, w):
        return torch.ops.kt.moe_sft_forward(x, ids, w, experts.gate, experts.up, experts.down, None, None, None,
                                            "bf16", I, *lora, scaling, True)

    def op_backward(g, x, ids, w, saved):
        return torch.ops.kt.moe_sft_backward(g, x, ids, w, experts.gate, experts.up, experts.down, None, None, None,
                                             "bf16", I, *lora, scaling, saved[1], saved[2])

    print(f"# wrapper overhead, E={E} H={H} I={I} k={k} r={r}, bf16, {kt_ops.get_num_threads()} threads, "
          f"isa={kt_ops.get_isa()}")
    print("| qlen | op forward ms | wrapper forward_sft ms | ratio | op backward ms | wrapper backward ms | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for qlen in (int(q) for q in args.qlens.split(",")):
        x = torch.randn(qlen, H, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E)[:k] for _ in range(qlen)])
        w = torch.rand(qlen, k)
        g = torch.randn(qlen, H, dtype=torch.bfloat16)
        repeats = args.repeats or (40 if qlen <= 32 else 6)
        times = {"op_f": [], "wr_f": [], "op_b": [], "wr_b": []}
        # Both columns keep their latest results alive until the next call, as a training step
        # keeps its gradients until the optimizer has used them (the wrapper's buffer holds them).
        kept = {}
        for rep in range(repeats + 1):
            saved = []
            pairs = [("op_f", lambda: saved.append(op_forward(x, ids, w))),
                     ("wr_f", lambda: wrapper.forward_sft(x, ids, w, save_for_backward=True))]
            for name, fn in (pairs if rep % 2 else pairs[::-1]):
                t = timed(fn)
                if rep:  # the first round warms up
                    times[name].append(t)
            pairs = [("op_b", lambda: kept.__setitem__("op", op_backward(g, x, ids, w, saved[0]))),
                     ("wr_b", lambda: kept.__setitem__("wrapper", wrapper.backward(g)))]
            for name, fn in (pairs if rep % 2 else pairs[::-1]):
                t = timed(fn)
                if rep:
                    times[name].append(t)
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        print(f"| {qlen} | {med['op_f']:.2f} | {med['wr_f']:.2f} | {med['wr_f'] / med['op_f']:.3f} | "
              f"{med['op_b']:.2f} | {med['wr_b']:.2f} | {med['wr_b'] / med['op_b']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
