#!/usr/bin/env python3
"""Inference-mode timings of every inference method of the wrapper API: decode (qlen 1) and prefill
(qlen 512) on a DeepSeek-V2-Lite layer (E=64, H=2048, I=1408, k=6).

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
  --quick: the small shape (E=8 H=512 I=256 k=2 r=8), prefill qlen 64, 3 repeats (a smoke run, not numbers
  to quote)
  --kt-kernel: instead, kt-kernel 0.7.2's AVX2 quantized classes against kt_ops on the same format and
  size: AVX2FP8_MOE (E4M3, 128x128 block scales) vs FP8 (int8_kgroup, group 128), and
  AVX2GPTQInt4_MOE (symmetric int4, group 128) vs int4_kgroup group 128. kt-kernel runs in a child
  process (its worker pool keeps spinning after each call and would slow the kt_ops column).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import (
    DSV2_LITE,
    QUICK,
    ChildFailed,
    LoadWatch,
    MarkdownTable,
    load_kt_kernel,
    machine_line,
    measure,
    measure_alternating,
    random_lora,
    random_routed,
    run_child,
    time_kt_kernel,
)
from kt_ops import KTMoEWrapper
from kt_ops.core.formats import PROJECTIONS
from kt_ops.core.packed import pack_codes_split

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
    scale = torch.rand(E, N, groups, generator=gen) * (K**-0.5) / (127 if fmt.startswith("int8") else 8)
    if fmt in ("int4_1", "int4_1_kgroup"):
        scale = torch.stack((scale, -8 * scale), dim=-1)
    return codes, scale


def inference_wrapper(base, shape, method, fmt, group, gen):
    """An inference wrapper holding random codes of `fmt` packed exactly, and the parts it holds."""
    E, H, I = shape.E, shape.H, shape.I
    parts = pack_codes_split(
        *(random_codes(E, N, K, fmt, group, gen) for N, K in ((I, H), (I, H), (H, I))), fmt, group, [(0, I)]
    )
    wrapper = KTMoEWrapper(**base, mode="inference", method=method)
    wrapper._set_parts(parts, torch.arange(E))  # no public call installs packed parts yet
    return wrapper, parts


_MATMUL = torch.randn(256, 256)


def caller_work(kind: str, seconds: float) -> None:
    """What the caller does between submit_forward and sync_forward, for `seconds`."""
    if kind == "sleep":
        time.sleep(seconds)
        return
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        torch.mm(_MATMUL, _MATMUL)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=0, help="0: 20 at decode, 4 at prefill (3 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", default=",".join(CASES), help="comma-separated labels of " + ", ".join(CASES))
    parser.add_argument(
        "--work",
        choices=("sleep", "matmul"),
        default="sleep",
        help="caller work for the overlap rows: a sleep (GPU work) or torch matmuls on the CPU",
    )
    parser.add_argument(
        "--work-ms", type=float, default=0.0, help="caller work for the overlap rows; 0: as long as the serial forward"
    )
    parser.add_argument("--kt-kernel", action="store_true", help="compare with kt-kernel's AVX2 quantized classes")
    parser.add_argument("--kt-kernel-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = QUICK if args.quick else DSV2_LITE
    qlens = (1, 64) if args.quick else (1, 512)
    if args.kt_kernel_child:
        print(json.dumps(kt_kernel_child(args.kt_kernel_child, shape, qlens, args.threads, args.repeats or 4)))
        return
    gen = torch.Generator().manual_seed(0)
    base = dict(
        layer_idx=0,
        num_experts=shape.E,
        num_experts_per_tok=shape.k,
        hidden_size=shape.H,
        moe_intermediate_size=shape.I,
        num_gpu_experts=0,
        cpuinfer_threads=args.threads,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=4096,
    )
    if args.kt_kernel:
        kt_kernel_table(args, shape, qlens, base)
        return
    watch = LoadWatch()
    print(f"# inference, {shape}; {machine_line()}")
    table = MarkdownTable(
        "method",
        "qlen",
        "forward ms",
        f"SFT forward_sft ms (r={shape.r})",
        "ratio",
        "overlap: serial ms",
        "submit/work/sync ms",
        "hidden",
    )
    timings = []
    for label in args.methods.split(","):
        method, fmt, group, sft_method = CASES[label]
        wrapper, parts = inference_wrapper(base, shape, method, fmt, group, gen)
        sft = None
        if sft_method:
            sft = KTMoEWrapper(
                **base, mode="sft", method=sft_method, lora_rank=shape.r, lora_alpha=shape.alpha, group_size=group
            )
            sft.experts_parts = list(parts)
            sft.physical_to_logical_map = torch.arange(shape.E)
            sft.init_lora_weights(*random_lora(shape, gen))
        for qlen in qlens:
            repeats = args.repeats or (20 if qlen == 1 else (3 if args.quick else 4))
            inp = random_routed(shape, qlen, gen)
            x, ids, w = inp.x, inp.ids, inp.w
            fns = [lambda: wrapper.forward(x, ids, w)]
            if sft is not None:
                fns.append(lambda: sft.forward_sft(x, ids, w, save_for_backward=False))
            got = measure_alternating(fns, repeats=repeats)
            fwd = got[0].med
            sft_cell = ["-", "-"] if sft is None else [f"{got[1].med * 1e3:.2f}", f"{got[1].med / fwd:.2f}"]
            work_s = (args.work_ms / 1e3) or fwd

            def serial():
                wrapper.forward(x, ids, w)
                caller_work(args.work, work_s)

            def overlapped():
                wrapper.submit_forward(x, ids, w)
                caller_work(args.work, work_s)
                wrapper.sync_forward(x)

            ser, ovl = measure_alternating([serial, overlapped], repeats=max(repeats // 2, 2))
            timings += got + [ser, ovl]
            hidden = (ser.med - ovl.med) / min(fwd, work_s)
            table.row(
                label,
                qlen,
                f"{fwd * 1e3:.2f}",
                *sft_cell,
                f"{ser.med * 1e3:.2f}",
                f"{ovl.med * 1e3:.2f}",
                f"{100 * hidden:.0f}%",
            )
    print(
        "\nhidden: the share of the shorter of (MoE, caller work) that submit_forward hid behind the other; "
        f"the caller work ({args.work}) lasts as long as the serial forward unless --work-ms."
    )
    print("\n".join(watch.finish(timings).lines()))


# ---- kt-kernel 0.7.2's AVX2 quantized classes, same formats and sizes --------------------------------

KT_KERNEL_CASES = {  # kt-kernel class -> (kt_ops inference method, kernel format, group)
    "AVX2FP8_MOE": ("FP8", "int8_kgroup", 128),
    "AVX2GPTQInt4_MOE": ("RAWINT4", "int4_kgroup", 128),
}


def kt_kernel_repeats(repeats: int) -> dict:
    """Both sides: `repeats` calls, up to 4x as many for fast calls (decode)."""
    return dict(repeats=repeats, max_repeats=4 * repeats, min_time=1.0)


def kt_kernel_child(cls_name: str, shape, qlens, threads: int, repeats: int) -> dict:
    """Median ms per qlen of kt-kernel's `cls_name` on random weights in its own layout: FP8 bytes
    [N, K] with fp32 block scales [N/128, K/128]; GPTQ qweight int32 [K/8, N] with scales [K/128, N]."""
    ext, note = load_kt_kernel()
    if ext is None:
        raise SystemExit(note)
    gen = torch.Generator().manual_seed(0)

    def weight(n, kk):
        if cls_name == "AVX2FP8_MOE":
            w = (torch.randn(n, kk, generator=gen) * 0.5).to(torch.float8_e4m3fn).view(torch.uint8).contiguous()
            return w, (torch.rand((n + 127) // 128, (kk + 127) // 128, generator=gen) * 0.01).contiguous()
        q = torch.randint(-(2**31), 2**31 - 1, (kk // 8, n), generator=gen, dtype=torch.int32)
        return q, (torch.rand(kk // 128, n, generator=gen) * 0.01).contiguous()

    pairs = {
        p: [weight(*((shape.I, shape.H) if p != "down" else (shape.H, shape.I))) for _ in range(shape.E)]
        for p in PROJECTIONS
    }
    inputs = {q: random_routed(shape, q, gen) for q in qlens}
    got = time_kt_kernel(
        ext,
        threads,
        cls_name,
        shape,
        inputs,
        {p: [w for w, _ in pairs[p]] for p in PROJECTIONS},
        {p: [s for _, s in pairs[p]] for p in PROJECTIONS},
        bits=8 if cls_name == "AVX2FP8_MOE" else 4,
        **kt_kernel_repeats(repeats),
    )
    return {q: tm.med * 1e3 for q, (tm, _) in got.items()}


def kt_kernel_table(args, shape, qlens, base) -> None:
    if load_kt_kernel()[0] is None:
        print("kt-kernel is not installed (pip install --no-deps kt-kernel==0.7.2): no comparison")
        return
    gen = torch.Generator().manual_seed(0)
    repeats = args.repeats or 4
    print(f"# kt-kernel 0.7.2 AVX2 quantized classes vs kt_ops, {shape}; median ms; {machine_line()}")
    table = MarkdownTable(
        "kt-kernel class",
        "kt_ops method (format)",
        "qlen",
        "kt-kernel ms",
        "kt_ops ms",
        "kt_ops speed-up",
        align="llrrrr",
    )
    for cls_name, (method, fmt, group) in KT_KERNEL_CASES.items():
        try:
            theirs = run_child(
                [__file__, "--kt-kernel-child", cls_name, "--threads", str(args.threads), "--repeats", str(repeats)]
                + (["--quick"] if args.quick else [])
            )
        except ChildFailed as exc:
            table.row(cls_name, f"failed: {exc}")
            continue
        wrapper, _ = inference_wrapper(base, shape, method, fmt, group, gen)
        for qlen in qlens:
            inp = random_routed(shape, qlen, gen)
            ours = measure(lambda: wrapper.forward(inp.x, inp.ids, inp.w), **kt_kernel_repeats(repeats)).med * 1e3
            table.row(
                cls_name,
                f"{method} ({fmt} g{group})",
                qlen,
                f"{theirs[str(qlen)]:.2f}",
                f"{ours:.2f}",
                f"{theirs[str(qlen)] / ours:.2f}x",
            )


if __name__ == "__main__":
    main()
