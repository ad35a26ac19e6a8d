"""Indexing: scan → decode → encode → write, incremental and resumable.

The stages are separate functions (like clip-retrieval's reader / mapper / writer) so that the
same pipeline could be driven by a cluster engine; here one process runs them in order.
A commit group of images is written as one vector shard, then committed to SQL: an
interrupted run loses at most the group in flight, and the next run picks up from there.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.bounded import READ_TIMEOUT, TimedOut, map_bounded
from piaa_index.images import (
    ImageDecodeError,
    MemoryBudget,
    file_hash,
    load_image,
    return_freed_pixels_to_os,
)
from piaa_index.scan import FileInfo, scan
from piaa_index.schema import FAILED, INDEXED
from piaa_index.store import KnownImage, Store, utcnow
from piaa_index.vectors import VectorStore

if TYPE_CHECKING:
    from piaa_index.encoder import Encoder
    from piaa_index.progress import Progress


# Decoded pixels in flight across the decode threads: a 13,000 x 13,000 16-bit scan is 338 MB
# before it is reduced, so a few of them together must wait for each other.
DECODE_MEMORY = 512 << 20


@dataclass
class IndexReport:
    """What one index run did (the CLI prints it; `--json` prints `as_dict()`)."""

    indexed: int = 0
    unchanged: int = 0
    reused: int = 0
    removed: int = 0
    failed: list[dict] = field(default_factory=list)
    still_failing: int = 0
    skipped: dict[str, Any] = field(default_factory=dict)  # what the scan did not read, why
    kept: dict[str, int] = field(default_factory=dict)  # --prune: missing but not provably gone
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "reused": self.reused,
            "removed": self.removed,
            "failed": self.failed,
            "still_failing": self.still_failing,
            "skipped": self.skipped,
            "kept": self.kept,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.indexed / self.seconds, 2) if self.seconds else 0.0,
        }


class RetryNextRun(str):
    """A failure that says nothing about the file itself (its read timed out): reported in
    this run's summary but not recorded, so the next run tries the file again."""


@dataclass
class Row:
    """What SQL records about one indexed file (its vectors are in the shard)."""

    info: FileInfo
    content_hash: str
    width: int
    height: int


@dataclass
class _Encoded(Row):
    cls: np.ndarray
    patches: np.ndarray
    reused: bool


class Indexer:
    """Brings the store and vectors up to date with files on disk."""

    def __init__(
        self,
        store: Store,
        vectors: VectorStore,
        encoder_factory: Callable[[], Encoder],
        batch_size: int = 32,
        commit_every: int = 256,
        workers: int = 4,
        decode_memory: int = DECODE_MEMORY,
        read_timeout: float = READ_TIMEOUT,
    ):
        self.store = store
        self.vectors = vectors
        self._encoder_factory = encoder_factory
        self._encoder: Encoder | None = None
        self.batch_size = batch_size
        self.commit_every = commit_every
        self.workers = workers
        self.decode_budget = MemoryBudget(decode_memory)
        self.read_timeout = read_timeout
        return_freed_pixels_to_os()

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = self._encoder_factory()
        return self._encoder

    def run(
        self,
        paths: Sequence[str | Path],
        prune: bool = False,
        progress: Progress = True,
        exclude: Sequence[str] = (),
        default_excludes: bool = True,
        follow_symlinks: bool = False,
    ) -> IndexReport:
        started = time.perf_counter()
        report = IndexReport()
        todo, known = plan(
            self.store, report, paths, prune, exclude, default_excludes, follow_symlinks
        )
        if todo:
            with self.vectors.writer_lock():
                self._index_files(todo, known, report, progress)
        report.seconds = time.perf_counter() - started
        return report

    # -- stages --------------------------------------------------------------------------------

    def _index_files(
        self,
        todo: list[FileInfo],
        known: dict[str, KnownImage],
        report: IndexReport,
        progress: Progress,
    ) -> None:
        from piaa_index.progress import progress_bar

        group: list[_Encoded] = []
        failures: list[tuple[FileInfo, str]] = []
        with progress_bar(len(todo), "indexing", progress) as advance:
            for chunk_start in range(0, len(todo), self.batch_size):
                chunk = todo[chunk_start : chunk_start + self.batch_size]
                encoded, failed = self._encode_chunk(chunk, known)
                group.extend(encoded)
                failures.extend(failed)
                for item in encoded:
                    if item.reused:
                        report.reused += 1
                    else:
                        report.indexed += 1
                for info, error in failed:
                    report.failed.append({"path": info.path, "error": error})
                advance(len(chunk))
                if len(group) + len(failures) >= self.commit_every:
                    self._commit(group, failures, known)
                    group, failures = [], []
            self._commit(group, failures, known)

    def _encode_chunk(
        self, chunk: list[FileInfo], known: dict[str, KnownImage]
    ) -> tuple[list[_Encoded], list[tuple[FileInfo, str]]]:
        """Hash, reuse what can be reused, decode + encode the rest."""
        out, to_encode, hashes, failed = hash_and_reuse(
            chunk, self.store, self.vectors, self.workers, self.read_timeout
        )
        if to_encode:
            draft = max(self.encoder.image_size)
            decoded = decode_files(
                to_encode, draft, self.decode_budget, self.workers, self.read_timeout
            )
            good = [(info, img) for info, img in decoded if not isinstance(img, str)]
            failed.extend((info, img) for info, img in decoded if isinstance(img, str))
            out.extend(encode_decoded(self.encoder, good, hashes, len(good)))
        return out, failed

    def _commit(
        self,
        group: list[_Encoded],
        failures: list[tuple[FileInfo, str]],
        known: dict[str, KnownImage],
    ) -> None:
        """Vectors first (one durable shard), then the SQL rows in one transaction."""
        if not group and not failures:
            return
        shard = None
        if group:
            shard = self.vectors.next_shard_id()
            # Ids must exist before the shard is written: reserve them for new paths.
            ids = reserve_ids(self.store, [item.info for item in group], known)
            self.vectors.write_shard(
                shard,
                ids,
                np.stack([item.cls for item in group]),
                np.stack([item.patches for item in group]),
            )
        commit_rows(self.store, shard, group, failures, known)


