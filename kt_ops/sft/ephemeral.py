"""The ephemeral INT8 weight lifecycle (`kt_kernel.sft.ephemeral`, kt_weight_lifecycle='ephemeral'):
a producer (LLaMA-Factory's KT launcher) quantizes a model's experts into a private staging
directory in shared memory, `/dev/shm/kt-int8-{run_id}.staging`, publishes it (the manifest written,
then the directory renamed to `kt-int8-{run_id}`), and the trainer's wrapping loads each layer and
deletes its files at once (EphemeralKTWeightStore.consume_layer), so the quantized copy never holds
the whole model in RAM next to the loaded one. A crash leaves a staging lease naming its producer
process, from which a later run can reclaim the orphaned tree.

Every deletion is restricted to files the manifest lists, under a directory this user owns, that
nobody else can write, directly in the ephemeral base (symlinks are never followed). The manifest is
schema 1 of kt_ops.sft.weight_manifest, with run_id, owner_uid and producer_pid; the files' sizes
are recorded as found (the producer's quantizer decides them), not derived from the geometry.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import stat
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Tuple

from .weight_manifest import check_int8_geometry, check_int8_layer, scan_int8_layer

MANIFEST_NAME = "kt-ephemeral-manifest.json"
STAGING_LEASE_NAME = "kt-ephemeral-staging-lease.json"
SCHEMA_VERSION = 1
_EPHEMERAL_BASE = Path("/dev/shm")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{5,127}")

__all__ = [
    "MANIFEST_NAME",
    "STAGING_LEASE_NAME",
    "EphemeralKTWeightStore",
    "cleanup_ephemeral_int8_staging",
    "publish_ephemeral_int8_weights",
    "reclaim_stale_ephemeral_int8_staging",
    "validate_ephemeral_run_id",
    "write_ephemeral_staging_lease",
]


def validate_ephemeral_run_id(run_id: str) -> str:
    """`run_id`, checked before it becomes part of a path: 6 to 128 letters, digits, '.', '_', '-',
    starting with a letter or digit."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"ephemeral INT8 run_id must be 6-128 characters of letters, digits, '.', '_' or '-' (starting with a "
            f"letter or digit), got {run_id!r}"
        )
    return run_id


def _owned_root(root, run_id: str, staging: bool) -> Path:
    """The resolved root, after checking it is `kt-int8-{run_id}[.staging]`, a real directory right
    in the ephemeral base, owned by this user and writable by nobody else."""
    name = f"kt-int8-{validate_ephemeral_run_id(run_id)}" + (".staging" if staging else "")
    path = Path(root)
    if not path.is_absolute() or path.name != name:
        raise ValueError(f"ephemeral INT8 weight root must be an absolute path named {name!r}, got {str(path)!r}")
    if path.is_symlink():
        raise ValueError(f"ephemeral INT8 weight root must not be a symlink: {path}")
    resolved = path.resolve(strict=True)
    base = _EPHEMERAL_BASE.resolve(strict=True)
    if resolved.parent != base or not resolved.is_dir():
        raise ValueError(f"ephemeral INT8 weight root must be a directory directly in {base}, got {resolved}")
    info = resolved.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"ephemeral INT8 weight root {resolved} is owned by uid {info.st_uid}, not {os.getuid()}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"ephemeral INT8 weight root {resolved} must not be group- or world-writable")
    return resolved


def _write_json(root: Path, name: str, payload: Dict[str, Any]) -> None:
    """Write root/name atomically (a private temporary file, synced, then renamed)."""
    temporary = root / f".{name}.{os.getpid()}.tmp"
    with temporary.open("x", encoding="utf-8") as handle:
        json.dump(payload, handle, sort_keys=True, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, root / name)


