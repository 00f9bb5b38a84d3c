"""Crash-consistent writes: at every instant a file or directory kt_ops writes holds either its old
content or its new content, whole.

Every write builds the new content in a staging directory of its own beside the destination
(`.kt_ops-tmp-*` in the destination's directory, so the switch is a rename on one filesystem),
flushes it to disk, switches it into place with one rename and flushes the directory entry. A
writer holds a lock (flock) on its staging directory while it lives, so the next writer into the
same directory (`recover`) removes what a killed writer left and never touches a live one's.

- `atomic_file(path)`: one file (the library writing it gets a temporary path).
- `atomic_directory(path)`: a whole directory, switched with `renameat2(RENAME_EXCHANGE)`; on a
  filesystem without it (NFS, non-Linux) through a commit record, see below.
- `atomic_files(directory)`: a set of files that join a directory holding other things (kt-sft's
  output_dir). They cannot switch in one rename, so a commit record is written once all of them are
  on disk and the renames follow; `recover(directory)` completes an interrupted set, and every kt_ops
  writer and reader of such a directory runs it first.
- `exclusive(path)`: serialises read-modify-write of one file across threads and processes.
- `write_manifest` / `verify_manifest`: sizes and SHA-256 of a directory's files, to refuse a
  truncated or missing file by name.

A failed write (disk full, file size limit, I/O error, read-only directory) raises OSError naming the
destination, whose content is unchanged; the staging directory is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
import threading
from typing import Callable, Iterator, Optional

# Names kt_ops gives its own temporaries all begin with ".kt_ops-".
STAGING_PREFIX = ".kt_ops-tmp-"
_RECORD = ".kt_ops-commit.json"  # in a staging directory: its content is complete, finish the switch
_ASIDE = ".kt_ops-old"  # in a staging directory: the replaced directory (no RENAME_EXCHANGE)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NEARLY_FULL = 1 << 20  # bytes: a failed write with less free space than this was a full disk

# Fault injection for the crash tests and scripts/kill_campaign.py: when set, called as
# fault_hook(event, destination) at every boundary between two file operations of a write
# ("staged", "written", "synced", "committed", "moved", "switched"), so a test can kill the process
# there or raise an I/O error.
fault_hook: Optional[Callable[[str, str], None]] = None

_thread_lock = threading.Lock()


def _step(event: str, path: str) -> None:
    if fault_hook is not None:
        fault_hook(event, path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: str) -> None:
    for directory, _, files in os.walk(top, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(directory, name)):
                _fsync(os.path.join(directory, name))
        _fsync(directory)


def _errno_of(exc: BaseException, staging: str) -> Optional[int]:
    """The errno behind a failed write. Libraries lose it: safetensors keeps only its text ("os error
    28"), torch.save none at all ("unexpected pos"), so a full disk or an exceeded file size limit
    is recognised from the state it leaves."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if type(exc).__module__ == "builtins" and not isinstance(exc, (OSError, RuntimeError)):
        return None  # a plain Python error (ValueError, TypeError...) is the writer's, not the disk's
    found = re.search(r"os error (\d+)", str(exc))
    if found:
        return int(found.group(1))
    try:
        fs = os.statvfs(staging)
        if fs.f_bavail * fs.f_frsize < _NEARLY_FULL:
            return errno.ENOSPC
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            for directory, _, files in os.walk(staging):
                if any(os.path.getsize(os.path.join(directory, f)) >= limit for f in files):
                    return errno.EFBIG
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _reported(path: str, staging: str) -> Iterator[None]:
    """I/O failures inside the block become OSError naming `path` (the user's file, not the staging
    one) and saying what state it is in; other exceptions pass unchanged."""
    try:
        yield
    except Exception as e:
        code = _errno_of(e, staging)
        if code is None and not isinstance(e, OSError):
            raise
        reason = os.strerror(code) if code is not None else str(e)
        if os.path.exists(os.path.join(staging, _RECORD)):
            message = (
                f"could not finish writing {path}: {reason}; the new content is complete in {staging} and "
                "the next kt_ops write or read there switches it in"
            )
        else:
            message = f"could not write {path}: {reason}; it is left as it was"
        raise (OSError(code, message) if code is not None else OSError(message)) from e


def _lock_staging(path: str) -> Optional[int]:
    """An fd holding the lock of staging directory `path`, or None when its writer (or another
    recover) holds it, or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def recover(directory: str) -> None:
    """Finish or remove what writers killed in `directory` left: a staging directory with a commit
    record holds a complete new content and is switched into place, any other is removed. Staging
    directories of live writers are left alone. Raises OSError naming `directory` when a committed
    switch cannot be completed (e.g. the directory became read-only)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(STAGING_PREFIX)]
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        staging = os.path.join(directory, name)
        fd = _lock_staging(staging)
        if fd is None:
            continue
        try:
            if os.path.exists(os.path.join(staging, _RECORD)):
                try:
                    _roll_forward(staging, directory)
                except OSError as e:
                    raise OSError(
                        e.errno,
                        f"{directory} holds an interrupted save ({staging}) that could not be "
                        f"completed: {e.strerror or e}; kt_ops completes it on the next "
                        "write into the directory",
                    ) from e
            shutil.rmtree(staging, ignore_errors=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _staging(directory: str, destination: str) -> Iterator[str]:
    """A new, locked staging directory in `directory` for a write of `destination`. Removed at the
    end unless it holds a commit record whose switch is unfinished (recover completes it)."""
    recover(directory)
    while True:
        try:
            staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
            fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise OSError(
                e.errno,
                f"could not write {destination}: cannot create a file in {directory} "
                f"({e.strerror}); it is left as it was",
            ) from e
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.exists(staging) and os.stat(staging).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # a recover() elsewhere took it for a dead writer's between mkdtemp and flock
    try:
        _step("staged", destination)
        yield staging
    finally:
        if not os.path.exists(os.path.join(staging, _RECORD)):
            shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)


