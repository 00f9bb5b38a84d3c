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
  --kt-kernel: instead, kt-kernel 0.7.2's AVX2 quantized classes against kt_ops on the same format and
  size: AVX2FP8_MOE (E4M3, 128x128 block scales) vs FP8 (int8_kgroup, group 128), and
  AVX2GPTQInt4_MOE (symmetric int4, group 128) vs int4_kgroup group 128. kt-kernel runs in a child
  process (its worker pool keeps spinning after each call and would slow the kt_ops column).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import kt_ops
from kt_ops import KTMoEWrapper
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
    parser.add_argument("--kt-kernel", action="store_true", help="compare with kt-kernel's AVX2 quantized classes")
    parser.add_argument("--kt-kernel-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    E, H, I, k, r = (16, 512, 384, 6, 16) if args.quick else (64, 2048, 1408, 6, 16)
    qlens = (1, 64) if args.quick else (1, 512)
    if args.kt_kernel_child:
        print(json.dumps(kt_kernel_child(args.kt_kernel_child, (E, H, I, k), qlens, args.threads, args.repeats or 4)))
        return
    gen = torch.Generator().manual_seed(0)
    base = dict(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H, moe_intermediate_size=I,
                num_gpu_experts=0, cpuinfer_threads=args.threads, threadpool_count=1, weight_path=None,
                chunked_prefill_size=4096)
    if args.kt_kernel:
        kt_kernel_table(args, (E, H, I, k), qlens, base)
        return
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


# ---- kt-kernel 0.7.2's AVX2 quantized classes, same formats and sizes --------------------------------

KT_KERNEL_CASES = {  # kt-kernel class -> (kt_ops inference method, kernel format, group)
    "AVX2FP8_MOE": ("FP8", "int8_kgroup", 128),
    "AVX2GPTQInt4_MOE": ("RAWINT4", "int4_kgroup", 128),
}


def _load_kt_kernel_avx2():
    spec = importlib.util.find_spec("kt_kernel")
    if spec is None:
        return None
    paths = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "_kt_kernel_ext_avx2.*.so")))
    if not paths:
        return None
    ext_spec = importlib.util.spec_from_file_location("kt_kernel_ext", paths[0])
    ext = importlib.util.module_from_spec(ext_spec)
    ext_spec.loader.exec_module(ext)
    return ext


def kt_kernel_child(cls_name: str, shape, qlens, threads: int, repeats: int) -> dict:
    """Median ms per qlen of kt-kernel's `cls_name` on random weights in its own layout: FP8 bytes
    [N, K] with fp32 block scales [N/128, K/128]; GPTQ qweight int32 [K/8, N] with scales [K/128, N]."""
    ext = _load_kt_kernel_avx2()
    E, H, I, k = shape
    gen = torch.Generator().manual_seed(0)
    pool = ext.WorkerPoolConfig()
    pool.subpool_count, pool.subpool_numa_map, pool.subpool_thread_count = 1, [0], [threads]
    cpu = ext.CPUInfer(pool)

    def weight(n, kk):
        if cls_name == "AVX2FP8_MOE":
            w = (torch.randn(n, kk, generator=gen) * 0.5).to(torch.float8_e4m3fn).view(torch.uint8).contiguous()
            return w, (torch.rand((n + 127) // 128, (kk + 127) // 128, generator=gen) * 0.01).contiguous()
        q = torch.randint(-2 ** 31, 2 ** 31 - 1, (kk // 8, n), generator=gen, dtype=torch.int32)
        return q, (torch.rand(kk // 128, n, generator=gen) * 0.01).contiguous()

    weights = {p: [weight(*((I, H) if p != "down" else (H, I))) for _ in range(E)] for p in ("gate", "up", "down")}
    mask = torch.zeros(E, dtype=torch.bool)
    config = ext.moe.MOEConfig(E, k, H, I, mask.data_ptr())
    config.layer_idx, config.pool, config.max_len = 0, cpu.backend_, max(qlens)
    for p in ("gate", "up", "down"):
        setattr(config, p + "_projs", [[w.data_ptr() for w, _ in weights[p]]])
        setattr(config, p + "_scales", [[s.data_ptr() for _, s in weights[p]]])
    config.quant_config.bits = 8 if cls_name == "AVX2FP8_MOE" else 4
    config.quant_config.group_size = 128
    config.quant_config.zero_point = False
    moe = getattr(ext.moe, cls_name)(config)
    order = torch.arange(E, dtype=torch.int64)
    cpu.submit(moe.load_weights_task(order.data_ptr()))
    cpu.sync()
    result = {}
    for qlen in qlens:
        x = torch.randn(qlen, H, generator=gen, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(qlen)]).contiguous()
        w = torch.rand(qlen, k, generator=gen).contiguous()
        out = torch.empty(qlen, H, dtype=torch.bfloat16)
        size = torch.tensor([qlen], dtype=torch.int32)

        def run():
            cpu.submit(moe.forward_task(size.data_ptr(), k, ids.data_ptr(), w.data_ptr(), x.data_ptr(),
                                        out.data_ptr(), False))
            cpu.sync()

        result[qlen] = alternate([run], repeats if qlen > 1 else 4 * repeats)[0] * 1e3
    return result


def kt_kernel_table(args, shape, qlens, base) -> None:
    if _load_kt_kernel_avx2() is None:
        print("kt-kernel is not installed (pip install --no-deps kt-kernel==0.7.2): no comparison")
        return
    E, H, I, k = shape
    gen = torch.Generator().manual_seed(0)
    repeats = args.repeats or 4
    print(f"# kt-kernel 0.7.2 AVX2 quantized classes vs kt_ops, E={E} H={H} I={I} k={k}, {args.threads} threads, "
          f"isa={kt_ops.get_isa()}; median ms")
    print("| kt-kernel class | kt_ops method (format) | qlen | kt-kernel ms | kt_ops ms | kt_ops speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for cls_name, (method, fmt, group) in KT_KERNEL_CASES.items():
        child = subprocess.run([sys.executable, __file__, "--kt-kernel-child", cls_name, "--threads", str(args.threads),
                                "--repeats", str(repeats)] + (["--quick"] if args.quick else []),
                               capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode != 0 or not lines:
            print(f"| {cls_name} | failed: {(child.stderr.strip().splitlines() or ['?'])[-1]} |")
            continue
        theirs = {int(q): ms for q, ms in json.loads(lines[-1]).items()}
        codes = [random_codes(E, N, K, fmt, group, gen) for N, K in ((I, H), (I, H), (H, I))]
        wrapper = KTMoEWrapper(**base, mode="inference", method=method)
        wrapper._set_parts(pack_codes_split(*codes, fmt, group, [(0, I)]), torch.arange(E))
        del codes
        for qlen in qlens:
            x = torch.randn(qlen, H, generator=gen, dtype=torch.bfloat16)
            ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(qlen)])
            w = torch.rand(qlen, k, generator=gen)
            ours = alternate([lambda: wrapper.forward(x, ids, w)], repeats if qlen > 1 else 4 * repeats)[0] * 1e3
            print(f"| {cls_name} | {method} ({fmt} g{group}) | {qlen} | {theirs[qlen]:.2f} | {ours:.2f} | "
                  f"{theirs[qlen] / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
