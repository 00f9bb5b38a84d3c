#!/usr/bin/env python3
"""Side-by-side CPU benchmark of the kt_ops MoE+LoRA layer against its baselines.

Default shape is the DeepSeek-V2-Lite MoE layer: E=64 experts, hidden H=2048,
intermediate I=1408, top-k=6, LoRA rank 16 (alpha 32), qlen 1, 32, 128, 512.

One run measures, for every qlen, on the SAME random inputs:
  * kt_ops forward (no grad), LoRA r=16 (nonzero B), BF16 base weights, bf16 hidden
  * kt_ops forward with lora_rank=0            -> LoRA overhead %
  * kt_ops forward+backward, LoRA r=16         -> backward/forward ratio
  * PyTorch eager fp32 and bf16 MoE+LoRA loop (see /work/shared/anchors/torch_eager_lora_moe.py),
    forward and forward+backward
  * transformers' Qwen3MoeExperts bf16 (eager and grouped_mm experts implementations, no LoRA),
    forward and forward+backward
  * kt-kernel 0.7.2 AVX2BF16_MOE forward (inference, no LoRA), only if kt_kernel is installed
plus the machine's measured fp32 and bf16 GEMM peaks (torch.mm) and DRAM read bandwidth (torch.sum
over a large tensor), and prints ONE table (metrics as rows, qlens as columns) under a header with
the CPU model, its ISA flags and the kt_ops ISA in use.

FLOP accounting (base weights only, LoRA FLOPs are not counted):
  forward          3 * 2 * H * I * qlen * k
  forward+backward 2 * forward   (base weights are frozen: backward only needs dX)
Effective weight bandwidth of a forward:
  distinct experts hit * 3 * H * I * bytes_per_weight / time   (bf16: 2 bytes, fp32: 4)

Timing: warm-up calls, then the median of several repeats (more repeats for fast calls);
all kt_ops / torch work runs with the requested thread count. kt-kernel is timed in a child
process (its worker pool keeps spinning after each call and would slow every other column);
the child rebuilds the identical random problem from the same seed.

Usage (from the repository root):
  .venv/bin/python benchmarks/bench_moe.py                 # full DeepSeek-V2-Lite table
  .venv/bin/python benchmarks/bench_moe.py --quick         # small smoke test (< 1 min)
  .venv/bin/python benchmarks/bench_moe.py --scaling       # kt_ops 1 vs 2 threads
  .venv/bin/python benchmarks/bench_moe.py --help
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import glob
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

PROJS = ("gate", "up", "down")


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_busy_fraction(interval: float = 1.0):
    """Fraction of all CPUs busy during `interval` seconds (this process sleeps meanwhile, so it is
    the load from other processes)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
        return 1.0 - (i1 - i0) / max(t1 - t0, 1)
    except Exception:
        return None


def wait_until_idle(max_wait: float, threshold: float = 0.10, quiet_samples: int = 3, sample_s: float = 2.0):
    """Block until other processes leave the CPUs idle (`quiet_samples` consecutive samples below
    `threshold`), or `max_wait` seconds pass. Returns True if the machine went quiet."""
    t_end = time.time() + max_wait
    n = 0
    while time.time() < t_end:
        b = cpu_busy_fraction(sample_s)
        n = n + 1 if (b is not None and b < threshold) else 0
        if n >= quiet_samples:
            return True
    return False


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot():
    """(total jiffies, busy jiffies) of the whole machine and this process's own CPU jiffies."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        total = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system  # children: the kt-kernel child
        return total, total - idle, own * _CLK_TCK
    except Exception:
        return None


def others_fraction(a, b):
    """Fraction of all CPUs used by OTHER processes between snapshots a and b."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    return min(1.0, max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0])))


class Timing:
    """Result of one measurement: list of per-call seconds, plus the share of all CPUs that
    other processes used while it was timed."""

    def __init__(self, times, others=None):
        self.times = list(times)
        self.others = others

    @property
    def med(self):
        return statistics.median(self.times)

    @property
    def min(self):
        return min(self.times)

    @property
    def max(self):
        return max(self.times)

    def as_dict(self):
        return {"median_s": self.med, "min_s": self.min, "max_s": self.max, "n": len(self.times),
                "others_cpu_fraction": self.others}


SETTLE_S = 0.2


def bench(fn, warmup: int, repeats: int, min_time: float, max_repeats: int, pre=None) -> Timing:
    """Warm up, then time `fn` at least `repeats` times (more, up to max_repeats, for fast calls
    so that about `min_time` seconds are measured). `pre` runs untimed before every call.
    Sleeps SETTLE_S first so that spinning worker threads of the previous measurement go idle."""
    if SETTLE_S > 0:
        time.sleep(SETTLE_S)
    est = None
    for _ in range(max(warmup, 1)):
        if pre is not None:
            pre()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        est = dt if est is None else min(est, dt)
    n = repeats
    if est is not None and est > 0:
        n = max(repeats, min(max_repeats, int(math.ceil(min_time / est))))
    ts = []
    snap0 = cpu_snapshot()
    for _ in range(n):
        if pre is not None:
            pre()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return Timing(ts, others_fraction(snap0, cpu_snapshot()))


def rel_err(out, ref) -> float:
    out = out.detach().float()
    ref = ref.detach().float()
    den = ref.abs().mean().item()
    if den == 0.0:
        return float("nan") if out.abs().mean().item() != 0 else 0.0
    return (out - ref).abs().mean().item() / den


class quiet_stdout:
    """Silence C/C++ writes to fd 1 (kt-kernel prints banners on construction/destruction)."""

    def __enter__(self):
        sys.stdout.flush()
        self.saved = os.dup(1)
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 1)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)
        os.close(self.null)
        return False


def set_threads(n: int, kt_ops_mod=None):
    torch.set_num_threads(n)
    if kt_ops_mod is not None and hasattr(kt_ops_mod, "set_num_threads"):
        kt_ops_mod.set_num_threads(n)


# ----------------------------------------------------------------------------------------
# machine ceilings
# ----------------------------------------------------------------------------------------
def measure_gemm_peak(n: int, repeats: int = 10, dtype=torch.float32):
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        ts.append(time.perf_counter() - t0)
    fl = 2.0 * n ** 3
    return {"n": n, "best_gflops": fl / min(ts) / 1e9, "median_gflops": fl / statistics.median(ts) / 1e9}


def measure_dram_bw(nbytes: int, repeats: int = 7):
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    for _ in range(2):
        x.sum()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    real = x.numel() * 4
    del x
    gc.collect()
    return {"bytes": real, "best_gbs": real / min(ts) / 1e9, "median_gbs": real / statistics.median(ts) / 1e9}


