"""Making file-system changes durable: a rename or an unlink is on disk only once its folder
is fsynced (POSIX). Used by every writer that promises crash safety (vectors, scores, indexes,
XMP sidecars)."""

from __future__ import annotations

import hashlib
import os
import threading
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


def write_bytes_atomic(data: bytes, path: Path, unique: bool = False) -> None:
    """Write a file whole or not at all: a temporary name, fsync, rename (then fsync the folder
    where the caller needs the rename itself durable). `unique`: a temporary name of this
    process and thread, for files that several readers may rewrite at once."""
    tag = f".{os.getpid()}.{threading.get_ident()}" if unique else ""
    tmp = path.with_name(f"{path.name}{tag}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    """A file's blake2b-128 digest, read in 1 MiB pieces: the checksum of every derived file."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def damaged_files(folder: Path, sums: dict[str, str]) -> list[str]:
    """The files of `sums` (name -> digest) in `folder` that are missing or differ."""
    bad = []
    for name, expected in sums.items():
        try:
            if file_digest(folder / name) != expected:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad
