"""Reliability of the runtime around the ops: failures inside pool tasks reach Python, fork()
children work, files the user owns are never overwritten, a clean exit with work in flight, one
wrapper shared by threads, all-or-nothing loads and errors that name what is wrong.

Every probe that could crash or hang the interpreter runs in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import kt_ops
from kt_ops import _C

REPO = pathlib.Path(__file__).resolve().parent.parent

# A layer whose forward and backward go through every pool phase, with several tasks per phase.
LAYER_SETUP = """
import torch, kt_ops
from kt_ops import _C
kt_ops.set_num_threads(4)
torch.manual_seed(0)
E, H, I, T, K = 4, 256, 192, 96, 2
layer = kt_ops.KTMoELayer(E, H, I, lora_rank=4, method="{method}")
layer.load_weights_from_tensors(torch.randn(E, I, H) * 0.05, torch.randn(E, I, H) * 0.05, torch.randn(E, H, I) * 0.05)
with torch.no_grad():
    for p in layer.parameters():
        p.normal_(0, 0.05)
x = torch.randn(T, H)
ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
w = torch.rand(T, K)

def step():
    xx = x.clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(xx, ids, w)
    y.square().sum().backward()
    return [y.detach(), xx.grad] + [p.grad.clone() for p in layer.parameters()]

def raw_step():
    # The ops alone, without autograd: after fork() torch's own thread pools (autograd, BLAS) can
    # hang in the child whatever kt_ops does, so the fork tests call the kernels directly.
    ex, lora = layer.experts, [p.detach() for p in layer.lora_parameters()]
    args, kwargs = kt_ops.ops.forward_call(x, ids, w, ex, lora, layer.lora_scaling, True)
    y, pre, mid = torch.ops.kt.moe_sft_forward(*args, **kwargs)
    args, kwargs = kt_ops.ops.backward_call(y, x, ids, w, ex, lora, layer.lora_scaling, pre, mid)
    return [y, *torch.ops.kt.moe_sft_backward(*args, **kwargs)]

def same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))
"""


def run_python(code: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_ok(result: subprocess.CompletedProcess, expect: str = "OK") -> None:
    assert result.returncode == 0 and expect in result.stdout, (
        f"rc={result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )


# ---- 1. an exception inside a pool task -----------------------------------------------------------


@pytest.mark.parametrize("on_caller", [False, True], ids=["worker", "caller"])
def test_task_exception_becomes_python_error_and_pool_stays_usable(on_caller):
    result = run_python(
        LAYER_SETUP.format(method="AMXBF16_SFT")
        + f"""
good = step()
for failure in range(3):
    _C._inject_task_fault({on_caller})
    # The fault fires in the next task that kind of thread runs; on a busy machine one thread may
    # take all the tasks of a call, so a few calls may pass before it does.
    for attempt in range(100):
        try:
            step()
        except MemoryError:
            break
    else:
        raise SystemExit("no MemoryError from the injected std::bad_alloc in 100 calls")
    assert same(step(), good), "the call after a failed one differs"
print("OK")
"""
    )
    assert_ok(result)


SHIM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
extern void* __libc_malloc(size_t);
extern void* __libc_memalign(size_t, size_t);
static volatile size_t shim_threshold = 0;   /* 0: disarmed */
static volatile int shim_count = 0;
void shim_arm(size_t threshold) { shim_threshold = threshold; }
int shim_failures(void) { return shim_count; }
/* Only off the main thread: kt_ops' tasks run on torch's OpenMP threads (or kt_ops' own workers),
   and in the armed step torch's code on those threads (elementwise parallel regions) does not
   allocate this much; the main thread's allocations (Python, autograd) are not prepared for it. */
static int shim_fails(size_t n) {
  if (shim_threshold && n >= shim_threshold && getpid() != (pid_t)syscall(SYS_gettid)) {
    __sync_fetch_and_add(&shim_count, 1);
    return 1;
  }
  return 0;
}
void* malloc(size_t n) { return shim_fails(n) ? NULL : __libc_malloc(n); }
void* aligned_alloc(size_t alignment, size_t n) { return shim_fails(n) ? NULL : __libc_memalign(alignment, n); }
int posix_memalign(void** out, size_t alignment, size_t n) {
  if (shim_fails(n)) return ENOMEM;
  *out = __libc_memalign(alignment, n);
  return *out ? 0 : ENOMEM;
}
"""