# ----------------------------------------------------------------------------------------
# shared random problem
# ----------------------------------------------------------------------------------------
class Problem:
    """Base weights (bf16), LoRA factors (bf16-rounded) and per-qlen inputs shared by every column."""

    def __init__(self, E, H, I, K, R, alpha, qlens, seed=0):
        self.E, self.H, self.I, self.K, self.R, self.alpha = E, H, I, K, R, alpha
        self.scale = alpha / R if R > 0 else 0.0
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, std=0.02):
            return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

        self.w = {"gate": rnd(E, I, H), "up": rnd(E, I, H), "down": rnd(E, H, I)}
        # LoRA in the usual layout: A [E, r, in], B [E, out, r]; B is nonzero on purpose.
        dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
        self.lora_a, self.lora_b = {}, {}
        for p in PROJS:
            din, dout = dims[p]
            self.lora_a[p] = rnd(E, R, din, std=1.0 / math.sqrt(din))
            self.lora_b[p] = rnd(E, dout, R, std=0.02)
        self.inputs = {}
        for q in qlens:
            x = torch.randn(q, H, generator=g).to(torch.bfloat16)
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(q)]).to(torch.int64)
            w = torch.softmax(torch.randn(q, K, generator=g), -1).float()
            go = torch.randn(q, H, generator=g).to(torch.bfloat16)
            self.inputs[q] = {"x": x, "ids": ids.contiguous(), "w": w.contiguous(), "go": go,
                              "hit": int(ids.unique().numel())}

    def weight_bytes_bf16(self, experts_hit):
        return experts_hit * 3 * self.H * self.I * 2


# ----------------------------------------------------------------------------------------
# torch eager fp32 baseline (same loop as /work/shared/anchors/torch_eager_lora_moe.py)
# ----------------------------------------------------------------------------------------
class EagerMoE:
    def __init__(self, prob: Problem, dtype=torch.float32):
        self.p = prob
        self.dtype = dtype
        self.W = {k: v.to(dtype) for k, v in prob.w.items()}
        self.A = {k: v.to(dtype).requires_grad_() for k, v in prob.lora_a.items()}
        self.B = {k: v.to(dtype).requires_grad_() for k, v in prob.lora_b.items()}

    def layer(self, x, ids, w, lora=True):
        s = self.p.scale
        Wg, Wu, Wd = self.W["gate"], self.W["up"], self.W["down"]
        Ag, Au, Ad = self.A["gate"], self.A["up"], self.A["down"]
        Bg, Bu, Bd = self.B["gate"], self.B["up"], self.B["down"]
        out = torch.zeros(x.shape[0], self.p.H, dtype=x.dtype)
        for e in ids.unique().tolist():
            tok, slot = torch.where(ids == e)
            xe = x[tok]
            if lora:
                g = xe @ Wg[e].T + s * (xe @ Ag[e].T) @ Bg[e].T
                u = xe @ Wu[e].T + s * (xe @ Au[e].T) @ Bu[e].T
                h = F.silu(g) * u
                y = h @ Wd[e].T + s * (h @ Ad[e].T) @ Bd[e].T
            else:
                g = xe @ Wg[e].T
                u = xe @ Wu[e].T
                h = F.silu(g) * u
                y = h @ Wd[e].T
            out = out.index_add(0, tok, y * w[tok, slot, None])
        return out

    def params(self):
        return list(self.A.values()) + list(self.B.values())


# ----------------------------------------------------------------------------------------
# transformers' own experts block (same as /work/shared/anchors/hf_experts_bench.py): fused 3D
# weights, frozen, no LoRA; gradients flow to the input and routing weights only.
# ----------------------------------------------------------------------------------------
def make_hf_experts(prob: Problem, impl: str, dtype=torch.bfloat16):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=prob.H, moe_intermediate_size=prob.I, num_experts=prob.E,
                         num_experts_per_tok=prob.K)
    cfg._experts_implementation = impl
    ex = Qwen3MoeExperts(cfg).to(dtype)
    with torch.no_grad():  # the benchmark's own weights: gate_up_proj is [E, 2I, H], down_proj [E, H, I]
        ex.gate_up_proj.copy_(torch.cat([prob.w["gate"], prob.w["up"]], 1).to(dtype))
        ex.down_proj.copy_(prob.w["down"].to(dtype))
    ex.requires_grad_(False)
    return ex


# ----------------------------------------------------------------------------------------
# kt-kernel (optional)
# ----------------------------------------------------------------------------------------
def load_kt_kernel_ext():
    """Return (ext_module, note) or (None, reason)."""
    if importlib.util.find_spec("kt_kernel") is None:
        return None, "not installed"
    try:
        import kt_kernel  # noqa: F401  (selects the ISA variant)
        ext = kt_kernel.kt_kernel_ext
        return ext, f"kt_kernel {getattr(kt_kernel, '__version__', '?')} variant={getattr(ext, '__cpu_variant__', '?')}"
    except Exception as exc:  # e.g. the package's optional python deps (gguf) are missing
        first_err = f"{type(exc).__name__}: {exc}"
    # Fallback: load the AVX2 extension module directly (it does not need the python extras).
    try:
        d = os.path.dirname(importlib.util.find_spec("kt_kernel").origin)
        cands = sorted(glob.glob(os.path.join(d, "_kt_kernel_ext_avx2.*.so")))
        if not cands:
            return None, f"import kt_kernel failed ({first_err}); no AVX2 extension found"
        spec = importlib.util.spec_from_file_location("kt_kernel_ext", cands[0])
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
        try:
            from importlib.metadata import version
            ver = version("kt-kernel")
        except Exception:
            ver = "?"
        return ext, (f"kt-kernel {ver} AVX2 extension loaded directly "
                     f"(`import kt_kernel` failed: {first_err})")
    except Exception as exc:
        return None, f"import failed: {first_err}; direct load failed: {type(exc).__name__}: {exc}"


class KtKernelMoE:
    """kt-kernel AVX2BF16_MOE forward, set up exactly like /work/shared/anchors/kt_kernel_avx2_bench.py."""

    def __init__(self, ext, prob: Problem, threads: int, max_len: int):
        E, K, H, I = prob.E, prob.K, prob.H, prob.I
        self.ext = ext
        self.K = K
        pool = ext.WorkerPoolConfig()
        pool.subpool_count = 1
        pool.subpool_numa_map = [0]
        pool.subpool_thread_count = [threads]
        self.cpu = ext.CPUInfer(pool)
        self.gate = [prob.w["gate"][e].contiguous() for e in range(E)]
        self.up = [prob.w["up"][e].contiguous() for e in range(E)]
        self.down = [prob.w["down"][e].contiguous() for e in range(E)]
        self.mask = torch.zeros(E, dtype=torch.bool)
        mc = ext.moe.MOEConfig(E, K, H, I, self.mask.data_ptr())
        mc.layer_idx = 0
        mc.pool = self.cpu.backend_
        mc.max_len = max(max_len, 1)
        mc.gate_projs = [[t.data_ptr() for t in self.gate]]
        mc.up_projs = [[t.data_ptr() for t in self.up]]
        mc.down_projs = [[t.data_ptr() for t in self.down]]
        mc.gate_scales = [[0] * E]
        mc.up_scales = [[0] * E]
        mc.down_scales = [[0] * E]
        self.mc = mc
        self.moe = ext.moe.AVX2BF16_MOE(mc)
        self.p2l = torch.arange(E, dtype=torch.int64)
        self.cpu.submit(self.moe.load_weights_task(self.p2l.data_ptr()))
        self.cpu.sync()

    def make_fwd(self, inp):
        q = inp["x"].shape[0]
        x = inp["x"].contiguous()
        ids = inp["ids"].contiguous()
        w = inp["w"].contiguous()
        out = torch.empty(q, x.shape[1], dtype=torch.bfloat16)
        bsz = torch.tensor([q], dtype=torch.int32)
        cpu, moe, K = self.cpu, self.moe, self.K

        def run():
            cpu.submit(moe.forward_task(bsz.data_ptr(), K, ids.data_ptr(), w.data_ptr(),
                                        x.data_ptr(), out.data_ptr(), False))
            cpu.sync()
            return out

        # keep buffers alive with the closure
        run._keep = (x, ids, w, out, bsz)
        return run


