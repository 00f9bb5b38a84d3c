#!/usr/bin/env python3
"""Side-by-side CPU benchmark of the kt_ops MoE+LoRA layer against its baselines, in one run on the same
random inputs; default shape the DeepSeek-V2-Lite MoE layer (E=64 H=2048 I=1408 k=6, LoRA r=16 alpha 32),
qlen 1, 32, 128, 512:
  * kt_ops forward (no grad) with LoRA (nonzero B) and with lora_rank=0 (-> LoRA overhead), and
    forward+backward (-> backward/forward ratio); bf16 base weights and hidden states
  * the plain-PyTorch MoE+LoRA loop (/work/shared/anchors/torch_eager_lora_moe.py) in fp32 and bf16,
    forward and forward+backward; fp32 is also the reference of the accuracy rows
  * transformers' Qwen3MoeExperts bf16 (eager and grouped_mm experts implementations, no LoRA),
    forward and forward+backward
  * kt-kernel 0.7.2, when kt_kernel is installed, in a child process per worker-pool size (its pool keeps
    spinning after each call and would slow every other column): its own SFT class (AMXSFTMoEWrapper,
    AMXBF16_SFT: forward and forward+backward with the same LoRA) where the wheel's build for this CPU
    has it (AMX, or AVX512_BF16 on AMD Zen 4/5), else its AVX2BF16_MOE inference forward (no LoRA)
plus the machine's fp32 / bf16 GEMM peaks (torch.mm) and DRAM read bandwidth (torch.sum over a large
tensor). ONE table: metrics as rows, qlens as columns, under a header with the CPU, its ISA flags, the
kt_ops ISA and other processes' load. FLOPs count the base weights only: forward 3*2*H*I*qlen*k,
forward+backward twice that (frozen base weights: backward only needs dX).

  .venv/bin/python benchmarks/bench_moe.py              # the full DeepSeek-V2-Lite table
  .venv/bin/python benchmarks/bench_moe.py --quick      # small smoke test (< 1 min)
  .venv/bin/python benchmarks/bench_moe.py --scaling    # kt_ops 1 vs 2 threads
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from typing import Callable, List

import torch
import torch.nn.functional as F

import kt_ops
from common import (
    DSV2_LITE,
    QUICK,
    ChildFailed,
    LoadWatch,
    Problem,
    Shape,
    Timing,
    ceiling_lines,
    ceilings,
    fmt,
    load_kt_kernel,
    machine_line,
    measure,
    parse_ints,
    print_table,
    quiet_stdout,
    rel_err,
    run_child,
    set_threads,
    time_kt_kernel,
)
from kt_ops.core.formats import LORA_NAMES, PROJECTIONS
from kt_ops.reference import moe_loop

BF16, FP32 = torch.bfloat16, torch.float32


class EagerMoE:
    """The plain-PyTorch MoE+LoRA loop of /work/shared/anchors/torch_eager_lora_moe.py (its op order) in
    `dtype`, on the problem's bf16 weights upcast; the LoRA factors are leaves that get gradients.
    In fp32 it is also the accuracy rows' reference."""

    def __init__(self, prob: Problem, dtype=FP32):
        self.s, self.dtype = prob.shape.scaling, dtype
        self.W = [t.to(dtype) for t in prob.weights]
        self.lora = [t.to(dtype).requires_grad_() for t in prob.lora]

    def __call__(self, x, ids, w, lora=True):
        (Wg, Wu, Wd), (Ag, Bg, Au, Bu, Ad, Bd), s = self.W, self.lora, self.s if lora else 0.0

        def expert(e, xe):
            g = xe @ Wg[e].T + s * (xe @ Ag[e].T) @ Bg[e].T
            u = xe @ Wu[e].T + s * (xe @ Au[e].T) @ Bu[e].T
            h = F.silu(g) * u
            return h @ Wd[e].T + s * (h @ Ad[e].T) @ Bd[e].T

        return moe_loop(x, ids, w, expert)


def hf_experts(prob: Problem, impl: str):
    """transformers' own Qwen3-MoE experts block (as /work/shared/anchors/hf_experts_bench.py) on the
    problem's weights, bf16, frozen, no LoRA: gradients flow to the input and routing weights only."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    s = prob.shape
    cfg = Qwen3MoeConfig(hidden_size=s.H, moe_intermediate_size=s.I, num_experts=s.E, num_experts_per_tok=s.k)
    cfg._experts_implementation = impl
    ex = Qwen3MoeExperts(cfg).to(BF16)
    with torch.no_grad():  # gate_up_proj is [E, 2I, H], down_proj [E, H, I]
        ex.gate_up_proj.copy_(torch.cat([prob.gate, prob.up], 1))
        ex.down_proj.copy_(prob.down)
    return ex.requires_grad_(False)


def shape_of(args) -> Shape:
    return Shape(args.experts, args.hidden, args.intermediate, args.topk, args.rank, args.alpha)


# ---- kt-kernel, in a child process per worker-pool size ----------------------------------------------


def kt_kernel_sft(prob: Problem, threads: int):
    """kt-kernel's own SFT wrapper (AMXBF16_SFT) on the problem's weights and LoRA, or raises where the
    installed wheel's build for this CPU lacks it. Returns (wrapper, what it points into)."""
    from kt_kernel.sft import AMXSFTMoEWrapper

    s = prob.shape
    with quiet_stdout():
        sft = AMXSFTMoEWrapper(
            layer_idx=0,
            num_experts=s.E,
            num_experts_per_tok=s.k,
            hidden_size=s.H,
            moe_intermediate_size=s.I,
            num_gpu_experts=0,
            cpuinfer_threads=threads,
            threadpool_count=1,
            weight_path="",
            chunked_prefill_size=max(prob.inputs),
            lora_rank=s.r,
            lora_alpha=s.alpha,
            max_cache_depth=1,
            method="AMXBF16_SFT",
        )
        sft.load_weights_from_tensors(*prob.weights, torch.arange(s.E))
        lora = [t.contiguous() for t in prob.lora]
        grads = [torch.zeros_like(t) for t in lora]
        sft.init_lora_weights(*lora, *grads)
    return sft, (lora, grads)


