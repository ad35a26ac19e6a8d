"""Indexing: scan → decode → encode → write, incremental and resumable.

The stages are separate functions (like clip-retrieval's reader / mapper / writer) so that the
same pipeline could be driven by a cluster engine. Here one process runs them, a chunk of
`batch_size` files at a time: the main thread hashes chunk n+1 (and looks up what it can reuse)
while a background thread decodes and preprocesses it in `workers` threads, and the encoder
encodes chunk n. A commit group of images is written as one vector shard, then committed to
SQL, in the main thread and in file order: an interrupted run loses at most the group in flight,
and the next run picks up from there.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.catalog.schema import FAILED, INDEXED
from piaa_index.catalog.store import KnownImage, Store, utcnow
from piaa_index.engines.base import IndexJob, IndexReport
from piaa_index.ingest.bounded import READ_TIMEOUT, TimedOut, map_bounded
from piaa_index.ingest.images import (
    ImageDecodeError,
    MemoryBudget,
    file_hash,
    load_image,
    return_freed_pixels_to_os,
)
from piaa_index.ingest.scan import FileInfo, scan
from piaa_index.progress import note, progress_bar
from piaa_index.vectors.shards import VectorStore

if TYPE_CHECKING:
    from piaa_index.model.encoder import Encoder
    from piaa_index.progress import Progress

__all__ = ["IndexReport", "Indexer", "LocalEngine"]  # IndexReport: engines/base.py's


# Decoded pixels in flight across the decode threads: a 13,000 x 13,000 16-bit scan is 338 MB
# before it is reduced, so a few of them together must wait for each other.
DECODE_MEMORY = 512 << 20


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
    # What the decoders said about a file that still decoded (images.py captures LibRaw's and
    # Pillow's messages instead of letting them reach the terminal): kept in the run's report.
    messages: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """A decoded image already through the encoder's preprocess, in its decode thread."""

    pixels: Any  # torch.Tensor [3, H, W], what `Encoder.preprocess` returns
    width: int  # the file's full upright size (load_image's info["original_size"])
    height: int
    messages: list[str] = field(default_factory=list)  # load_image's info["decoder_messages"]


@dataclass
class _Chunk:
    """One chunk of files between its hashing (main thread) and its encoding."""

    reused: list[_Encoded]
    hashes: dict[str, str]  # path -> content hash
    failed: list[tuple[FileInfo, str]]  # unreadable when hashed
    sources: dict[str, tuple[Any, ...]]  # what the reuse decision was made on (_sources)
    files: list[FileInfo] = field(default_factory=list)
    decoding: _Job | None = None  # decode_files of the files to encode, in the background
    error: Exception | None = None  # planning it failed: raised when its turn comes