def kt_kernel_child_main(args):
    """Body of the child process: time kt-kernel forward for every qlen, save results."""
    torch.set_num_threads(args.threads)
    result = {"times": {}, "out": {}}
    ext, note = load_kt_kernel_ext()
    result["note"] = note
    if ext is None:
        torch.save(result, args._out)
        return 0
    prob = Problem(args.experts, args.hidden, args.intermediate, args.topk, args.rank, args.alpha,
                   args.qlens, seed=args.seed)
    bopts = dict(warmup=args.warmup, repeats=args.repeats, min_time=args.min_time,
                 max_repeats=args.max_repeats)
    try:
        with quiet_stdout():
            ktk = KtKernelMoE(ext, prob, args._kt_kernel_worker, max(args.qlens))
        for q in args.qlens:
            print(f"# kt-kernel ({args._kt_kernel_worker} pool threads) qlen={q} ...", file=sys.stderr, flush=True)
            run = ktk.make_fwd(prob.inputs[q])
            result["out"][q] = run().clone()
            tm = bench(run, **bopts)
            result["times"][q] = tm.times
            result.setdefault("others", {})[q] = tm.others
        with quiet_stdout():
            del ktk
            gc.collect()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    torch.save(result, args._out)
    return 0


def run_kt_kernel_child(args, pool_threads):
    import subprocess
    import tempfile
    fd, path = tempfile.mkstemp(suffix=".pt", prefix="bench_moe_ktk_")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__),
           "--qlens", ",".join(map(str, args.qlens)), "--experts", str(args.experts),
           "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
           "--topk", str(args.topk), "--rank", str(args.rank), "--alpha", str(args.alpha),
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--max-repeats", str(args.max_repeats), "--min-time", str(args.min_time), "--seed", str(args.seed),
           "--settle", str(args.settle),
           "--_kt-kernel-worker", str(pool_threads), "--_out", path]
    try:
        cp = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if args.verbose or cp.returncode != 0:
            sys.stderr.write(cp.stderr)
        if cp.returncode != 0:
            return {"error": f"child exited with {cp.returncode}: {cp.stderr.strip().splitlines()[-1:] }"}
        sys.stderr.write("".join(l + "\n" for l in cp.stderr.splitlines() if l.startswith("# ")))
        return torch.load(path, weights_only=False)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------
# kt_ops
# ----------------------------------------------------------------------------------------
def import_kt_ops():
    try:
        kt_ops = importlib.import_module("kt_ops")
        if not hasattr(kt_ops, "KTMoELayer"):
            return None, "kt_ops imported but has no KTMoELayer"
        return kt_ops, None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _find_lora_param(layer, proj, ab):
    for name in (f"{proj}_lora_{ab}", f"{proj}_lora_{ab.upper()}", f"lora_{ab}_{proj}"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor):
            return t
    return None


def _to_layout(src, target_shape):
    """src is [E, a, b]; return it in target_shape (as-is or with the last two dims swapped)."""
    if tuple(src.shape) == tuple(target_shape):
        return src
    if tuple(src.transpose(-1, -2).shape) == tuple(target_shape):
        return src.transpose(-1, -2)
    return None


def make_kt_ops_layer(kt_ops, prob: Problem, rank: int, method: str):
    layer = kt_ops.KTMoELayer(num_experts=prob.E, hidden_size=prob.H, intermediate_size=prob.I,
                              lora_rank=rank, lora_alpha=prob.alpha, method=method,
                              lora_dtype=torch.bfloat16)
    layer.load_weights_from_tensors(prob.w["gate"], prob.w["up"], prob.w["down"])
    matched = rank > 0
    if rank > 0:
        with torch.no_grad():
            for p in PROJS:
                for ab, src in (("a", prob.lora_a[p]), ("b", prob.lora_b[p])):
                    t = _find_lora_param(layer, p, ab)
                    if t is None:
                        matched = False
                        continue
                    s = _to_layout(src, t.shape)
                    if s is None:
                        matched = False
                        # unknown layout: still make it nonzero so LoRA work is real
                        t.copy_((torch.randn(t.shape) * 0.02).to(t.dtype))
                    else:
                        t.copy_(s.to(t.dtype))
    return layer, matched


