"""Writing the run's own files so that a kill or a full disk never leaves a partial one.

- `write_atomic(path, text)`: written to `<path>.tmp`, flushed to the disk (fsync), renamed over `path`,
  and the directory fsync'd; on failure the `.tmp` is removed and `path` keeps its previous content.
- `sha256(path)`: a file's digest, read in 1 MiB blocks (checkpoint files, the LoRA base, export files).
- `fsync_path(path)`: a file's data, or a directory's entries (a rename or a new file in a directory
  survives a power cut only once the directory itself is flushed).
- `DiskFullError` ("no space left on device: <path>") is what every write of the run's files raises when
  the filesystem is full, whatever the writer reported (torch's zip writer turns ENOSPC into
  "unexpected pos ..."; safetensors reports it as text, "os error 28"): `disk_full(exc, path)` tells, from
  the error's chain, its text, or by a probe write; `write_error(exc, path)` is the one-line message.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]
# errno values that mean the filesystem (or the user's quota on it) is full.
FULL = (errno.ENOSPC, errno.EDQUOT)
# What writers that hide the errno (safetensors' Rust IoError) say instead.
FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
PROBE_BYTES = 64 * 1024  # a write this size fails on a filesystem too full to have taken the failed one


class DiskFullError(OSError):
    """The filesystem under `path` is full; the message is `no space left on device: <path>`."""

    def __init__(self, path: PathLike):
        super().__init__(errno.ENOSPC, f"no space left on device: {path}")
        self.path = str(path)

    def __str__(self) -> str:
        return f"no space left on device: {self.path}"


def sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: PathLike) -> None:
    """Flush a file's data, or a directory's entries (new names, renames), to the disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _full_in_chain(exc: BaseException) -> bool:
    """An error of the chain has a full-disk errno, or says so in its text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL:
            return True
        if any(text in str(exc) for text in FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_full(directory: PathLike) -> bool:
    """Is the filesystem of `directory` too full to take PROBE_BYTES more (tried, then removed)?"""
    probe = Path(directory) / f".space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as exc:
        return exc.errno in FULL
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def disk_full(exc: BaseException, path: PathLike) -> bool:
    """Did the write of `path` fail because its filesystem is full? The error's chain says so, or,
    when the writer hid the errno, a probe write beside `path` does."""
    if _full_in_chain(exc):
        return True
    where = Path(path)
    directory = where if where.is_dir() else where.parent
    return directory.is_dir() and is_full(directory)


def write_error(exc: BaseException, path: PathLike) -> str:
    """One line for a failed write of `path`: DiskFullError's message when the disk is full, else
    `cannot write <path>: <type>: <first line>`; for errors that are passed between ranks as text."""
    if disk_full(exc, path):
        return str(DiskFullError(path))
    text = str(exc)
    return f"cannot write {path}: {type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def write_atomic(path: PathLike, text: str) -> None:
    """`path` holds `text` completely, or (on any failure) what it held before; DiskFullError when full."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if disk_full(exc, path):
            raise DiskFullError(path) from exc
        raise
