"""The Ray engine (`--engine ray`): indexing and re-tagging on a Ray cluster.

The local indexer's stages (piaa_index/engines/indexer.py), run as a Ray Data pipeline:

    driver  scan and plan (incremental skip, prune), reserve image ids, cut commit groups
    tasks   hash, reuse vectors of identical content, decode (CPU, memory-bounded)  `_prepare`
    actors  encode: one model per actor, GPU actors when the cluster has GPUs         `_Encode`
    tasks   write the group's shard into the shared vector folder, durably            `_write`
    driver  commit each group's SQL rows once its shard is on disk

A group's shard id and image ids are fixed on the driver before any worker runs, so a task
Ray retries after its worker died rewrites the same shard (write to a temporary name, rename):
nothing is duplicated. Shards are durable before the driver commits the rows pointing at them:
a killed driver leaves orphan shards, which the next open deletes, and pending rows, which the
next run indexes. Workers reach the vectors and the database by path and URL, so the library
home must be on storage every node mounts at the same path (checked before a run).
"""

from __future__ import annotations

import logging
import pickle
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.engines.base import IndexJob, IndexReport
from piaa_index.errors import PiaaError, UserInputError
from piaa_index.method import fusion
from piaa_index.method.pvcl import pack, unpack
from piaa_index.progress import Progress, progress_bar
from piaa_index.vectors.shards import VectorStore, VectorStoreError, describe_identity

if TYPE_CHECKING:
    from piaa_index.catalog.store import Store
    from piaa_index.config import ModelSpec
    from piaa_index.engines.indexer import Row
    from piaa_index.ingest.scan import FileInfo
    from piaa_index.method.pvcl import Classifier
    from piaa_index.vectors.shards import VectorStore

# File systems a node never shares with another: a home there works on one node only.
NODE_LOCAL_FS = frozenset({"tmpfs", "ramfs", "devtmpfs"})
GPU_BATCH_SIZE = 256  # images per forward pass on a GPU actor (CPU actors use --batch-size)


class RayUnavailable(PiaaError):
    """`--engine ray` without Ray installed, or a cluster that cannot be reached."""


class RayRunError(PiaaError):
    """A Ray run that stopped on the cluster; committed groups are kept."""


def _root_cause(exc: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (RayTaskError, UserCodeException)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


@contextmanager
def one_line_failures(what: str, after: str = "") -> Iterator[None]:
    """A failure on the cluster as one line (exit 1), naming the worker's own error."""
    try:
        yield
    except PiaaError:
        raise
    except Exception as exc:
        cause = _root_cause(exc)
        if isinstance(cause, PiaaError):
            raise RayRunError(str(cause)) from None
        text = str(cause).strip().splitlines()
        detail = f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")
        raise RayRunError(f"{what} stopped on the Ray cluster ({detail}){after}") from None


def require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the extra brings both)
    except ImportError:
        raise RayUnavailable("the Ray engine needs Ray: pip install 'piaa-index[ray]'") from None
    return ray


@contextmanager
def connected(address: str | None) -> Iterator[Any]:
    """Ray, connected to `address` (`auto`, `ray://host:10001`; None: RAY_ADDRESS or a new
    local instance). A connection this call made is closed at the end."""
    ray = require_ray()
    made = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RayUnavailable(
                f"cannot reach the Ray cluster at {address or 'a new local instance'}: {first}"
            ) from None
        made = True
    try:
        from ray.data import DataContext

        for name in ("ray", "ray.data"):  # stderr stays for our progress bar
            logging.getLogger(name).setLevel(logging.WARNING)

        # Our own bar on the driver says how many images are committed; Ray's would interleave.
        DataContext.get_current().enable_progress_bars = False
        yield ray
    finally:
        if made:
            ray.shutdown()


# -- shared storage ---------------------------------------------------------------------------


