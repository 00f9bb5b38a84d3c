#!/usr/bin/env python3
"""Weight formats side by side in one run: kt_ops forward (and forward+backward) per SFT method on
the same weights and inputs, with the ratio to BF16. Default: DeepSeek-V2-Lite layer (E=64,
H=2048, I=1408, k=6, LoRA r=16), qlen 1 (decode) and 512 (prefill), 2 threads.

  .venv/bin/python benchmarks/bench_formats.py [--qlens 1,512] [--threads 2] [--quick]
      [--methods AMXBF16_SFT,AMXINT8_SFT,int8_kgroup] [--baseline DIR] [--stat median|min]

--baseline DIR times the same methods, weights and inputs with another build of kt_ops (DIR is a
checkout with its extension built in place, e.g. the commit before a kernel change) in a child
process, call by call alternating with this one, so both columns see the same machine load. The
child only runs while this process waits: the two never compete for the cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("AMXBF16_SFT", "AMXINT8_SFT", "int8_kgroup", "AMXINT4_SFT", "AMXINT4_1_SFT", "AMXINT4_KGroup_SFT",
           "AMXINT4_1KGroup_SFT")


def build(args):
    """Layers and inputs, identical in every process that calls this with the same arguments."""
    import kt_ops

    E, H, I, k, r = (8, 512, 256, 2, 8) if args.quick else (64, 2048, 1408, 6, 16)
    qlens = [1, 64] if args.quick else [int(q) for q in args.qlens.split(",")]
    kt_ops.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16) for s in ((E, I, H), (E, I, H), (E, H, I))]
    layers = {}
    for method in args.methods.split(","):
        layer = kt_ops.KTMoELayer(E, H, I, lora_rank=r, method=method, group_size=args.group_size)
        layer.load_weights_from_tensors(*weights)
        with torch.no_grad():
            for name in ("gate_lora_b", "up_lora_b", "down_lora_b"):
                getattr(layer, name).normal_(0, 0.02, generator=gen)
        layers[method] = layer
    del weights
    inputs = {}
    for q in qlens:
        x = torch.randn(q, H, generator=gen).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(q)])
        inputs[q] = (x, ids, torch.softmax(torch.randn(q, k, generator=gen), -1))
    return (E, H, I, k, r), qlens, layers, inputs


def timed_call(layers, inputs, method, q, backward):
    """Seconds for one forward (no grad) or forward+backward of `method` at qlen q."""
    layer = layers[method]
    x, ids, w = inputs[q]
    t0 = time.perf_counter()
    if backward:
        xg = x.clone().requires_grad_()
        layer(xg, ids, w).sum().backward()
    else:
        with torch.no_grad():
            layer(x, ids, w)
    return time.perf_counter() - t0


def serve(args):
    """Child for --baseline: answers "method q backward" lines with one timed call each."""
    import kt_ops

    _, _, layers, inputs = build(args)
    print(json.dumps({"ready": kt_ops.__file__}), flush=True)
    for line in sys.stdin:
        method, q, backward = line.split()
        print(json.dumps(timed_call(layers, inputs, method, int(q), backward == "1")), flush=True)


class Baseline:
    def __init__(self, directory, argv):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(directory))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--serve"], cwd=directory,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.path = json.loads(self.proc.stdout.readline())["ready"]
        if not os.path.abspath(self.path).startswith(os.path.abspath(directory)):
            raise RuntimeError(f"--baseline {directory}: the child imported kt_ops from {self.path}")

    def call(self, method, q, backward):
        self.proc.stdin.write(f"{method} {q} {int(backward)}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def timings(fns, repeats, stat, min_time=1.0):
    """Median (or minimum) seconds of each fn, called in turn (one warm-up each), so that all see
    the same load. The minimum estimates the unloaded time on a machine shared with other work."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    while len(times[0]) < repeats or (sum(times[0]) < min_time and len(times[0]) < 50):
        for fn, ts in zip(fns, times):
            ts.append(fn())
    return [(min if stat == "min" else statistics.median)(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlens", default="1,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated; the first is the ratios' base")
    ap.add_argument("--baseline", metavar="DIR", help="also time the kt_ops built in checkout DIR, alternating")
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="statistic over the repeats")
    ap.add_argument("--quick", action="store_true", help="E=8 H=512 I=256 k=2, qlens 1,64")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args)
    import kt_ops

    child_argv = [a for a in sys.argv[1:] if a != "--baseline" and a != args.baseline]
    baseline = Baseline(args.baseline, child_argv) if args.baseline else None
    (E, H, I, k, r), qlens, layers, inputs = build(args)
    methods = list(layers)
    info = kt_ops.cpu_info()
    print(f"# kt_ops weight formats, {datetime.datetime.now():%Y-%m-%d %H:%M}, {info['model']}, isa={info['isa']}, "
          f"threads={args.threads}, E={E} H={H} I={I} k={k} r={r} group_size={args.group_size}, "
          f"{args.stat} of >= {args.repeats} calls, load average before the run {os.getloadavg()[0]:.1f}")
    print(f"# this build: {kt_ops.__file__}" + (f"; baseline: {baseline.path} (alternating call by call)"
                                                 if baseline else ""))
    builds = ["", " base"] if baseline else [""]
    heads = [f"fwd q={q}{b} ms (x {methods[0]})" for q in qlens for b in builds]
    heads += [f"fwd+bwd q={q}{b} ms (x {methods[0]})" for q in qlens if q > 1 for b in builds]
    print("| method | resident MB | " + " | ".join(heads) + " |")
    print("|---" * (2 + len(heads)) + "|")
    base = {}
    for method in methods:
        cells = [f"{layers[method].experts.nbytes() / 2**20:.0f}"]
        for backward in (False, True):
            for q in qlens:
                if backward and q == 1:
                    continue
                fns = [lambda: timed_call(layers, inputs, method, q, backward)]
                if baseline:
                    fns.append(lambda: baseline.call(method, q, backward))
                repeats = max(3, args.repeats // 2) if backward else args.repeats
                for b, t in zip(builds, timings(fns, repeats, args.stat)):
                    base.setdefault((backward, q, b), t)
                    cells.append(f"{t * 1e3:.2f} ({base[(backward, q, b)] / t:.2f}x)")
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)
    print(f"(x {methods[0]} > 1: faster than {methods[0]} of the same build, measured in the same run)")
    if baseline:
        baseline.close()


if __name__ == "__main__":
    main()
