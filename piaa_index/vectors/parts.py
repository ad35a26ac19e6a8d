"""A derived index kept as parts: FAISS indexes of at most `cap` vectors each that share one
trained coarse quantiser (and, for IVF-PQ, one codebook), each its own file in the index's
folder.

Why: a writer changes only the parts it must. New vectors go to the last part until it is
full, then a new part starts; a part with images to drop is read whole, changed and written
again; every other part stays memory-mapped. An index run therefore holds about one part
(`PART_BYTES` of codes and ids) in memory whatever the library's size, where both derived
indexes used to be loaded whole to be changed, ~2 GB per million images (issue 23,
docs/scale.md). A search asks every part for its k best and keeps the best of all: the parts
share the quantiser, so the lists scanned are those of one index holding everything.

Part 0 keeps the name the whole index had before parts (`cls.faiss`, `patches.faiss`): a
library saved then loads as one part. The caller keeps which part holds each image (in its
held arrays, saved with the parts by `Parts.save`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from piaa_index.durable import content_stamp, file_checksum, file_digest, replace_all
from piaa_index.vectors.faiss_lib import faiss as _faiss

# Codes and ids of one part: what a writer holds in memory at once.
PART_BYTES = 256 << 20


def _is_ivf(index: Any) -> bool:
    return hasattr(index, "nlist")


def part_name(stem: str, n: int) -> str:
    return f"{stem}.faiss" if n == 0 else f"{stem}-{n}.faiss"


def _cap_of(index: Any) -> int:
    """Vectors per part of an index like this one: `PART_BYTES` of codes and 8-byte ids for an
    IVF; a flat index is never split (its owner bounds it: `similar.MAX_FLAT_CELLS`)."""
    if not _is_ivf(index):
        return 1 << 62
    code_size = getattr(index, "code_size", None) or 4 * int(index.d)  # (a reader's: float32)
    return max(1, PART_BYTES // (int(code_size) + 8))


@dataclass
class Part:
    name: str  # its file in the folder
    index: Any  # a FAISS index (whole or memory-mapped), or a read-only reader's
    whole: bool  # held in memory: may be changed
    dirty: bool = False  # changed since it was last written
    pending: Path | None = None  # written here, renamed into place by the caller's save
    digest: str | None = None  # of its file (saved or pending); None: not known yet


def _mapped(path: Path) -> Any:
    """A saved part memory-mapped (an IVF's lists are not read until probed; a flat index is
    read whole, as FAISS maps only inverted lists)."""
    faiss = _faiss()
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)


def empty_like(index: Any) -> Any:
    """An empty copy of a part with its training (quantiser, codebook); `index` itself is
    emptied when it is an IVF read from a file (its mapped lists are replaced, not copied)."""
    faiss = _faiss()
    if not _is_ivf(index):
        out = faiss.clone_index(index)
        out.reset()
        return out
    # (read_index gives the IVF class itself: no wrapper whose deletion would free it)
    lists = faiss.ArrayInvertedLists(index.nlist, index.code_size)
    index.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    index.ntotal = 0
    return index


class Parts:
    """The parts of one derived index, in `folder`, files named after `stem`."""

    def __init__(
        self, folder: Path | None, stem: str, parts: list[Part], cap: int, empty: Callable[[], Any]
    ):
        self.folder = folder  # None: built in memory only (never flushed before its save)
        self.stem = stem
        self.parts = parts
        self.cap = cap  # vectors a part takes (`_cap_of`)
        self._empty = empty
        self._stack: tuple[Any, ...] | None = None  # `_stacked`'s index and what it borrows

    @classmethod
    def fresh(cls, folder: Path | None, stem: str, trained: Any) -> Parts:
        """No parts yet; each new one a copy of `trained` (trained, empty)."""
        buf = _faiss().serialize_index(trained)
        return cls(folder, stem, [], _cap_of(trained), lambda: _faiss().deserialize_index(buf))

    @classmethod
    def open(
        cls,
        folder: Path,
        stem: str,
        meta: dict[str, Any],
        reader: Callable[[Path], Any] | None = None,
    ) -> Parts:
        """The parts saved in `folder` with `meta` (its meta.json), memory-mapped through
        FAISS, or opened with `reader` (a read-only process's: None from it means FAISS reads
        that part). A meta.json from before parts names none: the index is one part."""
        names = meta["parts"] if "parts" in meta else [part_name(stem, 0)]
        digests = meta.get("sums") or {}
        parts = []
        for name in names:
            index = reader(folder / name) if reader is not None else None
            if index is None:
                index = _mapped(folder / name)
            parts.append(Part(name, index, whole=False, digest=digests.get(name)))

        def empty() -> Any:
            return empty_like(_mapped(folder / (parts[0].pending or parts[0].name)))

        cap = _cap_of(parts[0].index) if parts else 1
        return cls(folder, stem, parts, cap, empty)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    @property
    def ntotal(self) -> int:
        return sum(int(p.index.ntotal) for p in self.parts)

    @property
    def nlist(self) -> int:
        """Lists of each part's IVF (they share the quantiser); 1 for a flat index."""
        return int(getattr(self.parts[0].index, "nlist", 1)) if self.parts else 1

    def set_nprobe(self, nprobe: int) -> None:
        for p in self.parts:
            p.index.nprobe = min(int(nprobe), int(p.index.nlist))

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids): the `k` best of all parts (FAISS IVF parts: searched as one index),
        else up to `k` best of each part, all parts' together; the caller orders and cuts them
        (one part: FAISS's answer as it was)."""
        x = np.ascontiguousarray(np.asarray(q, np.float32).reshape(1, -1))
        stack = self._stacked()  # held here: a change meanwhile drops only self._stack
        if stack is not None:
            stacked = stack[0]
            stacked.nprobe = self.parts[0].index.nprobe
            s, i = stacked.search(x, min(int(k), self.ntotal))
            keep = i[0] >= 0
            return np.asarray(s[0][keep], np.float32), np.asarray(i[0][keep], np.int64)
        scores, ids = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)]
        for p in self.parts:
            kk = min(int(k), int(p.index.ntotal))
            if kk <= 0:
                continue
            s, i = p.index.search(x, kk)
            keep = i[0] >= 0
            scores.append(np.asarray(s[0][keep], np.float32))
            ids.append(np.asarray(i[0][keep], np.int64))
        return np.concatenate(scores), np.concatenate(ids)

    def _stacked(self) -> tuple[Any, ...] | None:
        """The parts of a FAISS IVF as one index: an empty copy of a part whose lists are the
        parts' lists end to end (FAISS's HStackInvertedLists, nothing copied), so a search
        keeps one heap instead of one per part (at 1M, 6 patch parts and 32,768 hits: 0.10 s
        instead of 0.20 s, the same ids). Returned with what it borrows (the lists, the parts
        and their indexes), which must outlive its use. None for one part, a flat index, or
        parts read without FAISS."""
        if len(self.parts) < 2 or not all(hasattr(p.index, "invlists") for p in self.parts):
            return None
        if self._stack is None:
            faiss = _faiss()
            borrowed = faiss.InvertedListsPtrVector()
            for p in self.parts:
                borrowed.push_back(p.index.invlists)
            lists = faiss.HStackInvertedLists(len(self.parts), borrowed.data())
            index = self._empty()
            index.replace_invlists(lists, False)  # not owned: kept alive beside it
            index.ntotal = self.ntotal
            self._stack = (index, lists, borrowed, [p.index for p in self.parts])
        return self._stack

    # -- changes -----------------------------------------------------------------------------

    def add(self, x: np.ndarray, ids: np.ndarray, rows_per_image: int = 1) -> np.ndarray:
        """Add rows, `rows_per_image` consecutive ones an image's (kept in one part): the last
        part is filled up to `cap`, then new parts. The part of each image."""
        self._stack = None
        images = len(ids) // rows_per_image
        out = np.zeros(images, np.int32)
        done = 0
        while done < images:
            if not self.parts or int(self.parts[-1].index.ntotal) >= self.cap:
                self._release_all()
                self.parts.append(Part(self._new_name(), self._empty(), True))
            n = len(self.parts) - 1
            room = max(1, (self.cap - int(self.parts[n].index.ntotal)) // rows_per_image)
            take = min(images - done, room)
            a, b = done * rows_per_image, (done + take) * rows_per_image
            self._writable(n).add_with_ids(
                np.ascontiguousarray(x[a:b], dtype=np.float32),
                np.ascontiguousarray(ids[a:b], dtype=np.int64),
            )
            self.parts[n].dirty = True
            out[done : done + take] = n
            done += take
        return out

    def remove(self, n: int, ids: np.ndarray) -> None:
        """Remove these ids' rows from part `n`."""
        faiss = _faiss()
        self._stack = None
        gone = np.ascontiguousarray(np.unique(ids), dtype=np.int64)
        if len(gone):
            self._writable(n).remove_ids(faiss.IDSelectorBatch(len(gone), faiss.swig_ptr(gone)))
            self.parts[n].dirty = True

    def _new_name(self) -> str:
        taken = set(self.names)
        return next(
            part_name(self.stem, n)
            for n in range(len(taken) + 1)
            if part_name(self.stem, n) not in taken
        )

    @property
    def needs_rebuild(self) -> bool:
        """No part (built over no image), or many more parts than the vectors need (removals
        thinned them): time to rebuild, which holds one part at a time too."""
        return not self.parts or len(self.parts) > 2 * math.ceil(self.ntotal / self.cap) + 2

    def _writable(self, n: int) -> Any:
        self._stack = None  # it borrows the parts' lists: made again after any change
        part = self.parts[n]
        if not part.whole:
            self._release_all(keep=n)  # one part in memory at a time
            assert self.folder is not None
            part.index = _faiss().read_index(str(part.pending or self.folder / part.name))
            part.whole = True
        return part.index

    def _release_all(self, keep: int | None = None) -> None:
        """Write every changed part held in memory (but `keep`) to its temporary file, and map
        the written IVF parts instead of holding them."""
        if self.folder is None:
            return  # an index built in memory (tests): kept whole until its save
        self._stack = None
        for i, part in enumerate(self.parts):
            if i != keep and part.whole and _is_ivf(part.index):
                self._write(part)
                part.index, part.whole = _mapped(part.pending or self.folder / part.name), False

    def _write(self, part: Part) -> None:
        if not part.dirty:
            return
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{part.name}.tmp"
        _faiss().write_index(part.index, str(tmp))
        part.pending, part.digest, part.dirty = tmp, file_digest(tmp), False

    def drop_emptied(self, part_of: np.ndarray) -> np.ndarray:
        """Drop the parts that removals emptied (not the last one left: new parts copy its
        training), so re-encoding a whole library does not leave a trail of empty files;
        `part_of` (the part of each held image) renumbered to match."""
        keep = [i for i, p in enumerate(self.parts) if int(p.index.ntotal) > 0]
        if not keep or len(keep) == len(self.parts):
            return part_of
        renumber = np.full(len(self.parts), -1, np.int32)
        renumber[keep] = np.arange(len(keep), dtype=np.int32)
        self._stack = None
        self.parts[:] = [self.parts[i] for i in keep]  # in place: `open`'s `empty` reads it
        return renumber[part_of]

    # -- persistence -------------------------------------------------------------------------

    def save(self, folder: Path, held: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Save the parts with their owner's held arrays (`held.npz`, crc32-checked on every
        load) and `meta` in `meta.json`, which lists the parts and the checksums of every
        file, and is renamed last: it vouches for the others (`replace_all`), so a save cut
        short leaves none and the index is rebuilt."""
        folder.mkdir(parents=True, exist_ok=True)
        pairs, digests = self._write_all(folder)
        with open(folder / "held.npz.tmp", "wb") as fh:
            np.savez(fh, allow_pickle=False, **held)
        meta = {
            **meta,
            "parts": self.names,
            # Checksums: every file's, checked by `db check`; the held ids' (a quick crc32)
            # on every load, unless it is still the file hashed here (a rename keeps the stamp)
            "sums": {**digests, "held.npz": file_checksum(folder / "held.npz.tmp")},
            "stamps": {"held.npz": content_stamp(folder / "held.npz.tmp")},
        }
        (folder / "meta.json.tmp").write_text(json.dumps(meta))
        replace_all(
            [
                *pairs,
                (folder / "held.npz.tmp", folder / "held.npz"),
                (folder / "meta.json.tmp", folder / "meta.json"),
            ],
            last_vouches=True,
        )
        self._written()

    def _write_all(self, folder: Path) -> tuple[list[tuple[Path, Path]], dict[str, str]]:
        """Write the changed parts to temporary files in `folder`: (their (temporary, final)
        pairs for `replace_all`, the digest of every part's file for the meta.json)."""
        self.folder = folder
        for part in self.parts:
            if part.pending is not None and not part.pending.exists():
                part.dirty = True  # a save cut short moved it: written again (from memory)
            self._write(part)
        pairs = [(p.pending, folder / p.name) for p in self.parts if p.pending is not None]
        digests = {}
        for p in self.parts:
            if p.digest is None:  # a part saved before its digest was kept here
                p.digest = file_digest(folder / p.name)
            digests[p.name] = p.digest
        return pairs, digests

    def _written(self) -> None:
        """The caller moved the pending files into place: map the IVF parts held in memory
        from them (a Library keeps its indexes between runs), and remove the files that are
        no longer parts (a rebuild into fewer) and their leftovers."""
        assert self.folder is not None
        self._stack = None
        for p in self.parts:
            p.pending = None
            if p.whole and _is_ivf(p.index):
                p.index, p.whole = _mapped(self.folder / p.name), False
        keep = set(self.names)
        for path in self.folder.glob(f"{self.stem}*.faiss*"):
            if path.name not in keep and (
                path.name == f"{self.stem}.faiss" or path.name.startswith(f"{self.stem}-")
            ):
                path.unlink(missing_ok=True)