def fs_type(path: Path) -> str | None:
    """The file system type of the mount that holds `path` (Linux /proc/mounts), or None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(Path(path).resolve())
    best, kind = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, parts[2]
    return kind


def _read_probes(probes: list[tuple[str, str]]) -> list[bool]:
    out = []
    for path, token in probes:
        try:
            out.append(Path(path).read_text() == token)
        except OSError:
            out.append(False)
    return out


def check_shared(ray: Any, folders: Sequence[Path]) -> None:
    """Refuse folders that some node of the cluster does not see as the driver does.

    With more than one node, a folder on a node-local file system (tmpfs, an overlay) is
    refused outright; then every node reads a probe file the driver wrote in each folder.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        for folder in folders:
            kind = fs_type(folder)
            if kind in NODE_LOCAL_FS:
                raise UserInputError(
                    f"{folder} is on {kind}, local to this machine, and the Ray cluster has "
                    f"{len(nodes)} nodes: put the library home (--home/PIAA_HOME) on a shared "
                    "file system (NFS, SMB) mounted at the same path on every node"
                )
    token = uuid.uuid4().hex
    probes = []
    try:
        for folder in folders:
            probe = Path(folder) / f".piaa-probe-{token}"
            probe.write_text(token)
            probes.append((str(probe), token))
        reader = ray.remote(num_cpus=0)(_read_probes)
        refs = [
            reader.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(probes)
            for n in nodes
        ]
        seen = ray.get(refs, timeout=120)
    finally:
        for path, _ in probes:
            Path(path).unlink(missing_ok=True)
    for node, oks in zip(nodes, seen, strict=True):
        for folder, ok in zip(folders, oks, strict=True):
            if not ok:
                raise UserInputError(
                    f"Ray node {node.get('NodeManagerAddress')} does not see {folder} as this "
                    "machine does: put the library home (--home/PIAA_HOME) on a shared file "
                    "system (NFS, SMB) mounted at the same path on every node"
                )


def shared_folders(vectors_root: Path, url: str) -> list[Path]:
    """What workers open by path: the vector folder, and the SQLite file's folder if any."""
    folders = [Path(vectors_root).resolve()]
    if url.startswith("sqlite:///"):
        folders.append(Path(url.removeprefix("sqlite:///")).expanduser().resolve().parent)
    return folders


def worker_db_url(url: str) -> str:
    """The database URL as a worker must use it (a relative SQLite path made absolute)."""
    if url.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(url.removeprefix("sqlite:///")).expanduser().resolve())
    return url


