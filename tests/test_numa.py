"""threadpool_count > 1 for real: the parts of a layer run at once on sub-pools of their own, with
their weights first touched by their pool's threads. On a one-node machine this is a logical test
(the multi-node placement itself is unverified on hardware here)."""

import ctypes
import os
import platform
import threading

import pytest
import torch

import kt_ops
from kt_ops import _C
from kt_ops.core.subpools import Subpools, node_cpus, parse_cpulist, subpool_layout
from kt_ops.experts_base import CPUInfer, WorkerPoolConfig, _MoEBase
from kt_testing import GRAD_NAMES, LORA_NAMES, assert_tight, make_case
from test_reliability import assert_ok, run_python
from test_wrapper import loaded, wrapper_grads

pytestmark = pytest.mark.filterwarnings("ignore:the process's CPUInfer already exists")


@pytest.fixture(scope="module")
def two_subpools():
    """The process's CPUInfer as a threadpool_count=2 wrapper makes it (first config wins), restored after.
    One for the module: each CPUInfer's sub-pools start dispatcher threads that live as long as the process."""
    previous = _MoEBase._cpu_infer_instance
    infer = CPUInfer(WorkerPoolConfig(subpool_count=2, max_threads_per_subpool=1))
    _MoEBase._cpu_infer_instance = infer
    yield infer.subpools
    _MoEBase._cpu_infer_instance = previous


def take_log():
    return [dict(zip(("pool", "tid", "met"), entry)) for entry in _C._take_rendezvous_log()]


def assert_ran_at_once(log):
    """Both parts were inside a job of their own sub-pool at the same time, on two other threads."""
    assert sorted(e["pool"] for e in log) == [0, 1], log
    assert all(e["met"] for e in log), f"a part waited in vain for the other: they ran one after another {log}"
    tids = {e["tid"] for e in log}
    assert len(tids) == 2 and threading.get_native_id() not in tids, log


# ---- the parts run at once and give the single pool's results ------------------------------------


@pytest.mark.parametrize("method,group_size", [("AMXBF16_SFT", 128), ("AMXINT8_SFT", 128)])
def test_parts_run_at_once_and_equal_one_pool(two_subpools, method, group_size):
    case = make_case(seed=6, T=12, E=4, k=2, H=64, I=64, r=4)
    one = loaded(case, method=method, group_size=group_size)
    two = loaded(case, method=method, group_size=group_size, threadpool_count=2)
    assert len(two.experts_parts) == 2 and len(one.experts_parts) == 1
    _C._arm_rendezvous(2, 60.0)
    out2 = two.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=True)
    assert_ran_at_once(take_log())
    _C._arm_rendezvous(2, 60.0)
    grad_input, grads = two.backward(case.grad_out)
    assert_ran_at_once(take_log())
    grads2 = [grad_input, grads["grad_weights"]] + [grads[f"grad_{name}"] for name in LORA_NAMES]
    out1, grads1 = wrapper_grads(one, case)
    if method == "AMXBF16_SFT":  # the tolerance of test_wrapper's sub-pool tests
        for name, a, b in zip(("output",) + GRAD_NAMES, [out2] + grads2, [out1] + grads1):
            assert_tight(name, a, b, rtol=1e-5)
    else:  # down's quantization covers each part's columns separately
        for name, a, b in zip(("output",) + GRAD_NAMES, [out2] + grads2, [out1] + grads1):
            assert (a - b).abs().mean() <= 0.05 * b.abs().mean() + 1e-12, name


def test_inference_parts_run_at_once(two_subpools):
    from kt_ops import KTMoEWrapper

    case = make_case(seed=3, T=6, E=4, k=2, H=64, I=256, r=4)
    make = lambda count: KTMoEWrapper(  # noqa: E731
        layer_idx=0,
        num_experts=4,
        num_experts_per_tok=2,
        hidden_size=64,
        moe_intermediate_size=256,
        num_gpu_experts=0,
        cpuinfer_threads=2,
        threadpool_count=count,
        weight_path=None,
        chunked_prefill_size=512,
        mode="inference",
        method="AMXINT8",
    )
    one, two = make(1), make(2)
    for w in (one, two):
        w.load_weights_from_tensors(case.gate, case.up, case.down, torch.arange(4))
    _C._arm_rendezvous(2, 60.0)
    out2 = two.forward(case.hidden, case.ids, case.weights)
    assert_ran_at_once(take_log())
    out1 = one.forward(case.hidden, case.ids, case.weights)
    assert (out2 - out1).abs().mean() <= 0.05 * out1.abs().mean()


