"""Shard files read at byte offsets, without FAISS: the layouts `VectorStore.write_shard` writes.

A query that reads a few rows in each of ~1,000 shards (text search's pre-score at 1M images)
paid two FAISS `read_index` calls and a memory map per shard, and the kernel mapped pages
around every row it touched (4.4 GB of page cache mapped into the process at 1M). FAISS's
serialisation of the two index kinds a shard holds is simple and stable, so their rows are
read here with `os.pread` at offsets computed from the headers, and nothing is mapped:

    cls file   "IxM2" header  "IxFI" header  u64 n·d  float32[n, d]  u64 n  int64[n] (ids)
    patch file "IxFI" header  u64 n·d (fp32)  codes[n·M, 4d]
               "IxSQ" header  i32 qtype  i32 rangestat  f32 arg  u64 d  u64 code size
                              u64 t  float32[t] (trained)  u64 n·M·code size  codes

    header = i32 d, i64 ntotal, i64, i64, u8 is_trained, i32 metric (a f32 after it if > 1)

The parsers are strict: the fourccs, every count at its computed offset and the file's size
must agree, else they return None and the caller reads the file through FAISS, which reads
PQ codecs and reports a damaged file. tests/test_shard_rows.py compares every codec's rows,
ids and codes with FAISS's, bit for bit.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

# pread is POSIX: elsewhere (Windows) every read goes through FAISS.
AVAILABLE = hasattr(os, "pread")
_PREADV = hasattr(os, "preadv")
# Read at once: the headers and, below width ~500, a scalar quantiser's trained ranges (a
# wider one's are read again to their length: parse_patch).
HEAD_BYTES = 4096
# Rows closer than this many bytes are read with one pread (the gap is read and dropped):
# a syscall costs about what copying a few KB from the page cache does.
COALESCE_GAP = 8192
_HEADER = struct.Struct("<iqqqBi")  # d, ntotal, dummy, dummy, is_trained, metric_type
_U64 = struct.Struct("<Q")
_SQ = struct.Struct("<iifQQ")  # qtype, rangestat, rangestat_arg, d, code_size
FLAT_QTYPE = -1  # PatchFile.qtype of an IndexFlat (fp32) patch file
# FAISS's ScalarQuantizer qtypes (the numbers its files store; tests/test_similar_files.py
# checks them against faiss)
QT_8BIT, QT_4BIT, QT_8BIT_UNIFORM, QT_4BIT_UNIFORM, QT_FP16 = 0, 1, 2, 3, 4


class ShortRead(OSError):
    """A file shorter than its header said (truncated since it was opened)."""


@dataclass(frozen=True)
class ClsFile:
    """Where a cls file's rows and ids lie."""

    dim: int
    ntotal: int
    rows_at: int  # byte offset of row 0 (float32[dim])
    ids_at: int  # byte offset of the id of row 0 (int64)


@dataclass(frozen=True)
class PatchFile:
    """Where a patch file's codes lie, and how they decode (`shards.CodeForm.of`)."""

    dim: int
    ntotal: int  # patches (images × M)
    qtype: int  # the ScalarQuantizer's qtype, FLAT_QTYPE for fp32
    trained: np.ndarray  # the scalar quantiser's trained ranges (empty for fp32 / fp16)
    code_size: int  # bytes per patch
    codes_at: int


def _header(buf: bytes, at: int, fourcc: bytes) -> tuple[int, int, int] | None:
    """(dim, ntotal, offset after the header) of an index header with this fourcc."""
    if buf[at : at + 4] != fourcc or len(buf) < at + 4 + _HEADER.size + 4:
        return None
    dim, ntotal, _, _, _, metric = _HEADER.unpack_from(buf, at + 4)
    end = at + 4 + _HEADER.size
    if metric > 1:  # metric_arg follows (no shard is written with such a metric)
        end += 4
    if dim <= 0 or ntotal < 0:
        return None
    return dim, ntotal, end


def _u64(buf: bytes, at: int) -> int | None:
    return _U64.unpack_from(buf, at)[0] if len(buf) >= at + 8 else None


def parse_cls(fd: int, size: int) -> ClsFile | None:
    """The layout of an IndexIDMap2 over an IndexFlat, or None (not one, or damaged)."""
    head = read_at(fd, 0, min(size, HEAD_BYTES), exact=False)
    outer = _header(head, 0, b"IxM2")
    if outer is None:
        return None
    dim, ntotal, at = outer
    inner = _header(head, at, b"IxFI") or _header(head, at, b"IxF2")
    if inner is None or inner[:2] != (dim, ntotal):
        return None
    at = inner[2]
    if _u64(head, at) != ntotal * dim:
        return None
    rows_at = at + 8
    ids_at = rows_at + 4 * ntotal * dim + 8
    if ids_at + 8 * ntotal != size:
        return None
    if _u64(read_at(fd, ids_at - 8, 8, exact=False), 0) != ntotal:
        return None
    return ClsFile(dim, ntotal, rows_at, ids_at)