def lora_grads(layer, prob):
    """Return the kt_ops LoRA grads in the eager layout, concatenated (or None)."""
    outs = []
    for p in PROJS:
        for ab, src in (("a", prob.lora_a[p]), ("b", prob.lora_b[p])):
            t = _find_lora_param(layer, p, ab)
            if t is None or t.grad is None:
                return None
            gl = _to_layout(t.grad, src.shape)
            if gl is None:
                return None
            outs.append(gl.float().reshape(-1))
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------
def run_main(args, kt_ops, kt_ops_err, prob, peaks):
    res = {q: {} for q in args.qlens}   # res[q][key] = Timing
    errs = {q: {} for q in args.qlens}  # relative errors
    notes = []
    bopts = dict(warmup=args.warmup, repeats=args.repeats, min_time=args.min_time,
                 max_repeats=args.max_repeats)

    # --- references and eager baseline objects
    eager = EagerMoE(prob)  # also the fp32 reference for the accuracy rows
    eager16 = EagerMoE(prob, torch.bfloat16)
    hf = {}
    if not args.skip_hf:
        for impl in ("eager", "grouped_mm"):
            try:
                hf[impl] = make_hf_experts(prob, impl)
            except Exception as exc:
                notes.append(f"transformers Qwen3MoeExperts[{impl}]: {type(exc).__name__}: {exc}")

    # --- kt_ops layers
    kt16 = kt0 = None
    lora_matched = False
    if kt_ops is not None:
        try:
            kt16, lora_matched = make_kt_ops_layer(kt_ops, prob, prob.R, args.method)
        except Exception as exc:
            notes.append(f"kt_ops r={prob.R} layer construction failed: {type(exc).__name__}: {exc}")
            if args.verbose:
                traceback.print_exc()
        try:
            kt0, _ = make_kt_ops_layer(kt_ops, prob, 0, args.method)
        except Exception as exc:
            notes.append(f"kt_ops r=0 layer construction failed: {type(exc).__name__}: {exc}")
            if args.verbose:
                traceback.print_exc()
        if kt16 is not None and not lora_matched:
            notes.append("kt_ops LoRA parameter names/layouts not recognised: LoRA set to random values "
                         "that differ from the eager reference (rel-err rows for r=16 are not meaningful)")

    # --- kt-kernel
    # kt-kernel runs in a child process per pool size (its worker pool spins between calls
    # and would disturb every other measurement in this process); the child rebuilds the
    # identical random problem from the same seed.
    ktks = {}  # pool threads -> {"times": {q: [...]}, "out": {q: tensor}}
    ktk_note = None
    if args.skip_kt_kernel:
        ktk_note = "skipped (--skip-kt-kernel)"
    elif importlib.util.find_spec("kt_kernel") is None:
        ktk_note = "not installed"
    else:
        for kt_t in args.kt_kernel_threads:
            r = run_kt_kernel_child(args, kt_t)
            ktk_note = r.get("note", ktk_note)
            if r.get("error"):
                notes.append(f"kt-kernel ({kt_t} pool threads): {r['error']}")
            if r.get("times"):
                ktks[kt_t] = r
    res_notes = {"kt_kernel": ktk_note}

    def safe(q, key, fn):
        try:
            return fn()
        except Exception as exc:
            notes.append(f"qlen={q} {key}: {type(exc).__name__}: {exc}")
            if args.verbose:
                traceback.print_exc()
            return None

    for q in args.qlens:
        inp = prob.inputs[q]
        print(f"# measuring qlen={q} ...", file=sys.stderr, flush=True)

        # reference outputs (fp32 eager, single pass, also gives reference grads)
        xr = inp["x"].float().requires_grad_()
        wr = inp["w"].clone().requires_grad_()
        for t in eager.params():
            t.grad = None
        ref_y = eager.layer(xr, inp["ids"], wr, lora=True)
        ref_y.backward(inp["go"].float())
        ref = {"y": ref_y.detach(), "dx": xr.grad.detach().clone(), "dw": wr.grad.detach().clone(),
               "dlora": torch.cat([m[p].grad.reshape(-1) for p in PROJS for m in (eager.A, eager.B)])}
        with torch.no_grad():
            ref["y_nolora"] = eager.layer(inp["x"].float(), inp["ids"], inp["w"], lora=False)

        # ---- kt_ops forward r=16
        if kt16 is not None:
            x = inp["x"].clone()
            ids, w = inp["ids"], inp["w"].clone()

            def kt_fwd(layer=kt16, x=x, ids=ids, w=w):
                with torch.no_grad():
                    return layer(x, ids, w)

            out = safe(q, "kt_ops fwd", kt_fwd)
            if out is not None:
                errs[q]["kt_fwd_y"] = rel_err(out, ref["y"])
                res[q]["kt_fwd"] = safe(q, "kt_ops fwd", lambda: bench(kt_fwd, **bopts))

            # ---- kt_ops fwd+bwd r=16
            xg = inp["x"].clone().requires_grad_()
            wg = inp["w"].clone().requires_grad_()
            go = inp["go"]
            params = [p for p in kt16.parameters() if p.requires_grad]

            def zero():
                xg.grad = None
                wg.grad = None
                for p in params:
                    p.grad = None

            def kt_step(layer=kt16):
                y = layer(xg, ids, wg)
                y.backward(go)
                return y

            def first_step():
                zero()
                y = kt_step()
                errs[q]["kt_step_y"] = rel_err(y, ref["y"])
                if xg.grad is not None:
                    errs[q]["kt_dx"] = rel_err(xg.grad, ref["dx"])
                if wg.grad is not None:
                    errs[q]["kt_dw"] = rel_err(wg.grad, ref["dw"])
                if lora_matched:
                    gl = lora_grads(kt16, prob)
                    if gl is not None:
                        errs[q]["kt_dlora"] = rel_err(gl, ref["dlora"])
                return y

            if safe(q, "kt_ops fwd+bwd", first_step) is not None:
                res[q]["kt_step"] = safe(q, "kt_ops fwd+bwd", lambda: bench(kt_step, pre=zero, **bopts))

        # ---- kt_ops forward r=0
        if kt0 is not None:
            x0 = inp["x"].clone()
            w0 = inp["w"].clone()

            def kt0_fwd(layer=kt0, x=x0, w=w0, ids=inp["ids"]):
                with torch.no_grad():
                    return layer(x, ids, w)

            out = safe(q, "kt_ops fwd r=0", kt0_fwd)
            if out is not None:
                errs[q]["kt0_y"] = rel_err(out, ref["y_nolora"])
                res[q]["kt0_fwd"] = safe(q, "kt_ops fwd r=0", lambda: bench(kt0_fwd, **bopts))

        # ---- kt-kernel forward (one measurement per pool thread count)
        for kt_t, r in ktks.items():
            if q in r["times"]:
                res[q][f"ktk_fwd_{kt_t}"] = Timing(r["times"][q], r.get("others", {}).get(q))
            if q in r.get("out", {}):
                errs[q][f"ktk_y_{kt_t}"] = rel_err(r["out"][q], ref["y_nolora"])

        # ---- torch eager fp32 (LoRA)
        if not args.skip_eager and q <= args.eager_max_qlen:
            xe = inp["x"].float()
            we = inp["w"].clone()

            def eager_fwd():
                with torch.no_grad():
                    return eager.layer(xe, inp["ids"], we, lora=True)

            xeg = inp["x"].float().requires_grad_()
            weg = inp["w"].clone().requires_grad_()
            gof = inp["go"].float()

            def ezero():
                xeg.grad = None
                weg.grad = None
                for t in eager.params():
                    t.grad = None

            def eager_step():
                y = eager.layer(xeg, inp["ids"], weg, lora=True)
                y.backward(gof)

            res[q]["eager_fwd"] = safe(q, "eager fwd", lambda: bench(eager_fwd, **bopts))
            res[q]["eager_step"] = safe(q, "eager fwd+bwd", lambda: bench(eager_step, pre=ezero, **bopts))

            # ---- torch eager bf16 (LoRA): the same loop on bf16 tensors (oneDNN bf16 GEMMs)
            xb = inp["x"].clone().requires_grad_()
            wb = inp["w"].to(torch.bfloat16).requires_grad_()
            gob = inp["go"]

            def eager16_fwd():
                with torch.no_grad():
                    return eager16.layer(inp["x"], inp["ids"], wb.detach(), lora=True)

            def e16zero():
                xb.grad = None
                wb.grad = None
                for t in eager16.params():
                    t.grad = None

            def eager16_step():
                eager16.layer(xb, inp["ids"], wb, lora=True).backward(gob)

            res[q]["eager16_fwd"] = safe(q, "eager bf16 fwd", lambda: bench(eager16_fwd, **bopts))
            res[q]["eager16_step"] = safe(q, "eager bf16 fwd+bwd", lambda: bench(eager16_step, pre=e16zero, **bopts))

        # ---- transformers' experts bf16 (no LoRA)
        for impl, ex in hf.items():
            xh = inp["x"].clone().requires_grad_()
            wh = inp["w"].to(torch.bfloat16).requires_grad_()

            def hf_fwd(ex=ex):
                with torch.no_grad():
                    return ex(inp["x"], inp["ids"], wh.detach())

            def hf_zero():
                xh.grad = None
                wh.grad = None

            def hf_step(ex=ex):
                ex(xh, inp["ids"], wh).backward(inp["go"])

            res[q][f"hf_{impl}_fwd"] = safe(q, f"hf {impl} fwd", lambda: bench(hf_fwd, **bopts))
            res[q][f"hf_{impl}_step"] = safe(q, f"hf {impl} fwd+bwd", lambda: bench(hf_step, pre=hf_zero, **bopts))
        gc.collect()

    # free big objects before returning
    del kt16, kt0, ktks, eager, eager16, hf
    gc.collect()
    return res, errs, notes, res_notes


