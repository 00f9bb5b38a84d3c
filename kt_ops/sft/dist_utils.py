"""Distributed helpers and the activation-checkpoint phase of kt_ops.sft (kt-kernel's
`kt_kernel.sft.dist_utils`).

Distributed SFT keeps the CPU experts in rank 0: every rank sends its rows there (gather), rank 0
computes, and each rank gets its rows of the output back (scatter). The checkpoint phase says whether
a forward runs under non-reentrant activation checkpointing, and in which pass: the first forward or
the recompute during backward.
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

_CHECKPOINT_PHASE: ContextVar[Optional[str]] = ContextVar("kt_activation_checkpoint_phase", default=None)
# The codes every rank exchanges to check that they take the same path (-1: not a known value).
_PHASES = {"none": 0, "first_forward": 1, "recompute": 2, "other": 3, "error": 4}
_ACTIONS = {"normal": 0, "cache_first_forward": 1, "reuse_recompute": 2}
_POLICIES = {None: 0, "recompute": 1, "retain": 2}


@contextlib.contextmanager
def activation_checkpoint_phase(phase: str) -> Iterator[None]:
    token = _CHECKPOINT_PHASE.set(phase)
    try:
        yield
    finally:
        _CHECKPOINT_PHASE.reset(token)


def get_activation_checkpoint_context_fn():
    """The `context_fn` for torch.utils.checkpoint.checkpoint(use_reentrant=False) that marks its
    two passes, so KT layers know which one they run in."""

    def context_fn():
        return activation_checkpoint_phase("first_forward"), activation_checkpoint_phase("recompute")

    return context_fn


def checkpoint_hook_mode() -> str:
    """'first_forward' or 'recompute' inside a checkpoint's passes, 'none' outside; the phase set by
    get_activation_checkpoint_context_fn, else read from torch's saved-tensor hook on top of the stack
    ('other' for a hook that is not a checkpoint's, 'error' when the stack cannot be read)."""
    explicit = _CHECKPOINT_PHASE.get()
    if explicit is not None:
        return explicit
    try:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except Exception:
        return "error"
    if top is None:
        return "none"
    try:
        pack = top[0]
        name = f"{getattr(pack, '__module__', '')}.{getattr(pack, '__qualname__', '')}"
    except Exception:
        return "other"
    if "_recomputation_hook.__init__.<locals>.pack_hook" in name:
        return "recompute"
    if "_checkpoint_hook.__init__.<locals>.pack_hook" in name:
        return "first_forward"
    return "other"


def distributed_rank_world_size() -> Tuple[int, int]:
    """(rank, world size): the process group's, else the launcher's RANK / WORLD_SIZE (models are
    built before the group exists, and rank 0 must already know it owns the experts), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    rank_text, world_text = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank_text is None or world_text is None:
        return 0, 1
    try:
        rank, world = int(rank_text), int(world_text)
    except ValueError as error:
        raise RuntimeError(
            f"Invalid distributed launcher environment: RANK={rank_text!r}, WORLD_SIZE={world_text!r}"
        ) from error
    if world <= 0 or not 0 <= rank < world:
        raise RuntimeError(f"Invalid distributed launcher environment: rank={rank}, world_size={world}")
    return rank, world


def distributed_on() -> Tuple[bool, int, int]:
    """(several ranks, rank, world size) of the running process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False, 0, 1
    world = dist.get_world_size()
    return world > 1, dist.get_rank(), world


def all_gather_qlens(local_qlen: int, device: torch.device, world_size: int) -> List[int]:
    import torch.distributed as dist

    mine = torch.tensor([int(local_qlen)], device=device, dtype=torch.int64)
    gathered = [torch.empty(1, device=device, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    return [int(t.item()) for t in gathered]


def all_gather_checkpoint_state(
    local_qlen: int,
    *,
    layer_idx: int,
    phase: str,
    action: str,
    cpu_policy: Optional[str] = None,
    gpu_policy: Optional[str] = None,
    owner_valid: bool = True,
    device: torch.device,
    world_size: int,
) -> List[int]:
    """Every rank's qlen, after checking that all ranks agree on the layer, checkpoint phase, action,
    activation policy and ownership: ranks that disagreed would enter different collectives and
    hang, so a disagreement raises on all of them instead."""
    import torch.distributed as dist

    state = [
        int(local_qlen),
        int(layer_idx),
        _PHASES.get(phase, -1),
        _ACTIONS.get(action, -1),
        _POLICIES.get(cpu_policy, -1),
        _POLICIES.get(gpu_policy, -1),
        int(bool(owner_valid)),
    ]
    if world_size == 1:
        states = [state]
    else:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Checkpoint state agreement requires an initialized process group")
        if dist.get_world_size() != world_size:
            raise RuntimeError(
                f"Checkpoint state world-size mismatch: got {dist.get_world_size()}, expected {world_size}"
            )
        mine = torch.tensor(state, device=device, dtype=torch.int64)
        gathered = [torch.empty(len(state), device=device, dtype=torch.int64) for _ in range(world_size)]
        dist.all_gather(gathered, mine)
        states = [[int(v) for v in t.tolist()] for t in gathered]
    names = ("qlen", "layer", "phase", "action", "cpu_policy", "gpu_policy")
    invalid = [
        f"rank {rank} {name}={'invalid' if name not in ('qlen', 'layer') else value}"
        for rank, values in enumerate(states)
        for name, value in zip(names, values)
        if value < 0
    ]
    if invalid or len({tuple(values[1:]) for values in states}) != 1:
        detail = "; ".join(
            f"rank {rank}: qlen={v[0]}, layer={v[1]}, phase_id={v[2]}, action_id={v[3]}, cpu_policy_id={v[4]}, "
            f"gpu_policy_id={v[5]}, owner_valid={v[6]}"
            for rank, v in enumerate(states)
        )
        prefix = f"Invalid checkpoint state ({', '.join(invalid)}). " if invalid else ""
        raise RuntimeError(f"{prefix}KT checkpoint control flow differs across ranks: {detail}")
    return [values[0] for values in states]


def qlen_offsets(all_qlens: Sequence[int]) -> List[int]:
    offsets = [0]
    for qlen in all_qlens:
        offsets.append(offsets[-1] + int(qlen))
    return offsets


def gather_varlen_to_rank0(
    local_tensor: torch.Tensor, *, all_qlens: Sequence[int], rank: int, world_size: int
) -> Optional[List[torch.Tensor]]:
    """Rank 0 gets every rank's rows (all_qlens[r] of them), in rank order; the others get None."""
    import torch.distributed as dist

    local_tensor = local_tensor.contiguous()
    if local_tensor.shape[0] != int(all_qlens[rank]):
        raise RuntimeError(
            f"Local leading dim mismatch on rank {rank}: got {local_tensor.shape[0]}, expected {all_qlens[rank]}"
        )
    if rank != 0:
        if all_qlens[rank]:
            for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, local_tensor, 0)]):
                request.wait()
        return None
    chunks = [local_tensor]
    receives = []
    for source in range(1, world_size):
        chunk = local_tensor.new_empty((int(all_qlens[source]), *local_tensor.shape[1:]))
        chunks.append(chunk)
        if chunk.shape[0]:
            receives.append(dist.P2POp(dist.irecv, chunk, source))
    if receives:
        for request in dist.batch_isend_irecv(receives):
            request.wait()
    return chunks


