"""Durable files, in one place: atomic writes (one file, or several that belong together), the
advisory file locks, and the content hash of every file we write or index.

A rename or an unlink is on disk only once its folder is fsynced (POSIX). Used by every writer
that promises crash safety (vectors, scores, indexes, XMP sidecars), and by the caches, which
skip the fsync on purpose (said where they do).
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

HASH_CHUNK = 1 << 20  # bytes read at a time when hashing


# ---- fsync ----------------------------------------------------------------------------------


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


def fsync_file(path: str | Path) -> None:
    """fsync a file written (and closed) earlier."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


# ---- atomic writes --------------------------------------------------------------------------


@contextmanager
def atomic_write(
    path: str | Path,
    *,
    tmp: str | Path | None = None,
    exclusive: bool = False,
    create_mode: int = 0o666,
    keep_mode: bool = False,
    fsync: bool = True,
    sync_folder: bool = False,
) -> Iterator[BinaryIO]:
    """Write `path` whole or not at all: the body writes to the yielded file, which is then
    flushed, fsynced and renamed over `path`. On an exception the temporary file is removed
    and `path` is untouched.

    `tmp`: the temporary name (default `<name>.tmp` beside it); `exclusive`: create it with
    O_EXCL (for random names); `create_mode`: its permissions before the umask; `keep_mode`:
    the permissions of the file it replaces; `fsync=False`: no fsync (caches only: a crash may
    lose the new file, which is made again); `sync_folder`: fsync the folder after the rename,
    for callers that need the rename itself durable before they go on."""
    path = Path(path)
    tmp_path = Path(tmp) if tmp is not None else path.with_name(f"{path.name}.tmp")
    mode: int | None = None
    if keep_mode:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = None  # a new file: the umask decides, as for any file the user makes
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    flags |= getattr(os, "O_BINARY", 0)
    fd = os.open(tmp_path, flags, create_mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if mode is not None:
                os.chmod(tmp_path, mode)
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    if sync_folder:
        fsync_dir(path.parent)


def write_bytes_atomic(
    data: bytes, path: Path, unique: bool = False, *, fsync: bool = True
) -> None:
    """Write a file whole or not at all: a temporary name, fsync, rename (then fsync the folder
    where the caller needs the rename itself durable). `unique`: a temporary name of this
    process and thread, for files that several readers may rewrite at once. `fsync=False`:
    caches only (see `atomic_write`)."""
    tag = f".{os.getpid()}.{threading.get_ident()}" if unique else ""
    with atomic_write(path, tmp=path.with_name(f"{path.name}{tag}.tmp"), fsync=fsync) as fh:
        fh.write(data)


def replace_all(
    pairs: Sequence[tuple[Path, Path]], *, last_vouches: bool = False, sync_folder: bool = True
) -> None:
    """Move files written together into place: every temporary file of `pairs` (tmp, final) is
    fsynced, then each renamed in the given order, then their folders fsynced.

    `last_vouches`: the last file is the one that says the others belong together (a meta.json
    with their checksums, which readers check first), so the old one is removed before the
    first rename and the new one renamed last: a crash in between leaves no such file vouching
    for a mix of old and new files, and the reader rebuilds. `sync_folder=False`: the caller
    fsyncs the folder itself next."""
    for tmp, _ in pairs:
        fsync_file(tmp)
    if last_vouches:
        Path(pairs[-1][1]).unlink(missing_ok=True)
    for tmp, final in pairs:
        os.replace(tmp, final)
    if sync_folder:
        for folder in dict.fromkeys(Path(final).parent for _, final in pairs):
            fsync_dir(folder)


# ---- file locks -----------------------------------------------------------------------------


@contextmanager
def file_lock(path: str | Path, *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """An advisory lock (flock) on `path`, created if missing, held for the `with` block.

    Yields True once held. `shared`: many holders at once, none exclusive; `blocking=False`:
    yields False at once when it cannot be had now (the caller decides: wait, skip or refuse).
    Locks are per open file: two `with` blocks in one process exclude each other too. Where
    there are no flocks (Windows) nothing is locked and it yields True: one writer at a time
    is then the user's to ensure."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield True
        return
    flags = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if not blocking:
        flags |= fcntl.LOCK_NB
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), flags)
        except OSError:
            if blocking:
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---- hashing --------------------------------------------------------------------------------


def stream_digest(fh: BinaryIO) -> str:
    """The blake2b-128 digest (hex) of what is left to read in `fh`, read in 1 MiB pieces: the
    content hash of indexed images and the checksum of every derived file (the digests stored
    in existing libraries are these; never change the algorithm or its size)."""
    digest = hashlib.blake2b(digest_size=16)
    while chunk := fh.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def bytes_digest(data: bytes) -> str:
    """`stream_digest` of bytes in memory (a file about to be written: its name or checksum)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path: str | Path) -> str:
    """A file's blake2b-128 digest (`stream_digest`)."""
    with open(path, "rb") as fh:
        return stream_digest(fh)


def file_checksum(path: str | Path) -> str:
    """ "crc32:xxxxxxxx" of a file: the quick check of a large cache read on every query (the
    numpy text tower: 254 MB at ViT-B/16, 0.07 s against blake2b's 0.34 s). It finds damage
    (flipped bits, a torn or truncated write); it is not a content identity."""

    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK * 16):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def content_stamp(path: Path) -> list[int]:
    """A file's (inode, size, mtime): kept by a rename, moved by any rewrite, copy or
    restore of it. A file whose stamp is the one recorded when it was hashed is not hashed
    again on every load (`damaged_files`); `piaa db check` hashes it whatever its stamp."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def damaged_files(
    folder: Path, sums: dict[str, str], stamps: dict[str, list[int]] | None = None
) -> list[str]:
    """The files of `sums` (name -> digest: `file_digest`'s, or `file_checksum`'s "crc32:…")
    in `folder` that are missing or differ; one whose `content_stamp` is its entry in
    `stamps` is taken as sound without reading it."""
    bad = []
    for name, expected in sums.items():
        check = file_checksum if expected.startswith("crc32:") else file_digest
        try:
            if stamps is not None and stamps.get(name) == content_stamp(folder / name):
                continue
            if check(folder / name) != expected:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad
