#!/usr/bin/env python3
"""Inference-mode timings per method (spec 001 §2.1): decode (qlen 1) and prefill (qlen 512) on a
DeepSeek-V2-Lite layer (E=64, H=2048, I=1408, k=6).

* `forward` of each inference wrapper (AMXINT8, AMXINT4, FP8, RAWINT4, LLAMAFILE as Q8_0 and as Q4_K)
  against `forward_sft(save_for_backward=False)` of an SFT wrapper holding the same packed experts
  (AMXINT8_SFT, AMXINT4_SFT, AMXINT4_KGroup_SFT, AMXINT4_1KGroup_SFT with rank-16 LoRA, which the
  SFT column pays for).
* Overlap: `forward` then the caller's own work (a sleep standing for GPU work, or a torch matmul
  that competes for the CPU) against submit_forward, the caller's work, sync_forward.

The experts are random codes packed exactly (pack_experts_from_codes) straight into each wrapper: what
is timed is the forward path; loading (GGUF, checkpoints) is not. Each column is timed alternately
with the one it is compared with, so background load hits both alike.

  .venv/bin/python benchmarks/bench_inference.py [--threads 2] [--repeats N] [--quick]
  --quick: E=16, H=512, I=384, prefill qlen 64, 3 repeats (a smoke run, not numbers to quote)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import kt_ops
from kt_ops import KTMoEWrapper
from kt_ops.utils.amx import pack_codes_split

# label -> (inference method, kernel format, group size, SFT method holding that format)
CASES = {
    "AMXINT8": ("AMXINT8", "int8", 128, "AMXINT8_SFT"),
    "AMXINT4": ("AMXINT4", "int4", 128, "AMXINT4_SFT"),
    "FP8": ("FP8", "int8_kgroup", 128, None),
    "RAWINT4": ("RAWINT4", "int4_kgroup", 32, "AMXINT4_KGroup_SFT"),
    "LLAMAFILE Q8_0": ("LLAMAFILE", "int8_kgroup", 32, None),
    "LLAMAFILE Q4_K": ("LLAMAFILE", "int4_1_kgroup", 32, "AMXINT4_1KGroup_SFT"),
}


def random_codes(E, N, K, fmt, group, gen):
    groups = 1 if fmt in ("int8", "int4") else K // group
    if fmt.startswith("int8"):
        codes = torch.randint(-127, 128, (E, N, K), generator=gen, dtype=torch.int16)
    else:
        codes = torch.randint(0, 16, (E, N, K), generator=gen, dtype=torch.int16)
    scale = torch.rand(E, N, groups, generator=gen) * (K ** -0.5) / (127 if fmt.startswith("int8") else 8)
    if fmt in ("int4_1", "int4_1_kgroup"):
        scale = torch.stack((scale, -8 * scale), dim=-1)
    return codes, scale


_MATMUL = torch.randn(256, 256)


def caller_work(kind: str, seconds: float) -> None:
    """What the caller does between submit_forward and sync_forward, for `seconds`."""
    if kind == "sleep":
        time.sleep(seconds)
        return
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        torch.mm(_MATMUL, _MATMUL)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns, repeats):
    """Median seconds of each fn, called in alternating order after one warm-up round."""
    times = [[] for _ in fns]
    for rep in range(repeats + 1):
        order = list(range(len(fns))) if rep % 2 else list(range(len(fns)))[::-1]
        for i in order:
            t = timed(fns[i])
            if rep:
                times[i].append(t)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=0, help="0: 20 at decode, 4 at prefill (3 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", default=",".join(CASES), help="comma-separated labels of " + ", ".join(CASES))
    parser.add_argument("--work", choices=("sleep", "matmul"), default="sleep",
                        help="caller work for the overlap rows: a sleep (GPU work) or torch matmuls on the CPU")
    parser.add_argument("--work-ms", type=float, default=0.0, help="caller work for the overlap rows; 0: as long "
                        "as the serial forward")
    args = parser.parse_args()
    E, H, I, k, r = (16, 512, 384, 6, 16) if args.quick else (64, 2048, 1408, 6, 16)
    qlens = (1, 64) if args.quick else (1, 512)
    gen = torch.Generator().manual_seed(0)
    base = dict(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H, moe_intermediate_size=I,
                num_gpu_experts=0, cpuinfer_threads=args.threads, threadpool_count=1, weight_path=None,
                chunked_prefill_size=4096)
    print(f"# inference, E={E} H={H} I={I} k={k}, {kt_ops.get_num_threads()} threads, isa={kt_ops.get_isa()}")
    print("| method | qlen | forward ms | SFT forward_sft ms (r=16) | ratio | overlap: serial ms | submit/work/sync ms "
          "| hidden |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label in args.methods.split(","):
        method, fmt, group, sft_method = CASES[label]
        codes = [random_codes(E, N, K, fmt, group, gen) for N, K in ((I, H), (I, H), (H, I))]
        parts = pack_codes_split(*codes, fmt, group, [(0, I)])
        del codes
        wrapper = KTMoEWrapper(**base, mode="inference", method=method)
        wrapper._set_parts(parts, torch.arange(E))
        sft = None
        if sft_method:
            sft = KTMoEWrapper(**base, mode="sft", method=sft_method, lora_rank=r, lora_alpha=32.0, group_size=group)
            sft.experts_parts = list(parts)
            sft.physical_to_logical_map = torch.arange(E)
            sft.init_lora_weights(*(torch.randn(s, generator=gen, dtype=torch.bfloat16) * 0.02 for s in
                                    ((E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r))))
        for qlen in qlens:
            repeats = args.repeats or (20 if qlen == 1 else (3 if args.quick else 4))
            x = torch.randn(qlen, H, generator=gen, dtype=torch.bfloat16)
            ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(qlen)])
            w = torch.rand(qlen, k, generator=gen)
            fns = [lambda: wrapper.forward(x, ids, w)]
            if sft is not None:
                fns.append(lambda: sft.forward_sft(x, ids, w, save_for_backward=False))
            got = alternate(fns, repeats)
            inf_ms = got[0] * 1e3
            sft_cell = f"{got[1] * 1e3:.2f} | {got[1] / got[0]:.2f}" if sft is not None else "- | -"
            work_s = (args.work_ms / 1e3) or got[0]

            def serial():
                wrapper.forward(x, ids, w)
                caller_work(args.work, work_s)

            def overlapped():
                wrapper.submit_forward(x, ids, w)
                caller_work(args.work, work_s)
                wrapper.sync_forward(x)

            ser, ovl = alternate([serial, overlapped], max(repeats // 2, 2))
            hidden = (ser - ovl) / min(got[0], work_s)
            print(f"| {label} | {qlen} | {inf_ms:.2f} | {sft_cell} | {ser * 1e3:.2f} | {ovl * 1e3:.2f} | "
                  f"{100 * hidden:.0f}% |", flush=True)
    print("\nhidden: the share of the shorter of (MoE, caller work) that submit_forward hid behind the other; "
          f"the caller work ({args.work}) lasts as long as the serial forward unless --work-ms.")


if __name__ == "__main__":
    main()