# -- the stages, shared with the Ray engine (piaa_index/ray_engine.py) ----------------------------


def hash_and_reuse(
    chunk: Sequence[FileInfo],
    store: Store,
    vectors: VectorStore,
    workers: int = 4,
    read_timeout: float = READ_TIMEOUT,
) -> tuple[list[_Encoded], list[FileInfo], dict[str, str], list[tuple[FileInfo, str]]]:
    """Hash each file; a file whose content is already indexed reuses those vectors.

    Returns (reused, files to decode and encode, path -> hash, unreadable files). Each read is
    bounded by `read_timeout` seconds (a hung network share fails the file, not the run).
    """
    failed: list[tuple[FileInfo, str]] = []
    hashes: dict[str, str] = {}
    digests = map_bounded(lambda info: file_hash(info.path), chunk, workers, read_timeout)
    for info, got in zip(chunk, digests, strict=True):
        if isinstance(got, str):
            hashes[info.path] = got
        elif isinstance(got, TimedOut):
            failed.append((info, RetryNextRun(f"cannot read file: {got}")))
        elif isinstance(got, OSError):
            failed.append((info, f"cannot read file: {got.strerror or got}"))
        else:
            raise got
    same = store.indexed_by_hash(hashes.values())
    out: list[_Encoded] = []
    to_encode: list[FileInfo] = []
    for info in chunk:
        digest = hashes.get(info.path)
        if digest is None:
            continue
        source = same.get(digest)
        if source is not None and source.shard is not None and source.shard_row is not None:
            cls, patches = vectors.vectors_for(source.id, source.shard, source.shard_row)
            out.append(
                _Encoded(info, digest, source.width or 0, source.height or 0, cls, patches, True)
            )
        else:
            to_encode.append(info)
    return out, to_encode, hashes, failed


def decode_files(
    infos: Sequence[FileInfo],
    draft: int,
    budget: MemoryBudget,
    workers: int,
    read_timeout: float = READ_TIMEOUT,
) -> list[tuple[FileInfo, Any]]:
    """Decode in threads (Pillow releases the GIL while decoding), each bounded by
    `read_timeout` seconds; errors become strings."""

    def one(info: FileInfo) -> Any:
        # JPEG draft decoding: decode at 1/2..1/8 scale when still >= the model's input.
        return load_image(info.path, draft_size=draft, budget=budget)

    out: list[tuple[FileInfo, Any]] = []
    for info, img in zip(infos, map_bounded(one, infos, workers, read_timeout), strict=True):
        if isinstance(img, ImageDecodeError):
            out.append((info, str(img)))
        elif isinstance(img, TimedOut):
            out.append((info, RetryNextRun(f"cannot read file: {img}")))
        elif isinstance(img, BaseException):
            raise img
        else:
            out.append((info, img))
    return out