def kt_kernel_child(args) -> None:
    """Times the best kt-kernel class this CPU's wheel build has (AMXBF16_SFT forward and forward+backward
    with LoRA, else AVX2BF16_MOE forward without) at every qlen and prints the times and its forward
    error against the fp32 reference (with or without LoRA, as it computes) as one JSON line."""
    result = {"cls": "AVX2BF16_MOE", "times": {}, "step_times": {}, "others": {}, "err": {}}
    ext, result["note"] = load_kt_kernel()
    if ext is not None:
        prob = Problem(shape_of(args), args.qlens, args.seed)
        threads, opts = args._kt_kernel_worker, bench_opts(args)
        eager = EagerMoE(prob)
        try:
            try:
                sft, keep = kt_kernel_sft(prob, threads)
            except Exception as exc:  # noqa: BLE001 - no SFT class in this build: the inference class instead
                result["note"] += f"; no AMXBF16_SFT here ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                sft = None
            if sft is not None:
                result["cls"] = "AMXBF16_SFT"
                for q, inp in prob.inputs.items():
                    print(f"# kt-kernel AMXBF16_SFT ({threads} pool threads) qlen={q} ...", file=sys.stderr, flush=True)
                    x, ids, w = inp.x.contiguous(), inp.ids.contiguous(), inp.w.contiguous()
                    fwd = measure(lambda: sft.forward(x, ids, w, save_for_backward=False), **opts)
                    step = measure(
                        lambda: (sft.forward(x, ids, w, save_for_backward=True), sft.backward(inp.go)), **opts
                    )
                    result["times"][q], result["others"][q] = fwd.times, fwd.others
                    result["step_times"][q] = step.times
                    with torch.no_grad():
                        out = sft.forward(x, ids, w, save_for_backward=False).float()
                        result["err"][q] = rel_err(out, eager(inp.x.float(), inp.ids, inp.w))
            else:
                split = {p: list(t) for p, t in zip(PROJECTIONS, prob.weights)}
                got = time_kt_kernel(ext, threads, "AVX2BF16_MOE", prob.shape, prob.inputs, split, **opts)
                with torch.no_grad():
                    for q, inp in prob.inputs.items():
                        tm, out = got[q]
                        result["times"][q], result["others"][q] = tm.times, tm.others
                        result["err"][q] = rel_err(out, eager(inp.x.float(), inp.ids, inp.w, lora=False))
        except Exception as exc:  # noqa: BLE001 - reported in the parent's notes
            result["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result))


def run_kt_kernel(args, notes: List[str]):
    """{pool threads: child result} and the note for the kt-kernel section."""
    if args.skip_kt_kernel:
        return {}, "skipped (--skip-kt-kernel)"
    got, note = {}, "not installed"
    for threads in args.kt_kernel_threads:
        argv = [os.path.abspath(__file__), *args.argv, "--_kt-kernel-worker", str(threads)]
        try:
            r = run_child(argv)
        except ChildFailed as exc:
            notes.append(f"kt-kernel ({threads} pool threads): {exc}")
            continue
        note = r["note"]
        if r.get("error"):
            notes.append(f"kt-kernel ({threads} pool threads): {r['error']}")
        if r["times"]:
            got[threads] = {k: {int(q): v for q, v in r[k].items()} for k in ("times", "step_times", "others", "err")}
            got[threads]["cls"] = r["cls"]
    return got, note


# ---- measurements ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Column:
    key: str  # results are <key>_fwd and <key>_step
    fn: Callable  # (x, ids, w) -> y
    x_dtype: torch.dtype  # of x and of the output gradient
    w_dtype: torch.dtype = FP32
    params: list = dataclasses.field(default_factory=list)  # trainable leaves zeroed between steps
    step: bool = True


def kt_column(args, prob: Problem, rank=None) -> Column:
    layer = prob.layer(args.method, rank, lora_dtype=BF16)
    if rank == 0:  # the step's leaves are x and the routing weights only
        return Column("kt0", layer, BF16)
    return Column("kt", layer, BF16, params=[getattr(layer, name) for name in LORA_NAMES])


def eager_column(key: str, m: EagerMoE) -> Column:
    return Column(key, m, m.dtype, m.dtype, m.lora)


def bench_opts(args) -> dict:
    return dict(
        warmup=args.warmup,
        repeats=args.repeats,
        min_time=args.min_time,
        max_repeats=args.max_repeats,
        settle=args.settle,
    )


def time_column(col: Column, inp, args, safe):
    """{"fwd": Timing, "step": Timing} and the outputs of a first untimed forward and step:
    {"fwd": y, "step": y, "grads": [dx, dw, *param grads]}."""
    x, w = inp.x.to(col.x_dtype), inp.w.to(col.w_dtype)
    timings, outs = {}, {}

    def fwd():
        with torch.no_grad():
            return col.fn(x, inp.ids, w)

    outs["fwd"] = safe(f"{col.key} fwd", fwd)
    if outs["fwd"] is not None:
        timings["fwd"] = safe(f"{col.key} fwd", lambda: measure(fwd, **bench_opts(args)))
    if col.step:
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_(), *col.params]
        go = inp.go.to(col.x_dtype)

        def zero():
            for t in leaves:
                t.grad = None

        def step():
            y = col.fn(leaves[0], inp.ids, leaves[1])
            y.backward(go)
            return y

        zero()
        outs["step"] = safe(f"{col.key} fwd+bwd", step)
        if outs["step"] is not None:
            outs["grads"] = [t.grad for t in leaves]
            timings["step"] = safe(f"{col.key} fwd+bwd", lambda: measure(step, pre=zero, **bench_opts(args)))
    return timings, outs


