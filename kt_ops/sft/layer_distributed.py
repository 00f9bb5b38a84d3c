"""KTMoELayerWrapper's rank-0 protocol (several ranks, the CPU backend on rank 0): every rank
checks with the others that they take the same path (layer, checkpoint phase and action, activation
policy, ownership) before any collective, sends its rows to rank 0, which submits one forward over all
of them, and later receives its rows of the output. A failure on any rank is raised on every rank."""

from __future__ import annotations

from typing import Optional

import torch

from .checkpointing import check_cache_empty, check_cache_ready, poison_cache, validate_activation_checkpoint_phase
from .dist_utils import (
    scatter_rank0_output,
    all_gather_checkpoint_state,
    all_gather_qlens,
    distributed_on,
    gather_varlen_to_rank0,
    sync_any_rank_exception,
    sync_rank0_exception,
)


def _ownership_error(layer, rank: int, world: int) -> Optional[Exception]:
    try:
        wrapped = int(getattr(layer, "_kt_world_size_at_wrap", world))
        if wrapped != world:
            raise RuntimeError(
                f"KT wrapper was created for world_size={wrapped}, but the active process group has world_size={world}"
            )
        if rank == 0 and layer.wrapper is None:
            raise RuntimeError("rank 0 does not own the KT backend")
        if rank != 0 and layer.wrapper is not None:
            raise RuntimeError(f"rank {rank} unexpectedly owns a KT backend")
    except Exception as error:
        return error
    return None


def _rank0_prepare(layer, action: str, total_qlen: int, reuse: bool) -> Optional[Exception]:
    """Rank 0's refresh and checkpoint-cache checks before the step (the error, or None)."""
    try:
        layer._refresh_backend_weights()
        if action == "cache_first_forward":
            check_cache_empty(layer.wrapper)
        if reuse:
            if layer.wrapper is None:
                raise RuntimeError("Rank 0 does not own the KT backend")
            check_cache_ready(layer.wrapper, total_qlen)
    except Exception as error:
        if reuse:
            poison_cache(layer.wrapper, error)
        return error
    return None


def distributed_submit(layer, hidden_states, topk_ids, topk_weights, save: bool, phase: str, action: str):
    """(the GPU-side experts' output or None, every rank's qlen)."""
    _, rank, world = distributed_on()
    device = hidden_states.device
    qlen = hidden_states.shape[0] * hidden_states.shape[1]
    ownership = _ownership_error(layer, rank, world)
    policy = layer._kt_activation_policy
    qlens = all_gather_checkpoint_state(
        qlen,
        layer_idx=layer.layer_idx,
        phase=phase,
        action=action,
        cpu_policy=policy.cpu,
        gpu_policy=policy.gpu,
        owner_valid=ownership is None,
        device=device,
        world_size=world,
    )
    if qlens[rank] != qlen:
        raise RuntimeError(f"Rank {rank} qlen mismatch: local={qlen}, all_qlens[{rank}]={qlens[rank]}")
    validate_activation_checkpoint_phase(policy, phase, requires_backward=save)
    if ownership is not None:
        raise RuntimeError(f"Layer {layer.layer_idx} KT ownership validation failed: {ownership}") from ownership
    reuse = action == "reuse_recompute"
    error = _rank0_prepare(layer, action, sum(qlens), reuse) if rank == 0 else None
    if reuse:
        sync_rank0_exception(
            error, device=device, context=f"Layer {layer.layer_idx} checkpoint cache validation failed"
        )
    else:
        error = _gather_and_submit(layer, hidden_states, topk_ids, topk_weights, save, qlens, error)
        if rank == 0 and error is not None and action == "cache_first_forward":
            poison_cache(layer.wrapper, error)
        sync_rank0_exception(error, device=device, context=f"Layer {layer.layer_idx} CPU forward submission failed")
    gpu_output = None
    if layer._shared_expert_attr is not None or layer.lora_experts is not None:
        gpu_error = None
        try:
            gpu_output = layer._compute_gpu_output(hidden_states)
        except Exception as exc:
            gpu_error = exc
        try:
            sync_any_rank_exception(
                gpu_error, device=device, context=f"Layer {layer.layer_idx} local GPU expert forward failed"
            )
        except Exception as exc:
            if action != "normal":
                poison_cache(layer.wrapper, exc)
            raise
    return gpu_output, qlens


def _gather_and_submit(layer, hidden_states, topk_ids, topk_weights, save, qlens, error):
    _, rank, world = distributed_on()
    qlen, k = qlens[rank], layer.moe_config.num_experts_per_tok
    gathered = [
        gather_varlen_to_rank0(t.detach().reshape(qlen, -1).contiguous(), all_qlens=qlens, rank=rank, world_size=world)
        for t in (hidden_states, topk_ids.reshape(qlen, k), topk_weights.reshape(qlen, k))
    ]
    if rank != 0 or error is not None:
        return error
    try:
        if layer.wrapper is None:
            raise RuntimeError("Rank 0 does not own the KT backend")
        x, ids, weights = (torch.cat(parts, dim=0) for parts in gathered)
        layer.wrapper.submit_forward(x, ids, weights, save_for_backward=save)
    except Exception as exc:
        return exc
    return None


def no_grad_output(layer, hidden_states: torch.Tensor, all_qlens) -> torch.Tensor:
    """The experts' output of a forward that needs no backward (no autograd node)."""
    batch, seq, hidden = hidden_states.shape
    qlen, device, dtype = batch * seq, hidden_states.device, hidden_states.dtype
    on, rank, world = distributed_on()
    if not on:
        if layer.wrapper is None:
            return torch.empty(batch, seq, hidden, device=device, dtype=dtype)
        return layer.wrapper.sync_forward(output_device=device).view(batch, seq, hidden).to(dtype)
    qlens = [int(q) for q in all_qlens] if all_qlens is not None else all_gather_qlens(qlen, device, world)
    if len(qlens) != world or qlens[rank] != qlen:
        raise RuntimeError(f"Rank {rank} qlen mismatch: local={qlen}, all_qlens={qlens}")

    def rank0_output():
        if layer.wrapper is None:
            raise RuntimeError("Rank 0 wrapper is required in the distributed KT path")
        return layer.wrapper.sync_forward(output_device=device)

    output = scatter_rank0_output(
        rank0_output,
        qlens,
        rank,
        world,
        hidden,
        device=device,
        dtype=dtype,
        context=f"Layer {layer.layer_idx} CPU inference forward failed",
    )
    return output.view(batch, seq, hidden)