def _write_record(staging: str, record: dict) -> None:
    """The record appears whole (renamed into place): a half-written one would be taken for none."""
    path = os.path.join(staging, _RECORD)
    with open(path + ".new", "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".new", path)
    _fsync(staging)


def _roll_forward(staging: str, directory: str) -> None:
    """Move the committed content of `staging` into `directory`. Idempotent: after a kill it is
    simply run again."""
    with open(os.path.join(staging, _RECORD)) as f:
        record = json.load(f)
    for name in record.get("files", []):
        source = os.path.join(staging, name)
        if os.path.lexists(source):
            os.replace(source, os.path.join(directory, name))
            _step("moved", os.path.join(directory, name))
    name = record.get("directory")
    if name is not None and os.path.lexists(os.path.join(staging, name)):
        target = os.path.join(directory, name)
        if os.path.lexists(target):
            os.rename(target, os.path.join(staging, _ASIDE))
            _step("moved", target)
        os.rename(os.path.join(staging, name), target)
    _fsync(directory)
    os.remove(os.path.join(staging, _RECORD))


def _exchange(a: str, b: str) -> bool:
    """Swap directories `a` and `b` in one step; False where the system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # not glibc >= 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


@contextlib.contextmanager
def atomic_file(path) -> Iterator[str]:
    """Yields a temporary path for the new content of the file `path` (in a staging directory beside
    it); when the block ends without an exception the file is flushed to disk and replaces `path` in
    one rename. The directory holding `path` must exist."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"{path} is a directory; a file was to be written there")
    with _staging(os.path.dirname(path), path) as staging, _reported(path, staging):
        tmp = os.path.join(staging, os.path.basename(path))
        yield tmp
        if not os.path.isfile(tmp):
            raise RuntimeError(f"the writer of {path} wrote nothing to its temporary path {tmp}")
        _step("written", path)
        _fsync(tmp)
        _fsync(staging)
        _step("synced", path)
        os.replace(tmp, path)
        _step("switched", path)
        _fsync(os.path.dirname(path))


@contextlib.contextmanager
def atomic_directory(path) -> Iterator[str]:
    """Yields an empty directory to build the new content of the directory `path` in; when the block
    ends without an exception it is flushed to disk and replaces `path` (whatever that held) in one
    switch. A symlink's target is replaced, not the link. The parent of `path` must exist."""
    path = os.path.realpath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, f"{path} exists and is not a directory")
    parent, name = os.path.split(path)
    with _staging(parent, path) as staging, _reported(path, staging):
        new = os.path.join(staging, name)
        os.mkdir(new)
        yield new
        _step("written", path)
        _fsync_tree(new)
        _step("synced", path)
        if not os.path.exists(path):
            os.rename(new, path)
        elif not _exchange(new, path):
            _write_record(staging, {"directory": name})
            _step("committed", path)
            _roll_forward(staging, parent)
        _step("switched", path)
        _fsync(parent)
    # The replaced content went into the staging directory, and with it.