def run_scaling(args, kt_ops, prob, thread_list):
    bopts = dict(warmup=args.warmup, repeats=args.repeats, min_time=args.min_time,
                 max_repeats=args.max_repeats)
    layer, _ = make_kt_ops_layer(kt_ops, prob, prob.R, args.method)
    params = [p for p in layer.parameters() if p.requires_grad]
    res = {}  # res[(threads, q)] = {"fwd": Timing, "step": Timing}
    for q in args.qlens:
        inp = prob.inputs[q]
        x = inp["x"].clone()
        xg = inp["x"].clone().requires_grad_()
        wg = inp["w"].clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                return layer(x, inp["ids"], inp["w"])

        def zero():
            xg.grad = None
            wg.grad = None
            for p in params:
                p.grad = None

        def step():
            layer(xg, inp["ids"], wg).backward(inp["go"])

        for t in thread_list:
            print(f"# scaling: qlen={q} threads={t} ...", file=sys.stderr, flush=True)
            set_threads(t, kt_ops)
            res[(t, q)] = {"fwd": bench(fwd, **bopts), "step": bench(step, pre=zero, **bopts)}
    set_threads(args.threads, kt_ops)
    del layer
    gc.collect()
    return res


# ----------------------------------------------------------------------------------------
# printing
# ----------------------------------------------------------------------------------------
def fmt(v, spec="{:.2f}", none="-"):
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return none
    return spec.format(v)


def print_table(title, col_names, rows, label_w=None):
    """rows: list of (label, [cells]) or a string (section line)."""
    labels = [r[0] for r in rows if not isinstance(r, str)]
    lw = label_w or max([len(s) for s in labels] + [10])
    cw = max([len(c) for c in col_names] + [max((len(c) for r in rows if not isinstance(r, str)
                                                 for c in r[1]), default=8)]) + 2
    width = lw + cw * len(col_names)
    print(title)
    print("=" * width)
    print(f"{'':<{lw}}" + "".join(f"{c:>{cw}}" for c in col_names))
    print("-" * width)
    for r in rows:
        if isinstance(r, str):
            print(r)
            continue
        label, cells = r
        print(f"{label:<{lw}}" + "".join(f"{c:>{cw}}" for c in cells))
    print("=" * width)


