"""File-system helpers of the store writer and reader: whole-file checksums, durable writes, locking.

Errors from the OS (full disk, read-only or forbidden destination) become ConversionError here.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import xxhash

from zipmoe.errors import ConversionError
from zipmoe.store.format import JOURNAL_NAME, MANIFEST_NAME, FileRecord

_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space (or pick another destination) and re-run — "
    "experts already written are kept and re-verified",
    errno.EDQUOT: "disk quota exceeded; free space and re-run — experts already written are kept",
    errno.EACCES: "permission denied; choose a destination you can write to",
    errno.EPERM: "operation not permitted; choose a destination you can write to",
    errno.EROFS: "the file system is read-only; choose a writable destination",
}


def file_record(path: Path, fsync: bool = False) -> FileRecord:
    """Size and xxh3_64 of a whole file, streamed in 16 MiB blocks."""
    hasher, size = xxhash.xxh3_64(), 0
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while block := f.read(1 << 24):
            hasher.update(block)
            size += len(block)
    return FileRecord(size=size, checksum=hasher.intdigest())


def check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty dir, or (with overwrite) a zipmoe store."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise ConversionError(f"destination {dest} exists and is not a directory; choose another path")
    if not any(dest.iterdir()):
        return
    if (dest / MANIFEST_NAME).exists() or (dest / JOURNAL_NAME).exists():
        if overwrite:
            return
        raise ConversionError(
            f"{dest} already holds a zipmoe store; pass overwrite=True (--overwrite) to replace it"
        )
    raise ConversionError(
        f"destination {dest} exists, is not empty and is not a zipmoe store; refusing to replace "
        "it — choose another path"
    )


@contextmanager
def os_errors(dest: Path, action: str):
    """Turn OSError (full, read-only, forbidden destination) into ConversionError saying what to do."""
    try:
        yield
    except OSError as exc:
        advice = _ADVICE.get(exc.errno or 0, f"{exc.strerror or exc}; fix it and re-run")
        where = exc.filename or dest.parent
        raise ConversionError(f"cannot write the store {dest} ({action}, at {where}): {advice}") from exc


def lock_dir(tmp: Path) -> int:
    """flock the temp dir so two writers never share it; the kernel drops the lock if we are killed."""
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConversionError(
            f"another zipmoe conversion is writing {tmp} right now; wait for it or stop it"
        ) from None
    return fd


def clear_dir(directory: Path, keep: set[str]) -> None:
    """Delete everything in directory except the names in keep."""
    for child in directory.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def write_durable(path: Path, data: bytes) -> None:
    """Write, fsync and atomically rename into place."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames and creations in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
