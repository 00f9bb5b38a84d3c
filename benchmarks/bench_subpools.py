#!/usr/bin/env python3
"""threadpool_count=1 vs 2 through the SFT wrapper, side by side in one process, same total threads:

  tpc=1             one part on the main pool of --threads threads
  tpc=2 sequential  two parts one after another on that main pool (what threadpool_count=2 did
                    before the sub-pools ran at once)
  tpc=2 at once     two parts at once, each on its own sub-pool of --threads/2 threads

Columns: forward_sft(save_for_backward=False), and forward_sft(save) + backward. bf16 weights and
hidden states; LoRA r. Default shape: DeepSeek-V2-Lite's layer (E=64, H=2048, I=1408, k=6), r=16.
On a machine with one NUMA node nothing is pinned, so this measures the concurrency alone.

  PYTHONPATH=. .venv/bin/python benchmarks/bench_subpools.py [--threads 2] [--qlens 1,128] [--repeats N]
      [--shape E,H,I,k,r] [--quick]
"""

from __future__ import annotations

import argparse
import types
import warnings

import torch

import kt_ops
from kt_ops.core.subpools import node_cpus
from common import LoadWatch, MarkdownTable, add_layer_args, layer_problem, machine_line, measure_alternating


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(parser, qlens="1,128", repeats_help="0: 30 at qlen<=32, else 6")
    args = parser.parse_args()
    prob = layer_problem(args)
    shape = prob.shape
    E, H, I, k, r = shape.E, shape.H, shape.I, shape.k, shape.r
    lora = list(prob.lora)

    def wrapper(threadpool_count):
        w = kt_ops.KTMoEWrapper(
            layer_idx=0,
            num_experts=E,
            num_experts_per_tok=k,
            hidden_size=H,
            moe_intermediate_size=I,
            num_gpu_experts=0,
            cpuinfer_threads=args.threads,
            threadpool_count=threadpool_count,
            weight_path=None,
            chunked_prefill_size=4096,
            mode="sft",
            method="AMXBF16_SFT",
            lora_rank=r,
            lora_alpha=shape.alpha,
        )
        w.init_lora_weights(*lora)
        return w

    # The process's CPUInfer is made by the first wrapper: 2 sub-pools of threads/2, main pool of threads.
    at_once = wrapper(2)
    at_once.load_weights_from_tensors(*prob.weights, torch.arange(E))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CPUInfer already exists": intended, the tpc=1 layer uses the main pool
        one = wrapper(1)
        sequential = wrapper(2)
    one.load_weights_from_tensors(*prob.weights, torch.arange(E))
    sequential.experts_parts = at_once.experts_parts  # same packed parts, run without the sub-pools
    sequential.cpu_infer = types.SimpleNamespace(subpools=None)
    prob.release_weights()
    names = ("tpc=1", "tpc=2 sequential", "tpc=2 at once")
    layers = (one, sequential, at_once)

    watch = LoadWatch()
    nodes = node_cpus()
    print(
        f"# threadpool_count 1 vs 2, {shape}, bf16, {args.threads} threads in all; {machine_line()}; "
        f"NUMA nodes with CPUs: {len(nodes) or 'unknown'}; sub-pools of {at_once.cpu_infer.subpools.threads} "
        f"thread(s), pinned: {any(at_once.cpu_infer.subpools.cpu_sets)}"
    )
    table = MarkdownTable(
        "qlen",
        *(f"{n} fwd ms" for n in names),
        *(f"{n} fwd+bwd ms" for n in names),
        "at once / tpc=1 fwd",
        "at once / tpc=1 fwd+bwd",
    )
    timings = []
    for qlen, inp in prob.inputs.items():
        x, ids, w, g = inp.x, inp.ids, inp.w, inp.go
        repeats = args.repeats or (30 if qlen <= 32 else 6)
        fwd = measure_alternating(
            [lambda layer=layer: layer.forward_sft(x, ids, w, save_for_backward=False) for layer in layers],
            repeats=repeats,
        )

        def step(layer):
            layer.forward_sft(x, ids, w, save_for_backward=True)
            return layer.backward(g)

        both = measure_alternating([lambda layer=layer: step(layer) for layer in layers], repeats=repeats)
        timings += fwd + both
        f = [t.med * 1e3 for t in fwd]
        b = [t.med * 1e3 for t in both]
        table.row(qlen, *(f"{v:.2f}" for v in f), *(f"{v:.2f}" for v in b), f"{f[2] / f[0]:.3f}", f"{b[2] / b[0]:.3f}")
    # what running the parts at once costs by itself: handing two calls to the dispatchers and back
    hand_off = measure_alternating(
        [lambda: at_once.cpu_infer.subpools.run([(lambda: None, ())] * 2)], warmup=20, repeats=500
    )[0]
    print(
        f"hand-off of two no-op calls to the sub-pools' dispatchers and back: median {hand_off.med * 1e6:.0f} us, "
        f"min {hand_off.min * 1e6:.0f} us"
    )
    print("\n".join(watch.finish(timings + [hand_off]).lines()))


if __name__ == "__main__":
    main()
