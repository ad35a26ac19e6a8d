"""What every index engine takes and returns: an `IndexJob` in, an `IndexReport` out.

clip-retrieval's runner/distributor shape: the caller (`Library.index`) describes the run once,
as plain collaborators and values, and an `Engine` runs the same stages (indexer.py's `plan`,
`hash_and_reuse`, `decode_files`, `encode_decoded`, `allocate`, `commit_rows`) in one process
(`LocalEngine`, piaa_index/engines/indexer.py) or on a Ray cluster (`RayEngine`,
piaa_index/engines/ray_engine.py). No engine sees a `Library`. `engine_for(name)`
(piaa_index/engines/__init__.py) picks one:

    job = IndexJob(paths, store, lambda: vectors, load_encoder, spec, db_url)
    report = engine_for("local").run(job, progress)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from piaa_index.errors import UserInputError
from piaa_index.ingest.bounded import READ_TIMEOUT

if TYPE_CHECKING:
    from piaa_index.catalog.store import Store
    from piaa_index.config import ModelSpec
    from piaa_index.model.encoder import Encoder
    from piaa_index.progress import Progress
    from piaa_index.vectors.shards import VectorStore


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
    # Files that decoded, with what their decoders said (corrupt EXIF, extraneous JPEG bytes):
    # {"path", "messages"}, here rather than on the terminal.
    warnings: list[dict] = field(default_factory=list)
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
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.indexed / self.seconds, 2) if self.seconds else 0.0,
        }


@dataclass(frozen=True)
class IndexJob:
    """Everything one index run needs. Built by `Library.index`; a test or another program
    may build one from a `Store` and a `VectorStore` of its own.

    `vectors` and `encoder` are called, not held: `vectors()` opens the vector folder (a new
    library records its model's identity there first), `encoder()` loads the model, and only a
    run with files to encode calls it.
    """

    paths: tuple[str | Path, ...]  # files and folders to scan (recursive, incremental)
    store: Store
    vectors: Callable[[], VectorStore]
    encoder: Callable[[], Encoder]
    spec: ModelSpec  # the model a Ray worker loads (it must give the vectors' identity)
    db_url: str  # the database a Ray worker opens (read-only: content-hash lookups)
    prune: bool = False
    exclude: tuple[str, ...] = ()  # gitignore-style patterns, on top of .piaaignore files
    default_excludes: bool = True
    follow_symlinks: bool = False
    batch_size: int = 32  # images per forward pass (a Ray GPU actor uses at least 256)
    commit_every: int = 256  # images per shard and per SQL commit
    workers: int = 4  # the local engine's read and decode threads
    read_timeout: float = READ_TIMEOUT  # seconds to read and decode one file
    address: str | None = None  # Ray: `auto`, `ray://host:10001`; None: RAY_ADDRESS or local
    encoders: int | None = None  # Ray encoder actors; None: one per GPU, else half the CPUs

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.batch_size < 1:
            raise UserInputError(f"batch size must be at least 1, not {self.batch_size}")
        if self.commit_every < 1:
            raise UserInputError(f"commit group must be at least 1 image, not {self.commit_every}")
        if not self.read_timeout > 0:
            raise UserInputError(f"read timeout must be positive, not {self.read_timeout}")


class Engine(Protocol):
    """Runs an index job: scan and plan, hash and reuse, decode, encode, write shards, commit
    rows; the same stages, the same report, wherever they run."""

    def run(self, job: IndexJob, progress: Progress = False) -> IndexReport: ...