class LocalEngine:
    """The `Engine` of one process: an `Indexer` over the job's store and vectors."""

    def run(self, job: IndexJob, progress: Progress = False) -> IndexReport:
        vectors = job.vectors()
        n = len(job.paths)
        note(f"scanning {n} path{'s' if n != 1 else ''}…", progress)
        indexer = Indexer(
            job.store,
            vectors,
            job.encoder,
            batch_size=job.batch_size,
            commit_every=job.commit_every,
            workers=job.workers,
            read_timeout=job.read_timeout,
        )
        return indexer.run(
            job.paths,
            prune=job.prune,
            progress=progress,
            exclude=job.exclude,
            default_excludes=job.default_excludes,
            follow_symlinks=job.follow_symlinks,
        )


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
        """Chunk by chunk, as if one after the other: the results, the shards and the SQL
        commits are those of a serial run; only the next chunk's hashing and decoding overlap
        this chunk's encoding and writing. Decoded pixels alive: this chunk's (and their stacked
        batch while it encodes) and the next chunk's, never more."""

        chunks = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        group: list[_Encoded] = []
        failures: list[tuple[FileInfo, str]] = []
        background = _Background()
        try:
            with progress_bar(len(todo), "indexing", progress) as advance:
                ahead = self._plan_chunk(chunks[0], background) if chunks else None
                for n, chunk in enumerate(chunks):
                    current, ahead = ahead, None
                    assert current is not None
                    if current.error is not None:
                        raise current.error
                    if n + 1 < len(chunks):
                        ahead = self._plan_ahead(chunks[n + 1], background)
                    encoded, failed = self._finish_chunk(current)
                    del current  # its decoded pixels: not kept while the next chunk decodes
                    group.extend(encoded)
                    failures.extend(failed)
                    for item in encoded:
                        if item.reused:
                            report.reused += 1
                        else:
                            report.indexed += 1
                        if item.messages:
                            report.warnings.append(
                                {"path": item.info.path, "messages": item.messages}
                            )
                    for info, error in failed:
                        report.failed.append({"path": info.path, "error": error})
                    advance(len(chunk))
                    if len(group) + len(failures) >= self.commit_every:
                        self._commit(group, failures, known)
                        group, failures = [], []
                        if ahead is not None:
                            ahead = self._recheck(ahead, background)
                self._commit(group, failures, known)
        finally:
            background.close()

    def _plan_chunk(
        self,
        files: list[FileInfo],
        background: _Background,
        hashed: tuple[dict[str, str], list[tuple[FileInfo, str]]] | None = None,
        same: dict[str, Any] | None = None,
    ) -> _Chunk:
        """Main thread: hash (unless `hashed`), look up what can be reused (unless `same`), and
        hand the files to encode to `background` to decode and preprocess."""
        hashes, failed = hashed or hash_files(files, self.workers, self.read_timeout)
        if same is None:
            same = self.store.indexed_by_hash(hashes.values())
        reused, to_encode = reuse_or_encode(files, hashes, same, self.vectors)
        chunk = _Chunk(reused, hashes, list(failed), _sources(same), files)
        if to_encode:
            chunk.decoding = background.submit(
                decode_files,
                to_encode,
                max(self.encoder.image_size),
                self.decode_budget,
                self.workers,
                self.read_timeout,
                self.encoder.preprocess,
            )
        return chunk

    def _plan_ahead(self, files: list[FileInfo], background: _Background) -> _Chunk:
        """The next chunk's plan; a failure is kept for its turn, after this chunk's commit,
        as a serial run would have met it."""
        try:
            return self._plan_chunk(files, background)
        except Exception as exc:
            return _Chunk([], {}, [], {}, files, error=exc)

    def _recheck(self, chunk: _Chunk, background: _Background) -> _Chunk:
        """After a commit: a chunk planned before it must reuse what a serial run, planning it
        after the commit, would have (e.g. a copy of a file just committed). Planned again
        when the lookup now answers otherwise."""
        if chunk.error is not None:
            return chunk
        same = self.store.indexed_by_hash(chunk.hashes.values())
        if _sources(same) == chunk.sources:
            return chunk
        if chunk.decoding is not None:
            chunk.decoding.wait()  # its pixels go; never two decodes of one chunk at once
            chunk.decoding = None
        try:
            return self._plan_chunk(chunk.files, background, (chunk.hashes, chunk.failed), same)
        except Exception as exc:
            return _Chunk([], {}, [], {}, chunk.files, error=exc)

    def _finish_chunk(self, chunk: _Chunk) -> tuple[list[_Encoded], list[tuple[FileInfo, str]]]:
        """Main thread: wait for the chunk's decoded tensors and encode them; (reused then
        encoded, in file order; failures: unreadable, then undecodable)."""
        out, failed = chunk.reused, chunk.failed
        if chunk.decoding is not None:
            decoded = self._decoded(chunk)
            good = [(info, img) for info, img in decoded if not isinstance(img, str)]
            failed.extend((info, img) for info, img in decoded if isinstance(img, str))
            del decoded
            out.extend(encode_decoded(self.encoder, good, chunk.hashes, len(good)))
        return out, failed

    def _decoded(self, chunk: _Chunk) -> list[tuple[FileInfo, Any]]:
        """The background decode of `chunk` (waits for it; its error is raised here)."""
        assert chunk.decoding is not None
        job, chunk.decoding = chunk.decoding, None
        return job.result()  # type: ignore[no-any-return]

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
            # Ids must exist before the shard is written: reserved for new paths.
            ((shard, ids),) = allocate(self.store, self.vectors, [[i.info for i in group]], known)
            self.vectors.write_shard(
                shard,
                ids,
                np.stack([item.cls for item in group]),
                np.stack([item.patches for item in group]),
            )
        commit_rows(self.store, shard, group, failures, known)