@pytest.mark.parametrize("kt_backend", ["AMXBF16", "AMXINT8"])
def test_apply_kt_runs_each_layer_in_parts_on_the_subpools(two_subpools, kt_backend):
    """kt_threadpool_count reaches the layers apply_kt makes: each runs in parts at once on the
    process's sub-pools, forward and backward, and agrees with one pool."""
    pytest.importorskip("transformers")
    from kt_ops.integration import apply_kt, kt_experts_modules
    from kt_ops.integration.tiny import tiny_model
    from kt_testing import token_ids

    def run(count):
        torch.manual_seed(0)
        model = apply_kt(
            tiny_model("tiny-qwen3-moe", moe_intermediate_size=64),
            kt_backend=kt_backend,
            kt_threadpool_count=count,
            lora_rank=4,
            lora_alpha=8.0,
        )
        for _, _, kt in kt_experts_modules(model):
            assert len(kt.experts_parts) == count and kt.subpools is (two_subpools if count > 1 else None)
            with torch.no_grad():
                kt.gate_lora_b.normal_(0, 0.1)  # B starts at zero: give the LoRA terms values
        ids = token_ids()
        _C._arm_rendezvous(2, 60.0)
        loss = model(input_ids=ids, labels=ids).loss
        if count > 1:
            assert_ran_at_once(take_log()[:2])
        loss.backward()
        return loss.detach(), [p.grad for _, _, kt in kt_experts_modules(model) for p in kt.lora_parameters()]

    (loss1, grads1), (loss2, grads2) = run(1), run(2)
    tol = 1e-5 if kt_backend == "AMXBF16" else 0.05  # int8: down's scales cover each part's columns
    assert abs(loss2 - loss1) <= tol * abs(loss1)
    for a, b in zip(grads2, grads1):
        assert (a - b).abs().mean() <= tol * b.abs().mean() + 1e-12


def test_kt_sft_config_splits_layers_over_kt_threadpool_count(two_subpools, tmp_path):
    pytest.importorskip("transformers")
    from kt_ops import cli
    from kt_ops.integration import kt_experts_modules
    from kt_ops.integration.tiny import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_model("tiny-qwen3-moe", moe_intermediate_size=64).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    config = cli.load_config(
        {
            "model_name_or_path": str(model_dir),
            "dataset": "identity",
            "output_dir": str(tmp_path),
            "kt_config": {"kt_threadpool_count": 2, "kt_tp_enabled": True},
        },
        quiet=True,
    )
    model, _ = cli.build_model(config)
    assert all(len(kt.experts_parts) == 2 for _, _, kt in kt_experts_modules(model))


def test_rendezvous_fails_for_parts_run_one_after_another(two_subpools):
    """The concurrency check is not vacuous: jobs of the two sub-pools one after another meet no one."""
    job = (_C._first_touch_copy, (torch.zeros(1 << 20),))
    _C._arm_rendezvous(2, 0.2)
    two_subpools.run([job, (lambda: None, ())])
    two_subpools.run([(lambda: None, ()), job])
    log = take_log()
    # pool 0 waited in vain; pool 1 found 0's past arrival, which is why every arrival must have met
    assert [(e["pool"], e["met"]) for e in log] == [(0, False), (1, True)], log


def test_error_on_one_part_is_raised_and_pools_stay_usable(two_subpools):
    case = make_case(seed=4, T=8, E=4, k=2, H=64, I=64, r=4)
    two = loaded(case, threadpool_count=2)
    good = two.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=False)
    # one thread per sub-pool: the dispatcher is the caller of its pool's jobs
    _C._inject_task_fault(True, subpool=1)
    with pytest.raises(MemoryError):
        two.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=True)
    assert two._cache_depth == 0
    assert torch.equal(two.forward_sft(case.hidden, case.ids, case.weights, save_for_backward=False), good)
    out, grads = wrapper_grads(two, case)  # backward too
    assert torch.equal(out, good)