@pytest.fixture(scope="module")
def malloc_shim(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the malloc shim")
    folder = tmp_path_factory.mktemp("shim")
    (folder / "shim.c").write_text(SHIM)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O1", "-o", str(folder / "shim.so"), str(folder / "shim.c")], check=True
    )
    return str(folder / "shim.so")


def test_worker_allocation_failure_raises_memory_error(malloc_shim):
    # int8 prefill: the tasks dequantize weight panels into per-thread buffers, grown here for a batch
    # larger than any before; those allocations fail, on threads other than the caller only.
    result = run_python(
        LAYER_SETUP.format(method="AMXINT8_SFT")
        + """
import ctypes
shim = ctypes.CDLL(None)
good = step()
# A batch larger than any before: the tasks' per-thread buffers must grow for it, off the caller.
big_x = torch.randn(1024, H)
big_ids = torch.stack([torch.randperm(E)[:K] for _ in range(1024)])
big_w = torch.rand(1024, K)
shim.shim_arm(ctypes.c_size_t(16 << 10))
try:
    layer(big_x.requires_grad_(True), big_ids, big_w).sum().backward()
except MemoryError:
    pass
else:
    raise SystemExit("no MemoryError")
finally:
    shim.shim_arm(ctypes.c_size_t(0))
assert shim.shim_failures() > 0, "the shim failed no allocation"
assert same(step(), good)
print("OK", shim.shim_failures())
""",
        env={"LD_PRELOAD": malloc_shim},
    )
    assert_ok(result)


def test_address_space_limit_raises_and_recovers():
    # A real RLIMIT_AS a little above what the process has mapped: allocations fail wherever they
    # fall (torch's tensors on this thread, routing vectors, the workers' scratch). Every call must
    # either succeed or raise, and after the limit is lifted the next call is exact again.
    result = run_python(
        LAYER_SETUP.format(method="AMXINT8_SFT")
        + """
import resource
good = step()
big_x = torch.randn(2048, H)
big_ids = torch.randint(0, E, (2048, K))
big_w = torch.rand(2048, K)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
failures = 0
for headroom_mb in (1, 4, 16, 64):
    mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (headroom_mb << 20), hard))
    try:
        layer(big_x.requires_grad_(True), big_ids, big_w).sum().backward()
    except (MemoryError, RuntimeError) as e:
        failures += 1
        assert isinstance(e, MemoryError) or "memory" in str(e).lower(), e
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert same(step(), good)
assert failures >= 1, "no limit made the call fail"
# Threads cannot be created either (their stacks do not fit): a clear error and a truthful count.
mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + (16 << 20), hard))
try:
    kt_ops.set_num_threads(64)
except RuntimeError as e:
    assert "could not start" in str(e), e
else:
    raise SystemExit("set_num_threads(64) succeeded under a 16 MiB headroom")
finally:
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
n = kt_ops.get_num_threads()
assert 1 <= n < 64, n
assert same(step(), good)
print("OK", failures)
"""
    )
    assert_ok(result)


# ---- 2. fork ----------------------------------------------------------------------------------------


def test_fork_child_runs_the_op():
    result = run_python(
        LAYER_SETUP.format(method="AMXBF16_SFT")
        + """
good = raw_step()
import os
pid = os.fork()
if pid == 0:
    os._exit(0 if same(raw_step(), good) and same(raw_step(), good) else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert same(raw_step(), good)   # the parent's pool is untouched
print("OK")
""",
        timeout=60,
    )
    assert_ok(result)


