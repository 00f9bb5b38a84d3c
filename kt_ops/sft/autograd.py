"""KTMoEFunction: kt-kernel 0.7's autograd function over an SFT wrapper (`kt_kernel.sft.autograd`).

Its forward collects the output of a forward the caller already submitted (wrapper.submit_forward)
and its backward runs wrapper.backward. Under non-reentrant activation checkpointing the first
forward's output can be kept (cache_checkpoint_forward) and handed to the recompute
(reuse_cached_forward), so the experts run once. With several ranks the wrapper lives on rank 0:
outputs are scattered from there and output gradients gathered to it; rank 0's backward scales the
optimizer gradients by 1 / world size, the average DDP would take.

The LoRA's and base weights' gradients never flow through autograd: the wrapper writes them into
its gradient buffers (kt_ops.wrappers.sft_state). Only a wrapper that keeps no authoritative
gradients hands the base-weight buffers back to autograd (full fine-tuning), which accumulates them.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from .checkpointing import clear_cache, poison_cache
from .dist_utils import (
    scatter_rank0_output,
    all_gather_qlens,
    gather_varlen_to_rank0,
    scatter_varlen_from_rank0,
    distributed_on,
    qlen_offsets,
    sync_any_rank_exception,
    sync_rank0_exception,
)

logger = logging.getLogger(__name__)


def _release_window(wrapper: Any, context: str) -> None:
    """Close an authoritative optimizer window a failed step may have opened."""
    try:
        wrapper.release_authoritative_optimizer_grads()
    except Exception:
        logger.exception("Failed to close the authoritative optimizer-gradient window after %s", context)


def _collect_output(wrapper, qlen: int, device, cache: bool, reuse: bool) -> torch.Tensor:
    """The experts' output of the submitted forward (or of the cached first forward), on `device`."""
    if reuse:
        return wrapper.get_checkpoint_output(qlen, output_device=device)
    if cache:
        output = wrapper.sync_forward(output_device=None)
        wrapper.cache_checkpoint_output(output, qlen)
        return output.to(device=device, non_blocking=True)
    return wrapper.sync_forward(output_device=device)


def _checked_qlens(all_qlens, qlen: int, device, rank: int, world: int):
    if all_qlens is None:
        qlens = all_gather_qlens(qlen, device, world)
    else:
        qlens = [int(q) for q in all_qlens]
        if len(qlens) != world:
            raise RuntimeError(f"all_qlens length mismatch: got {len(qlens)}, expected {world}")
    if qlens[rank] != qlen:
        raise RuntimeError(f"Rank {rank} qlen mismatch: local={qlen}, all_qlens[{rank}]={qlens[rank]}")
    return qlens


class KTMoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        wrapper: Any,
        lora_ref: torch.Tensor,
        hidden_size: int,
        num_experts_per_tok: int,
        layer_idx: int,
        training: bool,
        train_lora: bool,
        all_qlens: Optional[Sequence[int]],
        cache_checkpoint_forward: bool = False,
        reuse_cached_forward: bool = False,
        gate_proj_param: Optional[torch.Tensor] = None,
        up_proj_param: Optional[torch.Tensor] = None,
        down_proj_param: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """[batch, seq, H] hidden_states -> the experts' output; lora_ref and the *_proj_param are
        the parameters whose gradients the wrapper produces (they make autograd call backward)."""
        batch, seq, _ = hidden_states.shape
        qlen, device, dtype = batch * seq, hidden_states.device, hidden_states.dtype
        on, rank, world = distributed_on()
        cache, reuse = bool(cache_checkpoint_forward), bool(reuse_cached_forward)
        if on:
            qlens = _checked_qlens(all_qlens, qlen, device, rank, world)

            def rank0_output():
                if wrapper is None:
                    raise RuntimeError("Rank 0 does not own the KT backend")
                return _collect_output(wrapper, sum(qlens), device, cache, reuse)

            def on_error(exc):
                if cache or reuse:
                    poison_cache(wrapper, exc)

            output = scatter_rank0_output(
                rank0_output,
                qlens,
                rank,
                world,
                hidden_size,
                device=device,
                dtype=dtype,
                context=f"Layer {layer_idx} CPU forward synchronization failed",
                on_error=on_error,
            ).view(batch, seq, hidden_size)
        elif wrapper is not None:
            try:
                output = _collect_output(wrapper, qlen, device, cache, reuse).view(batch, seq, hidden_size).to(dtype)
            except Exception as exc:
                if cache or reuse:
                    poison_cache(wrapper, exc)
                raise
        else:
            output = torch.empty(batch, seq, hidden_size, device=device, dtype=dtype)
        ctx.wrapper, ctx.hidden_size, ctx.k, ctx.layer_idx = wrapper, hidden_size, num_experts_per_tok, layer_idx
        ctx.shape, ctx.device, ctx.dtype = (batch, seq), device, dtype
        ctx.weights_meta = (topk_weights.shape, topk_weights.dtype, topk_weights.device)
        ctx.dist_on, ctx.world = on, world
        ctx.all_qlens = qlens if on else None
        ctx.retained = cache or reuse
        ctx.authoritative = bool(wrapper is not None and getattr(wrapper, "_uses_authoritative_optimizer_grads", False))
        ctx.full_weight_grad = bool(
            wrapper is not None and getattr(wrapper, "_full_weight_grad", False) and gate_proj_param is not None
        )
        # A saved tensor, so that non-reentrant checkpointing's unpack hook (the recompute, which
        # submits this layer's forward again) runs when backward reads it, before the wrapper's
        # backward needs that forward.
        ctx.save_for_backward(hidden_states.new_empty(()))
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        _recompute_then_check(ctx)
        if ctx.dist_on:
            grad_input, grad_weights = _distributed_backward(ctx, grad_output)
        elif ctx.wrapper is not None:
            grad_input, grad_weights = _local_backward(ctx, grad_output)
        else:
            grad_input = torch.zeros(*ctx.shape, ctx.hidden_size, device=ctx.device, dtype=ctx.dtype)
            shape, dtype, device = ctx.weights_meta
            grad_weights = torch.zeros(shape, device=device, dtype=dtype)
        _submit_next_repack(ctx)
        base = (None, None, None)
        if ctx.full_weight_grad and not ctx.authoritative:
            wrapper = ctx.wrapper
            base = (wrapper.grad_gate_proj_buf, wrapper.grad_up_proj_buf, wrapper.grad_down_proj_buf)
        return (grad_input, None, grad_weights, *([None] * 10), *base)


def _recompute_then_check(ctx) -> None:
    """Read the saved tensor (which runs a checkpoint's recompute) and make every rank fail together
    when one rank's recompute failed."""
    error = None
    try:
        _ = ctx.saved_tensors
    except Exception as exc:
        error = exc
    if ctx.retained and ctx.dist_on:
        try:
            sync_any_rank_exception(
                error, device=ctx.device, context=f"Layer {ctx.layer_idx} checkpoint recompute failed"
            )
        except Exception as exc:
            poison_cache(ctx.wrapper, exc)
            raise
    elif error is not None:
        if ctx.retained:
            poison_cache(ctx.wrapper, error)
        raise error


def _local_backward(ctx, grad_output):
    batch, seq = ctx.shape
    wrapper = ctx.wrapper
    try:
        scale = {"optimizer_grad_scale": 1.0} if ctx.authoritative else {}
        result = wrapper.backward(grad_output.reshape(batch * seq, ctx.hidden_size), output_device=ctx.device, **scale)
        grad_input, grad_weights = _grads_of(result)
        grad_input = grad_input.view(batch, seq, ctx.hidden_size).to(ctx.dtype)
        grad_weights = grad_weights.to(torch.bfloat16)
    except Exception as exc:
        if ctx.retained:
            poison_cache(wrapper, exc)
        if ctx.authoritative:
            _release_window(wrapper, "a local backward error")
        raise
    finally:
        try:
            clear_cache(wrapper)
        except Exception:
            if ctx.authoritative:
                _release_window(wrapper, "a checkpoint cache cleanup error")
            raise
    return grad_input, grad_weights


