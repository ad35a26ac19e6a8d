"""Making file-system changes durable: a rename or an unlink is on disk only once its folder
is fsynced (POSIX). Used by every writer that promises crash safety (vectors, scores, indexes,
XMP sidecars)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder; a no-op where folders cannot be opened (Windows) or fsynced."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(str(folder) or ".", flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write a file whole or not at all: a temporary name, fsync, rename (then fsync the folder
    where the caller needs the rename itself durable)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