def test_fork_dataloader_workers_call_the_op():
    result = run_python(
        LAYER_SETUP.format(method="AMXBF16_SFT")
        + """
from torch.utils.data import DataLoader, Dataset
expected = layer(x, ids, w).detach()

class Rows(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        rows = slice(i * 12, (i + 1) * 12)
        with torch.no_grad():
            return layer(x[rows], ids[rows], w[rows])

out = torch.cat(list(DataLoader(Rows(), batch_size=None, num_workers=2, multiprocessing_context="fork")))
assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), (out - expected).abs().max()
print("OK")
""",
        timeout=90,
    )
    assert_ok(result)


# ---- 3. files the user owns -----------------------------------------------------------------------


def _peft_adapter(path: pathlib.Path, E=4, H=8, I=6, r=2, dtype=torch.float32, skip=()):
    from safetensors.torch import save_file

    tensors = {}
    for e in range(E):
        if e in skip:
            continue
        for proj, (out_dim, in_dim) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            prefix = f"base_model.model.model.layers.0.mlp.experts.{e}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_dim).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, r).to(dtype)
    save_file(tensors, str(path))
    return path


def test_convert_refuses_to_overwrite_inputs_and_foreign_files(tmp_path):
    from kt_ops.convert_moe_lora import main

    adapter = _peft_adapter(tmp_path / "adapter_model.safetensors")
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    before = adapter.read_bytes(), config.read_bytes()
    assert main(["--input", str(adapter), "--output", str(adapter)]) == 2
    assert main(["--input", str(adapter), "--config", str(config), "--output", str(config)]) == 2
    foreign = tmp_path / "notes.pt"
    foreign.write_bytes(b"the user's file")
    assert main(["--input", str(adapter), "--output", str(foreign), "--num-experts", "4"]) == 2
    assert (adapter.read_bytes(), config.read_bytes()) == before
    assert foreign.read_bytes() == b"the user's file"
    out = tmp_path / "moe_lora.pt"
    assert main(["--input", str(adapter), "--output", str(out), "--num-experts", "4"]) == 0
    assert main(["--input", str(adapter), "--output", str(out), "--num-experts", "4"]) == 0  # its own output: replaced


def _amx_wrapper(layer_idx, weight_path, E=4, H=32, I=32):
    return kt_ops.KTMoEWrapper(
        layer_idx=layer_idx,
        num_experts=E,
        num_experts_per_tok=2,
        hidden_size=H,
        moe_intermediate_size=I,
        num_gpu_experts=0,
        cpuinfer_threads=2,
        threadpool_count=1,
        weight_path=str(weight_path),
        chunked_prefill_size=64,
        cpu_save=True,
        method="AMXINT8",
        mode="inference",
    )


def _weights(seed, E=4, H=32, I=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)


def test_cpu_save_keeps_other_layers_and_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    from kt_ops.weights.packed_io import packed_layers

    packed = tmp_path / "experts.safetensors"
    for layer in range(3):
        _amx_wrapper(layer, packed).load_weights_from_tensors(*_weights(layer), torch.arange(4))
    assert packed_layers(str(packed)) == [0, 1, 2]
    # Two layers sharing one weight_path, saved concurrently: both end up in the file.
    shared = tmp_path / "shared.safetensors"
    threads = [
        threading.Thread(
            target=lambda L=L: _amx_wrapper(L, shared).load_weights_from_tensors(*_weights(L), torch.arange(4))
        )
        for L in (5, 6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert packed_layers(str(shared)) == [5, 6]
    # Layer 1 reloaded from the file is layer 1's quantization.
    reloaded = _amx_wrapper(1, packed)
    reloaded.cpu_save = False
    reloaded.load_weights(torch.arange(4))
    assert torch.equal(reloaded.experts_parts[0].gate, kt_ops.pack_experts(*_weights(1), "int8").gate)
    # A HuggingFace checkpoint named as weight_path is never replaced.
    hf = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.ones(2, 2)}, str(hf))
    before = hf.read_bytes()
    with pytest.raises(FileExistsError, match="not a kt_ops packed-experts file"):
        _amx_wrapper(0, hf).load_weights_from_tensors(*_weights(0), torch.arange(4))
    assert hf.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["experts.safetensors", "model.safetensors", "shared.safetensors"]


# ---- 4. exit with work in flight ------------------------------------------------------------------