def parse_patch(fd: int, size: int) -> PatchFile | None:
    """The layout of a flat (fp32) or scalar-quantised patch file, or None (a PQ codec, or
    damaged)."""
    head = read_at(fd, 0, min(size, HEAD_BYTES), exact=False)
    flat = _header(head, 0, b"IxFI") or _header(head, 0, b"IxF2")
    if flat is not None:
        dim, ntotal, at = flat
        qtype, trained, code_size = FLAT_QTYPE, np.zeros(0, np.float32), 4 * dim
        count = _u64(head, at)  # in floats
        if count is None or count * 4 != ntotal * code_size:
            return None
    else:
        sq = _header(head, 0, b"IxSQ")
        if sq is None or len(head) < sq[2] + _SQ.size + 8:
            return None
        dim, ntotal, at = sq
        qtype, _rangestat, _arg, sq_dim, code_size = _SQ.unpack_from(head, at)
        at += _SQ.size
        n_trained = _u64(head, at)
        if sq_dim != dim or code_size <= 0 or n_trained is None or n_trained > 2 * dim:
            return None
        at += 8
        if len(head) < at + 4 * n_trained + 8 <= size:  # wide: the ranges run past HEAD_BYTES
            head = read_at(fd, 0, at + 4 * n_trained + 8, exact=False)
        if len(head) < at + 4 * n_trained + 8:
            return None
        trained = np.frombuffer(head, "<f4", n_trained, at).astype(np.float32)
        at += 4 * n_trained
        if _u64(head, at) != ntotal * code_size:
            return None
    codes_at = at + 8
    if codes_at + ntotal * code_size != size:
        return None
    return PatchFile(dim, ntotal, qtype, trained, code_size, codes_at)


def read_at(fd: int, offset: int, n: int, exact: bool = True) -> bytes:
    """`n` bytes at `offset` (fewer at the end of the file unless `exact`)."""
    out = b""
    while len(out) < n:
        got = os.pread(fd, n - len(out), offset + len(out))
        if not got:
            break
        out += got
    if exact and len(out) < n:
        raise ShortRead(f"{n - len(out)} bytes missing at offset {offset + len(out)}")
    return out


def read_rows(fd: int, start: int, row_bytes: int, rows: np.ndarray) -> np.ndarray:
    """[len(rows), row_bytes] uint8: the rows (sorted) of the array at `start`, read with one
    pread per run of rows closer than COALESCE_GAP (a run of consecutive rows straight into
    the result)."""
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows), row_bytes), np.uint8)
    if not len(rows):
        return out
    # runs: positions a..b of rows at most `step` apart (the loop below is per run: no numpy)
    step = 1 + COALESCE_GAP // max(1, row_bytes)
    breaks = np.flatnonzero(np.diff(rows) > step) + 1
    starts, ends = [0, *breaks.tolist()], [*breaks.tolist(), len(rows)]
    firsts, lasts = rows[starts].tolist(), rows[np.asarray(ends) - 1].tolist()
    flat = out.data.cast("B")
    for a, b, first, last in zip(starts, ends, firsts, lasts, strict=True):
        offset = start + first * row_bytes
        if b - a == last - first + 1:  # consecutive rows: straight into `out`
            _read_into(fd, offset, flat[a * row_bytes : b * row_bytes])
        else:  # close rows: the gaps read and dropped
            block = np.empty((last - first + 1, row_bytes), np.uint8)
            _read_into(fd, offset, block.data.cast("B"))
            out[a:b] = block[rows[a:b] - first]
    return out


def _read_into(fd: int, offset: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        if _PREADV:
            got = os.preadv(fd, [view[done:]], offset + done)
        else:
            data = os.pread(fd, len(view) - done, offset + done)
            got = len(data)
            view[done : done + got] = data
        if got <= 0:
            raise ShortRead(f"{len(view) - done} bytes missing at offset {offset + done}")
        done += got


@contextmanager
def opened(path: str) -> Iterator[tuple[int, os.stat_result]]:
    """A file's descriptor (read-only) and its stat."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        yield fd, os.fstat(fd)
    finally:
        os.close(fd)
