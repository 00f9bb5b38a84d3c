"""kt-sft's training checkpoints: each `checkpoint-N` appears whole or not at all, and a run resumes
only from a checkpoint whose every file is intact.

Trainer writes a checkpoint file by file into `output_dir/checkpoint-N`, so a kill in between left a
partial directory, and resuming from it went on silently where a file was missing (no optimizer.pt:
a fresh optimizer; no rng_state.pth: other random numbers). `atomic_checkpoints(trainer)` has
Trainer write into a staging directory, adds the manifest `kt_checkpoint.json` (size and SHA-256 of
every file, written last) and switches the directory into place (core/durable.py). With several
processes every rank writes its own files (its RNG state, its shards) into rank 0's staging
directory, and rank 0 adds the manifest and switches it in once all are written.
`sharded_checkpoints(trainer)` saves an FSDP2 model's trainable parameters and optimizer state as
each rank's shards (torch.distributed.checkpoint; kt_ops.integration.fsdp). `resume_checkpoint`
checks a checkpoint against its manifest, and against the run (as many processes, sharded or not),
before Trainer reads any of it.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Iterator, Optional, Union

import torch

from ..core.durable import atomic_directory, recover, verify_manifest, write_manifest
from .fsdp import (
    SHARDED_MODEL,
    SHARDED_OPTIMIZER,
    load_sharded_model,
    load_sharded_optimizer,
    save_sharded_model,
    save_sharded_optimizer,
)

MANIFEST = "kt_checkpoint.json"
# What an exact resume reads besides the model's state; Trainer starts any of them afresh without a
# word when it is missing (save_only_model checkpoints have none of them). The optimizer state is
# optimizer.pt, or each rank's shards of it (sharded_checkpoints); the RNG state is per process.
RESUME_FILES = ("trainer_state.json", "scheduler.pt")
_SHARDED_STATE = (f"{SHARDED_MODEL}/.metadata", f"{SHARDED_OPTIMIZER}/.metadata")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_RNG_OF_RANK = re.compile(r"rng_state_(\d+)\.pth")


class CheckpointError(ValueError):
    """A checkpoint that cannot resume training exactly (incomplete, damaged or model-only)."""


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _staged(final: str) -> Iterator[str]:
    """Yields the staging directory of checkpoint `final` on every rank: rank 0's (atomic_directory),
    where each rank writes its files; rank 0 adds the manifest once all have written theirs and
    switches it in, and no rank leaves before the switch (a resume or the next save may read it)."""
    if not _distributed():
        with atomic_directory(final) as staged:
            yield staged
            write_manifest(staged, MANIFEST)
        return
    dist = torch.distributed
    if dist.get_rank() == 0:
        with atomic_directory(final) as staged:
            dist.broadcast_object_list([staged], src=0)
            yield staged
            dist.barrier()  # every rank's files are written
            write_manifest(staged, MANIFEST)
    else:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        yield box[0]
        dist.barrier()
    dist.barrier()


def atomic_checkpoints(trainer) -> None:
    """Make `trainer` (a transformers Trainer, or trl's) write each checkpoint into a staging
    directory beside `checkpoint-N`, with a manifest, and switch it into place in one step. Its
    rotation (`save_total_limit`) then runs on the output directory as before. Evaluation-based
    best-checkpoint tracking is not supported (kt-sft does not evaluate)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    save_checkpoint = trainer._save_checkpoint

    def atomic_save_checkpoint(model, trial):
        run_dir = trainer._get_output_dir(trial=trial)
        os.makedirs(run_dir, exist_ok=True)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
        with _staged(final) as staged:
            # Trainer names the directory itself (<run dir>/checkpoint-N): make the staging directory
            # its run directory for this save. Its rotation there finds nothing else to delete.
            trainer._get_output_dir = lambda trial=None: os.path.dirname(staged)
            try:
                save_checkpoint(model, trial)
            finally:
                del trainer._get_output_dir
        if trainer.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=trainer.args.save_total_limit,
                best_model_checkpoint=trainer.state.best_model_checkpoint,
                use_mtime=True,
            )

    trainer._save_checkpoint = atomic_save_checkpoint


