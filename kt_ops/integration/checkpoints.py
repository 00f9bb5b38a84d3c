"""kt-sft's training checkpoints: each `checkpoint-N` appears whole or not at all, and a run resumes
only from a checkpoint whose every file is intact.

Trainer writes a checkpoint file by file into `output_dir/checkpoint-N`, so a kill in between left a
partial directory, and resuming from it went on silently where a file was missing (no optimizer.pt:
a fresh optimizer; no rng_state.pth: other random numbers). `atomic_checkpoints(trainer)` has
Trainer write into a staging directory, adds the manifest `kt_checkpoint.json` (size and SHA-256 of
every file, written last) and switches the directory into place (core/durable.py).
`resume_checkpoint` checks a checkpoint against its manifest before Trainer reads any of it.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional, Union

from ..core.durable import atomic_directory, recover, verify_manifest, write_manifest

MANIFEST = "kt_checkpoint.json"
# What an exact resume reads besides the adapter; Trainer starts any of them afresh without a word
# when it is missing (save_only_model checkpoints have none of them).
RESUME_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot resume training exactly (incomplete, damaged or model-only)."""


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
        with atomic_directory(final) as staged:
            # Trainer names the directory itself (<run dir>/checkpoint-N): make the staging directory
            # its run directory for this save. Its rotation there finds nothing else to delete.
            trainer._get_output_dir = lambda trial=None: os.path.dirname(staged)
            try:
                save_checkpoint(model, trial)
            finally:
                del trainer._get_output_dir
            write_manifest(staged, MANIFEST)
        if trainer.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=trainer.args.save_total_limit,
                best_model_checkpoint=trainer.state.best_model_checkpoint,
                use_mtime=True,
            )

    trainer._save_checkpoint = atomic_save_checkpoint


def check_checkpoint(path: str) -> None:
    """Raise CheckpointError naming the file when the checkpoint directory `path` cannot resume
    training exactly: a file missing, truncated or changed since it was saved, no manifest (the save
    was interrupted, or another tool wrote it), or no optimizer / scheduler / RNG state."""
    if not os.path.isdir(path):
        raise CheckpointError(f"resume_from_checkpoint {path!r} is not a directory")
    try:
        files = verify_manifest(path, MANIFEST)
    except ValueError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from None
    missing = [name for name in RESUME_FILES if name not in files]
    if missing:
        raise CheckpointError(
            f"cannot resume from {path}: it has no {missing[0]} (saved with save_only_model?), "
            "so training would not continue as it was"
        )


def resume_checkpoint(value: Union[None, bool, str], output_dir: str) -> Optional[str]:
    """The checkpoint a run resumes from. `value`: None or False (none), a checkpoint directory
    (checked), or True: the newest complete `checkpoint-N` in `output_dir`, newer incomplete ones
    skipped with a warning. Raises CheckpointError naming what is wrong."""
    if value is None or value is False:
        return None
    if value is not True:
        check_checkpoint(value)
        return value
    recover(output_dir)  # staging directories of saves a kill interrupted
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted((int(m.group(1)) for n in names if (m := _CHECKPOINT.fullmatch(n))), reverse=True)
    for step in steps:
        path = os.path.join(output_dir, f"checkpoint-{step}")
        try:
            check_checkpoint(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"resume_from_checkpoint: true skips {path}: {e}", stacklevel=2)
    raise CheckpointError(
        f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-N "
        f"({len(steps)} incomplete); set it to false to start afresh"
    )
