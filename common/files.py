"""Crash-safe file replacement for state the processes keep on disk (the agent's xDS cache, the CA's keys)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, parents: bool = False) -> None:
    """Temp file in the same directory, renamed over ``path`` after an fsync, then the directory fsynced: a crash
    leaves the old or the new content, never half of one. ``mode`` is set before any byte is written, so a key
    is never readable by others, not even briefly. ``parents`` creates missing parent directories."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