def build_main_rows(args, prob, res, errs, peaks, ktk_note, kt_ops_status):
    qs = args.qlens
    peak = peaks.get("gemm", {}).get("best_gflops")
    peak16 = peaks.get("gemm_bf16", {}).get("best_gflops")
    bw = peaks.get("dram", {}).get("best_gbs")
    H, I, K = prob.H, prob.I, prob.K

    def flops(q, step=False):
        return 3 * 2 * H * I * q * K * (2 if step else 1)

    def t(q, key):
        r = res[q].get(key)
        return r.med if r is not None else None

    def ms(q, key):
        v = t(q, key)
        return v * 1e3 if v is not None else None

    def gf(q, key, step=False):
        v = t(q, key)
        return flops(q, step) / v / 1e9 if v else None

    def pct(a, b):
        return 100.0 * a / b if (a is not None and b) else None

    def ratio(a, b):
        return a / b if (a is not None and b) else None

    def wgbs(q, key, bpw=2):
        v = t(q, key)
        if not v:
            return None
        return prob.inputs[q]["hit"] * 3 * H * I * bpw / v / 1e9

    rows = []
    R = prob.R
    ms_spec = "{:.2f}"
    rows.append(("experts hit (distinct)", [str(prob.inputs[q]["hit"]) for q in qs]))
    rows.append(f"-- kt_ops ({kt_ops_status})")
    rows.append((f"kt_ops fwd r={R}  ms", [fmt(ms(q, "kt_fwd"), ms_spec) for q in qs]))
    rows.append(("  GFLOP/s", [fmt(gf(q, "kt_fwd"), "{:.1f}") for q in qs]))
    rows.append(("  % fp32 GEMM peak", [fmt(pct(gf(q, "kt_fwd"), peak), "{:.1f}%") for q in qs]))
    rows.append(("  % bf16 GEMM peak", [fmt(pct(gf(q, "kt_fwd"), peak16), "{:.1f}%") for q in qs]))
    rows.append(("  weight GB/s (bf16 bytes hit)", [fmt(wgbs(q, "kt_fwd"), "{:.1f}") for q in qs]))
    rows.append(("  % DRAM read BW", [fmt(pct(wgbs(q, "kt_fwd"), bw), "{:.1f}%") for q in qs]))
    rows.append(("kt_ops fwd r=0  ms", [fmt(ms(q, "kt0_fwd"), ms_spec) for q in qs]))
    rows.append(("  GFLOP/s", [fmt(gf(q, "kt0_fwd"), "{:.1f}") for q in qs]))
    rows.append(("  weight GB/s (bf16 bytes hit)", [fmt(wgbs(q, "kt0_fwd"), "{:.1f}") for q in qs]))
    rows.append((f"  LoRA r={R} overhead (fwd)",
                 [fmt(pct(t(q, "kt_fwd"), t(q, "kt0_fwd")) - 100.0 if (t(q, "kt_fwd") and t(q, "kt0_fwd")) else None,
                      "{:+.1f}%") for q in qs]))
    rows.append((f"kt_ops fwd+bwd r={R}  ms", [fmt(ms(q, "kt_step"), ms_spec) for q in qs]))
    rows.append(("  GFLOP/s", [fmt(gf(q, "kt_step", True), "{:.1f}") for q in qs]))
    rows.append(("  % fp32 GEMM peak", [fmt(pct(gf(q, "kt_step", True), peak), "{:.1f}%") for q in qs]))
    rows.append(("  bwd/fwd ratio ((f+b - f)/f)",
                 [fmt(ratio(t(q, "kt_step") - t(q, "kt_fwd"), t(q, "kt_fwd"))
                      if (t(q, "kt_step") and t(q, "kt_fwd")) else None, "{:.2f}") for q in qs]))
    rows.append(f"-- torch eager fp32 + LoRA r={R} (loop over hit experts, torch {torch.__version__})")
    rows.append(("eager fwd  ms", [fmt(ms(q, "eager_fwd"), ms_spec) for q in qs]))
    rows.append(("  GFLOP/s", [fmt(gf(q, "eager_fwd"), "{:.1f}") for q in qs]))
    rows.append(("  weight GB/s (fp32 bytes hit)", [fmt(wgbs(q, "eager_fwd", 4), "{:.1f}") for q in qs]))
    rows.append(("eager fwd+bwd  ms", [fmt(ms(q, "eager_step"), ms_spec) for q in qs]))
    rows.append(("  GFLOP/s", [fmt(gf(q, "eager_step", True), "{:.1f}") for q in qs]))
    rows.append(f"-- torch eager bf16 + LoRA r={R} (same loop, bf16 tensors)")
    rows.append(("eager bf16 fwd  ms", [fmt(ms(q, "eager16_fwd"), ms_spec) for q in qs]))
    rows.append(("eager bf16 fwd+bwd  ms", [fmt(ms(q, "eager16_step"), ms_spec) for q in qs]))
    rows.append(f"-- transformers Qwen3MoeExperts bf16, no LoRA (frozen experts; grads to x and topk_w)")
    for impl in ("eager", "grouped_mm"):
        rows.append((f"hf {impl} fwd  ms", [fmt(ms(q, f"hf_{impl}_fwd"), ms_spec) for q in qs]))
        rows.append((f"hf {impl} fwd+bwd  ms", [fmt(ms(q, f"hf_{impl}_step"), ms_spec) for q in qs]))
    rows.append(f"-- kt-kernel AVX2BF16_MOE fwd, no LoRA ({ktk_note})")
    kt_ts = args.kt_kernel_threads
    main_key = f"ktk_fwd_{kt_ts[0]}"
    if any(res[q].get(main_key) for q in qs):
        for kt_t in kt_ts:
            key = f"ktk_fwd_{kt_t}"
            rows.append((f"kt-kernel fwd ({kt_t} pool thr)  ms", [fmt(ms(q, key), ms_spec) for q in qs]))
            rows.append(("  GFLOP/s", [fmt(gf(q, key), "{:.1f}") for q in qs]))
            rows.append(("  weight GB/s (bf16 bytes hit)", [fmt(wgbs(q, key), "{:.1f}") for q in qs]))
    else:
        rows.append(("kt-kernel fwd  ms", ["not installed" if ktk_note == "not installed" else "n/a" for _ in qs]))
    rows.append(f"-- speedups (>1 means kt_ops faster; kt-kernel with {kt_ts[0]} pool threads)")
    rows.append((f"kt_ops fwd r={R} vs kt-kernel fwd", [fmt(ratio(t(q, main_key), t(q, "kt_fwd")), "{:.2f}x") for q in qs]))
    rows.append(("kt_ops fwd r=0 vs kt-kernel fwd", [fmt(ratio(t(q, main_key), t(q, "kt0_fwd")), "{:.2f}x") for q in qs]))
    rows.append((f"kt_ops fwd vs eager fwd", [fmt(ratio(t(q, "eager_fwd"), t(q, "kt_fwd")), "{:.2f}x") for q in qs]))
    rows.append((f"kt_ops f+b vs eager f+b", [fmt(ratio(t(q, "eager_step"), t(q, "kt_step")), "{:.2f}x") for q in qs]))
    peer_keys = ("eager_step", "eager16_step", "hf_eager_step", "hf_grouped_mm_step")

    def best_peer(q):
        ts = [t(q, key) for key in peer_keys if t(q, key)]
        return min(ts) if ts else None

    rows.append(("kt_ops f+b vs best torch/transformers f+b", [fmt(ratio(best_peer(q), t(q, "kt_step")), "{:.2f}x")
                                                             for q in qs]))
    rows.append("-- accuracy (mean|diff| / mean|ref|, ref = fp32 eager on the same bf16-rounded data)")
    rows.append((f"kt_ops r={R} fwd y", [fmt(errs[q].get("kt_fwd_y"), "{:.2e}") for q in qs]))
    rows.append((f"kt_ops r={R} f+b dX", [fmt(errs[q].get("kt_dx"), "{:.2e}") for q in qs]))
    rows.append((f"kt_ops r={R} f+b d(topk_w)", [fmt(errs[q].get("kt_dw"), "{:.2e}") for q in qs]))
    rows.append((f"kt_ops r={R} f+b dLoRA (all 6)", [fmt(errs[q].get("kt_dlora"), "{:.2e}") for q in qs]))
    rows.append(("kt_ops r=0 fwd y (ref no LoRA)", [fmt(errs[q].get("kt0_y"), "{:.2e}") for q in qs]))
    rows.append(("kt-kernel fwd y (ref no LoRA)", [fmt(errs[q].get(f"ktk_y_{kt_ts[0]}"), "{:.2e}") for q in qs]))
    rows.append("-- timing noise: max/min over repeats, n = repeats, o = % of CPUs used by other processes "
                "meanwhile ('!' if > 10%)")
    for key, lab in (("kt_fwd", "kt_ops fwd"), ("kt_step", "kt_ops f+b"), ("kt0_fwd", "kt_ops fwd r=0"),
                     *[(f"ktk_fwd_{kt_t}", f"kt-kernel fwd {kt_t}thr") for kt_t in kt_ts],
                     ("eager_fwd", "eager fwd"), ("eager_step", "eager f+b"),
                     ("eager16_fwd", "eager bf16 fwd"), ("eager16_step", "eager bf16 f+b"),
                     ("hf_eager_fwd", "hf eager fwd"), ("hf_eager_step", "hf eager f+b"),
                     ("hf_grouped_mm_fwd", "hf grouped_mm fwd"), ("hf_grouped_mm_step", "hf grouped_mm f+b")):
        cells = []
        for q in qs:
            r = res[q].get(key)
            if r is None:
                cells.append("-")
                continue
            o = "" if r.others is None else f" o={100 * r.others:.0f}%" + ("!" if r.others > 0.10 else "")
            cells.append(f"{r.max / r.min:.2f} n={len(r.times)}{o}")
        rows.append((f"  {lab}", cells))
    return rows