def _read_json(path: Path, what: str) -> Dict[str, Any]:
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{what} must be a regular file: {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_lease(lease: Dict[str, Any], run_id: str, error=ValueError) -> None:
    for key, want in (("schema_version", SCHEMA_VERSION), ("run_id", run_id), ("owner_uid", os.getuid())):
        if lease.get(key) != want:
            raise error(f"ephemeral staging lease {key} mismatch: expected {want!r}, got {lease.get(key)!r}")


def publish_ephemeral_int8_weights(
    staging_root,
    *,
    run_id: str,
    layer_indices: Iterable[int],
    numa_count: int,
    expert_num: int,
    hidden_size: int,
    intermediate_size: int,
) -> Path:
    """Check that the staging tree holds exactly the model's INT8 files, write its manifest, and
    rename it to the ready root, which is returned."""
    geometry = (numa_count, expert_num, hidden_size, intermediate_size)
    check_int8_geometry(*geometry)
    staging = _owned_root(staging_root, run_id, staging=True)
    lease = staging / STAGING_LEASE_NAME
    if lease.exists() or lease.is_symlink():
        _check_lease(_read_json(lease, "ephemeral staging lease"), run_id)
        lease.unlink()
    layers = sorted({int(i) for i in layer_indices})
    if not layers:
        raise ValueError("ephemeral INT8 weights need at least one expert layer")
    wanted, actual = {f"_layer_{i}" for i in layers}, {entry.name for entry in staging.iterdir()}
    if actual != wanted:
        raise ValueError(
            f"ephemeral INT8 staging root entries differ from the model's layers: {sorted(actual ^ wanted)}"
        )
    entries = [scan_int8_layer(staging, i, geometry, check_sizes=False) for i in layers]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "state": "ready",
        "run_id": run_id,
        "owner_uid": os.getuid(),
        "producer_pid": os.getpid(),
        "created_unix_ns": time.time_ns(),
        "expert_weight_format": "int8",
        "backend": "AMXINT8",  # kt-kernel's consumers require this value in schema 1
        **dict(zip(("threadpool_count", "expert_num", "hidden_size", "intermediate_size"), geometry)),
        "layers": entries,
        "bytes": sum(entry["bytes"] for entry in entries),
    }
    _write_json(staging, MANIFEST_NAME, manifest)
    ready = staging.with_name(f"kt-int8-{run_id}")
    if ready.exists() or ready.is_symlink():
        raise FileExistsError(f"ephemeral INT8 ready root already exists: {ready}")
    os.replace(staging, ready)
    return ready


def _remove_tree(root: Path) -> None:
    """Remove a checked tree bottom-up without following links (a link is removed, not entered)."""
    for current, directories, files in os.walk(root, topdown=False, followlinks=False):
        for name in files:
            Path(current, name).unlink()
        for name in directories:
            entry = Path(current, name)
            entry.unlink() if entry.is_symlink() else entry.rmdir()
    root.rmdir()


def cleanup_ephemeral_int8_staging(staging_root, *, run_id: str) -> None:
    """Remove an owned staging tree (a producer's failure path)."""
    _remove_tree(_owned_root(staging_root, run_id, staging=True))


def write_ephemeral_staging_lease(staging_root, *, run_id: str, producer_pid: int) -> None:
    """Record the producer process of a staging tree, so that an orphan can be told from a live one."""
    if int(producer_pid) <= 0:
        raise ValueError(f"producer_pid must be positive, got {producer_pid}")
    root = _owned_root(staging_root, run_id, staging=True)
    lease = {"schema_version": SCHEMA_VERSION, "run_id": run_id, "owner_uid": os.getuid()}
    _write_json(root, STAGING_LEASE_NAME, {**lease, "producer_pid": int(producer_pid)})


def reclaim_stale_ephemeral_int8_staging(staging_root, *, run_id: str) -> bool:
    """Remove a staging tree whose leased producer process is gone; False (nothing removed) while it
    lives. A tree without a valid lease is refused (RuntimeError)."""
    root = _owned_root(staging_root, run_id, staging=True)
    path = root / STAGING_LEASE_NAME
    if path.is_symlink() or not path.is_file():
        raise RuntimeError(f"refusing to reclaim {root}: it has no regular {STAGING_LEASE_NAME}")
    lease = json.loads(path.read_text(encoding="utf-8"))
    _check_lease(lease, run_id, RuntimeError)
    producer = lease.get("producer_pid")
    if not isinstance(producer, int) or producer <= 0:
        raise RuntimeError(f"refusing to reclaim {root}: invalid producer_pid {producer!r}")
    if Path(f"/proc/{producer}").exists():
        return False
    _remove_tree(root)
    return True


