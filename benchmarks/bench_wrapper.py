#!/usr/bin/env python3
"""Wrapper overhead: forward_sft / backward should stay within 5% of calling the ops directly.

Same packed experts, LoRA and inputs for both columns; the two are timed alternately, call by call,
so background load hits both alike. Shape: DeepSeek-V2-Lite layer (E=64, H=2048, I=1408, k=6),
LoRA r=16, bf16 weights and hidden states.

  .venv/bin/python benchmarks/bench_wrapper.py [--threads 2] [--qlens 1,512] [--repeats N] [--shape E,H,I,k,r] [--quick]
"""

from __future__ import annotations

import argparse

import torch

import kt_ops
from kt_ops.ops import backward_op, forward_op
from common import LoadWatch, MarkdownTable, add_layer_args, layer_problem, machine_line, measure_alternating


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(parser, qlens="1,512", repeats_help="0: 40 at qlen<=32, else 6")
    args = parser.parse_args()
    prob = layer_problem(args)
    shape = prob.shape
    E, H, I, k, r = shape.E, shape.H, shape.I, shape.k, shape.r
    lora = list(prob.lora)
    wrapper = kt_ops.KTMoEWrapper(
        layer_idx=0,
        num_experts=E,
        num_experts_per_tok=k,
        hidden_size=H,
        moe_intermediate_size=I,
        num_gpu_experts=0,
        cpuinfer_threads=args.threads,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=4096,
        mode="sft",
        method="AMXBF16_SFT",
        lora_rank=r,
        lora_alpha=shape.alpha,
    )
    wrapper.load_weights_from_tensors(*prob.weights, torch.arange(E))
    wrapper.init_lora_weights(*lora)
    experts = wrapper.experts_parts[0]
    scaling = wrapper.lora_scaling
    prob.release_weights()

    def op_forward(x, ids, w):
        return forward_op(x, ids, w, experts, lora, scaling, True)

    def op_backward(g, x, ids, w, saved):
        return backward_op(g, x, ids, w, experts, lora, scaling, saved[1], saved[2])

    watch = LoadWatch()
    print(f"# wrapper overhead, {shape}, bf16; {machine_line()}")
    table = MarkdownTable(
        "qlen", "op forward ms", "wrapper forward_sft ms", "ratio", "op backward ms", "wrapper backward ms", "ratio"
    )
    timings = []
    for qlen, inp in prob.inputs.items():
        x, ids, w, g = inp.x, inp.ids, inp.w, inp.go
        repeats = args.repeats or (40 if qlen <= 32 else 6)
        # Both columns keep their latest results alive until the next call, as a training step
        # keeps its gradients until the optimizer has used them (the wrapper's buffer holds them).
        kept = {}
        fwd = measure_alternating(
            [
                lambda: kept.__setitem__("op_f", op_forward(x, ids, w)),
                lambda: kept.__setitem__("wr_f", wrapper.forward_sft(x, ids, w)),
            ],
            repeats=repeats,
            pres=[None, wrapper.clear_cache],
        )
        wrapper.clear_cache()
        # each backward consumes a forward saved right before it, untimed
        bwd = measure_alternating(
            [
                lambda: kept.__setitem__("op_b", op_backward(g, x, ids, w, kept["saved"])),
                lambda: kept.__setitem__("wr_b", wrapper.backward(g)),
            ],
            repeats=repeats,
            pres=[
                lambda: kept.__setitem__("saved", op_forward(x, ids, w)),
                lambda: wrapper.forward_sft(x, ids, w, save_for_backward=True),
            ],
        )
        timings += fwd + bwd
        (op_f, wr_f), (op_b, wr_b) = ((t.med * 1e3 for t in pair) for pair in (fwd, bwd))
        table.row(
            qlen, f"{op_f:.2f}", f"{wr_f:.2f}", f"{wr_f / op_f:.3f}", f"{op_b:.2f}", f"{wr_b:.2f}", f"{wr_b / op_b:.3f}"
        )
    print("\n".join(watch.finish(timings).lines()))


if __name__ == "__main__":
    main()