def _grads_of(result):
    """(grad_input, grad_weights) of a wrapper's backward: kt-kernel's pair, its older triple, or the
    specification's (grad_input, {..., grad_weights})."""
    if isinstance(result, tuple) and len(result) == 2:
        grad_input, second = result
        return grad_input, second["grad_weights"] if isinstance(second, dict) else second
    if isinstance(result, tuple) and len(result) == 3:
        return result[0], result[2]
    raise ValueError("KTMoEWrapper.backward returned an unexpected format")


def _distributed_backward(ctx, grad_output):
    """Gather the output gradients to rank 0, run its backward once over every rank's rows (scaled
    by 1 / world size), scatter the input and routing-weight gradients back."""
    on, rank, world = distributed_on()
    batch, seq = ctx.shape
    qlen = batch * seq
    qlens = ctx.all_qlens if ctx.all_qlens is not None else all_gather_qlens(qlen, ctx.device, world)
    if qlens[rank] != qlen:
        raise RuntimeError(f"Backward qlen mismatch on rank {rank}: local={qlen}, all_qlens[{rank}]={qlens[rank]}")
    gathered = gather_varlen_to_rank0(
        grad_output.reshape(qlen, ctx.hidden_size).contiguous(), all_qlens=qlens, rank=rank, world_size=world
    )
    published = False
    chunks_input = chunks_weights = error = None
    if rank == 0:
        try:
            if ctx.wrapper is None:
                raise RuntimeError("Rank 0 does not own the KT backend")
            everything = torch.cat(gathered, dim=0)
            result = ctx.wrapper.backward(everything, output_device=ctx.device, optimizer_grad_scale=1.0 / world)
            published = ctx.authoritative
            grad_input, grad_weights = _grads_of(result)
            grad_input = grad_input.to(ctx.dtype).view(-1, ctx.hidden_size)
            grad_weights = grad_weights.to(torch.bfloat16).view(-1, ctx.k)
            offsets = qlen_offsets(qlens)
            chunks_input = [grad_input[offsets[r] : offsets[r + 1]].contiguous() for r in range(world)]
            chunks_weights = [grad_weights[offsets[r] : offsets[r + 1]].contiguous() for r in range(world)]
        except Exception as exc:
            error = exc
            if published:
                _release_window(ctx.wrapper, "a distributed backward error")
            if ctx.retained:
                poison_cache(ctx.wrapper, exc)
        finally:
            try:
                clear_cache(ctx.wrapper)
            except Exception as clear_error:
                error = error or clear_error
                poison_cache(ctx.wrapper, clear_error)
    sync_rank0_exception(error, device=ctx.device, context=f"Layer {ctx.layer_idx} CPU backward failed")
    try:
        grad_input = scatter_varlen_from_rank0(
            rank0_chunks=chunks_input,
            all_qlens=qlens,
            rank=rank,
            world_size=world,
            feature_shape=(ctx.hidden_size,),
            device=ctx.device,
            dtype=ctx.dtype,
        ).view(batch, seq, ctx.hidden_size)
        shape, dtype, device = ctx.weights_meta
        grad_weights = scatter_varlen_from_rank0(
            rank0_chunks=chunks_weights,
            all_qlens=qlens,
            rank=rank,
            world_size=world,
            feature_shape=(ctx.k,),
            device=device,
            dtype=torch.bfloat16,
        )
        grad_weights = grad_weights.view(shape).to(dtype)
    except Exception:
        if published:
            _release_window(ctx.wrapper, "a gradient scatter error")
        raise
    return grad_input, grad_weights


def _submit_next_repack(ctx) -> None:
    """Start the backward repack of the next layer in backward order (kt-kernel's overlap of weight
    preparation with this layer's GPU work), failing on every rank together."""
    on, rank, _ = distributed_on()
    following = getattr(ctx.wrapper, "_next_backward_wrapper", None)
    error = None
    if (not on or rank == 0) and following is not None and getattr(following, "share_backward_bb", False):
        try:
            following.submit_backward_repack()
        except Exception as exc:
            error = exc
            if ctx.authoritative and ctx.wrapper is not None:
                _release_window(ctx.wrapper, "a repack submission error")
    if on:
        sync_rank0_exception(error, device=ctx.device, context=f"Layer {ctx.layer_idx} backward repack failed")
    elif error is not None:
        raise error