def test_python_error_in_a_part_waits_for_the_others(two_subpools):
    finished = []

    def slow_ok():
        x = torch.randn(256, 256)
        for _ in range(20):
            x = x @ x.T / 256
        finished.append(True)

    def fail():
        raise ValueError("part 0 failed")

    with pytest.raises(ValueError, match="part 0 failed"):
        two_subpools.run([(fail, ()), (slow_ok, ())])
    assert finished == [True]
    assert two_subpools.run([(lambda: _C._current_subpool(), ())] * 2) == [0, 1]
    assert _C._current_subpool() == -1


# ---- first touch ---------------------------------------------------------------------------------


def page_nodes(t: torch.Tensor):
    """NUMA node of every page of `t` (move_pages(2) with no target: query only); negative = errno,
    e.g. -ENOENT for a page not present."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    page = os.sysconf("SC_PAGE_SIZE")
    start = t.data_ptr() // page * page
    addresses = list(range(start, t.data_ptr() + t.numel() * t.element_size(), page))
    pages = (ctypes.c_void_p * len(addresses))(*addresses)
    status = (ctypes.c_int * len(addresses))()
    SYS_move_pages = 279
    rc = libc.syscall(ctypes.c_long(SYS_move_pages), 0, ctypes.c_ulong(len(addresses)), pages, None, status, 0)
    if rc != 0:
        pytest.skip(f"move_pages not available here (errno {ctypes.get_errno()})")
    return list(status)


needs_move_pages = pytest.mark.skipif(
    platform.machine() != "x86_64" or not os.path.isdir("/sys/devices/system/node"),
    reason="move_pages syscall number and NUMA sysfs: x86-64 Linux",
)


@needs_move_pages
def test_first_touch_places_each_parts_pages_on_its_node(two_subpools):
    case = make_case(seed=5, T=4, E=8, k=2, H=256, I=512, r=4)
    two = loaded(case, threadpool_count=2)
    for p, part in enumerate(two.experts_parts):
        # several nodes: the part's own node; one node (this VM): a logical test, node 0
        want = two_subpools.nodes[p] if two_subpools.nodes[p] is not None else 0
        for name in ("gate", "up", "down"):
            got = set(page_nodes(getattr(part, name)))
            assert got == {want}, f"part {p} {name}: page nodes {got} (negative: errno, e.g. -2 not present)"
    # placed copies are fresh page-aligned mappings holding the same bytes
    packed = kt_ops.pack_experts(case.gate[:, :256], case.up[:, :256], case.down[:, :, :256], "bf16")
    assert torch.equal(two.experts_parts[0].gate, packed.gate)
    assert two.experts_parts[0].gate.data_ptr() % os.sysconf("SC_PAGE_SIZE") == 0


@needs_move_pages
def test_first_touch_copy_writes_fresh_pages(two_subpools):
    src = torch.randn(3, 1 << 19)  # 6 MiB: several 2 MiB tasks
    _C._arm_rendezvous(1, 60.0)
    copy = two_subpools.run([(_C._first_touch_copy, (src,)), (lambda: None, ())])[0]
    log = take_log()
    assert [e["pool"] for e in log] == [0] and log[0]["tid"] != threading.get_native_id()
    assert torch.equal(copy, src) and copy.data_ptr() != src.data_ptr()
    assert all(n == (two_subpools.nodes[0] or 0) for n in page_nodes(copy))
    assert torch.equal(_C._first_touch_copy(torch.empty(0)), torch.empty(0))


# ---- CPU sets ------------------------------------------------------------------------------------


def fake_nodes(root, cpulists):
    for node, text in cpulists.items():
        (root / f"node{node}").mkdir(parents=True)
        (root / f"node{node}" / "cpulist").write_text(text + "\n")
    (root / "possible").write_text("0-3\n")  # not a node directory
    return str(root)


def test_cpu_sets_of_a_fake_sysfs(tmp_path):
    assert parse_cpulist("0-3,8-9,12\n") == [0, 1, 2, 3, 8, 9, 12] and parse_cpulist("\n") == []
    root = fake_nodes(tmp_path / "node", {0: "0-3", 1: "4-7,12", 2: ""})  # node 2: memory only
    assert node_cpus(root) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7, 12]}
    everything = range(16)
    assert subpool_layout(2, root, everything) == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7, 12])]
    # pools sharing a node split its CPUs
    assert subpool_layout(4, root, everything) == [(0, [0, 1]), (1, [4, 5]), (0, [2, 3]), (1, [6, 7, 12])]
    assert subpool_layout(3, root, everything) == [(0, [0, 1]), (1, [4, 5, 6, 7, 12]), (0, [2, 3])]
    # CPUs this process may not use are left out; a node left without any is not used
    assert subpool_layout(2, root, [1, 2, 5]) == [(0, [1, 2]), (1, [5])]
    assert subpool_layout(2, root, [0, 1]) == [(None, []), (None, [])]
    # one node, or no NUMA information: nothing pinned
    one = fake_nodes(tmp_path / "one", {0: "0-7"})
    assert subpool_layout(2, one, everything) == [(None, []), (None, [])]
    assert (
        node_cpus(str(tmp_path / "missing")) == {} and subpool_layout(2, str(tmp_path / "missing")) == [(None, [])] * 2
    )


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin two sub-pools apart")
def test_subpool_threads_are_pinned_and_survive_fork(tmp_path):
    """Two fake nodes of one CPU each: every thread of sub-pool i (its dispatcher and its workers) is
    pinned to node i's CPU; a forked child rebuilds the pools and computes the same."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    root = fake_nodes(tmp_path / "node", {0: str(cpus[0]), 1: str(cpus[1])})
    result = run_python(f"""
import os, torch
from kt_ops import _C
from kt_ops.core.subpools import Subpools
from kt_ops.ops import forward_parts
from kt_ops.core.packed import pack_split
pools = Subpools(2, 2, root={root!r})
assert pools.nodes == [0, 1] and pools.cpu_sets == [[{cpus[0]}], [{cpus[1]}]], (pools.nodes, pools.cpu_sets)
assert pools.threads == 1  # a pinned pool gets no more threads than its CPUs
assert pools.run([(os.sched_getaffinity, (0,))] * 2) == [{{{cpus[0]}}}, {{{cpus[1]}}}]
_C._configure_subpools(2, 2, pools.cpu_sets)  # a worker each as well (same CPU sets)
# a job of several tasks ends only when every worker has taken part, so each has named and pinned itself
pools.run([(_C._first_touch_copy, (torch.zeros(1 << 21),))] * 2)
threads = {{}}
for tid in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{{tid}}/comm") as f:
        threads.setdefault(f.read().strip(), []).append(os.sched_getaffinity(int(tid)))
# per pool: its dispatcher and one worker (2 threads each)
assert threads["kt_ops-sub0"] == [{{{cpus[0]}}}] * 2 and threads["kt_ops-sub1"] == [{{{cpus[1]}}}] * 2, threads
g = torch.randn(4, 64, 32); u = torch.randn(4, 64, 32); d = torch.randn(4, 32, 64)
parts = pools.place(pack_split(g, u, d, "bf16", 128, [(0, 32), (32, 64)]))
x = torch.randn(5, 32); ids = torch.randint(0, 4, (5, 2)); w = torch.rand(5, 2)
_, want, _ = forward_parts(x, ids, w, parts, None, 0.0, False, pools)
pid = os.fork()
if pid == 0:
    _, got, _ = forward_parts(x, ids, w, parts, None, 0.0, False, pools)
    os._exit(0 if torch.equal(got, want) else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
_, again, _ = forward_parts(x, ids, w, parts, None, 0.0, False, pools)
assert torch.equal(again, want)
print("OK")
""")
    assert_ok(result)


def test_subpool_arguments_are_checked():
    with pytest.raises(ValueError, match="count"):
        Subpools(1, 1)
    with pytest.raises(ValueError, match="one CPU set per sub-pool"):
        _C._configure_subpools(2, 1, [[]])
    with pytest.raises(IndexError, match="sub-pool 7 does not exist"):
        _C._enter_subpool(7)