def print_header(args, prob, kt_ops, kt_ops_err, peaks):
    now = _dt.datetime.now().astimezone()
    print(f"kt_ops MoE+LoRA benchmark   {now.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible), "
          f"AVX2={'avx2' in cpu_flags()} FMA={'fma' in cpu_flags()} AVX512F={'avx512f' in cpu_flags()} "
          f"AMX-BF16={'amx_bf16' in cpu_flags()}")
    try:
        la = open('/proc/loadavg').read().split()[:3]
    except OSError:
        la = "?"
    busy = peaks.get("busy_before")
    busy_after = peaks.get("busy_after")
    print(f"load from other processes: {fmt(None if busy is None else 100 * busy, '{:.0f}%')} of all CPUs "
          f"busy just before the run, {fmt(None if busy_after is None else 100 * busy_after, '{:.0f}%')} just "
          f"after; loadavg {' '.join(la)}")
    o_run, o_worst = peaks.get("others_run"), peaks.get("others_worst")
    print(f"other processes used {fmt(None if o_run is None else 100 * o_run, '{:.0f}%')} of all CPUs during "
          f"the run (worst single measurement {fmt(None if o_worst is None else 100 * o_worst, '{:.0f}%')})")
    if ((busy or 0) > 0.15 or (busy_after or 0) > 0.15 or (o_run or 0) > 0.10 or (o_worst or 0) > 0.25):
        print("WARNING: other processes were using the CPU around or during this run; timings are unreliable.")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(torch threads {torch.get_num_threads()})")
    if kt_ops is not None:
        try:
            info = kt_ops.cpu_info()
        except Exception as exc:
            info = {"error": f"{type(exc).__name__}: {exc}"}
        ver = getattr(kt_ops, "__version__", None)
        if ver is None:
            try:
                from importlib.metadata import version
                ver = version("kt_ops")
            except Exception:
                ver = "(version unknown)"
        print(f"kt_ops {ver}: isa={info.get('isa')} available_isas={info.get('available_isas')} "
              f"num_threads={info.get('num_threads')} physical_cores={info.get('physical_cores')} "
              f"method={args.method}" + (f" (--isa {args.isa})" if args.isa else ""))
        if args.verbose:
            print(f"kt_ops cpu_info: {info}")
    else:
        print(f"kt_ops: NOT AVAILABLE ({kt_ops_err})")
    print(f"shape: E={prob.E} H={prob.H} I={prob.I} k={prob.K}  LoRA r={prob.R} alpha={prob.alpha} "
          f"(scale {prob.scale:g}), base weights bf16, hidden bf16; qlens={args.qlens}")
    print(f"threads={args.threads}  warmup={args.warmup}  repeats>={args.repeats} "
          f"(up to {args.max_repeats} for calls shorter than {args.min_time:g}s/repeats), median reported")
    g = peaks.get("gemm")
    d = peaks.get("dram")
    if g:
        print(f"machine fp32 GEMM peak (torch.mm {g['n']}^3, {args.threads} thr): best {g['best_gflops']:.1f} "
              f"GFLOP/s, median {g['median_gflops']:.1f}  -> '% peak' uses best")
    g16 = peaks.get("gemm_bf16")
    if g16:
        print(f"machine bf16 GEMM peak (torch.mm {g16['n']}^3, {args.threads} thr): best {g16['best_gflops']:.1f} "
              f"GFLOP/s, median {g16['median_gflops']:.1f}")
    if d:
        print(f"machine DRAM read BW (torch.sum over {d['bytes'] / 2**30:.2f} GiB fp32, {args.threads} thr): "
              f"best {d['best_gbs']:.1f} GB/s, median {d['median_gbs']:.1f}  -> '% DRAM' uses best")
    print("FLOPs: base only; fwd = 3*2*H*I*qlen*k, fwd+bwd = 2*fwd (frozen base weights); "
          "weight GB/s = distinct experts hit * 3*H*I*bytes / time")
    print()


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlens", type=str, default=None, help="comma-separated qlens (default 1,32,128,512)")
    ap.add_argument("--experts", "-E", type=int, default=None, help="number of experts (default 64)")
    ap.add_argument("--hidden", "-H", type=int, default=None, help="hidden size (default 2048)")
    ap.add_argument("--intermediate", "-I", type=int, default=None, help="expert intermediate size (default 1408)")
    ap.add_argument("--topk", "-k", type=int, default=None, help="experts per token (default 6)")
    ap.add_argument("--rank", "-r", type=int, default=None, help="LoRA rank (default 16)")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 32)")
    ap.add_argument("--threads", type=int, default=None, help="threads for kt_ops, torch and kt-kernel (default 2)")
    ap.add_argument("--isa", type=str, default=None, help="force a kt_ops ISA via kt_ops.set_isa()")
    ap.add_argument("--method", type=str, default="AMXBF16_SFT", help="kt_ops KTMoELayer method (default AMXBF16_SFT)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls per measurement (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="minimum timed repeats (default 5)")
    ap.add_argument("--max-repeats", type=int, default=None, help="maximum timed repeats for fast calls (default 30)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="aim for at least this many seconds of timed calls per measurement (default 1.0)")
    ap.add_argument("--quick", action="store_true",
                    help="small smoke-test shape (E=8 H=512 I=256 k=2 r=8, qlens 1,8,32), < 1 minute")
    ap.add_argument("--scaling", action="store_true",
                    help="thread-scaling mode: kt_ops fwd and fwd+bwd at each of --scaling-threads")
    ap.add_argument("--scaling-threads", type=str, default="1,2", help="thread counts for --scaling (default 1,2)")
    ap.add_argument("--skip-eager", action="store_true", help="skip the torch eager timings")
    ap.add_argument("--eager-max-qlen", type=int, default=1 << 30, help="only time torch eager up to this qlen")
    ap.add_argument("--skip-kt-kernel", action="store_true", help="skip kt-kernel even if installed")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers' Qwen3MoeExperts (eager, grouped_mm)")
    ap.add_argument("--kt-kernel-threads", type=str, default=None,
                    help="comma-separated kt-kernel worker-pool sizes to measure (default: --threads); "
                         "the first one is used for the speedup row")
    ap.add_argument("--no-peak", action="store_true", help="skip the GEMM-peak / DRAM-bandwidth measurements")
    ap.add_argument("--gemm-n", type=int, default=None, help="GEMM size for the peak measurement (default 2048)")
    ap.add_argument("--bw-gib", type=float, default=None, help="tensor size in GiB for the DRAM BW measurement (default 1)")
    ap.add_argument("--settle", type=float, default=0.2,
                    help="seconds to sleep before each measurement so other worker pools go idle")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="wait up to this many seconds for other processes to leave the CPUs idle first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_kt-kernel-worker", dest="_kt_kernel_worker", type=int, default=None,
                    help=argparse.SUPPRESS)
    ap.add_argument("--_out", dest="_out", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=str, default=None, help="also write all raw timings to this JSON file")
    ap.add_argument("--verbose", "-v", action="store_true")
    a = ap.parse_args(argv)

    if a.quick:
        d = dict(qlens="1,8,32", experts=8, hidden=512, intermediate=256, topk=2, rank=8, alpha=16.0,
                 warmup=2, repeats=3, max_repeats=10, min_time=0.1, gemm_n=1024, bw_gib=0.25)
    else:
        d = dict(qlens="1,32,128,512", experts=64, hidden=2048, intermediate=1408, topk=6, rank=16, alpha=32.0,
                 warmup=2, repeats=5, max_repeats=30, min_time=1.0, gemm_n=2048, bw_gib=1.0)
    d["threads"] = 2
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.qlens = [int(s) for s in str(a.qlens).split(",") if s.strip()]
    a.scaling_threads = [int(s) for s in str(a.scaling_threads).split(",") if s.strip()]
    if a.kt_kernel_threads is None:
        a.kt_kernel_threads = str(a.threads)
    a.kt_kernel_threads = [int(s) for s in str(a.kt_kernel_threads).split(",") if s.strip()]
    if a.topk > a.experts:
        ap.error("--topk must be <= --experts")
    return a


def main(argv=None):
    global SETTLE_S
    args = parse_args(argv)
    SETTLE_S = max(0.0, args.settle)
    torch.manual_seed(args.seed)
    if args._kt_kernel_worker is not None:
        return kt_kernel_child_main(args)

    kt_ops, kt_ops_err = import_kt_ops()
    if kt_ops is not None and args.isa:
        kt_ops.set_isa(args.isa)
    set_threads(args.threads, kt_ops)

    if args.wait_idle > 0:
        print(f"# waiting up to {args.wait_idle:g}s for the CPUs to go idle ...", file=sys.stderr, flush=True)
        if not wait_until_idle(args.wait_idle):
            print("# machine did not go idle; running anyway", file=sys.stderr, flush=True)
    peaks = {"busy_before": cpu_busy_fraction(1.0)}
    snap_start = cpu_snapshot()

    def finish_load_stats(timings):
        peaks["others_run"] = others_fraction(snap_start, cpu_snapshot())
        os_ = [t.others for t in timings if t is not None and t.others is not None]
        peaks["others_worst"] = max(os_) if os_ else None
        peaks["busy_after"] = cpu_busy_fraction(1.0)

    if not args.no_peak:
        print("# measuring fp32 and bf16 GEMM peaks and DRAM bandwidth ...", file=sys.stderr, flush=True)
        peaks["gemm"] = measure_gemm_peak(args.gemm_n)
        peaks["gemm_bf16"] = measure_gemm_peak(args.gemm_n, dtype=torch.bfloat16)
        peaks["dram"] = measure_dram_bw(int(args.bw_gib * 2 ** 30))

    print("# generating random problem ...", file=sys.stderr, flush=True)
    prob = Problem(args.experts, args.hidden, args.intermediate, args.topk, args.rank, args.alpha,
                   args.qlens, seed=args.seed)

    t_start = time.time()
    out_json = {"args": vars(args), "peaks": peaks, "cpu": cpu_model(),
                "date": _dt.datetime.now().astimezone().isoformat(),
                "torch": torch.__version__}
    if kt_ops is not None:
        try:
            out_json["kt_ops_cpu_info"] = {k: (v if isinstance(v, (str, int, float, bool, list, dict)) else str(v))
                                           for k, v in kt_ops.cpu_info().items()}
        except Exception as exc:
            out_json["kt_ops_cpu_info"] = str(exc)

    if args.scaling:
        if kt_ops is None:
            print_header(args, prob, kt_ops, kt_ops_err, peaks)
            print(f"kt_ops not importable ({kt_ops_err}); nothing to scale.")
            return 1
        try:
            res = run_scaling(args, kt_ops, prob, args.scaling_threads)
        except Exception as exc:
            print_header(args, prob, kt_ops, kt_ops_err, peaks)
            if args.verbose:
                traceback.print_exc()
            print(f"kt_ops scaling run failed: {type(exc).__name__}: {exc}")
            return 1
        finish_load_stats([tm for d in res.values() for tm in d.values()])
        print_header(args, prob, kt_ops, kt_ops_err, peaks)
        H, I, K = prob.H, prob.I, prob.K
        cols = [f"qlen={q}" for q in args.qlens]
        rows = []
        base_t = args.scaling_threads[0]
        for kind, lab, mult in (("fwd", f"kt_ops fwd r={prob.R}", 1), ("step", f"kt_ops fwd+bwd r={prob.R}", 2)):
            rows.append(f"-- {lab}")
            for t in args.scaling_threads:
                rows.append((f"{t} thr  ms", [fmt(res[(t, q)][kind].med * 1e3) for q in args.qlens]))
                rows.append((f"{t} thr  GFLOP/s", [fmt(3 * 2 * H * I * q * K * mult / res[(t, q)][kind].med / 1e9, "{:.1f}")
                                                   for q in args.qlens]))
            for t in args.scaling_threads[1:]:
                rows.append((f"speedup {t} vs {base_t} thr",
                             [fmt(res[(base_t, q)][kind].med / res[(t, q)][kind].med, "{:.2f}x") for q in args.qlens]))
                rows.append((f"parallel efficiency {t} thr",
                             [fmt(100.0 * res[(base_t, q)][kind].med / res[(t, q)][kind].med * base_t / t, "{:.0f}%")
                              for q in args.qlens]))
            for t in args.scaling_threads:
                cells = []
                for q in args.qlens:
                    r = res[(t, q)][kind]
                    o = "" if r.others is None else f" o={100 * r.others:.0f}%" + ("!" if r.others > 0.10 else "")
                    cells.append(f"{r.max / r.min:.2f}{o}")
                rows.append((f"{t} thr  noise max/min, other load", cells))
        print_table("kt_ops thread scaling (median ms)", cols, rows)
        out_json["scaling"] = {f"{t}thr_q{q}": {k: v.as_dict() for k, v in d.items()} for (t, q), d in res.items()}
    else:
        print("# building layers ...", file=sys.stderr, flush=True)
        res, errs, notes, rnotes = run_main(args, kt_ops, kt_ops_err, prob, peaks)
        finish_load_stats([tm for q in args.qlens for tm in res[q].values()])
        print_header(args, prob, kt_ops, kt_ops_err, peaks)
        status = "not importable" if kt_ops is None else f"isa={kt_ops.cpu_info().get('isa')}"
        rows = build_main_rows(args, prob, res, errs, peaks, rnotes["kt_kernel"], status)
        print_table(f"MoE layer E={prob.E} H={prob.H} I={prob.I} k={prob.K} LoRA r={prob.R}, "
                    f"{args.threads} threads, median ms", [f"qlen={q}" for q in args.qlens], rows)
        if kt_ops is None:
            print(f"note: kt_ops not importable: {kt_ops_err}")
        for n in notes:
            print(f"note: {n}")
        out_json["results"] = {str(q): {k: v.as_dict() for k, v in res[q].items() if v is not None}
                               for q in args.qlens}
        out_json["rel_err"] = {str(q): errs[q] for q in args.qlens}
        out_json["notes"] = notes + [f"kt_kernel: {rnotes['kt_kernel']}"]
    print(f"(benchmark body took {time.time() - t_start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out_json, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
