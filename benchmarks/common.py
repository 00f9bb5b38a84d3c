"""What the benchmark scripts share: standard shapes, one timing helper, the machine (CPU model and
flags, other processes' load, GEMM and DRAM ceilings), a random problem, kt-kernel set-up, child
processes and table printing.

The scripts import it as `common` (python puts a script's own folder first on sys.path); run them
from the repository root with kt_ops importable (the .venv's editable install, or PYTHONPATH=.).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from kt_ops.core.formats import LORA_NAMES, PROJECTIONS, lora_shapes


# ---- standard shapes ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    E: int  # experts
    H: int  # hidden size
    I: int  # expert intermediate size
    k: int  # experts per token
    r: int  # LoRA rank
    alpha: float = 32.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r if self.r else 0.0

    def __str__(self) -> str:
        return f"E={self.E} H={self.H} I={self.I} k={self.k} r={self.r}"

    def flops(self, qlen: int, backward: bool = False) -> int:
        """Base-weight FLOPs (LoRA's are not counted): 3 GEMMs of 2*H*I per routed token; a backward
        doubles them (frozen base weights: only dX is needed)."""
        return 3 * 2 * self.H * self.I * qlen * self.k * (2 if backward else 1)

    def expert_bytes(self, experts: int, bytes_per_weight: int = 2) -> int:
        return experts * 3 * self.H * self.I * bytes_per_weight


DSV2_LITE = Shape(E=64, H=2048, I=1408, k=6, r=16, alpha=32.0)  # DeepSeek-V2-Lite's MoE layer: the default
QUICK = Shape(E=8, H=512, I=256, k=2, r=8, alpha=16.0)  # --quick: a smoke run, not numbers to quote


def parse_ints(text: str) -> List[int]:
    return [int(s) for s in str(text).split(",") if s.strip()]


# ---- the machine -------------------------------------------------------------------------------------


def _cpuinfo_field(name: str) -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> set:
    return set((_cpuinfo_field("flags") or "").split())


def has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16): without it torch's bf16 mm is
    a slow fallback, and kt_ops multiplies in fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def set_threads(n: int) -> None:
    """n threads for torch and for kt_ops' worker pool."""
    import kt_ops

    torch.set_num_threads(n)
    kt_ops.set_num_threads(n)


def machine_line() -> str:
    """The CPU, its ISA flags, the kt_ops kernel ISA and the threads: printed beside every table."""
    flags = cpu_flags()
    isa_flags = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    try:
        import kt_ops

        kt = f"kt_ops isa={kt_ops.get_isa()} ({kt_ops.get_num_threads()} threads)"
    except Exception as exc:  # noqa: BLE001 - the header still prints when kt_ops does not import
        kt = f"kt_ops not importable ({type(exc).__name__}: {exc})"
    return (
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, CPU {cpu_model()} ({os.cpu_count()} logical "
        f"CPUs; {isa_flags or 'no AVX2'}), {kt}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def proc_status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# ---- other processes' load (the machine is shared) --------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


_live_children: List[int] = []


def count_as_own(pid: int) -> None:
    """The CPU time of a child that runs beside this process (bench_formats' --baseline build, which
    only runs while this one waits) counts as this process's own, not as other processes' load: a
    child's time reaches os.times() only once it has been waited for."""
    _live_children.append(pid)


def _live_children_ticks() -> int:
    ticks = 0
    for pid in _live_children:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the line)
        except (OSError, IndexError, ValueError):  # gone (then counted by os.times) or unreadable
            pass
    return ticks


def cpu_snapshot():
    """(total jiffies, busy jiffies) of the whole machine and this process's own CPU jiffies (with its
    children's, e.g. a kt-kernel child, and those of live children registered by count_as_own), or
    None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    total = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    t = os.times()
    own = (t.user + t.system + t.children_user + t.children_system) * _CLK_TCK + _live_children_ticks()
    return total, total - idle, own


def others_fraction(a, b) -> Optional[float]:
    """Share of all CPUs that OTHER processes used between snapshots a and b."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    return min(1.0, max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0])))


def cpu_busy_fraction(interval: float = 1.0) -> Optional[float]:
    """Share of all CPUs busy during `interval` seconds while this process sleeps: others' load."""
    a = cpu_snapshot()
    time.sleep(interval)
    return others_fraction(a, cpu_snapshot())


def wait_until_idle(max_wait: float, threshold: float = 0.10, quiet_samples: int = 3, sample_s: float = 2.0) -> bool:
    """Wait until other processes leave the CPUs idle (`quiet_samples` samples in a row below
    `threshold`) or `max_wait` seconds pass; True if the machine went quiet."""
    end, quiet = time.time() + max_wait, 0
    while time.time() < end:
        busy = cpu_busy_fraction(sample_s)
        quiet = quiet + 1 if busy is not None and busy < threshold else 0
        if quiet >= quiet_samples:
            return True
    return False


def _pct(v: Optional[float]) -> str:
    return "?" if v is None else f"{100 * v:.0f}%"


class LoadWatch:
    """Other processes' CPU use just before a run, during it, in its worst single measurement and just
    after; `lines()` says it, with a warning when the timings are unreliable."""

    def __init__(self, wait_idle: float = 0.0):
        if wait_idle > 0:
            print(f"# waiting up to {wait_idle:g}s for the CPUs to go idle ...", file=sys.stderr, flush=True)
            if not wait_until_idle(wait_idle):
                print("# machine did not go idle; running anyway", file=sys.stderr, flush=True)
        self.before = cpu_busy_fraction(1.0)
        self.start = cpu_snapshot()
        self.run = self.worst = self.after = None

    def finish(self, timings: Sequence[Optional["Timing"]] = ()) -> "LoadWatch":
        self.run = others_fraction(self.start, cpu_snapshot())
        others = [t.others for t in timings if t is not None and t.others is not None]
        self.worst = max(others) if others else None
        self.after = cpu_busy_fraction(1.0)
        return self

    def lines(self) -> List[str]:
        out = [
            f"load from other processes: {_pct(self.before)} of all CPUs busy just before the run, "
            f"{_pct(self.after)} just after; loadavg {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
            f"other processes used {_pct(self.run)} of all CPUs during the run (worst single measurement "
            f"{_pct(self.worst)})",
        ]
        if (self.before or 0) > 0.15 or (self.after or 0) > 0.15 or (self.run or 0) > 0.10 or (self.worst or 0) > 0.25:
            out.append("WARNING: other processes were using the CPU around or during this run; timings are unreliable.")
        return out

    def as_dict(self) -> dict:
        return {
            "busy_before": self.before,
            "busy_after": self.after,
            "others_run": self.run,
            "others_worst": self.worst,
        }


# ---- timing ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Seconds of every timed call, the share of all CPUs other processes used meanwhile and the minor
    page faults of the timed calls (memory taken fresh from the OS)."""

    times: List[float]
    others: Optional[float] = None
    minor_faults: int = 0

    @property
    def med(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def noise(self) -> str:
        """max/min over the repeats, their number, and other processes' load ('!' above 10 %)."""
        o = "" if self.others is None else f" o={100 * self.others:.0f}%" + ("!" if self.others > 0.10 else "")
        return f"{self.max / self.min:.2f} n={len(self.times)}{o}"

    def as_dict(self) -> dict:
        return {
            "median_s": self.med,
            "min_s": self.min,
            "max_s": self.max,
            "n": len(self.times),
            "others_cpu_fraction": self.others,
            "minor_faults": self.minor_faults,
        }


def measure_alternating(
    fns: Sequence[Callable],
    warmup: int = 1,
    repeats: int = 5,
    min_time: float = 0.0,
    max_repeats: Optional[int] = None,
    pres: Optional[Sequence[Optional[Callable]]] = None,
    settle: float = 0.0,
    returns_seconds: bool = False,
) -> List[Timing]:
    """Time every fn of `fns`, called in turn, the order reversed every other round, so that all see the
    same load and none always runs right after another: `warmup` untimed rounds, then `repeats` timed
    rounds, or more (up to `max_repeats`) when a round is short, so that about `min_time` seconds are
    timed. `pres[i]` runs untimed before every call of fns[i]. `settle` seconds of sleep first let the
    previous measurement's worker threads go idle. With `returns_seconds` each fn returns its own
    seconds (e.g. timed in a child process) instead of being timed around the call."""
    pres = list(pres) if pres is not None else [None] * len(fns)

    def call(i: int) -> float:
        if pres[i] is not None:
            pres[i]()
        t0 = time.perf_counter()
        got = fns[i]()
        return got if returns_seconds else time.perf_counter() - t0

    if settle > 0:
        time.sleep(settle)
    order = list(range(len(fns)))
    best = [math.inf] * len(fns)
    for rnd in range(warmup):
        for i in order if rnd % 2 else order[::-1]:
            best[i] = min(best[i], call(i))
    n = repeats
    if warmup and max_repeats and min_time > 0:
        n = max(repeats, min(max_repeats, math.ceil(min_time / max(max(best), 1e-9))))
    times: List[List[float]] = [[] for _ in fns]
    snap = cpu_snapshot()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for rnd in range(n):
        for i in order if rnd % 2 else order[::-1]:
            times[i].append(call(i))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    others = others_fraction(snap, cpu_snapshot())
    return [Timing(ts, others, faults) for ts in times]


def measure(fn: Callable, pre: Optional[Callable] = None, **kwargs) -> Timing:
    """measure_alternating for one fn."""
    return measure_alternating([fn], pres=[pre], **kwargs)[0]


# ---- machine ceilings --------------------------------------------------------------------------------


def gemm_peak(n: int, dtype=torch.float32, repeats: int = 10) -> dict:
    """torch.mm n^3 (oneDNN / MKL pick the best ISA) with the current torch threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    t = measure(lambda: torch.mm(a, b, out=c), warmup=3, repeats=repeats)
    return {"n": n, "best_gflops": 2.0 * n**3 / t.min / 1e9, "median_gflops": 2.0 * n**3 / t.med / 1e9}


def dram_read_bw(nbytes: int, repeats: int = 7) -> dict:
    """torch.sum over an fp32 tensor of `nbytes`, far larger than the caches."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    t = measure(x.sum, warmup=2, repeats=repeats)
    return {"bytes": x.numel() * 4, "best_gbs": x.numel() * 4 / t.min / 1e9, "median_gbs": x.numel() * 4 / t.med / 1e9}


def ceilings(gemm_n: int, dram_bytes: int) -> dict:
    """fp32 and bf16 GEMM peaks and DRAM read bandwidth with the current torch threads."""
    print("# measuring fp32 and bf16 GEMM peaks and DRAM bandwidth ...", file=sys.stderr, flush=True)
    # Without native bf16 products torch's bf16 mm is a slow fallback (one thread on a Zen 3: over 30 s
    # per 2048^3 call), and the ceiling means nothing there: an n/4 product shows that it is slow.
    native_bf16 = has_native_bf16()
    bf16_n = gemm_n if native_bf16 else max(gemm_n // 4, 64)
    return {
        "gemm": gemm_peak(gemm_n),
        "gemm_bf16": gemm_peak(bf16_n, torch.bfloat16, repeats=10 if native_bf16 else 3),
        "dram": dram_read_bw(dram_bytes),
    }


def ceiling_lines(peaks: dict) -> List[str]:
    out = []
    for key, what in (("gemm", "fp32 GEMM peak"), ("gemm_bf16", "bf16 GEMM peak")):
        if key in peaks:
            g = peaks[key]
            out.append(
                f"machine {what} (torch.mm {g['n']}^3, {torch.get_num_threads()} thr): best "
                f"{g['best_gflops']:.1f} GFLOP/s, median {g['median_gflops']:.1f}"
                + ("  -> '% peak' uses best" if key == "gemm" else "")
            )
    if "dram" in peaks:
        d = peaks["dram"]
        out.append(
            f"machine DRAM read BW (torch.sum over {d['bytes'] / 2**30:.2f} GiB fp32, {torch.get_num_threads()} "
            f"thr): best {d['best_gbs']:.1f} GB/s, median {d['median_gbs']:.1f}  -> '% DRAM' uses best"
        )
    return out


# ---- the random problem ------------------------------------------------------------------------------


@dataclasses.dataclass
class Routed:
    x: torch.Tensor  # [q, H] bf16 hidden states
    ids: torch.Tensor  # [q, k] int64, k distinct experts per token
    w: torch.Tensor  # [q, k] fp32 routing weights (softmax)
    go: torch.Tensor  # [q, H] bf16 output gradient
    hit: int  # distinct experts routed to


def random_lora(shape: Shape, gen: torch.Generator, dtype=torch.bfloat16):
    """LoRA factors in LORA_NAMES order, bf16-valued: A ~ N(0, 1/in), B ~ N(0, 0.02^2), nonzero so that
    LoRA's work and gradients are real."""
    return tuple(
        (torch.randn(*s, generator=gen) * (s[2] ** -0.5 if name.endswith("_a") else 0.02)).to(torch.bfloat16).to(dtype)
        for name, s in zip(LORA_NAMES, lora_shapes(shape.E, shape.H, shape.I, shape.r))
    )


def random_routed(shape: Shape, q: int, gen: torch.Generator) -> Routed:
    """q tokens, each routed to k distinct experts."""
    x = torch.randn(q, shape.H, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(shape.E, generator=gen)[: shape.k] for _ in range(q)]).to(torch.int64)
    w = torch.softmax(torch.randn(q, shape.k, generator=gen), -1).float()
    go = torch.randn(q, shape.H, generator=gen).to(torch.bfloat16)
    return Routed(x, ids.contiguous(), w.contiguous(), go, int(ids.unique().numel()))


class Problem:
    """bf16 base weights (gate, up, down) ~ N(0, 0.02^2), random_lora and random_routed inputs per qlen.
    The same shape, qlens and seed give the same tensors in every process."""

    def __init__(self, shape: Shape, qlens: Sequence[int] = (), seed: int = 0):
        self.shape = shape
        E, H, I = shape.E, shape.H, shape.I
        g = torch.Generator().manual_seed(seed)
        self.gate, self.up, self.down = (
            (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16) for s in ((E, I, H), (E, I, H), (E, H, I))
        )
        self.lora = random_lora(shape, g)
        self.inputs: Dict[int, Routed] = {q: random_routed(shape, q, g) for q in qlens}

    @property
    def weights(self):
        return self.gate, self.up, self.down

    def release_weights(self) -> None:
        """Frees the bf16 base weights once they are packed where they are needed."""
        self.gate = self.up = self.down = None

    def layer(self, method: str = "AMXBF16_SFT", rank: Optional[int] = None, **kwargs):
        """A kt_ops.KTMoELayer holding these weights and LoRA (rank 0: none)."""
        import kt_ops

        s = self.shape
        rank = s.r if rank is None else rank
        layer = kt_ops.KTMoELayer(s.E, s.H, s.I, lora_rank=rank, lora_alpha=s.alpha, method=method, **kwargs)
        layer.load_weights_from_tensors(*self.weights)
        if rank:
            with torch.no_grad():
                for name, t in zip(LORA_NAMES, self.lora):
                    getattr(layer, name).copy_(t)
        return layer


def add_layer_args(parser, qlens: str, repeats_help: str) -> None:
    """The command line of the single-layer scripts: threads, qlens, repeats, shape, --quick."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qlens", default=qlens)
    parser.add_argument("--repeats", type=int, default=0, help=repeats_help)
    parser.add_argument("--shape", default="{0.E},{0.H},{0.I},{0.k},{0.r}".format(DSV2_LITE), help="E,H,I,k,r")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK}, qlens 1,32, 5 repeats: a smoke run")


def layer_problem(args) -> "Problem":
    """The Problem add_layer_args' arguments describe (--quick also sets qlens 1,32 and 5 repeats)."""
    if args.quick:
        args.qlens, args.repeats = "1,32", 5
    return Problem(QUICK if args.quick else Shape(*parse_ints(args.shape)), parse_ints(args.qlens))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """mean|out - ref| / mean|ref|."""
    out, ref = out.detach().float(), ref.detach().float()
    den = ref.abs().mean().item()
    if den == 0.0:
        return float("nan") if out.abs().mean().item() != 0 else 0.0
    return (out - ref).abs().mean().item() / den


# ---- kt-kernel (optional; pip install --no-deps kt-kernel==0.7.2) ------------------------------------


def load_kt_kernel():
    """(kt-kernel's extension module, a note saying which) or (None, why not). Installed with --no-deps,
    `import kt_kernel` fails on its missing Python extras; the AVX2 module is then loaded directly."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("kt_kernel")
    if spec is None:
        return None, "not installed"
    try:
        import kt_kernel

        ext = kt_kernel.kt_kernel_ext
        return ext, f"kt_kernel {getattr(kt_kernel, '__version__', '?')} variant={getattr(ext, '__cpu_variant__', '?')}"
    except Exception as exc:  # noqa: BLE001
        first = f"{type(exc).__name__}: {exc}"
    paths = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "_kt_kernel_ext_avx2.*.so")))
    if not paths:
        return None, f"import kt_kernel failed ({first}); no AVX2 extension found"
    try:
        ext_spec = importlib.util.spec_from_file_location("kt_kernel_ext", paths[0])
        ext = importlib.util.module_from_spec(ext_spec)
        ext_spec.loader.exec_module(ext)
        from importlib.metadata import version

        return (
            ext,
            f"kt-kernel {version('kt-kernel')} AVX2 extension loaded directly (`import kt_kernel` failed: {first})",
        )
    except Exception as exc:  # noqa: BLE001
        return None, f"import failed: {first}; direct load failed: {type(exc).__name__}: {exc}"


class quiet_stdout:
    """Silences C/C++ writes to fd 1 (kt-kernel prints banners on construction and destruction)."""

    def __enter__(self):
        sys.stdout.flush()
        self.saved, self.null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 1)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)
        os.close(self.null)
        return False


def kt_kernel_moe(
    ext,
    threads: int,
    cls_name: str,
    shape: Shape,
    max_len: int,
    weights: dict,
    scales: Optional[dict] = None,
    bits: Optional[int] = None,
    group_size: int = 128,
):
    """kt-kernel's MoE class `cls_name` over per-expert tensors (weights[p] / scales[p]: E tensors for p in
    gate, up, down) with a `threads`-thread worker pool. Returns (cpu, moe, keep): `keep` holds what
    kt-kernel points into and must outlive moe."""
    pool = ext.WorkerPoolConfig()
    pool.subpool_count, pool.subpool_numa_map, pool.subpool_thread_count = 1, [0], [threads]
    cpu = ext.CPUInfer(pool)
    E = shape.E
    mask = torch.zeros(E, dtype=torch.bool)
    config = ext.moe.MOEConfig(E, shape.k, shape.H, shape.I, mask.data_ptr())
    config.layer_idx, config.pool, config.max_len = 0, cpu.backend_, max(max_len, 1)
    for p in PROJECTIONS:
        setattr(config, p + "_projs", [[t.data_ptr() for t in weights[p]]])
        setattr(config, p + "_scales", [[s.data_ptr() for s in scales[p]]] if scales else [[0] * E])
    if bits is not None:
        config.quant_config.bits, config.quant_config.group_size, config.quant_config.zero_point = (
            bits,
            group_size,
            False,
        )
    moe = getattr(ext.moe, cls_name)(config)
    order = torch.arange(E, dtype=torch.int64)
    cpu.submit(moe.load_weights_task(order.data_ptr()))
    cpu.sync()
    return cpu, moe, (mask, config, order, weights, scales)


def time_kt_kernel(
    ext,
    threads: int,
    cls_name: str,
    shape: Shape,
    inputs: Dict[int, "Routed"],
    weights: dict,
    scales: Optional[dict] = None,
    bits: Optional[int] = None,
    **measure_kwargs,
) -> Dict[int, tuple]:
    """{qlen: (Timing, output)} of kt-kernel's forward (kt_kernel_moe's arguments) on every input; run it in
    a child process: kt-kernel's worker pool keeps spinning after each call and would slow other work."""
    with quiet_stdout():
        cpu, moe, keep = kt_kernel_moe(ext, threads, cls_name, shape, max(inputs), weights, scales, bits)
    got = {}
    for q, inp in inputs.items():
        print(f"# kt-kernel {cls_name} ({threads} pool threads) qlen={q} ...", file=sys.stderr, flush=True)
        run = kt_kernel_forward(cpu, moe, inp.x, inp.ids, inp.w)
        out = run().clone()
        got[q] = measure(run, **measure_kwargs), out
    with quiet_stdout():
        del cpu, moe, keep
    return got


