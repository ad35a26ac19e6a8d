"""Score matrices: every image's confidence S, patch evidence E and [CLS] score per label.

One folder per classifier, `<vectors_dir>/scores/<key>/`, holding segments. A segment is the
images scored in one pass (the fit's re-tag, or the images indexed since), as `.npy` files
memory-mapped on read:

    <seg>.ids.npy      int64 [n]     image ids
    <seg>.shard.npy    int32 [n]     the vector shard each row was scored from
    <seg>.S.npy / .E.npy / .C.npy    float32 [C, n]   label-major, so a label is contiguous
    <seg>.present.npy  bool [C, n]   the tag rule (decisions.Decisions.apply: S >= 1/2)

float32, not float16: fp16 keeps ~3 significant digits, so at 100k+ images many fused scores
tie and the ranking (and the shown scores) would differ from the float64 reference; the whole
matrix is 13 bytes per image and label, noise next to the patch vectors.

Crash ordering is that of the vector shards: a segment is written under temporary names,
fsynced and renamed, then SQL (`classifiers.scores_key` / `score_segments`) commits it. On open
(`cleanup`), folders and segments that SQL does not list are deleted. Rows are never rewritten:
an image scored again (re-encoded, moved by vacuum) appears in a later segment and the latest
row wins; rows of images no longer indexed are masked by the caller (`ScoreView.valid`).

Images that left the index (pruned, vectors lost) get a removal segment, `<seg>.removed.npy`
(int64 [n] ids, no scores): their latest row is then a tombstone and every row of theirs is
masked on open. The first query after a prune writes it (`Tagger.state`), so later processes
agree with SQL without comparing every image with it (piaa_index/catalog/readonly.py).

Checksums: `<seg>.sum.json` holds each file's blake2b digest and the (inode, size, mtime,
ctime) it had when hashed, written after the files and before SQL commits the segment. Opening
a segment re-hashes only a file whose stamp moved (any write, copy or restore moves it; hashing
every file on every open would cost ~0.15 s per 80 MB, ~2 s per fresh process at 1M images);
`piaa db check` hashes every file. A damaged or missing segment is left out of the view with a
one-line warning, so the next query scores its images again from the vectors, and `db check`
removes it. `checksums.json` in a score folder names the first segment written with checksums:
from there on a segment without its checksum file is damaged, not old.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from piaa_index.durable import (
    atomic_write,
    file_digest,
    file_lock,
    fsync_dir,
    replace_all,
    write_bytes_atomic,
)
from piaa_index.layout import WRITER_LOCK, VectorsLayout

if TYPE_CHECKING:
    from piaa_index.method.decisions import Decisions

# Confidence (the calibrated fused score), patch evidence m, [CLS] score, text support (max patch-text cosine: the gate of
# piaa_index/method/decisions.py, kept so that `tags` can say why a label is or is not present).
KINDS = ("S", "E", "C", "U")
DTYPE = np.float32
LOCK = WRITER_LOCK  # <scores>/writer.lock
FINISH_ROWS = 65_536  # images per block when the tag rule is applied (bounds memory)
SUMS = "sum"  # <seg>.sum.json: the checksums of a segment's files
MARKER = "checksums.json"  # {"from": N}: segments numbered N and up carry checksums


class SegmentDamaged(ValueError):
    """A score segment's file is missing or does not match its checksum."""


def scores_root(vectors_dir: Path) -> Path:
    return VectorsLayout(Path(vectors_dir)).scores


def new_key() -> str:
    return uuid.uuid4().hex


@contextmanager
def writer_lock(root: Path, blocking: bool = True) -> Iterator[bool]:
    """Exclusive right to write score files; yields False if not blocking and it is taken."""
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / LOCK, blocking=blocking) as held:  # Windows: single writer on the user
        yield held


def cleanup(root: Path, committed: Mapping[str, Sequence[str]]) -> list[Path]:
    """Delete score folders and segments that SQL does not know (crash leftovers, old fits).

    `committed` maps each classifier's key to its committed segment names. The caller holds the
    writer lock, so no writer's uncommitted files are mistaken for leftovers.
    """
    removed = leftovers(root, committed)
    for path in removed:
        if path.parent == root:
            shutil.rmtree(path, ignore_errors=True)  # a whole folder SQL does not know
        else:
            path.unlink(missing_ok=True)
    return removed


