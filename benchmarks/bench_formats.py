#!/usr/bin/env python3
"""Weight formats side by side in one run: kt_ops forward (and forward+backward) per SFT method on
the same weights and inputs, with the ratio to BF16. Default: DeepSeek-V2-Lite layer (E=64,
H=2048, I=1408, k=6, LoRA r=16), qlen 1 (decode) and 512 (prefill), 2 threads.

  .venv/bin/python benchmarks/bench_formats.py [--qlens 1,512] [--threads 2] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

import kt_ops

METHODS = ("AMXBF16_SFT", "AMXINT8_SFT", "AMXINT4_SFT", "AMXINT4_1_SFT", "AMXINT4_KGroup_SFT",
           "AMXINT4_1KGroup_SFT")


def median_time(fn, repeats: int, min_time: float = 1.0) -> float:
    fn()
    times = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlens", default="1,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="E=8 H=512 I=256 k=2, qlens 1,64")
    args = ap.parse_args()
    E, H, I, k, r = (8, 512, 256, 2, 8) if args.quick else (64, 2048, 1408, 6, 16)
    qlens = [1, 64] if args.quick else [int(q) for q in args.qlens.split(",")]
    kt_ops.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16) for s in ((E, I, H), (E, I, H), (E, H, I))]
    layers = {}
    for method in METHODS:
        layer = kt_ops.KTMoELayer(E, H, I, lora_rank=r, method=method, group_size=args.group_size)
        layer.load_weights_from_tensors(*weights)
        with torch.no_grad():
            for name in ("gate_lora_b", "up_lora_b", "down_lora_b"):
                getattr(layer, name).normal_(0, 0.02, generator=gen)
        layers[method] = layer
    del weights
    info = kt_ops.cpu_info()
    print(f"# kt_ops weight formats, {datetime.datetime.now():%Y-%m-%d %H:%M}, {info['model']}, isa={info['isa']}, "
          f"threads={args.threads}, E={E} H={H} I={I} k={k} r={r} group_size={args.group_size}")
    print(f"| method | resident MB | " + " | ".join(f"fwd q={q} ms (x BF16)" for q in qlens)
          + " | " + " | ".join(f"fwd+bwd q={q} ms (x BF16)" for q in qlens if q > 1) + " |")
    print("|---" * (2 + len(qlens) + sum(q > 1 for q in qlens)) + "|")
    base = {}
    for method in METHODS:
        layer = layers[method]
        cells = [f"{layer.experts.nbytes() / 2**20:.0f}"]
        fb_cells = []
        for q in qlens:
            x = torch.randn(q, H, generator=gen).to(torch.bfloat16)
            ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(q)])
            w = torch.softmax(torch.randn(q, k, generator=gen), -1)

            def fwd():
                with torch.no_grad():
                    layer(x, ids, w)

            t = median_time(fwd, args.repeats)
            base.setdefault(("f", q), t)
            cells.append(f"{t * 1e3:.2f} ({base[('f', q)] / t:.2f}x)")
            if q > 1:
                xg = x.clone().requires_grad_()

                def fwd_bwd():
                    layer(xg, ids, w).sum().backward()

                t = median_time(fwd_bwd, max(3, args.repeats // 2))
                base.setdefault(("fb", q), t)
                fb_cells.append(f"{t * 1e3:.1f} ({base[('fb', q)] / t:.2f}x)")
        print(f"| {method} | " + " | ".join(cells + fb_cells) + " |", flush=True)
    print("(x BF16 > 1: faster than AMXBF16_SFT measured in the same run)")


if __name__ == "__main__":
    main()