def test_exit_with_deferred_experts_in_flight_is_clean():
    code = """
import torch, kt_ops
E, H, I, K = 8, 256, 512, 4
w = kt_ops.KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I,
                        num_gpu_experts=0, cpuinfer_threads=2, threadpool_count=1, weight_path=None,
                        chunked_prefill_size=4096, method="AMXINT8", mode="inference",
                        max_deferred_experts_per_token=2)
w.load_weights_from_tensors(torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I), torch.arange(E))
x = torch.randn(256, H)
ids = torch.stack([torch.randperm(E)[:K] for _ in range(256)])
w.forward(x, ids, torch.rand(256, K))          # leaves its deferred experts running
w.submit_forward(x, ids, torch.rand(256, K))   # and one more call whose results nobody collects
print("OK")
"""
    # Two exits at once (the failure showed in 4 of 5 before the CPUInfer thread was drained at exit).
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0 and "OK" in out, f"rc={p.returncode}\n{err[-2000:]}"


# ---- 5. one SFT wrapper shared by threads ---------------------------------------------------------


def _sft_wrapper(depth=2):
    E, H, I, r = 4, 32, 32, 4
    wrapper = kt_ops.KTMoEWrapper(
        layer_idx=0,
        num_experts=E,
        num_experts_per_tok=2,
        hidden_size=H,
        moe_intermediate_size=I,
        num_gpu_experts=0,
        cpuinfer_threads=2,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=64,
        method="AMXBF16_SFT",
        mode="sft",
        lora_rank=r,
        lora_alpha=8.0,
        max_cache_depth=depth,
    )
    wrapper.load_weights_from_tensors(*_weights(3, E, H, I), torch.arange(E))
    g = torch.Generator().manual_seed(4)
    shapes = ((E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r))
    wrapper.init_lora_weights(*(torch.randn(s, generator=g) * 0.1 for s in shapes))
    return wrapper


def _tokens(seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(5, 32, generator=g),
        torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(5)]),
        torch.rand(5, 2, generator=g),
        torch.randn(5, 32, generator=g),
    )


def test_shared_wrapper_interleaved_threads_get_their_own_gradients():
    wrapper = _sft_wrapper()
    expected = {}
    for seed in (1, 2):
        x, ids, w, grad = _tokens(seed)
        wrapper.forward_sft(x, ids, w)
        expected[seed] = wrapper.backward(grad)
    # Forced interleaving F1 F2 B1 B2: thread 1's backward must use thread 1's forward.
    results = {}
    f1_done, f2_done, b1_done = threading.Event(), threading.Event(), threading.Event()

    def first():
        x, ids, w, grad = _tokens(1)
        wrapper.forward_sft(x, ids, w)
        f1_done.set()
        f2_done.wait()
        results[1] = wrapper.backward(grad)
        b1_done.set()

    def second():
        x, ids, w, grad = _tokens(2)
        f1_done.wait()
        wrapper.forward_sft(x, ids, w)
        f2_done.set()
        b1_done.wait()
        results[2] = wrapper.backward(grad)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for seed in (1, 2):
        grad_x, grads = results[seed]
        assert torch.equal(grad_x, expected[seed][0])
        for name, value in grads.items():
            assert torch.equal(value, expected[seed][1][name]), name


