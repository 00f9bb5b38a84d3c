#!/usr/bin/env python3
"""Weight formats side by side in one run: kt_ops forward (and forward+backward) per SFT method on
the same weights and inputs, with the ratio to BF16. Default: DeepSeek-V2-Lite layer (E=64,
H=2048, I=1408, k=6, LoRA r=16), qlen 1 (decode: a rotation of tokens over all experts, so that the
weights stream from DRAM) and 512 (prefill), 2 threads.

  .venv/bin/python benchmarks/bench_formats.py [--qlens 1,512] [--threads 2] [--quick]
      [--methods AMXBF16_SFT,AMXINT8_SFT,int8_kgroup] [--baseline DIR] [--stat median|min]

A method name with the suffix "+dot" (AMXINT8_SFT+dot, AMXINT4_SFT+dot, int8_kgroup+dot) is that
int8 or 4-bit method with kt_ops.set_integer_dot(True): integer dot products at every row count, not
only decode's.

--baseline DIR times the same methods, weights and inputs with another build of kt_ops (DIR is a
checkout with its extension built in place, e.g. the commit before a kernel change; it needs
kt_ops/core/formats.py, which this checkout's common.py imports) in a child process, call by call
alternating with this one, so both columns see the same machine load. The child only runs while this
process waits: the two never compete for the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import kt_ops
from common import (
    DSV2_LITE,
    QUICK,
    LoadWatch,
    MarkdownTable,
    Problem,
    count_as_own,
    machine_line,
    measure_alternating,
    parse_ints,
    random_routed,
    set_threads,
)
from kt_ops.core.formats import SFT_METHOD_FORMATS, SFT_METHODS, WEIGHT_FORMATS

INTEGER_DOT = "+dot"  # method-name suffix: set_integer_dot(True) for its calls

# every SFT method, then the formats that no method name selects (by their format name), and the int8
# and int4 methods with integer dot products at every row count
METHODS = (
    SFT_METHODS
    + tuple(f for f in WEIGHT_FORMATS if f not in (SFT_METHOD_FORMATS[m] for m in SFT_METHODS))
    + ("AMXINT8_SFT" + INTEGER_DOT, "AMXINT4_SFT" + INTEGER_DOT)
)


def build(args):
    """Layers and inputs, identical in every process that calls this with the same arguments. qlen 1
    (decode) gets a rotation of routings that together hit every expert twice: one fixed token would
    keep its few experts' weights in a large last-level cache (hundreds of MB on server CPUs) from
    call to call, and time a cache instead of the DRAM streaming a decode step does."""
    shape = QUICK if args.quick else DSV2_LITE
    set_threads(args.threads)
    prob = Problem(shape, [1, 64] if args.quick else parse_ints(args.qlens))
    layers = {
        method: prob.layer(method.removesuffix(INTEGER_DOT), group_size=args.group_size)
        for method in args.methods.split(",")
    }
    prob.release_weights()
    inputs = dict(prob.inputs)
    if 1 in inputs:
        gen = torch.Generator().manual_seed(1)
        inputs[1] = [random_routed(shape, 1, gen) for _ in range(2 * -(-shape.E // shape.k))]
    return shape, list(prob.inputs), layers, inputs


_next_routing = {}  # (method, backward) -> calls made with a rotation of routings


def timed_call(layers, inputs, method, q, backward):
    """Seconds for one forward (no grad) or forward+backward of `method` at qlen q (the next routing of
    a rotation, where q has one)."""
    layer, inp = layers[method], inputs[q]
    if isinstance(inp, list):
        n = _next_routing.get((method, backward), 0)
        _next_routing[(method, backward)] = n + 1
        inp = inp[n % len(inp)]
    integer_dot = method.endswith(INTEGER_DOT)
    if integer_dot:
        kt_ops.set_integer_dot(True)
    try:
        t0 = time.perf_counter()
        if backward:
            layer(inp.x.clone().requires_grad_(), inp.ids, inp.w).sum().backward()
        else:
            with torch.no_grad():
                layer(inp.x, inp.ids, inp.w)
        return time.perf_counter() - t0
    finally:
        if integer_dot:
            kt_ops.set_integer_dot(False)


def serve(args):
    """Child for --baseline: answers "method q backward" lines with one timed call each."""
    _, _, layers, inputs = build(args)
    print(json.dumps({"ready": kt_ops.__file__}), flush=True)
    for line in sys.stdin:
        method, q, backward = line.split()
        print(json.dumps(timed_call(layers, inputs, method, int(q), backward == "1")), flush=True)


class Baseline:
    def __init__(self, directory, argv):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(directory))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *argv, "--serve"],
            cwd=directory,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        count_as_own(self.proc.pid)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlens", default="1,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated; the first is the ratios' base")
    ap.add_argument("--baseline", metavar="DIR", help="also time the kt_ops built in checkout DIR, alternating")
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="statistic over the repeats")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK}, qlens 1,64")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args)
    child_argv = [a for a in sys.argv[1:] if a != "--baseline" and a != args.baseline]
    baseline = Baseline(args.baseline, child_argv) if args.baseline else None
    shape, qlens, layers, inputs = build(args)
    methods = list(layers)
    watch = LoadWatch()
    print(
        f"# kt_ops weight formats, {shape} group_size={args.group_size}, {args.stat} of >= {args.repeats} calls; "
        f"{machine_line()}"
    )
    print(
        f"# this build: {kt_ops.__file__}"
        + (f"; baseline: {baseline.path} (alternating call by call)" if baseline else "")
    )
    builds = ["", " base"] if baseline else [""]
    heads = [f"fwd q={q}{b} ms (x {methods[0]})" for q in qlens for b in builds]
    heads += [f"fwd+bwd q={q}{b} ms (x {methods[0]})" for q in qlens if q > 1 for b in builds]
    table = MarkdownTable("method", "resident MB", *heads)
    base, timings = {}, []
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
                # the minimum estimates the unloaded time on a machine shared with other work
                got = measure_alternating(fns, repeats=repeats, min_time=1.0, max_repeats=50, returns_seconds=True)
                timings += got
                for b, t in zip(builds, got):
                    t = t.min if args.stat == "min" else t.med
                    base.setdefault((backward, q, b), t)
                    cells.append(f"{t * 1e3:.2f} ({base[(backward, q, b)] / t:.2f}x)")
        table.row(method, *cells)
    print(f"(x {methods[0]} > 1: faster than {methods[0]} of the same build, measured in the same run)")
    print("\n".join(watch.finish(timings).lines()))
    if baseline:
        baseline.close()


if __name__ == "__main__":
    main()