def sharded_checkpoints(trainer) -> None:
    """Make `trainer`, whose model is sharded by FSDP2 (kt_ops.integration.fsdp.shard_model), save and
    resume the model's trainable parameters and the optimizer state as every rank's shards
    (torch.distributed.checkpoint: `fsdp_model/`, `fsdp_optimizer/`; rank 0 writes `scheduler.pt`).
    Trainer's own writers would save rank 0's shards only, as if they were the whole."""
    from transformers.trainer import SCHEDULER_NAME

    def save_model(output_dir=None, _internal_call=False):
        if not _internal_call:
            raise RuntimeError(
                "Trainer.save_model cannot write an FSDP2-sharded model's adapter; gather it with "
                "kt_ops.integration.fsdp.gathered_adapter_params and save it on rank 0"
            )
        save_sharded_model(output_dir, trainer.model)

    def save_optimizer_and_scheduler(output_dir):
        save_sharded_optimizer(output_dir, trainer.model, trainer.optimizer)
        if trainer.args.should_save:
            torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def load_from_checkpoint(resume_from_checkpoint, model=None):
        load_sharded_model(resume_from_checkpoint, trainer.model)

    def load_optimizer_and_scheduler(checkpoint):
        if checkpoint is None:
            return
        load_sharded_optimizer(checkpoint, trainer.model, trainer.optimizer)
        scheduler = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        trainer.lr_scheduler.load_state_dict(scheduler)

    trainer.save_model = save_model
    trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    trainer._load_from_checkpoint = load_from_checkpoint
    trainer._load_optimizer_and_scheduler = load_optimizer_and_scheduler


def _check_layout(path: str, files: list, processes: int, sharded: bool) -> None:
    """The checkpoint holds what this run resumes from: the optimizer state in its form (sharded or
    optimizer.pt) and the RNG state of each of its `processes`."""
    has_sharded = [name for name in _SHARDED_STATE if name in files]
    if sharded and not has_sharded and "optimizer.pt" in files:
        raise CheckpointError(f"cannot resume from {path}: it was saved without fsdp; resume it without fsdp")
    if not sharded and has_sharded:
        raise CheckpointError(f"cannot resume from {path}: it was saved sharded by FSDP2; resume it with fsdp")
    ranks = [f for f in files if _RNG_OF_RANK.fullmatch(f)]
    saved_by = len(ranks) or int("rng_state.pth" in files)
    optimizer = _SHARDED_STATE if sharded else ("optimizer.pt",)
    missing = [name for name in (*optimizer, *RESUME_FILES) if name not in files]
    if saved_by == 0:
        missing.append("rng_state.pth" if processes == 1 else "rng_state_0.pth")
    if missing:
        raise CheckpointError(
            f"cannot resume from {path}: it has no {missing[0]} (saved with save_only_model?), "
            "so training would not continue as it was"
        )
    if saved_by != processes:
        raise CheckpointError(
            f"cannot resume from {path}: it was saved by {saved_by} process(es) (its rng_state files) and "
            f"this run has {processes}; each process's data and random numbers continue only on as many"
        )


def check_checkpoint(path: str, processes: int = 1, sharded: bool = False) -> None:
    """Raise CheckpointError naming the file when the checkpoint directory `path` cannot resume
    training exactly with `processes` processes (`sharded`: with FSDP2): a file missing, truncated or
    changed since it was saved, no manifest (the save was interrupted, or another tool wrote it), no
    optimizer / scheduler / RNG state, or saved by another number of processes or in the other form."""
    if not os.path.isdir(path):
        raise CheckpointError(f"resume_from_checkpoint {path!r} is not a directory")
    try:
        files = verify_manifest(path, MANIFEST)
    except ValueError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from None
    _check_layout(path, files, processes, sharded)


def resume_checkpoint(
    value: Union[None, bool, str], output_dir: str, processes: int = 1, sharded: bool = False
) -> Optional[str]:
    """The checkpoint a run of `processes` processes (`sharded`: with FSDP2) resumes from. `value`:
    None or False (none), a checkpoint directory (checked), or True: the newest complete
    `checkpoint-N` in `output_dir`, newer incomplete ones skipped with a warning. Raises
    CheckpointError naming what is wrong."""
    if value is None or value is False:
        return None
    if value is not True:
        check_checkpoint(value, processes, sharded)
        return value
    recover(output_dir)  # staging directories of saves a kill interrupted
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted((int(m.group(1)) for n in names if (m := _CHECKPOINT.fullmatch(n))), reverse=True)
    for step in steps:
        path = os.path.join(output_dir, f"checkpoint-{step}")
        try:
            check_checkpoint(path, processes, sharded)
            return path
        except CheckpointError as e:
            warnings.warn(f"resume_from_checkpoint: true skips {path}: {e}", stacklevel=2)
    raise CheckpointError(
        f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-N "
        f"({len(steps)} incomplete); set it to false to start afresh"
    )