def leftovers(root: Path, committed: Mapping[str, Sequence[str]]) -> list[Path]:
    """What `cleanup` would delete, touching nothing: score folders SQL does not know, and the
    files of segments it does not know in the others. [] when the folder agrees with SQL."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        if folder.name not in committed:
            found.append(folder)
            continue
        keep = set(committed[folder.name]) | {MARKER.split(".", 1)[0]}
        found.extend(p for p in folder.iterdir() if p.name.split(".", 1)[0] not in keep)
    return found


def _file(folder: Path, segment: str, kind: str) -> Path:
    return folder / f"{segment}.{kind}.npy"


class SegmentWriter:
    """Streams one segment: rows arrive in chunks, thresholds at the end (`finish`)."""

    def __init__(self, folder: Path, segment: str, n: int, n_labels: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.segment = segment
        self.n = n
        self.n_labels = n_labels
        self._tmp: dict[str, Path] = {}
        self.ids = self._open("ids", np.int64, (n,))
        self.shards = self._open("shard", np.int32, (n,))
        self.mats = {kind: self._open(kind, DTYPE, (n_labels, n)) for kind in KINDS}
        self.filled = 0

    def _open(self, kind: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        path = _file(self.folder, self.segment, kind).with_suffix(".npy.tmp")
        self._tmp[kind] = path
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def write(
        self,
        ids: np.ndarray,
        shards: np.ndarray,
        S: np.ndarray,
        E: np.ndarray,
        Cs: np.ndarray,
        U: np.ndarray,
    ) -> None:
        """Append rows ([b] ids and shards, [b, C] scores) in order."""
        a, b = self.filled, self.filled + len(ids)
        self.ids[a:b] = ids
        self.shards[a:b] = shards
        for kind, values in zip(KINDS, (S, E, Cs, U), strict=True):
            self.mats[kind][:, a:b] = values.T
        self.filled = b

    @property
    def evidence(self) -> np.ndarray:
        """[n, C] view of the patch evidence written so far (what the thresholds are fit on)."""
        return self.mats["E"].T[: self.filled]

    @property
    def support(self) -> np.ndarray:
        """[n, C] view of the text support written so far."""
        return self.mats["U"].T[: self.filled]

    @property
    def cls(self) -> np.ndarray:
        """[n, C] view of the [CLS] scores written so far."""
        return self.mats["C"].T[: self.filled]

    def finish(self, decisions: Decisions) -> None:
        """Score and decide with the tag rule (`Decisions.apply`: the confidence S and whether
        it is a tag), flush, fsync and rename every file into place."""
        if self.filled != self.n:
            raise ValueError(f"segment {self.segment}: {self.filled} of {self.n} rows written")
        present = self._open("present", np.bool_, (self.n_labels, self.n))
        S, E, Cs, U = (self.mats[k] for k in KINDS)
        for a in range(0, self.n, FINISH_ROWS):  # label-major files, [rows, C] blocks
            b = min(self.n, a + FINISH_ROWS)
            conf, tags = decisions.apply(E[:, a:b].T, Cs[:, a:b].T, U[:, a:b].T)
            if conf is not None:
                S[:, a:b] = conf.T
            present[:, a:b] = tags.T
        arrays = [self.ids, self.shards, present, *self.mats.values()]
        for arr in arrays:
            arr.flush()  # type: ignore[attr-defined]
        del arrays, present, S, E, Cs, U
        self.ids = self.shards = np.empty(0)
        self.mats = {}
        # _seal fsyncs the folder once the checksums are written beside the files.
        replace_all(
            [(tmp, _file(self.folder, self.segment, kind)) for kind, tmp in self._tmp.items()],
            sync_folder=False,
        )
        _seal(self.folder, self.segment, list(self._tmp))
        fsync_dir(self.folder.parent)

    def abort(self) -> None:
        self.mats = {}
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)


# The shard of a tombstone row: its image is no longer indexed.
REMOVED = -1


def write_removed(folder: Path, segment: str, ids: Sequence[int]) -> None:
    """A durable removal segment: these images' latest rows become tombstones."""
    # <seg>.removed.npy.tmp, then renamed; a file object: np.save would append ".npy" to a name
    with atomic_write(_file(folder, segment, "removed")) as fh:
        np.save(fh, np.asarray(ids, dtype=np.int64))
    _seal(folder, segment, ["removed"])


def _number(segment: str) -> int | None:
    digits = segment[3:]
    return int(digits) if segment.startswith("seg") and digits.isdigit() else None


def _stamp(st: os.stat_result) -> list[int]:
    """What moves when a file is written, copied or restored (ctime cannot be set back)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _seal(folder: Path, segment: str, kinds: Sequence[str]) -> None:
    """Record the checksums of a segment's files (in place, fsynced): before SQL commits it."""
    marker = folder / MARKER
    if not marker.exists():  # the first segment of this folder written with checksums
        write_bytes_atomic(json.dumps({"from": _number(segment) or 0}).encode(), marker)
    sums = {}
    for kind in kinds:
        path = _file(folder, segment, kind)
        sums[kind] = {"digest": file_digest(path), "stamp": _stamp(path.stat())}
    write_bytes_atomic(json.dumps(sums).encode(), folder / f"{segment}.{SUMS}.json")
    fsync_dir(folder)