def scatter_varlen_from_rank0(
    *,
    rank0_chunks: Optional[Sequence[torch.Tensor]],
    all_qlens: Sequence[int],
    rank: int,
    world_size: int,
    feature_shape: Tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Each rank's rows of what rank 0 holds (rank0_chunks[r] for rank r)."""
    import torch.distributed as dist

    local = torch.empty((int(all_qlens[rank]), *feature_shape), device=device, dtype=dtype)
    if rank != 0:
        if local.shape[0]:
            for request in dist.batch_isend_irecv([dist.P2POp(dist.irecv, local, 0)]):
                request.wait()
        return local
    if rank0_chunks is None or len(rank0_chunks) != world_size:
        raise RuntimeError("rank0_chunks must hold one chunk per rank on rank 0")
    if int(rank0_chunks[0].shape[0]) != local.shape[0]:
        raise RuntimeError(f"Rank 0 local chunk mismatch: got {rank0_chunks[0].shape[0]}, expected {local.shape[0]}")
    if local.shape[0]:
        local.copy_(rank0_chunks[0])
    sends = []
    for target in range(1, world_size):
        chunk = rank0_chunks[target].contiguous()
        if int(chunk.shape[0]) != int(all_qlens[target]):
            raise RuntimeError(
                f"Rank {target} chunk mismatch on rank 0: got {chunk.shape[0]}, expected {all_qlens[target]}"
            )
        if chunk.shape[0]:
            sends.append(dist.P2POp(dist.isend, chunk, target))
    if sends:
        for request in dist.batch_isend_irecv(sends):
            request.wait()
    return local


def scatter_rank0_output(
    compute: Callable[[], torch.Tensor],
    qlens: Sequence[int],
    rank: int,
    world: int,
    hidden: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    context: str,
    on_error: Optional[Callable[[BaseException], None]] = None,
) -> torch.Tensor:
    """Every rank's rows of the [sum(qlens), hidden] output that rank 0 computes with compute(). An
    exception there is raised on every rank (on_error sees it on rank 0 first)."""
    chunks, error = None, None
    if rank == 0:
        try:
            output = compute().to(dtype).view(sum(qlens), hidden)
            offsets = qlen_offsets(qlens)
            chunks = [output[offsets[r] : offsets[r + 1]].contiguous() for r in range(world)]
        except Exception as exc:
            error = exc
            if on_error is not None:
                on_error(exc)
    sync_rank0_exception(error, device=device, context=context)
    return scatter_varlen_from_rank0(
        rank0_chunks=chunks,
        all_qlens=qlens,
        rank=rank,
        world_size=world,
        feature_shape=(hidden,),
        device=device,
        dtype=dtype,
    )


def sync_rank0_exception(error: Optional[BaseException], *, device: torch.device, context: str) -> None:
    """Raise rank 0's error (None: none) on every rank, so that no rank enters the next collective
    while another has given up."""
    import torch.distributed as dist

    on, rank, _ = distributed_on()
    if not on:
        if error is not None:
            raise RuntimeError(f"{context}: {error}") from error
        return
    encoded = f"{type(error).__name__}: {error}".encode("utf-8", "replace") if rank == 0 and error else b""
    length = torch.tensor([len(encoded)], device=device, dtype=torch.int64)
    dist.broadcast(length, src=0)
    if not int(length.item()):
        return
    payload = (
        torch.tensor(list(encoded), device=device, dtype=torch.uint8)
        if rank == 0
        else torch.empty(int(length.item()), device=device, dtype=torch.uint8)
    )
    dist.broadcast(payload, src=0)
    synced = RuntimeError(f"{context}: {bytes(payload.cpu().tolist()).decode('utf-8', 'replace')}")
    if error is not None:
        raise synced from error
    raise synced


def sync_any_rank_exception(error: Optional[BaseException], *, device: torch.device, context: str) -> None:
    """Raise the lowest failing rank's error on every rank (None: this rank did not fail)."""
    import torch.distributed as dist

    on, rank, world = distributed_on()
    if not on:
        if error is not None:
            raise RuntimeError(f"{context}: {error}") from error
        return
    encoded = f"{type(error).__name__}: {error}".encode("utf-8", "replace") if error is not None else b""
    lengths = [torch.empty(1, device=device, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([len(encoded)], device=device, dtype=torch.int64))
    failing = [r for r, length in enumerate(lengths) if int(length.item())]
    if not failing:
        return
    source = failing[0]
    payload = (
        torch.tensor(list(encoded), device=device, dtype=torch.uint8)
        if rank == source
        else torch.empty(int(lengths[source].item()), device=device, dtype=torch.uint8)
    )
    dist.broadcast(payload, src=source)
    synced = RuntimeError(f"{context} on rank {source}: {bytes(payload.cpu().tolist()).decode('utf-8', 'replace')}")
    if rank == source and error is not None:
        raise synced from error
    raise synced


# kt-kernel's names for these (its tests and integrations import them)
_checkpoint_hook_mode = checkpoint_hook_mode
_distributed_rank_world_size = distributed_rank_world_size
_all_gather_qlens = all_gather_qlens
_all_gather_checkpoint_state = all_gather_checkpoint_state
_qlen_offsets = qlen_offsets
_dist_gather_varlen_to_rank0 = gather_varlen_to_rank0
_dist_scatter_varlen_from_rank0 = scatter_varlen_from_rank0