class EphemeralKTWeightStore:
    """One published run, opened by the trainer: consume_layer(L) after layer L is loaded deletes its
    files, finish() the rest once all are consumed. Until then, cleanup() (also at exit and on
    SIGINT / SIGTERM) deletes whatever the manifest lists and nothing else."""

    def __init__(self, root: Path, manifest: Dict[str, Any], geometry: Tuple[int, int, int, int]):
        self.root = root
        self.manifest = manifest
        self._geometry = geometry
        self._closed = False
        self._previous_handlers: Dict[int, Any] = {}
        atexit.register(self.cleanup)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    @classmethod
    def open(
        cls,
        root,
        *,
        layer_indices: Iterable[int],
        numa_count: int,
        expert_num: int,
        hidden_size: int,
        intermediate_size: int,
    ) -> "EphemeralKTWeightStore":
        """Check a ready root against the model (every layer ready, exactly the listed files)."""
        geometry = (int(numa_count), int(expert_num), int(hidden_size), int(intermediate_size))
        check_int8_geometry(*geometry)
        manifest = _read_json(Path(root) / MANIFEST_NAME, "ephemeral INT8 manifest")
        resolved = _owned_root(root, str(manifest.get("run_id", "")), staging=False)
        header = {"schema_version": SCHEMA_VERSION, "state": "ready", "owner_uid": os.getuid()}
        header.update({"expert_weight_format": "int8", "backend": "AMXINT8"})
        header.update(zip(("threadpool_count", "expert_num", "hidden_size", "intermediate_size"), geometry))
        for key, want in header.items():
            if manifest.get(key) != want:
                raise ValueError(
                    f"ephemeral INT8 manifest {key} mismatch: expected {want!r}, got {manifest.get(key)!r}"
                )
        layers = manifest.get("layers")
        wanted = sorted({int(i) for i in layer_indices})
        if not isinstance(layers, list) or sorted(entry.get("index") for entry in layers) != wanted:
            raise ValueError(f"ephemeral INT8 manifest layers differ from the model's {wanted}")
        for entry in layers:
            if entry.get("state") != "ready":
                raise ValueError("an ephemeral INT8 run cannot be resumed after a layer was consumed")
            cls._check_layer(resolved, entry, geometry)
        expected = {MANIFEST_NAME, *(f"_layer_{i}" for i in wanted)}
        extra = {entry.name for entry in resolved.iterdir()} - expected
        if extra:
            raise ValueError(f"ephemeral INT8 root holds entries outside its manifest: {sorted(extra)}")
        return cls(resolved, manifest, geometry)

    @staticmethod
    def _check_layer(root: Path, entry: Dict[str, Any], geometry) -> None:
        listed = check_int8_layer(root, entry, geometry, verify_hashes=False, check_sizes=False)
        if sum(item["size_bytes"] for item in listed) != entry.get("bytes"):
            raise ValueError(f"layer {entry.get('index')}: byte total mismatch with the manifest")

    def _entry(self, layer_idx: int) -> Dict[str, Any]:
        for entry in self.manifest["layers"]:
            if entry["index"] == int(layer_idx):
                return entry
        raise KeyError(f"layer {layer_idx} is not listed in the ephemeral manifest")

    def consume_layer(self, layer_idx: int) -> None:
        """Delete layer `layer_idx`'s files (call once it is loaded); the manifest records each step,
        so a crash midway is never taken for a ready run."""
        if self._closed:
            raise RuntimeError("the ephemeral INT8 store is already closed")
        entry = self._entry(layer_idx)
        if entry["state"] != "ready":
            raise RuntimeError(f"ephemeral INT8 layer {layer_idx} is {entry['state']!r}, not ready")
        self._check_layer(self.root, entry, self._geometry)
        entry["state"] = "consuming"
        _write_json(self.root, MANIFEST_NAME, self.manifest)
        self._delete_layer(entry)
        entry["state"] = "consumed"
        _write_json(self.root, MANIFEST_NAME, self.manifest)

    def _delete_layer(self, entry: Dict[str, Any], best_effort: bool = False) -> None:
        for item in entry.get("files", ()):
            relative = Path(str(item.get("path", "")))
            if relative.is_absolute() or ".." in relative.parts:
                continue
            path = self.root / relative
            if path.is_file() and not path.is_symlink():
                path.unlink()
            elif not best_effort:
                raise RuntimeError(f"refusing to delete {path}: missing or not a regular file")
        layer_dir = self.root / f"_layer_{int(entry['index'])}"
        for directory in [layer_dir / f"_numa_{n}" for n in reversed(range(int(entry.get("numa_count", 0))))] + [
            layer_dir
        ]:
            if directory.is_dir() and not directory.is_symlink():
                try:
                    directory.rmdir()
                except OSError:
                    if not best_effort:
                        raise

    def finish(self) -> None:
        """Remove the emptied root once every layer is consumed."""
        if any(entry["state"] != "consumed" for entry in self.manifest["layers"]):
            raise RuntimeError("cannot finish the ephemeral INT8 store: some layers are not consumed")
        (self.root / MANIFEST_NAME).unlink()
        self.root.rmdir()
        self._close()

    def cleanup(self) -> None:
        """Best effort: delete the listed files of unconsumed layers, the manifest, and the root when
        it is then empty. Files the manifest does not list stay."""
        if self._closed:
            return
        try:
            for entry in self.manifest.get("layers", ()):
                if entry.get("state") != "consumed":
                    self._delete_layer(entry, best_effort=True)
            for name in (MANIFEST_NAME, f".{MANIFEST_NAME}.{os.getpid()}.tmp"):
                path = self.root / name
                if path.is_file() and not path.is_symlink():
                    path.unlink()
            try:
                self.root.rmdir()
            except OSError:
                pass
        finally:
            self._close()

    def _on_signal(self, signum, frame) -> None:
        previous = self._previous_handlers.get(signum)
        self.cleanup()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    def _close(self) -> None:
        self._closed = True
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)
        self._previous_handlers.clear()
        atexit.unregister(self.cleanup)