# -- the stages, shared with the Ray engine (piaa_index/engines/ray_engine.py) ----------------------------


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
    hashes, failed = hash_files(chunk, workers, read_timeout)
    out, to_encode = reuse_or_encode(chunk, hashes, store.indexed_by_hash(hashes.values()), vectors)
    return out, to_encode, hashes, failed


def hash_files(
    chunk: Sequence[FileInfo], workers: int = 4, read_timeout: float = READ_TIMEOUT
) -> tuple[dict[str, str], list[tuple[FileInfo, str]]]:
    """(path -> content hash, unreadable files), reading in `workers` threads, each read
    bounded by `read_timeout` seconds."""
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
    return hashes, failed


def reuse_or_encode(
    chunk: Sequence[FileInfo], hashes: dict[str, str], same: dict[str, Any], vectors: VectorStore
) -> tuple[list[_Encoded], list[FileInfo]]:
    """(files reusing the vectors of indexed identical content, files to decode and encode);
    `same` is `Store.indexed_by_hash` of the hashes."""
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
    return out, to_encode


def _sources(same: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """What `reuse_or_encode` reads of a lookup: the vectors and size each hash would reuse."""
    return {
        digest: (row.id, row.shard, row.shard_row, row.width, row.height)
        for digest, row in same.items()
    }


def decode_files(
    infos: Sequence[FileInfo],
    draft: int,
    budget: MemoryBudget,
    workers: int,
    read_timeout: float = READ_TIMEOUT,
    preprocess: Callable[[Any], Any] | None = None,
) -> list[tuple[FileInfo, Any]]:
    """Decode in threads (Pillow releases the GIL while decoding), each bounded by
    `read_timeout` seconds; errors become strings. With `preprocess` (the encoder's), each
    image is also preprocessed in its thread, right after decoding: a `Prepared`, not the
    decoded image, and the pixels at file scale are freed there and then."""

    def one(info: FileInfo) -> Any:
        # JPEG draft decoding: decode at 1/2..1/8 scale when still >= the model's input.
        img = load_image(info.path, draft_size=draft, budget=budget)
        if preprocess is None:
            return img
        width, height = img.info.get("original_size", img.size)
        try:
            return Prepared(preprocess(img), width, height, _messages(img))
        except BaseException as exc:  # not a decoding error, whatever its type: raised
            raise _NotDecoding(exc) from exc

    out: list[tuple[FileInfo, Any]] = []
    for info, img in zip(infos, map_bounded(one, infos, workers, read_timeout), strict=True):
        if isinstance(img, _NotDecoding):
            raise img.error
        if isinstance(img, ImageDecodeError):
            out.append((info, str(img)))
        elif isinstance(img, TimedOut):
            out.append((info, RetryNextRun(f"cannot read file: {img}")))
        elif isinstance(img, BaseException):
            raise img
        else:
            out.append((info, img))
    return out


class _NotDecoding(Exception):
    """An error of `preprocess` in a decode thread: raised as itself, not taken for a file's."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def encode_decoded(
    encoder: Encoder, good: Sequence[tuple[FileInfo, Any]], hashes: dict[str, str], batch_size: int
) -> list[_Encoded]:
    """Encode decoded images, `batch_size` per forward pass: `Prepared` ones as they are,
    decoded images (the Ray engine's) preprocessed here first."""
    import torch

    out: list[_Encoded] = []
    for start in range(0, len(good), max(1, batch_size)):
        part = good[start : start + max(1, batch_size)]
        prepared = [_prepared(encoder, img) for _, img in part]
        cls, patches = encoder.encode_images(torch.stack([p.pixels for p in prepared]))
        for j, (info, img) in enumerate(part):
            width, height = _original_size(img)
            out.append(
                _Encoded(
                    info,
                    hashes[info.path],
                    width,
                    height,
                    cls[j],
                    patches[j],
                    False,
                    prepared[j].messages,
                )
            )
    return out


def _prepared(encoder: Encoder, img: Any) -> Prepared:
    if isinstance(img, Prepared):
        return img
    return Prepared(encoder.preprocess(img), *_original_size(img), _messages(img))


def _messages(img: Any) -> list[str]:
    """The decoder messages `load_image` kept for a file that decoded."""
    return [str(m) for m in getattr(img, "info", {}).get("decoder_messages", [])]


def _original_size(img: Any) -> tuple[int, int]:
    if isinstance(img, Prepared):
        return img.width, img.height
    width, height = img.info.get("original_size", img.size)
    return width, height


class _Job:
    """One call run by `_Background`; `result()` waits for it, then hands its value over once
    (so the caller alone keeps the pixels) or raises its error."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self._call: tuple[Callable[..., Any], tuple[Any, ...]] | None = (fn, args)
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        if self._call is None:  # cancelled
            return
        fn, args = self._call
        self._call = None
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the main thread, which raises it
            self._error = exc
        finally:
            del fn, args
            self._done.set()

    def cancel(self) -> None:
        """Never run (its thread is closing)."""
        self._call = None
        self._done.set()

    def wait(self) -> None:
        """Until it has run; its value (and error) dropped."""
        while not self._done.wait(1.0):  # a timeout keeps Ctrl-C prompt on every platform
            pass
        self._value = self._error = None

    def result(self) -> Any:
        while not self._done.wait(1.0):
            pass
        error, value = self._error, self._value
        self._value = self._error = None
        if error is not None:
            raise error
        return value


class _Background:
    """One daemon thread running submitted calls in order: the next chunk's decode while the
    main thread encodes this one. A daemon, like map_bounded's readers: Ctrl-C or an error in
    the main thread never waits for it (it stops after its current call, see `close`)."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Job:
        job = _Job(fn, args)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="piaa-decode")
            self._thread.start()
        self._tasks.put(job)
        return job

    def _loop(self) -> None:
        while True:
            job = self._tasks.get()
            if job is None:
                return
            job.run()
            del job

    def close(self) -> None:
        """No more calls: the thread ends after the one it is running; calls still queued (the
        run stopped: an error, Ctrl-C) are dropped unrun."""
        if self._thread is None:
            return
        while True:
            try:
                job = self._tasks.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        self._tasks.put(None)
        self._thread = None


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


def allocate(
    store: Store,
    vectors: VectorStore,
    groups: Sequence[Sequence[FileInfo]],
    known: dict[str, KnownImage],
    record: bool = False,
) -> list[tuple[int, list[int]]]:
    """(shard id, image ids) of each commit group: the one allocation of both engines, made
    under the vector writer lock before the groups' shards are written.

    Image ids: `reserve_ids` (placeholder rows for new paths). Shard ids: consecutive from
    `VectorStore.next_shard_id`; with `record` they are also recorded durably
    (`reserve_shard_ids`), which the Ray engine needs, allocating every group before workers
    that may outlive a killed driver write them. The local engine allocates each group just
    before writing it itself, so nothing needs recording.
    """
    flat = [info for files in groups for info in files]
    for start in range(0, len(flat), 5000):  # bounded statements on a big first run
        reserve_ids(store, flat[start : start + 5000], known)
    first = vectors.reserve_shard_ids(len(groups)) if record else vectors.next_shard_id()
    return [(first + k, [known[i.path].id for i in files]) for k, files in enumerate(groups)]


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