def kt_kernel_forward(cpu, moe, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A call running one kt-kernel forward (x bf16 [q, H], ids int64 [q, k], w fp32 [q, k]); it returns
    the bf16 output, one buffer reused by every call."""
    x, ids, w = x.contiguous(), ids.to(torch.int64).contiguous(), w.float().contiguous()
    out = torch.empty_like(x)
    size = torch.tensor([x.shape[0]], dtype=torch.int32)

    def run():
        cpu.submit(
            moe.forward_task(
                size.data_ptr(), ids.shape[1], ids.data_ptr(), w.data_ptr(), x.data_ptr(), out.data_ptr(), False
            )
        )
        cpu.sync()
        return out

    return run


# ---- child processes ---------------------------------------------------------------------------------


class ChildFailed(RuntimeError):
    def __init__(self, returncode: int, stderr: str):
        lines = stderr.strip().splitlines()
        super().__init__(f"child exited with {returncode}: {lines[-1] if lines else '(no stderr)'}")
        self.stderr = stderr


def run_child(argv: Sequence[str], timeout: Optional[float] = None, env: Optional[dict] = None) -> dict:
    """Run `python argv...` (a script's child mode, e.g. to give kt-kernel's spinning worker pool or a
    peak-RSS measurement a process of its own) and return the JSON object on the last line of its stdout
    that starts with '{'. Raises ChildFailed (with the child's stderr) when it fails."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise ChildFailed(out.returncode, out.stderr)
    sys.stderr.write("".join(line + "\n" for line in out.stderr.splitlines() if line.startswith("# ")))
    return json.loads(lines[-1])


# ---- printing ----------------------------------------------------------------------------------------


def fmt(v, spec: str = "{:.2f}", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return none
    return spec.format(v)


def print_table(title: str, col_names: Sequence[str], rows: Sequence) -> None:
    """A fixed-width table: rows are (label, [cells]) or a string (a section line)."""
    cells = [r for r in rows if not isinstance(r, str)]
    lw = max([len(r[0]) for r in cells] + [10])
    cw = max([len(c) for c in col_names] + [len(c) for r in cells for c in r[1]]) + 2
    width = lw + cw * len(col_names)
    print(f"{title}\n{'=' * width}\n{'':<{lw}}" + "".join(f"{c:>{cw}}" for c in col_names) + f"\n{'-' * width}")
    for r in rows:
        print(r if isinstance(r, str) else f"{r[0]:<{lw}}" + "".join(f"{c:>{cw}}" for c in r[1]))
    print("=" * width)


class MarkdownTable:
    """A markdown table printed row by row as results come; `align` has one 'l' or 'r' per column
    (default: the first left, the rest right)."""

    def __init__(self, *headers: str, align: Optional[str] = None):
        align = align or "l" + "r" * (len(headers) - 1)
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|", flush=True)

    @staticmethod
    def row(*cells) -> None:
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