def test_shared_wrapper_backward_from_a_third_thread_is_refused():
    wrapper = _sft_wrapper()
    # The forward threads stay alive until the check is done: an exited thread's id may be reused by
    # the next thread, which would make the two forwards look like one thread's.
    saved, done = threading.Barrier(3), threading.Event()

    def forward(seed):
        x, ids, w, _ = _tokens(seed)
        wrapper.forward_sft(x, ids, w)
        saved.wait()
        done.wait()

    threads = [threading.Thread(target=forward, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    try:
        saved.wait()
        with pytest.raises(RuntimeError, match="ambiguous.*pass cache_idx"):
            wrapper.backward(_tokens(1)[3])
        wrapper.backward(_tokens(1)[3], cache_idx=0)  # explicit: fine
    finally:
        done.set()
        for t in threads:
            t.join()


# ---- 6. loads: all-or-nothing, metadata checked, sizes overflow-checked ---------------------------


def _packed_file(tmp_path, I=64, fmt="bf16", layers=(0,)):
    from kt_ops.weights.packed_io import save_packed_experts

    g = torch.Generator().manual_seed(0)
    E, H = 4, 32
    experts = kt_ops.pack_experts(
        torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g), fmt, 32
    )
    path = tmp_path / "packed.safetensors"
    save_packed_experts(str(path), {layer: experts for layer in layers}, overwrite=True)
    return path


def _rewrite_metadata(path, layer, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["kt_ops.layers"])
    for key, value in changes.items():
        if value is None:
            del meta[str(layer)][key]
        else:
            meta[str(layer)][key] = value
    save_file(tensors, str(path), metadata={"kt_ops.layers": json.dumps(meta)})


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4_kgroup"])
def test_packed_metadata_smaller_than_the_tensors_is_refused(tmp_path, fmt):
    from kt_ops.weights.packed_io import load_packed_experts

    path = _packed_file(tmp_path, I=64, fmt=fmt)
    _rewrite_metadata(path, 0, intermediate_size=63)  # packs to the same bytes as 64
    with pytest.raises(ValueError, match="non-zero rows beyond the metadata's 63"):
        load_packed_experts(str(path), 0)


def test_packed_metadata_wrong_sizes_name_the_file_and_field(tmp_path):
    from kt_ops.weights.packed_io import load_packed_experts

    path = _packed_file(tmp_path)
    _rewrite_metadata(path, 0, hidden_size=48)
    with pytest.raises(ValueError, match=r"packed.safetensors: layer 0: blk.0.ffn_gate_exps.weight .* hidden_size=48"):
        load_packed_experts(str(path), 0)
    _rewrite_metadata(path, 0, hidden_size=32, num_experts=5)
    with pytest.raises(ValueError, match="num_experts=5"):
        load_packed_experts(str(path), 0)
    _rewrite_metadata(path, 0, num_experts=None)
    with pytest.raises(ValueError, match=r"metadata lacks \['num_experts'\]"):
        load_packed_experts(str(path), 0)


def test_convert_needs_every_expert_when_the_count_is_known(tmp_path):
    from kt_ops.weights.moe_lora import convert_moe_lora

    adapter = _peft_adapter(tmp_path / "a.safetensors", E=8, skip=(7,))
    with pytest.raises(ValueError, match=r"expert\(s\) \[7\] have no LoRA"):
        convert_moe_lora(str(adapter), str(tmp_path / "out.pt"), num_experts=8)
    with pytest.raises(ValueError, match="LoRA for expert 6, but the layers have 4 experts"):
        convert_moe_lora(str(adapter), str(tmp_path / "out.pt"), num_experts=4)
    assert not (tmp_path / "out.pt").exists()


def test_convert_refuses_integer_lora(tmp_path):
    from kt_ops.weights.moe_lora import convert_moe_lora

    adapter = _peft_adapter(tmp_path / "a.safetensors", dtype=torch.int32)
    with pytest.raises(ValueError, match="must be floating point"):
        convert_moe_lora(str(adapter), str(tmp_path / "out.pt"), num_experts=4)


def test_intermediate_size_overflow_is_refused():
    E, H = 2, 32
    experts = kt_ops.pack_experts(torch.randn(E, 32, H), torch.randn(E, 32, H), torch.randn(E, H, 32), "bf16")
    huge = 2**62
    loras = (
        torch.zeros(E, 0, H),
        torch.zeros(E, huge, 0),
        torch.zeros(E, 0, H),
        torch.zeros(E, huge, 0),
        torch.zeros(E, 0, huge),
        torch.zeros(E, H, 0),
    )
    for T in (0, 1):
        with pytest.raises(ValueError, match="too large"):
            args, kwargs = kt_ops.ops.forward_call(
                torch.zeros(T, H), torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), experts, loras, 1.0, False
            )
            torch.ops.kt.moe_sft_forward(*args, **dict(kwargs, intermediate_size=huge))
    with pytest.raises(ValueError, match="too large"):
        _C.packed_bytes("int8", huge, huge)