# -- indexing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What every worker needs to know, sent with each task (the `IndexJob`'s part a worker
    can use: no store, no open vector store, no encoder)."""

    db_url: str
    vectors_root: str
    identity: dict
    codec: str
    spec: ModelSpec
    draft: int  # the model's input size: JPEGs decode at reduced scale down to it
    batch_size: int  # per forward pass on a CPU actor
    gpu_batch_size: int
    decode_memory: int
    read_timeout: float  # seconds per file read/decode (a hung share fails the file)


@dataclass
class _Group:
    shard: int
    files: list[FileInfo]
    ids: dict[str, int]  # path -> image id, reserved on the driver
    reused: list[Any] = field(default_factory=list)  # indexer._Encoded
    decoded: list[tuple[FileInfo, Any]] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)
    failed: list[tuple[FileInfo, str]] = field(default_factory=list)
    encoded: list[Any] = field(default_factory=list)  # indexer._Encoded, row order
    rows: list[tuple[Row, bool]] = field(default_factory=list)  # (row, reused), after the write
    written: bool = False


def _vectors(job: Job) -> Any:
    return VectorStore(Path(job.vectors_root), job.identity, job.codec)


def _prepare(row: dict[str, Any], job: Job) -> dict[str, Any]:
    """CPU task: hash, reuse identical content, decode (the local indexer's code)."""
    from piaa_index.catalog.store import Store
    from piaa_index.engines.indexer import decode_files, hash_and_reuse
    from piaa_index.ingest.images import MemoryBudget

    group: _Group = pickle.loads(row["payload"])
    store = Store.open(job.db_url, upgrade=False)
    try:
        reused, to_encode, group.hashes, group.failed = hash_and_reuse(
            group.files, store, _vectors(job), read_timeout=job.read_timeout
        )
    finally:
        store.close()
    group.reused = reused
    decoded = decode_files(
        to_encode, job.draft, MemoryBudget(job.decode_memory), 1, job.read_timeout
    )
    group.decoded = [(info, img) for info, img in decoded if not isinstance(img, str)]
    group.failed.extend((info, img) for info, img in decoded if isinstance(img, str))
    return {"payload": pickle.dumps(group, protocol=5)}


class _Encode:
    """Actor: one model, loaded once; encodes each group's decoded images."""

    def __init__(self, job: Job):
        import torch

        from piaa_index.model.encoder import Encoder

        gpu = torch.cuda.is_available()
        self.encoder = Encoder(job.spec, device="cuda" if gpu else "cpu")
        if self.encoder.identity() != job.identity:
            raise VectorStoreError(
                f"a Ray worker loads {describe_identity(self.encoder.identity())}, not "
                f"{describe_identity(job.identity)}: install the same model on every node"
            )
        self.batch_size = job.gpu_batch_size if gpu else job.batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from piaa_index.engines.indexer import encode_decoded

        out = []
        for payload in batch["payload"]:
            group: _Group = pickle.loads(payload)
            fresh = encode_decoded(self.encoder, group.decoded, group.hashes, self.batch_size)
            group.encoded = group.reused + fresh
            group.reused, group.decoded = [], []
            out.append(pickle.dumps(group, protocol=5))
        return {"payload": np.array(out, dtype=object)}


def _write(row: dict[str, Any], job: Job) -> dict[str, Any]:
    """CPU task: the group's shard, durable and checksummed; returns only what SQL records."""
    from piaa_index.engines.indexer import Row

    group: _Group = pickle.loads(row["payload"])
    items = group.encoded
    if items:
        _vectors(job).write_shard(
            group.shard,
            [group.ids[item.info.path] for item in items],
            np.stack([item.cls for item in items]),
            np.stack([item.patches for item in items]),
        )
        group.written = True
    group.rows = [
        (Row(item.info, item.content_hash, item.width, item.height), item.reused) for item in items
    ]
    group.encoded = []
    return {"payload": pickle.dumps(group, protocol=5)}


class RayEngine:
    """The `Engine` of a Ray cluster (`--engine ray`): the same report as the local engine."""

    def run(self, job: IndexJob, progress: Progress = False) -> IndexReport:
        return index(job, progress)


def index(job: IndexJob, progress: Progress = False) -> IndexReport:
    """Run `job` on the Ray cluster at `job.address`: the same report as the local engine."""
    from piaa_index.engines.indexer import DECODE_MEMORY, plan

    require_ray()  # before any work: a missing extra is one line, not a half-done run
    started = time.perf_counter()
    report = IndexReport()
    store, vectors = job.store, job.vectors()
    todo, known = plan(
        store,
        report,
        job.paths,
        job.prune,
        job.exclude,
        job.default_excludes,
        job.follow_symlinks,
    )
    if todo:
        with connected(job.address) as ray, vectors.writer_lock():
            check_shared(ray, shared_folders(vectors.root, job.db_url))
            work = Job(
                db_url=worker_db_url(job.db_url),
                vectors_root=str(vectors.root.resolve()),
                identity=vectors.identity,
                codec=vectors.codec,
                spec=job.spec,
                draft=max(job.encoder().image_size),
                batch_size=job.batch_size,
                gpu_batch_size=max(job.batch_size, GPU_BATCH_SIZE),
                decode_memory=DECODE_MEMORY,
                read_timeout=job.read_timeout,
            )
            groups = _groups(store, vectors, todo, known, job.commit_every)
            _run(ray, store, vectors, work, groups, known, report, progress, job.encoders)
    report.seconds = time.perf_counter() - started
    return report


def _groups(
    store: Store, vectors: VectorStore, todo: list[FileInfo], known: dict, commit_every: int
) -> list[_Group]:
    """Commit groups with their shard ids and image ids, fixed (and the shard ids recorded)
    before any worker runs: the local engine's allocation, all groups at once."""
    from piaa_index.engines.indexer import allocate

    cut = [todo[start : start + commit_every] for start in range(0, len(todo), commit_every)]
    given = allocate(store, vectors, cut, known, record=True)
    return [
        _Group(shard, files, dict(zip((f.path for f in files), ids, strict=True)))
        for files, (shard, ids) in zip(cut, given, strict=True)
    ]


def _run(
    ray: Any,
    store: Store,
    vectors: VectorStore,
    job: Job,
    groups: list[_Group],
    known: dict,
    report: IndexReport,
    progress: Progress,
    encoders: int | None,
) -> None:
    from piaa_index.engines.indexer import commit_rows

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if encoders is None:
        # CPU clusters: half the cores encode, the rest decode and write.
        encoders = gpus or max(1, cpus // 2)
    encode_args: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    # The library's patch quantiser is trained on the first shard written. The local engine's
    # first shard is the first commit group; so is this one: while the library has none, the
    # first group runs alone, and the same photos give the same stored patches either way.
    batches = [groups[:1], groups[1:]] if vectors.needs_quantizer() else [groups]
    total = sum(len(g.files) for g in groups)
    with (
        progress_bar(total, "indexing (ray)", progress) as advance,
        one_line_failures("indexing", "; the committed groups are kept: run again to finish"),
    ):
        for batch in batches:
            if not batch:
                continue
            ds = ray.data.from_items(
                [{"payload": pickle.dumps(g, protocol=5)} for g in batch],
                override_num_blocks=len(batch),
            )
            ds = ds.map(_prepare, fn_kwargs={"job": job}, num_cpus=1)
            ds = ds.map_batches(
                _Encode,
                fn_constructor_kwargs={"job": job},
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=encoders),
                **encode_args,
            )
            ds = ds.map(_write, fn_kwargs={"job": job}, num_cpus=1)
            for row in ds.iter_rows():
                group: _Group = pickle.loads(row["payload"])
                rows = [r for r, _ in group.rows]
                # The shard is on disk (the write task returned): now SQL may point at it.
                commit_rows(
                    store, group.shard if group.written else None, rows, group.failed, known
                )
                for _, reused in group.rows:
                    if reused:
                        report.reused += 1
                    else:
                        report.indexed += 1
                report.failed.extend({"path": i.path, "error": e} for i, e in group.failed)
                advance(len(group.files))


# -- re-tagging -------------------------------------------------------------------------------


def _score(
    job: tuple[str, dict, str], shard: int, rows: list[int], packed: bytes
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Task: read one chunk of a shard and score it (the local scoring code)."""

    root, identity, codec = job
    classifier, T = unpack(packed)
    chunk = VectorStore(Path(root), identity, codec).read_shard(shard, rows)
    scores = fusion.score_images(chunk.cls, chunk.patches, T, classifier)
    assert scores.support is not None
    return chunk.image_ids, scores.fused, scores.patch, scores.cls, scores.support


def score_chunks(
    ray: Any,
    vectors: VectorStore,
    chunks: Sequence[tuple[int, list[int]]],
    classifier: Classifier,
    T: np.ndarray,
) -> Iterator[tuple[np.ndarray, int, tuple[np.ndarray, ...]]]:
    """(image ids, shard, (fused, patch, cls, support)) per chunk, in the order given, scored
    by Ray tasks near the shards; a bounded number in flight."""

    job = (str(vectors.root.resolve()), vectors.identity, vectors.codec)
    packed = ray.put(pack(classifier, T))
    task = ray.remote(num_cpus=1)(_score)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[tuple[int, Any]] = []
    todo = iter(chunks)
    while True:
        while len(pending) < window:
            nxt = next(todo, None)
            if nxt is None:
                break
            pending.append((nxt[0], task.remote(job, nxt[0], nxt[1], packed)))
        if not pending:
            return
        shard, ref = pending.pop(0)
        with one_line_failures("re-tagging"):
            ids, *scores = ray.get(ref)
        yield ids, shard, tuple(scores)