def has_checksum(folder: Path, segment: str) -> bool:
    return (folder / f"{segment}.{SUMS}.json").exists()


def check_segment(folder: Path, segment: str, full: bool = False) -> str | None:
    """None when a segment's files match the checksums written with them (or it predates
    checksums), else what is wrong. Only files whose stamp moved since they were hashed are
    hashed again, every file when `full` (`piaa db check`)."""
    removal = _file(folder, segment, "removed").exists()
    kinds = ["removed"] if removal else ["ids", "shard", *KINDS, "present"]
    try:
        sums = json.loads((folder / f"{segment}.{SUMS}.json").read_text())
        if not isinstance(sums, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        try:
            start = json.loads((folder / MARKER).read_text()).get("from")
        except (OSError, ValueError, AttributeError):
            start = None
        number = _number(segment)
        if start is not None and (number is None or number >= int(start)):
            return "its checksum file is missing"
        sums = None  # written before checksums existed: its files only need to be there
    except (OSError, ValueError) as exc:
        return f"unreadable checksum file: {exc}"
    moved = False
    for kind in kinds:
        path = _file(folder, segment, kind)
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"{path.name} is missing"
        if sums is None:
            continue
        entry = sums.get(kind)
        if not isinstance(entry, dict) or "digest" not in entry:
            return f"{path.name} has no checksum"
        if not full and entry.get("stamp") == _stamp(st):
            continue
        try:
            if file_digest(path) != entry["digest"]:
                return f"{path.name} does not match its checksum"
        except OSError as exc:
            return f"cannot read {path.name}: {exc.strerror or exc}"
        entry["stamp"] = _stamp(path.stat())
        moved = True
    if moved:  # hashed again and sound (a copied or restored library): remember the new stamps
        try:
            write_bytes_atomic(
                json.dumps(sums).encode(), folder / f"{segment}.{SUMS}.json", unique=True
            )
        except OSError:
            pass  # a read-only library: hashed again next time
    return None


def remove_segment(folder: Path, segment: str) -> None:
    """Delete a segment's files (after SQL stopped listing it)."""
    if folder.is_dir():
        for path in folder.glob(f"{segment}.*"):
            path.unlink(missing_ok=True)
        fsync_dir(folder)


_warned: set[tuple[str, str]] = set()


@dataclass
class Segment:
    name: str
    ids: np.ndarray
    shards: np.ndarray
    mats: dict[str, np.ndarray]  # S, E, C, present: [C, n] memory maps; {} for a removal

    @classmethod
    def open(cls, folder: Path, name: str, verify: bool = True) -> Segment:
        """Map a segment's files; `SegmentDamaged` when one is missing or does not match its
        checksum (see `check_segment`)."""
        if verify:
            problem = check_segment(folder, name)
            if problem is not None:
                raise SegmentDamaged(f"score segment {name} in {folder} is damaged: {problem}")

        def load(kind: str) -> np.ndarray:
            return np.load(_file(folder, name, kind), mmap_mode="r")

        removed = _file(folder, name, "removed")
        if removed.exists():
            ids = np.asarray(np.load(removed), dtype=np.int64)
            return cls(name, ids, np.full(len(ids), REMOVED, np.int32), {})
        mats = {kind: load(kind) for kind in (*KINDS, "present")}
        return cls(name, np.asarray(load("ids")), np.asarray(load("shard")), mats)

    def column(self, kind: str, label: int) -> np.ndarray:
        if self.mats:
            return self.mats[kind][label]
        return np.zeros(len(self.ids), bool if kind == "present" else DTYPE)  # tombstones


@dataclass
class ScoreView:
    """The segments of one classifier as one logical [rows] x [labels] table.

    `valid` marks the rows that answer queries: the latest row of each image still indexed.
    Columns of a multi-segment view are concatenated on first use and kept.
    """

    key: str
    segments: list[Segment]
    ids: np.ndarray
    shards: np.ndarray
    valid: np.ndarray
    _columns: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    _lookup: tuple[np.ndarray, np.ndarray] | None = None
    _counts: np.ndarray | None = None

    @classmethod
    def open(cls, folder: Path, key: str, names: Sequence[str]) -> ScoreView:
        """The view of the committed segments `names`. A damaged one is left out (warned about
        once per process): its images then count as not scored, and the next query that may
        write scores them again from the vectors. A lost folder raises OSError."""
        if names and not Path(folder).is_dir():
            raise FileNotFoundError(f"score folder {folder} is missing")
        segments = []
        for name in names:
            try:
                segments.append(Segment.open(folder, name))
            except (SegmentDamaged, OSError, ValueError) as exc:
                if (str(folder), name) not in _warned:
                    _warned.add((str(folder), name))
                    reason = exc if isinstance(exc, SegmentDamaged) else f"{name}: {exc}"
                    print(
                        f"warning: {reason}; its images are scored again "
                        "(`piaa db check` removes it)",
                        file=sys.stderr,
                    )
        ids = _concat([s.ids for s in segments], np.int64)
        shards = _concat([s.shards for s in segments], np.int32)
        return cls(key, segments, ids, shards, latest_rows(ids) & (shards != REMOVED))

    @property
    def max_shard(self) -> int:
        return int(self.shards.max()) if len(self.shards) else 0

    def invalidate(self, mask: np.ndarray) -> None:
        """Mask rows (superseded or no longer indexed)."""
        self.valid &= ~mask
        self._lookup = None
        self._counts = None

    def column(self, kind: str, label: int) -> np.ndarray:
        """[rows] values of one label (S, E, C or present)."""
        if len(self.segments) == 1:
            return self.segments[0].column(kind, label)
        got = self._columns.get((kind, label))
        if got is None:
            got = np.concatenate([s.column(kind, label) for s in self.segments])
            self._columns[(kind, label)] = got
        return got

    def take(self, kind: str, label: int, rows: np.ndarray) -> np.ndarray:
        """One label's values at `rows`, read from each segment: `column` of a multi-segment
        view keeps a concatenated copy, [rows] floats per label and kind (a fit that reads every
        label would hold 12 bytes per image and label)."""
        if len(self.segments) == 1:
            return np.asarray(self.segments[0].column(kind, label)[rows])
        out = np.empty(len(rows), bool if kind == "present" else DTYPE)
        start = 0
        for seg in self.segments:
            stop = start + len(seg.ids)
            inside = (rows >= start) & (rows < stop)
            if inside.any():
                out[inside] = seg.column(kind, label)[rows[inside] - start]
            start = stop
        return out

    def row_of(self, image_id: int) -> tuple[Segment, int] | None:
        """(segment, position) of an image's valid row."""
        if self._lookup is None:
            if _increasing(self.ids) and bool(self.valid.all()):
                # Ids in order, every row valid (a fit's re-tag): the ids are the keys, no sort
                # of a million ids (25 ms) for a fresh `piaa tags`.
                self._lookup = (self.ids, np.arange(len(self.ids)))
            else:
                rows = np.nonzero(self.valid)[0]
                order = np.argsort(self.ids[rows], kind="stable")
                self._lookup = (self.ids[rows][order], rows[order])
        keys, rows = self._lookup
        i = int(np.searchsorted(keys, image_id))
        if i >= len(keys) or keys[i] != image_id:
            return None
        row = int(rows[i])
        for seg in self.segments:
            if row < len(seg.ids):
                return seg, row
            row -= len(seg.ids)
        return None

    def present_counts(self, n_labels: int) -> np.ndarray:
        """[C] images decided present per label (valid rows only)."""
        if self._counts is None:
            counts = np.zeros(n_labels, np.int64)
            start = 0
            for seg in self.segments:
                v = self.valid[start : start + len(seg.ids)]
                start += len(seg.ids)
                if not seg.mats:
                    continue  # tombstones
                pres = seg.mats["present"]
                every = bool(v.all())  # then no [rows] mask per label
                for c in range(n_labels):
                    # One contiguous row at a time: numpy's fast count (axis=1 is 4x slower).
                    counts[c] += int(np.count_nonzero(pres[c] if every else pres[c] & v))
            self._counts = counts
        return self._counts


def latest_rows(ids: np.ndarray) -> np.ndarray:
    """Mask of the last row of each id (later segments supersede earlier ones)."""
    if _increasing(ids):
        # Ids in increasing order (a fit's re-tag of a never-vacuumed library) are distinct:
        # 1 ms at 1M rows against 35-220 ms for np.unique, on every fresh process's first query.
        return np.ones(len(ids), dtype=bool)
    valid = np.zeros(len(ids), dtype=bool)
    if len(ids):
        _, first_in_reversed = np.unique(ids[::-1], return_index=True)
        valid[len(ids) - 1 - first_in_reversed] = True
    return valid


def _increasing(ids: np.ndarray) -> bool:
    """Strictly increasing (so also distinct)."""
    return len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1]))


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(p, dtype=dtype) for p in parts])


def segment_name(existing: Sequence[str]) -> str:
    """After every segment listed (`piaa db check` may have removed some from the list)."""
    numbers = [n for n in (_number(s) for s in existing) if n is not None]
    return f"seg{max([len(existing), *numbers]) + 1:06d}"