# ---- 7. errors that say what is wrong -------------------------------------------------------------


def test_meta_inputs_are_named():
    layer = kt_ops.KTMoELayer(4, 32, 32, lora_rank=2)
    layer.load_weights_from_tensors(*_weights(0))
    x, ids, w = torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)
    with pytest.raises(ValueError, match="hidden_states is a meta tensor"):
        layer(x.to("meta"), ids, w)
    with pytest.raises(ValueError, match="topk_weights is a meta tensor"):
        layer(x, ids, w.to("meta"))
    wrapper = _sft_wrapper()
    with pytest.raises(ValueError, match="expert_ids is a meta tensor"):
        wrapper.forward_sft(torch.randn(5, 32), torch.zeros(5, 2, dtype=torch.long, device="meta"), torch.rand(5, 2))


def test_damaged_files_are_named_and_do_not_stop_other_layers(tmp_path):
    from kt_ops.weights.loaders import SafeTensorLoader
    from kt_ops.weights.packed_io import load_packed_experts, save_packed_experts

    good = kt_ops.pack_experts(*_weights(0), "int8")
    folder = tmp_path / "converted"
    folder.mkdir()
    for layer in (0, 1):
        save_packed_experts(str(folder / f"blk.{layer}.safetensors"), {layer: good})
    damaged = folder / "blk.1.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # truncated
    loader = SafeTensorLoader(str(folder))
    assert torch.equal(loader.load_packed(0).gate, good.gate)
    with pytest.raises(KeyError, match=r"layer 1 .*blk.1.safetensors"):
        loader.load_packed(1)
    with pytest.raises(ValueError, match=r"blk.1.safetensors"):
        load_packed_experts(str(damaged), 1)
    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="header.safetensors is not a readable safetensors file"):
        SafeTensorLoader(str(header_only))


def test_set_num_threads_rejects_bad_counts():
    before = kt_ops.get_num_threads()
    with pytest.raises(ValueError, match="num_threads must be"):
        _C.set_num_threads(0)
    assert kt_ops.get_num_threads() == before


def _tiny_kt_model(seed):
    from kt_ops.integration import apply_kt
    from kt_ops.integration.tiny import tiny_model

    model = apply_kt(tiny_model("tiny-qwen3-moe"), lora_rank=2, lora_alpha=4.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_load_kt_adapter_is_all_or_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    from kt_ops.integration import load_kt_adapter, save_kt_adapter

    save_kt_adapter(_tiny_kt_model(0), str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(str(path))
    last = sorted(state)[-1]  # checked last: every earlier tensor would already have been copied
    model = _tiny_kt_model(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}

    def unchanged():
        return all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora" in n)

    for bad in (
        torch.zeros(*state[last].shape[:-1], state[last].shape[-1] + 1),  # wrong shape
        state[last].to(torch.int32),
    ):  # integer LoRA
        save_file({**state, last: bad}, str(path))
        with pytest.raises(ValueError, match=last.replace(".", r"\.")):
            load_kt_adapter(model, str(tmp_path))
        assert unchanged()
    save_file(state, str(path))
    load_kt_adapter(model, str(tmp_path))
    assert not unchanged()


def test_saved_adapter_records_the_expert_count_for_the_converter(tmp_path):
    from safetensors.torch import load_file, save_file

    from kt_ops.weights.moe_lora import convert_moe_lora
    from kt_ops.integration import save_kt_adapter

    save_kt_adapter(_tiny_kt_model(0), str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["kt_ops.num_experts"] == "8"
    # The highest expert missing in every layer: the recorded count tells it apart from 7 experts.
    save_file({k: v for k, v in state.items() if ".experts.7." not in k}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"expert\(s\) \[7\] have no LoRA"):
        convert_moe_lora(str(path), str(tmp_path / "moe.pt"))
    stats = convert_moe_lora(str(path), str(tmp_path / "moe.pt"), fill_missing_experts=True)
    assert stats["num_experts"] == 8
