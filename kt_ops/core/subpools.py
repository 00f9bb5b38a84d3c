"""NUMA sub-pools (threadpool_count > 1): the parts of a split layer run at once, each on its own
C++ pool, with its weights placed on its pool's NUMA node.

Sub-pool i is a C++ pool with threads of its own plus one Python dispatcher thread that entered it
(`_C._enter_subpool`): the kernels an op call on that thread runs use pool i, and the thread takes
part in the work. torch.ops calls release the GIL, so the dispatchers of all parts compute at once.
On a machine with several NUMA nodes, pool i's threads (dispatcher included) are pinned to the CPUs
of node i mod nodes (the nodes' CPUs split between the pools that share a node); on one node nothing
is pinned. `place` copies a part's packed weights into fresh pages written by its pool's threads, so
Linux's first-touch policy puts them on that node.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _C
from .checks import check_int
from .packed import PackedExperts

NODE_ROOT = "/sys/devices/system/node"


def parse_cpulist(text: str) -> List[int]:
    """The CPUs of a sysfs cpulist such as '0-3,8-11' or '' (none)."""
    cpus: List[int] = []
    for item in text.strip().split(","):
        if not item:
            continue
        lo, _, hi = item.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def node_cpus(root: str = NODE_ROOT) -> Dict[int, List[int]]:
    """{node: CPUs} of the NUMA nodes that have CPUs (memory-only nodes are left out); {} when `root`
    does not exist (no NUMA support in the kernel)."""
    if not os.path.isdir(root):
        return {}
    nodes = {}
    for name in os.listdir(root):
        if not (name.startswith("node") and name[4:].isdigit()):
            continue
        try:
            with open(os.path.join(root, name, "cpulist")) as f:
                cpus = parse_cpulist(f.read())
        except OSError:
            continue
        if cpus:
            nodes[int(name[4:])] = cpus
    return nodes


def subpool_layout(
    count: int,
    root: str = NODE_ROOT,
    allowed: Optional[Sequence[int]] = None,
    nodes: Optional[Sequence[int]] = None,
) -> List[Tuple[Optional[int], List[int]]]:
    """(node, CPUs to pin to) per sub-pool. Pool i goes to `nodes[i]` (kt-kernel's numa_nodes), by
    default to the i-th node mod the nodes with CPUs this process may use (`allowed`, default its
    affinity); pools sharing a node split its CPUs into disjoint runs. With fewer than two such
    nodes: (None, []) each, nothing pinned."""
    check_int(count, "count", 1)
    if allowed is None:
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    allowed = set(allowed)
    available = {node: [c for c in cpus if c in allowed] for node, cpus in node_cpus(root).items()}
    available = {node: cpus for node, cpus in sorted(available.items()) if cpus}
    if nodes is not None:
        assigned = _checked_nodes(nodes, count, available)
    else:
        order = list(available)
        assigned = [order[i % len(order)] for i in range(count)] if order else []
    if len(available) < 2:
        return [(None, []) for _ in range(count)]
    layout = []
    for i, node in enumerate(assigned):
        sharing, rank = assigned.count(node), assigned[:i].count(node)
        cpus = available[node]
        lo, hi = len(cpus) * rank // sharing, len(cpus) * (rank + 1) // sharing
        layout.append((node, cpus[lo:hi] or cpus))  # more pools than CPUs: share the node's CPUs
    return layout


def _checked_nodes(nodes: Sequence[int], count: int, available: Dict[int, List[int]]) -> List[int]:
    nodes = list(nodes)
    if len(nodes) != count:
        raise ValueError(f"numa_nodes must name one NUMA node per sub-pool ({count}), got {nodes}")
    for node in nodes:
        check_int(node, "numa_nodes entry", 0)
        # Without sysfs' node directory nothing can be checked (or pinned).
        if available and node not in available:
            raise ValueError(
                f"numa_nodes names node {node}, which has no CPU this process may use; nodes with CPUs: "
                f"{sorted(available)}"
            )
    return nodes


class Subpools:
    """`count` C++ sub-pools of up to `threads` threads each and their dispatcher threads (started
    on first use). One per process (CPUInfer's): building another reconfigures the same C++ pools."""

    def __init__(self, count: int, threads: int, root: str = NODE_ROOT, nodes: Optional[Sequence[int]] = None):
        check_int(count, "count", 2)
        check_int(threads, "threads", 1)
        self.requested_threads = threads
        self.requested_nodes = None if nodes is None else tuple(nodes)
        layout = subpool_layout(count, root, nodes=nodes)
        self.nodes: List[Optional[int]] = [node for node, _ in layout]
        self.cpu_sets: List[List[int]] = [cpus for _, cpus in layout]
        if any(self.cpu_sets):
            # a pinned pool with more threads than CPUs would have them time-slice
            threads = max(1, min([threads] + [len(cpus) for cpus in self.cpu_sets]))
        self.count, self.threads = count, threads
        _C._configure_subpools(count, threads, self.cpu_sets)
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # After fork only the forking thread exists: the child starts dispatchers of its own on first
        # use (the C++ pools rebuild themselves the same way).
        self._lock = threading.Lock()
        self._queues: List["queue.SimpleQueue"] = [queue.SimpleQueue() for _ in range(self.count)]
        self._dispatchers: List[Optional[threading.Thread]] = [None] * self.count

    def run(self, calls: Sequence[Tuple[Callable, tuple]]) -> list:
        """calls[p] = (fn, args) runs as fn(*args) on sub-pool p's dispatcher, all at once, in the
        caller's grad mode; returns the results in order. When some raise, the first part's error is
        raised once every part has finished (none is left writing into shared tensors)."""
        if len(calls) != self.count:
            raise ValueError(f"one call per sub-pool: {self.count} sub-pools, {len(calls)} calls")
        grad = torch.is_grad_enabled()
        futures = []
        for index, (fn, args) in enumerate(calls):
            future = concurrent.futures.Future()
            self._dispatcher(index)
            self._queues[index].put((fn, args, grad, future))
            futures.append(future)
        concurrent.futures.wait(futures)
        return [future.result() for future in futures]

    def place(self, parts: Sequence[PackedExperts]) -> List[PackedExperts]:
        """Part p's tensors copied into fresh pages first written by sub-pool p's threads."""
        return self.run([(_placed, (part,)) for part in parts])

    def _dispatcher(self, index: int) -> None:
        with self._lock:
            if self._dispatchers[index] is not None:
                return
            started = concurrent.futures.Future()
            thread = threading.Thread(
                target=self._serve, args=(index, self._queues[index], started), name=f"kt_ops-sub{index}", daemon=True
            )
            thread.start()
            started.result()  # raises when the thread could not enter (pin itself to) its pool
            self._dispatchers[index] = thread

    @staticmethod
    def _serve(index: int, tasks: "queue.SimpleQueue", started: concurrent.futures.Future) -> None:
        try:
            _C._enter_subpool(index)
        except BaseException as error:
            started.set_exception(error)
            return
        started.set_result(None)
        while True:
            fn, args, grad, future = tasks.get()
            try:
                with torch.set_grad_enabled(grad):
                    future.set_result(fn(*args))
            except BaseException as error:  # handed to the caller, who waits for it
                future.set_exception(error)


_process_subpools: Optional[Subpools] = None
_process_lock = threading.Lock()


def process_subpools(count: int, threads: int, nodes: Optional[Sequence[int]] = None) -> Optional[Subpools]:
    """The process's sub-pools (None for count 1): `count` of `threads` threads each, sub-pool i on
    NUMA node `nodes[i]` when given, made on first use. There is one set per process (the C++ pools
    are global); a later call asking for another shape gets the existing ones, with a warning, and
    its parts then run one after another on the calling thread's pool (run_parts)."""
    global _process_subpools
    check_int(count, "threadpool_count", 1)
    check_int(threads, "threads", 1)
    if count == 1:
        if nodes is not None:
            _checked_nodes(nodes, 1, {})
        return None
    wanted = (count, threads, None if nodes is None else tuple(nodes))
    with _process_lock:
        if _process_subpools is None:
            _process_subpools = Subpools(count, threads, nodes=nodes)
        elif (
            _process_subpools.count,
            _process_subpools.requested_threads,
            _process_subpools.requested_nodes,
        ) != wanted:
            warnings.warn(
                f"the process's sub-pools exist already ({_process_subpools.count} of "
                f"{_process_subpools.requested_threads} threads, nodes {_process_subpools.requested_nodes}); "
                f"ignoring {count} of {threads}, nodes {wanted[2]}",
                RuntimeWarning,
                stacklevel=3,
            )
        return _process_subpools


def run_parts(subpools: Optional[Subpools], fn: Callable, per_part_args: Sequence[tuple]) -> list:
    """[fn(*args) for each part]: at once on the sub-pools when there is one per part, otherwise
    one after another on the calling thread's pool (threadpool_count 1, or a wrapper whose
    threadpool_count differs from the process's CPUInfer)."""
    if subpools is not None and len(per_part_args) == subpools.count:
        return subpools.run([(fn, args) for args in per_part_args])
    return [fn(*args) for args in per_part_args]


def place_parts(subpools: Optional[Subpools], parts: Sequence[PackedExperts]) -> List[PackedExperts]:
    """`parts` with part p's weights on sub-pool p's node (unchanged without one sub-pool per part)."""
    if subpools is not None and len(parts) == subpools.count:
        return subpools.place(parts)
    return list(parts)


def _placed(experts: PackedExperts) -> PackedExperts:
    # every tensor field (weights, scales, biases), whichever PackedExperts has
    tensors = {f.name: getattr(experts, f.name) for f in dataclasses.fields(experts)}
    return dataclasses.replace(
        experts,
        **{name: _C._first_touch_copy(t.contiguous()) for name, t in tensors.items() if isinstance(t, torch.Tensor)},
    )
