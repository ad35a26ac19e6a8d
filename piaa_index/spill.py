"""An array too big to hold, kept in an unnamed temporary file and read back by rows.

Learning holds every labelled image's patches: 10,000 ViT-B/16 images are 2 GB in float16, and
a photographer with 50,000 keyworded photos would need 10. In a file they are page cache,
which the kernel writes out and drops as it needs; the reader takes the rows it works on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SpilledArray"]


class SpilledArray:
    """An [n, *row_shape] array of `dtype`, appended in blocks and read back by row: a slice
    (one read) or an index array (one read per run of consecutive rows), as a numpy array."""

    def __init__(self, row_shape: tuple[int, ...], dtype: Any, folder: Path | None = None) -> None:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)  # on the library's disk: /tmp may be RAM
        self._file = tempfile.TemporaryFile(dir=folder)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = np.dtype(dtype)
        self._row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._n = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self.row_shape)

    def __len__(self) -> int:
        return self._n

    def append(self, rows: np.ndarray) -> None:
        block = np.ascontiguousarray(rows, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {block.shape[1:]}, expected {self.row_shape}")
        self._file.seek(self._n * self._row_bytes)
        self._file.write(block.tobytes())
        self._n += len(block)

    def __getitem__(self, key: slice | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = np.empty((max(0, stop - start), *self.row_shape), self.dtype)
            self._read_into(out, start)
            return out
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self._n):
            raise IndexError(f"row out of range for {self._n} rows")
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        if not len(rows):
            return out
        # Runs of consecutive rows (in the order asked) are one read each.
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
            self._read_into(out[lo:hi], int(rows[lo]))
        return out

    def _read_into(self, out: np.ndarray, start: int) -> None:
        if not out.nbytes:
            return
        self._file.seek(start * self._row_bytes)
        if self._file.readinto(out.data.cast("B")) != out.nbytes:
            raise OSError("the spilled array's file was cut short")

    def close(self) -> None:
        self._file.close()