def encode_decoded(
    encoder: Encoder, good: Sequence[tuple[FileInfo, Any]], hashes: dict[str, str], batch_size: int
) -> list[_Encoded]:
    """Preprocess and encode decoded images, `batch_size` per forward pass."""
    import torch

    out: list[_Encoded] = []
    for start in range(0, len(good), max(1, batch_size)):
        part = good[start : start + max(1, batch_size)]
        batch = torch.stack([encoder.preprocess(img) for _, img in part])
        cls, patches = encoder.encode_images(batch)
        for j, (info, img) in enumerate(part):
            width, height = img.info.get("original_size", img.size)
            out.append(_Encoded(info, hashes[info.path], width, height, cls[j], patches[j], False))
    return out


def commit_rows(
    store: Store,
    shard: int | None,
    group: Sequence[Row],
    failures: Sequence[tuple[FileInfo, str]],
    known: dict[str, KnownImage],
) -> None:
    """The SQL rows of one commit group, in one transaction: `group[i]` is row i of `shard`,
    which must already be durable on disk (the crash ordering of docs/architecture.md)."""
    failures = [(info, error) for info, error in failures if not isinstance(error, RetryNextRun)]
    if not group and not failures:
        return
    now = utcnow()
    # Bulk rows: a commit group costs a fixed number of statements, not two per image.
    updates = [
        {
            "id": known[item.info.path].id,
            "content_hash": item.content_hash,
            "size": item.info.size,
            "mtime": item.info.mtime,
            "width": item.width,
            "height": item.height,
            "status": INDEXED,
            "error": None,
            "shard": shard,
            "shard_row": row_no,
            "indexed_at": now,
        }
        for row_no, item in enumerate(group)
    ]
    broken = [
        {
            "path": info.path,
            "content_hash": None,
            "size": info.size,
            "mtime": info.mtime,
            "width": None,
            "height": None,
            "status": FAILED,
            "error": error,
            "shard": None,
            "shard_row": None,
            "indexed_at": now,
        }
        for info, error in failures
    ]
    new_broken = []
    for (info, _error), row in zip(failures, broken, strict=True):
        if info.path in known:
            updates.append(dict(row, id=known[info.path].id))
        else:
            new_broken.append(row)
    store.commit_images(updates, new_broken)


def reserve_ids(store: Store, infos: Sequence[FileInfo], known: dict[str, KnownImage]) -> list[int]:
    """Image ids for these paths, with placeholder rows for new ones (Store.reserve_images)."""
    new = [info.path for info in infos if info.path not in known]
    if new:
        for path, image_id in zip(new, store.reserve_images(new), strict=True):
            known[path] = KnownImage(image_id, path, 0, 0.0, "pending")
    return [known[info.path].id for info in infos]


def plan(
    store: Store,
    report: IndexReport,
    paths: Sequence[str | Path],
    prune: bool,
    exclude: Sequence[str],
    default_excludes: bool,
    follow_symlinks: bool,
) -> tuple[list[FileInfo], dict[str, KnownImage]]:
    """Scan, skip what is unchanged or still failing, prune; (files to index, known rows).

    Shared by the local and the Ray engine, so incremental runs decide the same way.
    """
    found = scan(paths, exclude, default_excludes, follow_symlinks)
    report.skipped = found.skipped()
    known = store.images_under(found.roots)
    todo: list[FileInfo] = []
    for info in found.files:
        row = known.get(info.path)
        if row is not None and row.size == info.size and row.mtime == info.mtime:
            if row.status == INDEXED:
                report.unchanged += 1
                continue
            if row.status == FAILED:
                report.still_failing += 1
                continue
        todo.append(info)
    if prune:
        # Only what is provably gone: an unreadable folder or an unmounted share must not
        # cost the user their tags.
        on_disk = {f.path for f in found.files}
        gone = []
        kept: Counter[str] = Counter()
        for path, row in known.items():
            if path in on_disk:
                continue
            reason = found.why_kept(path)
            if reason is None:
                gone.append(row.id)
            else:
                kept[reason] += 1
        store.remove_images(gone)
        report.removed = len(gone)
        report.kept = dict(kept)
    return todo, known