@contextlib.contextmanager
def atomic_files(directory) -> Iterator[str]:
    """Yields a staging directory; the files written there join `directory` as one set, replacing
    files of the same names: once they are all on disk a commit record is written, then each is
    renamed into place. A kill during the renames is completed by the next `recover(directory)`
    (every kt_ops writer of the directory runs it, and kt-sft before it reads one), so the set is
    seen all old or all new. Only files: a subdirectory written there is an error."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    with _staging(directory, directory) as staging, _reported(directory, staging):
        yield staging
        names = sorted(n for n in os.listdir(staging) if not n.startswith(".kt_ops-"))
        nested = [n for n in names if os.path.isdir(os.path.join(staging, n))]
        if nested:
            raise ValueError(f"atomic_files({directory}) switches files only; {nested} are directories")
        _step("written", directory)
        for name in names:
            _fsync(os.path.join(staging, name))
        _step("synced", directory)
        _write_record(staging, {"files": names})
        _step("committed", directory)
        _roll_forward(staging, directory)
        _step("switched", directory)


@contextlib.contextmanager
def exclusive(path) -> Iterator[None]:
    """Serialises read-modify-write of the file `path` across threads and processes (two wrappers
    whose weight_path is the same file must both end up in it). The lock is the kernel's (flock),
    so a killed holder releases it; it is taken on the directory, so no lock file is left beside
    the user's files."""
    directory = os.open(os.path.dirname(os.path.abspath(os.fspath(path))), os.O_RDONLY)
    try:
        with _thread_lock:
            fcntl.flock(directory, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(directory, fcntl.LOCK_UN)
    finally:
        os.close(directory)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str, name: str) -> None:
    """Record the size and SHA-256 of every file under `directory` in its file `name` (written last,
    into a directory that is then switched into place)."""
    files = {}
    for folder, _, names in os.walk(directory):
        for f in names:
            full = os.path.join(folder, f)
            rel = os.path.relpath(full, directory)
            if rel != name and not os.path.islink(full):
                files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    with open(os.path.join(directory, name), "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)


def verify_manifest(directory: str, name: str) -> list[str]:
    """Check every file the manifest `name` of `directory` lists: present, of its size and digest.
    Returns the listed files; raises ValueError naming the first file that is missing, truncated or
    changed, or the manifest when it is missing or unreadable."""
    path = os.path.join(directory, name)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        raise ValueError(f"{directory} has no {name}: it was not completely written") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a readable manifest ({e})") from None
    for rel, entry in sorted(files.items()):
        full = os.path.join(directory, rel)
        if not os.path.isfile(full):
            raise ValueError(f"{full} is missing ({name} lists it)")
        size = os.path.getsize(full)
        if size != entry["size"]:
            raise ValueError(
                f"{full} has {size} bytes, {name} records {entry['size']}: it is truncated or was replaced"
            )
        if _sha256(full) != entry["sha256"]:
            raise ValueError(f"{full} does not match the SHA-256 {name} records: it was changed or damaged")
    return sorted(files)