def run_main(args, prob: Problem):
    res = {q: {} for q in args.qlens}  # res[q][key] = Timing
    errs = {q: {} for q in args.qlens}  # relative errors
    notes: List[str] = []

    def safe(what, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failing column leaves its cells empty and says why
            notes.append(f"{what}: {type(exc).__name__}: {exc}")
            if args.verbose:
                traceback.print_exc()
            return None

    # first, while this process holds only the problem: kt-kernel's children rebuild it
    ktk, ktk_note = run_kt_kernel(args, notes)
    print("# building layers ...", file=sys.stderr, flush=True)
    eager = EagerMoE(prob)
    makers = [("kt", lambda: kt_column(args, prob)), ("kt0", lambda: kt_column(args, prob, rank=0))]
    if not args.skip_eager:
        makers += [
            ("eager", lambda: eager_column("eager", eager)),
            ("eager16", lambda: eager_column("eager16", EagerMoE(prob, BF16))),
        ]
    if not args.skip_hf:
        makers += [
            (f"hf_{impl}", lambda impl=impl: Column(f"hf_{impl}", hf_experts(prob, impl), BF16, BF16))
            for impl in ("eager", "grouped_mm")
        ]
    cols = [c for c in (safe(f"{key} construction", make) for key, make in makers) if c is not None]

    for q in args.qlens:
        inp = prob.inputs[q]
        print(f"# measuring qlen={q} ...", file=sys.stderr, flush=True)
        # the reference: fp32 eager on the same bf16-rounded data, with its gradients
        xr, wr = inp.x.float().requires_grad_(), inp.w.clone().requires_grad_()
        for t in eager.lora:
            t.grad = None
        ref_y = eager(xr, inp.ids, wr)
        ref_y.backward(inp.go.float())
        ref_grads = [xr.grad, wr.grad, *(t.grad.clone() for t in eager.lora)]
        with torch.no_grad():
            ref_y0 = eager(inp.x.float(), inp.ids, inp.w, lora=False)
        for col in cols:
            if col.key.startswith("eager") and q > args.eager_max_qlen:
                continue
            timings, outs = time_column(col, inp, args, lambda what, fn: safe(f"qlen={q} {what}", fn))
            res[q].update({f"{col.key}_{kind}": tm for kind, tm in timings.items()})
            if col.key == "kt0" and outs["fwd"] is not None:
                errs[q]["kt0_y"] = rel_err(outs["fwd"], ref_y0)
            if col.key != "kt":
                continue
            if outs["fwd"] is not None:
                errs[q]["kt_fwd_y"] = rel_err(outs["fwd"], ref_y)
            if outs.get("step") is not None:
                got = outs["grads"]
                errs[q].update(
                    kt_step_y=rel_err(outs["step"], ref_y),
                    kt_dx=rel_err(got[0], ref_grads[0]),
                    kt_dw=rel_err(got[1], ref_grads[1]),
                    kt_dlora=rel_err(
                        torch.cat([g.float().flatten() for g in got[2:]]),
                        torch.cat([g.float().flatten() for g in ref_grads[2:]]),
                    ),
                )
        for threads, r in ktk.items():
            if q in r["times"]:
                res[q][f"ktk_fwd_{threads}"] = Timing(r["times"][q], r["others"].get(q))
                if q in r["step_times"]:
                    res[q][f"ktk_step_{threads}"] = Timing(r["step_times"][q], None)
                errs[q][f"ktk_y_{threads}"] = r["err"].get(q)
        gc.collect()
    ktk_cls = next((r["cls"] for r in ktk.values()), None)
    return res, errs, notes, (ktk_cls, ktk_note)


def run_scaling(args, prob: Problem):
    col = kt_column(args, prob)
    res = {}  # res[(threads, q)] = {"fwd": Timing, "step": Timing}
    for q in args.qlens:
        for t in args.scaling_threads:
            print(f"# scaling: qlen={q} threads={t} ...", file=sys.stderr, flush=True)
            set_threads(t)
            res[(t, q)] = time_column(col, prob.inputs[q], args, lambda what, fn: fn())[0]
    set_threads(args.threads)
    return res


# ---- printing ----------------------------------------------------------------------------------------


def main_rows(args, prob: Problem, res, errs, peaks, ktk):
    s, qs, R = prob.shape, args.qlens, prob.shape.r
    peak32 = peaks.get("gemm", {}).get("best_gflops")
    peak16 = peaks.get("gemm_bf16", {}).get("best_gflops")
    bw = peaks.get("dram", {}).get("best_gbs")

    def t(q, key):
        return res[q][key].med if res[q].get(key) is not None else None

    def div(a, b):
        return a / b if a is not None and b else None

    def pct(a, b):
        return None if div(a, b) is None else 100.0 * a / b

    def less1(ratio):
        return None if ratio is None else ratio - 1.0

    def timed(label, key, *extra, bpw=2):
        """Rows of column `key`: ms, then the `extra` metrics."""
        gf = lambda q: div(s.flops(q, key.endswith("_step")) / 1e9, t(q, key))  # noqa: E731
        wgbs = lambda q: div(s.expert_bytes(prob.inputs[q].hit, bpw) / 1e9, t(q, key))  # noqa: E731
        metrics = {
            "gflops": ("  GFLOP/s", gf, "{:.1f}"),
            "peak32": ("  % fp32 GEMM peak", lambda q: pct(gf(q), peak32), "{:.1f}%"),
            "peak16": ("  % bf16 GEMM peak", lambda q: pct(gf(q), peak16), "{:.1f}%"),
            "wgbs": (f"  weight GB/s ({'bf16' if bpw == 2 else 'fp32'} bytes hit)", wgbs, "{:.1f}"),
            "dram": ("  % DRAM read BW", lambda q: pct(wgbs(q), bw), "{:.1f}%"),
        }
        return [row(f"{label}  ms", lambda q: div(t(q, key), 1e-3))] + [row(*metrics[m]) for m in extra]

    def row(label, f, spec="{:.2f}"):
        return label, [fmt(f(q), spec) for q in qs]

    kt_ts = args.kt_kernel_threads
    ktk_fwd, ktk_step = f"ktk_fwd_{kt_ts[0]}", f"ktk_step_{kt_ts[0]}"
    rows = [
        ("experts hit (distinct)", [str(prob.inputs[q].hit) for q in qs]),
        f"-- kt_ops (isa={kt_ops.get_isa()})",
        *timed(f"kt_ops fwd r={R}", "kt_fwd", "gflops", "peak32", "peak16", "wgbs", "dram"),
        *timed("kt_ops fwd r=0", "kt0_fwd", "gflops", "wgbs"),
        row(f"  LoRA r={R} overhead (fwd)", lambda q: less1(div(t(q, "kt_fwd"), t(q, "kt0_fwd"))), "{:+.1%}"),
        *timed(f"kt_ops fwd+bwd r={R}", "kt_step", "gflops", "peak32", "peak16"),
        row("  bwd/fwd ratio ((f+b - f)/f)", lambda q: less1(div(t(q, "kt_step"), t(q, "kt_fwd")))),
        *timed("kt_ops fwd+bwd r=0", "kt0_step", "gflops"),
        row(f"  LoRA r={R} overhead (fwd+bwd)", lambda q: less1(div(t(q, "kt_step"), t(q, "kt0_step"))), "{:+.1%}"),
        f"-- torch eager fp32 + LoRA r={R} (loop over hit experts, torch {torch.__version__})",
        *timed("eager fwd", "eager_fwd", "gflops", "wgbs", bpw=4),
        *timed("eager fwd+bwd", "eager_step", "gflops"),
        f"-- torch eager bf16 + LoRA r={R} (same loop, bf16 tensors)",
        *timed("eager bf16 fwd", "eager16_fwd"),
        *timed("eager bf16 fwd+bwd", "eager16_step"),
        "-- transformers Qwen3MoeExperts bf16, no LoRA (frozen experts; grads to x and topk_w)",
    ]
    for impl in ("eager", "grouped_mm"):
        rows += [*timed(f"hf {impl} fwd", f"hf_{impl}_fwd"), *timed(f"hf {impl} fwd+bwd", f"hf_{impl}_step")]
    ktk_cls, ktk_note = ktk
    sft = ktk_cls == "AMXBF16_SFT"
    rows.append(f"-- kt-kernel {ktk_cls or ''} {f'r={R}' if sft else 'fwd, no LoRA'} ({ktk_note})")
    if any(res[q].get(ktk_fwd) for q in qs):
        for n in kt_ts:
            rows += timed(f"kt-kernel fwd ({n} pool thr)", f"ktk_fwd_{n}", "gflops", "wgbs")
            if sft:
                rows += timed(f"kt-kernel fwd+bwd ({n} pool thr)", f"ktk_step_{n}", "gflops")
    else:
        rows.append(("kt-kernel fwd  ms", ["not installed" if ktk_note == "not installed" else "n/a" for _ in qs]))
    peers = ("eager_step", "eager16_step", "hf_eager_step", "hf_grouped_mm_step")
    rows += [
        f"-- speedups (>1 means kt_ops faster; kt-kernel with {kt_ts[0]} pool threads)",
        row(f"kt_ops fwd r={R} vs kt-kernel fwd", lambda q: div(t(q, ktk_fwd), t(q, "kt_fwd")), "{:.2f}x"),
        row("kt_ops fwd r=0 vs kt-kernel fwd", lambda q: div(t(q, ktk_fwd), t(q, "kt0_fwd")), "{:.2f}x"),
        row(f"kt_ops f+b vs kt-kernel {ktk_cls} f+b", lambda q: div(t(q, ktk_step), t(q, "kt_step")), "{:.2f}x"),
        row("kt_ops fwd vs eager fwd", lambda q: div(t(q, "eager_fwd"), t(q, "kt_fwd")), "{:.2f}x"),
        row("kt_ops f+b vs eager f+b", lambda q: div(t(q, "eager_step"), t(q, "kt_step")), "{:.2f}x"),
        row(
            "kt_ops f+b vs best torch/transformers f+b",
            lambda q: div(min([t(q, k) for k in peers if t(q, k)], default=None), t(q, "kt_step")),
            "{:.2f}x",
        ),
        "-- accuracy (mean|diff| / mean|ref|, ref = fp32 eager on the same bf16-rounded data)",
    ]
    for label, key in (
        (f"kt_ops r={R} fwd y", "kt_fwd_y"),
        (f"kt_ops r={R} f+b dX", "kt_dx"),
        (f"kt_ops r={R} f+b d(topk_w)", "kt_dw"),
        (f"kt_ops r={R} f+b dLoRA (all 6)", "kt_dlora"),
        ("kt_ops r=0 fwd y (ref no LoRA)", "kt0_y"),
        (f"kt-kernel fwd y (ref {'with' if sft else 'no'} LoRA)", f"ktk_y_{kt_ts[0]}"),
    ):
        rows.append(row(label, lambda q: errs[q].get(key), "{:.2e}"))
    rows.append(
        "-- timing noise: max/min over repeats, n = repeats, o = % of CPUs used by other processes "
        "meanwhile ('!' if > 10%)"
    )
    for key, label in (
        ("kt_fwd", "kt_ops fwd"),
        ("kt_step", "kt_ops f+b"),
        ("kt0_fwd", "kt_ops fwd r=0"),
        ("kt0_step", "kt_ops f+b r=0"),
        *[(f"ktk_{kind}_{n}", f"kt-kernel {kind} {n}thr") for n in kt_ts for kind in ("fwd", "step")],
        ("eager_fwd", "eager fwd"),
        ("eager_step", "eager f+b"),
        ("eager16_fwd", "eager bf16 fwd"),
        ("eager16_step", "eager bf16 f+b"),
        ("hf_eager_fwd", "hf eager fwd"),
        ("hf_eager_step", "hf eager f+b"),
        ("hf_grouped_mm_fwd", "hf grouped_mm fwd"),
        ("hf_grouped_mm_step", "hf grouped_mm f+b"),
    ):
        rows.append((f"  {label}", [res[q][key].noise() if res[q].get(key) else "-" for q in qs]))
    return rows


def scaling_rows(args, prob: Problem, res):
    s, qs, base = prob.shape, args.qlens, args.scaling_threads[0]
    rows = []
    for kind, label in (("fwd", f"kt_ops fwd r={s.r}"), ("step", f"kt_ops fwd+bwd r={s.r}")):
        med = {(t, q): res[(t, q)][kind].med for t in args.scaling_threads for q in qs}
        rows.append(f"-- {label}")
        for t in args.scaling_threads:
            rows.append((f"{t} thr  ms", [fmt(med[(t, q)] * 1e3) for q in qs]))
            rows.append(
                (f"{t} thr  GFLOP/s", [fmt(s.flops(q, kind == "step") / med[(t, q)] / 1e9, "{:.1f}") for q in qs])
            )
        for t in args.scaling_threads[1:]:
            rows.append((f"speedup {t} vs {base} thr", [fmt(med[(base, q)] / med[(t, q)], "{:.2f}x") for q in qs]))
            rows.append(
                (
                    f"parallel efficiency {t} thr",
                    [fmt(100.0 * med[(base, q)] / med[(t, q)] * base / t, "{:.0f}%") for q in qs],
                )
            )
        for t in args.scaling_threads:
            rows.append((f"{t} thr  noise max/min, other load", [res[(t, q)][kind].noise() for q in qs]))
    return rows


def print_header(args, prob: Problem, watch: LoadWatch, peaks):
    info = kt_ops.cpu_info()
    print(f"kt_ops MoE+LoRA benchmark\n{machine_line()}")
    print("\n".join(watch.lines()))
    print(
        f"kt_ops: isa={info['isa']} available_isas={info['available_isas']} num_threads={info['num_threads']} "
        f"physical_cores={info['physical_cores']} method={args.method}" + (f" (--isa {args.isa})" if args.isa else "")
    )
    print(
        f"shape: {prob.shape} alpha={prob.shape.alpha} (scale {prob.shape.scaling:g}), base weights bf16, "
        f"hidden bf16; qlens={args.qlens}"
    )
    print(
        f"threads={args.threads}  warmup={args.warmup}  repeats>={args.repeats} (up to {args.max_repeats} for calls "
        f"shorter than {args.min_time:g}s/repeats), median reported"
    )
    print("\n".join(ceiling_lines(peaks)))
    print(
        "FLOPs: base only; fwd = 3*2*H*I*qlen*k, fwd+bwd = 2*fwd (frozen base weights); "
        "weight GB/s = distinct experts hit * 3*H*I*bytes / time\n"
    )


# ---- main --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlens", type=str, default=None, help="comma-separated qlens (default 1,32,128,512)")
    ap.add_argument("--experts", "-E", type=int, default=None, help="number of experts (default 64)")
    ap.add_argument("--hidden", "-H", type=int, default=None, help="hidden size (default 2048)")
    ap.add_argument("--intermediate", "-I", type=int, default=None, help="expert intermediate size (default 1408)")
    ap.add_argument("--topk", "-k", type=int, default=None, help="experts per token (default 6)")
    ap.add_argument("--rank", "-r", type=int, default=None, help="LoRA rank (default 16)")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 32)")
    ap.add_argument("--threads", type=int, default=2, help="threads for kt_ops, torch and kt-kernel (default 2)")
    ap.add_argument("--isa", type=str, default=None, help="force a kt_ops ISA via kt_ops.set_isa()")
    ap.add_argument("--method", type=str, default="AMXBF16_SFT", help="kt_ops KTMoELayer method (default AMXBF16_SFT)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls per measurement (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="minimum timed repeats (default 5)")
    ap.add_argument("--max-repeats", type=int, default=None, help="maximum timed repeats for fast calls (default 30)")
    ap.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="aim for at least this many seconds of timed calls per measurement (default 1.0)",
    )
    ap.add_argument("--quick", action="store_true", help=f"small smoke-test shape ({QUICK}, qlens 1,8,32), < 1 minute")
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="thread-scaling mode: kt_ops fwd and fwd+bwd at each of --scaling-threads",
    )
    ap.add_argument("--scaling-threads", type=str, default="1,2", help="thread counts for --scaling (default 1,2)")
    ap.add_argument("--skip-eager", action="store_true", help="skip the torch eager timings")
    ap.add_argument("--eager-max-qlen", type=int, default=1 << 30, help="only time torch eager up to this qlen")
    ap.add_argument("--skip-kt-kernel", action="store_true", help="skip kt-kernel even if installed")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers' Qwen3MoeExperts (eager, grouped_mm)")
    ap.add_argument(
        "--kt-kernel-threads",
        type=str,
        default=None,
        help="comma-separated kt-kernel worker-pool sizes to measure (default: --threads); "
        "the first one is used for the speedup row",
    )
    ap.add_argument("--no-peak", action="store_true", help="skip the GEMM-peak / DRAM-bandwidth measurements")
    ap.add_argument("--gemm-n", type=int, default=None, help="GEMM size for the peak measurement (default 2048)")
    ap.add_argument(
        "--bw-gib", type=float, default=None, help="tensor size in GiB for the DRAM BW measurement (default 1)"
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=0.2,
        help="seconds to sleep before each measurement so other worker pools go idle",
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="wait up to this many seconds for other processes to leave the CPUs idle first",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_kt-kernel-worker", dest="_kt_kernel_worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=str, default=None, help="also write all raw timings to this JSON file")
    ap.add_argument("--verbose", "-v", action="store_true")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # for kt-kernel's child
    shape = QUICK if a.quick else DSV2_LITE
    defaults = dict(
        experts=shape.E, hidden=shape.H, intermediate=shape.I, topk=shape.k, rank=shape.r, alpha=shape.alpha
    )
    if a.quick:
        defaults.update(qlens="1,8,32", warmup=2, repeats=3, max_repeats=10, min_time=0.1, gemm_n=1024, bw_gib=0.25)
    else:
        defaults.update(
            qlens="1,32,128,512", warmup=2, repeats=5, max_repeats=30, min_time=1.0, gemm_n=2048, bw_gib=1.0
        )
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.qlens, a.scaling_threads = parse_ints(a.qlens), parse_ints(a.scaling_threads)
    a.kt_kernel_threads = parse_ints(a.kt_kernel_threads or a.threads)
    if a.topk > a.experts:
        ap.error("--topk must be <= --experts")
    return a


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args._kt_kernel_worker is not None:
        torch.set_num_threads(args.threads)
        return kt_kernel_child(args)
    if args.isa:
        kt_ops.set_isa(args.isa)
    set_threads(args.threads)

    watch = LoadWatch(args.wait_idle)
    peaks = {} if args.no_peak else ceilings(args.gemm_n, int(args.bw_gib * 2**30))
    print("# generating random problem ...", file=sys.stderr, flush=True)
    prob = Problem(shape_of(args), args.qlens, seed=args.seed)
    t_start = time.time()
    out_json = {
        "args": vars(args),
        "peaks": peaks,
        "machine": machine_line(),
        "torch": torch.__version__,
        "kt_ops_cpu_info": kt_ops.cpu_info(),
    }
    cols = [f"qlen={q}" for q in args.qlens]
    if args.scaling:
        res = run_scaling(args, prob)
        watch.finish([tm for d in res.values() for tm in d.values()])
        print_header(args, prob, watch, peaks)
        print_table("kt_ops thread scaling (median ms)", cols, scaling_rows(args, prob, res))
        out_json["scaling"] = {f"{t}thr_q{q}": {k: v.as_dict() for k, v in d.items()} for (t, q), d in res.items()}
    else:
        res, errs, notes, ktk = run_main(args, prob)
        watch.finish([tm for q in args.qlens for tm in res[q].values()])
        print_header(args, prob, watch, peaks)
        print_table(
            f"MoE layer {prob.shape}, {args.threads} threads, median ms",
            cols,
            main_rows(args, prob, res, errs, peaks, ktk),
        )
        for n in notes:
            print(f"note: {n}")
        out_json.update(
            results={str(q): {k: v.as_dict() for k, v in res[q].items() if v is not None} for q in res},
            rel_err={str(q): errs[q] for q in errs},
            notes=notes + [f"kt_kernel: {ktk[0]}: {ktk[1]}"],
        )
    out_json["load"] = watch.as_dict()
    print(f"(benchmark body took {time.time() - t_start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out_json, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
