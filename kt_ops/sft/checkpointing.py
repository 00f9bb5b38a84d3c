"""How a KT layer behaves under activation checkpointing: the action of each checkpoint phase for
an activation policy, and the backend's checkpoint cache (kt_ops.wrappers.sft_state.CheckpointCache)
as the layer and KTMoEFunction drive it. The backend may be any object with kt-kernel's checkpoint
methods; those it lacks are skipped or, for the checks, read from `_kt_has_cached_forward`."""

from __future__ import annotations

from .config import KTActivationPolicy


def activation_checkpoint_action(policy: KTActivationPolicy, phase: str) -> str:
    """What the CPU experts do in a checkpoint phase: keep the first forward's output
    ('cache_first_forward') and hand it to the recompute ('reuse_recompute') when the CPU side
    retains while the GPU side recomputes, else run normally."""
    if policy.gpu == "recompute" and policy.cpu == "retain":
        return {"first_forward": "cache_first_forward", "recompute": "reuse_recompute"}.get(phase, "normal")
    return "normal"


def validate_activation_checkpoint_phase(policy: KTActivationPolicy, phase: str, *, requires_backward=False) -> None:
    if phase not in ("none", "first_forward", "recompute"):
        raise RuntimeError(f"Cannot determine activation checkpoint phase: {phase}")
    if policy.gpu == "retain" and phase != "none":
        raise RuntimeError("activation_policy.gpu=retain conflicts with active gradient checkpointing")
    if requires_backward and policy.gpu == "recompute" and phase == "none":
        raise RuntimeError(
            "activation_policy.gpu=recompute requires non-reentrant gradient checkpointing with the KT context_fn "
            "(kt_ops.sft.dist_utils.get_activation_checkpoint_context_fn)"
        )


def poison_cache(backend, error) -> None:
    poison = getattr(backend, "poison_checkpoint_output", None)
    if backend is not None and poison is not None:
        poison(error)


def clear_cache(backend) -> None:
    clear = getattr(backend, "clear_checkpoint_output", None)
    if clear is not None:
        clear()


def check_cache_empty(backend) -> None:
    """Before a first forward that will cache its output: nothing is cached (else poisoned)."""
    try:
        validate = getattr(backend, "validate_checkpoint_cache_empty", None)
        if validate is not None:
            validate()
        elif getattr(backend, "_kt_has_cached_forward", False):
            raise RuntimeError("Checkpoint forward cache is still live before a new first forward")
    except Exception as error:
        poison_cache(backend, error)
        raise


def check_cache_ready(backend, qlen: int) -> None:
    """Before a recompute that reuses the cached output: it is there, for these qlen rows."""
    validate = getattr(backend, "validate_checkpoint_output", None)
    if validate is not None:
        validate(qlen)
    elif not getattr(backend, "_kt_has_cached_forward", False):
        raise RuntimeError("No cached checkpoint forward output is available")
