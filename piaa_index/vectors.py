"""All FAISS use: `[CLS]` and patch vectors in append-only shards.

Each index run writes its vectors in shards, one per commit group: `NNNNNN.cls.faiss` (an
IndexIDMap2 over a flat inner-product index, ids = image ids) and `NNNNNN.patch.faiss` (a
scalar-quantised index holding M rows per image, in the same order as the cls shard). A shard
is written to a temporary name, fsynced and renamed *before* SQL commits the rows that point
at it, so after a crash a shard can be orphaned (deleted on reconcile) but an SQL row never
points at vectors that were not written (and if a shard was lost anyway, its images are sent
back to the next index run).

`manifest.json` records the model the vectors were made with; opening with another model fails.

Lossy patch codecs (sq8, sq4, pq4, opq4) quantise with ONE quantiser per library, trained once
on the first shard large enough and kept as `patch-quantizer.<digest>.faiss`. Every later shard
is encoded with it, so decoding a patch and encoding it again gives back the same codes: vacuum
and the reuse of an identical file's vectors copy patches without degrading them. Shards written
before the quantiser exists (a first run of a few photos) are stored in fp16, losslessly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from piaa_index.durable import fsync_dir
from piaa_index.errors import PiaaError

MANIFEST = "manifest.json"
RESERVED = "shards.next"  # the next shard id not yet handed out (reserve_shard_ids)

# Patch codecs. fp32 is stored flat; fp16 / sq8 / sq4 are FAISS scalar quantisers (sq8 and sq4
# with a per-dimension range trained on each shard); pqK is a product quantiser with d/K
# sub-quantisers of K dims and 256 centroids each (d/K bytes per patch; 2-dim sub-quantisers
# were dropped: FAISS trains them ~5x slower per byte than 4-dim ones, and sq4 costs the same), opqK the same after a
# learnt rotation (OPQ). Quantisers are trained per shard, on that shard's patches.
# Bytes per patch at dim d: fp32 4d, fp16 2d, sq8 d, sq4 d/2, pq4 / opq4 d/4.
CODECS = {
    "fp32": None,
    "fp16": "QT_fp16",
    "sq8": "QT_8bit",
    "sq4": "QT_4bit",
    "pq4": "PQ4",
    "opq4": "OPQ4",
}
# sq4: 52 KB per image at ViT-B/16 (fp16: 203 KB) at no measured ranking loss (docs/scale.md).
DEFAULT_CODEC = "sq4"
# Patches needed to train the library's quantiser: per-dimension ranges want a few thousand,
# a PQ codebook 256 centroids x 39 points (FAISS's advice).
SQ_MIN_TRAIN = 8_192
PQ_MIN_TRAIN = 256 * 39
MAX_TRAIN = 16_384  # patches sampled to train the quantiser (bounded time)
# Ranges widened by this fraction on each side: patches of later photos that fall outside the
# first shard's range are clipped less often, for a few percent of resolution.
SQ_RANGE_MARGIN = 0.05
QUANTIZER_GLOB = "patch-quantizer.*.faiss"


class VectorStoreError(PiaaError):
    """Vector files that cannot be used with the requested model or are damaged."""


class LockedError(VectorStoreError):
    """Another process is writing to this library."""


@dataclass(frozen=True)
class ShardVectors:
    """The live part of one shard: image ids, their [CLS] vectors and patches."""

    shard: int
    image_ids: np.ndarray  # [n] int64
    cls: np.ndarray  # [n, d] float32
    patches: np.ndarray  # [n, M, d] float32


def _faiss():  # type: ignore[no-untyped-def]
    import faiss

    return faiss


def _serialized(index) -> bytes:  # type: ignore[no-untyped-def]
    return _faiss().serialize_index(index).tobytes()


def _write_bytes_atomic(data: bytes, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class VectorStore:
    """A folder of FAISS shards for one library."""

    def __init__(self, root: Path, identity: dict, codec: str = DEFAULT_CODEC):
        self.root = Path(root)
        self.identity = dict(identity)
        self.codec = codec
        self.dim = int(identity["dim"])
        grid = identity["grid"]
        self.n_patches = int(grid[0]) * int(grid[1])

    # -- opening -------------------------------------------------------------------------------

    @staticmethod
    def read_manifest(root: Path) -> dict | None:
        path = Path(root) / MANIFEST
        if not path.exists():
            return None
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise VectorStoreError(f"damaged vector manifest {path}: {exc}") from None

    @classmethod
    def open(cls, root: Path, identity: dict, codec: str | None = None) -> VectorStore:
        """Open (or create) the folder; refuse vectors made with another model."""
        root = Path(root)
        manifest = cls.read_manifest(root)
        if manifest is None:
            if codec is not None and codec not in CODECS:
                raise ValueError(
                    f"unknown vector codec {codec!r}; choose one of {', '.join(CODECS)}"
                )
            manifest = {"identity": identity, "codec": codec or DEFAULT_CODEC, "version": 1}
            try:
                root.mkdir(parents=True, exist_ok=True)
                tmp = root / (MANIFEST + ".tmp")
                tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
                os.replace(tmp, root / MANIFEST)
            except OSError as exc:
                raise VectorStoreError(
                    f"cannot create the vector folder {root}: {exc.strerror or exc} "
                    "(choose a writable --home / PIAA_HOME)"
                ) from None
        elif manifest["identity"] != identity:
            raise VectorStoreError(
                "this index was made with "
                f"{describe_identity(manifest['identity'])}, not {describe_identity(identity)}; "
                "use the same --model/--pretrained/--front-end, or another PIAA_HOME / --db"
            )
        return cls(root, manifest["identity"], manifest["codec"])

    # -- shards --------------------------------------------------------------------------------

    def _path(self, shard: int, kind: str) -> Path:
        return self.root / f"{shard:06d}.{kind}.faiss"

    def _sum_path(self, shard: int) -> Path:
        return self.root / f"{shard:06d}.sum.json"

    def verify_shard(self, shard: int) -> str | None:
        """None when both files of a shard match the checksums written with them, else what is
        wrong. Reads the whole shard: for `piaa db check`, not for every query."""
        try:
            sums = json.loads(self._sum_path(shard).read_text())
        except FileNotFoundError:
            return None if self._path(shard, "cls").exists() else "missing"
        except (OSError, ValueError) as exc:
            return f"unreadable checksum file: {exc}"
        for kind in ("cls", "patch"):
            path = self._path(shard, kind)
            try:
                if _file_digest(path) != sums.get(kind):
                    return f"{path.name} does not match its checksum (damaged)"
            except OSError as exc:
                return f"cannot read {path.name}: {exc.strerror or exc}"
        return None

    def has_checksum(self, shard: int) -> bool:
        return self._sum_path(shard).exists()

    def shard_ids(self) -> set[int]:
        ids = set()
        for path in self.root.glob("*.cls.faiss"):
            try:
                ids.add(int(path.name.split(".", 1)[0]))
            except ValueError:
                continue
        return ids

    def next_shard_id(self) -> int:
        """Above every shard on disk and every id handed out by `reserve_shard_ids`."""
        try:
            reserved = int((self.root / RESERVED).read_text())
        except (OSError, ValueError):
            reserved = 0
        return max(max(self.shard_ids() | {0}) + 1, reserved)

    def reserve_shard_ids(self, n: int) -> int:
        """Hand out `n` shard ids at once (the Ray engine's commit groups); the first.

        Recorded durably, so that no later run reuses an id a worker of a killed run may
        still write: such a late shard is an orphan, never a shard SQL points at.
        """
        first = self.next_shard_id()
        _write_bytes_atomic(str(first + n).encode(), self.root / RESERVED)
        return first

    def write_shard(
        self, shard: int, image_ids: Sequence[int], cls: np.ndarray, patches: np.ndarray
    ) -> None:
        """Write one shard (both files) durably; the caller commits SQL afterwards."""
        faiss = _faiss()
        n = len(image_ids)
        if cls.shape != (n, self.dim) or patches.shape != (n, self.n_patches, self.dim):
            raise ValueError(
                f"shard shapes {cls.shape} / {patches.shape} do not match "
                f"({n}, {self.dim}) / ({n}, {self.n_patches}, {self.dim})"
            )
        cls_index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        cls_index.add_with_ids(
            np.ascontiguousarray(cls, dtype=np.float32), np.asarray(image_ids, dtype=np.int64)
        )
        flat = np.ascontiguousarray(patches.reshape(-1, self.dim), dtype=np.float32)
        patch_index = self._new_patch_index(flat, shard)
        patch_index.add(flat)
        patch_bytes, cls_bytes = _serialized(patch_index), _serialized(cls_index)
        # Patches and checksums first: a cls file is what marks a shard as present.
        _write_bytes_atomic(patch_bytes, self._path(shard, "patch"))
        sums = {"patch": _digest(patch_bytes), "cls": _digest(cls_bytes)}
        _write_bytes_atomic(json.dumps(sums).encode(), self._sum_path(shard))
        _write_bytes_atomic(cls_bytes, self._path(shard, "cls"))
        fsync_dir(self.root)

    def _new_patch_index(self, flat: np.ndarray, shard: int):  # type: ignore[no-untyped-def]
        """An empty, trained index to encode a shard's patches with (it is stored in the shard
        file, so every shard decodes on its own whatever happens to the library's quantiser)."""
        faiss = _faiss()
        qname = CODECS[self.codec]
        if qname is None:
            return faiss.IndexFlatIP(self.dim)
        if qname == "QT_fp16":
            return self._scalar_quantizer("QT_fp16")
        quantizer = self.patch_quantizer() or self._train_patch_quantizer(flat, shard)
        if quantizer is None:  # too few patches yet to train one well: lossless meanwhile
            return self._scalar_quantizer("QT_fp16")
        return faiss.clone_index(quantizer)

    def _scalar_quantizer(self, qname: str):  # type: ignore[no-untyped-def]
        faiss = _faiss()
        qtype = getattr(faiss.ScalarQuantizer, qname)
        return faiss.IndexScalarQuantizer(self.dim, qtype, faiss.METRIC_INNER_PRODUCT)

    def patch_quantizer(self):  # type: ignore[no-untyped-def]
        """The library's trained patch quantiser, or None before the first one is trained.
        A damaged file is set aside (renamed `.damaged`) and a new one gets trained: shards
        already written keep decoding with their own copy."""
        faiss = _faiss()
        # Two writers training at once (distributed workers) leave two files; all agree on one.
        for path in sorted(self.root.glob(QUANTIZER_GLOB)):
            data = path.read_bytes()
            if _digest(data) != path.name.split(".")[1]:
                path.rename(path.with_name(path.name + ".damaged"))
                continue
            return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return None

    def _train_patch_quantizer(self, flat: np.ndarray, shard: int):  # type: ignore[no-untyped-def]
        faiss = _faiss()
        qname = CODECS[self.codec] or "QT_fp16"
        if "PQ" in qname:
            sub_dims = int(qname.rsplit("PQ", 1)[1])
            if len(flat) < PQ_MIN_TRAIN or self.dim % sub_dims:
                return None
            m = self.dim // sub_dims
            index = faiss.IndexPQ(self.dim, m, 8, faiss.METRIC_INNER_PRODUCT)
            if qname.startswith("OPQ"):
                index = faiss.IndexPreTransform(faiss.OPQMatrix(self.dim, m), index)
        else:
            if len(flat) < SQ_MIN_TRAIN:
                return None
            index = self._scalar_quantizer(qname)
            index.sq.rangestat_arg = SQ_RANGE_MARGIN
        sample = flat
        if len(flat) > MAX_TRAIN:
            rng = np.random.default_rng(shard)
            sample = flat[np.sort(rng.choice(len(flat), MAX_TRAIN, replace=False))]
        index.train(sample)
        data = _serialized(index)
        path = self.root / f"patch-quantizer.{_digest(data)}.faiss"
        _write_bytes_atomic(data, path)
        fsync_dir(self.root)
        return self.patch_quantizer()

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Exclusive right to add shards: a second index run on the same library fails fast."""
        path = self.root / "writer.lock"
        with open(path, "a+") as fh:
            try:
                import fcntl
            except ImportError:  # Windows: no advisory locks; single-writer is on the user
                yield
                return
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise LockedError(
                    f"another piaa process is indexing this library ({self.root}); "
                    "wait for it to finish"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextmanager
    def _flock(self, name: str, mode: str) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks
            yield
            return
        with open(self.root / name, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH if mode == "shared" else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def reading(self) -> AbstractContextManager[None]:
        """Held by a pass over the shards (fit, re-tag, text search): the shards it was given
        stay on disk until it ends. Many readers at once; vacuum's deletion waits for them."""
        return self._flock("readers.lock", "shared")

    def deleting(self) -> AbstractContextManager[None]:
        """Held while shards that SQL no longer points at are deleted (vacuum): waits for every
        reader that may still hold their old locations."""
        return self._flock("readers.lock", "exclusive")

    def delete_shard(self, shard: int) -> None:
        # The cls file first: without it the shard no longer counts as present.
        for kind in ("cls", "patch"):
            self._path(shard, kind).unlink(missing_ok=True)
        self._sum_path(shard).unlink(missing_ok=True)

    def read_shard(
        self, shard: int, rows: Sequence[int] | None = None, with_patches: bool = True
    ) -> ShardVectors:
        """The vectors of one shard, restricted to `rows` (positions) when given.

        Without patches (`[CLS]`-only queries) the patch file, 50–200× larger, is not touched;
        `patches` is then an empty [n, 0, d] array.
        """
        try:
            return self._read_shard(shard, rows, with_patches)
        except RuntimeError as exc:  # faiss on a truncated or garbled file
            raise VectorStoreError(
                f"vector shard {shard} in {self.root} is damaged ({str(exc).splitlines()[0]}); "
                "run `piaa db check` to send its images back to be re-encoded"
            ) from None

    def _read_shard(
        self, shard: int, rows: Sequence[int] | None, with_patches: bool
    ) -> ShardVectors:
        faiss = _faiss()
        cls_path, patch_path = self._path(shard, "cls"), self._path(shard, "patch")
        if not cls_path.exists() or not patch_path.exists():
            raise VectorStoreError(f"vector shard {shard} is missing from {self.root}")
        cls_index = faiss.read_index(str(cls_path))
        ids = faiss.vector_to_array(cls_index.id_map).astype(np.int64)
        cls = cls_index.index.reconstruct_n(0, cls_index.ntotal)
        if rows is None:
            rows = list(range(len(ids)))
        rows_arr = np.asarray(rows, dtype=np.int64)
        if not with_patches:
            empty = np.empty((len(rows_arr), 0, self.dim), dtype=np.float32)
            return ShardVectors(shard, ids[rows_arr], cls[rows_arr], empty)
        patch_index = faiss.read_index(str(patch_path), faiss.IO_FLAG_MMAP)
        m = self.n_patches
        patches = np.empty((len(rows_arr), m, self.dim), dtype=np.float32)
        # Contiguous runs decode in one call, straight into `patches` (a decode into a new
        # array and a copy cost twice the decode: the fit's passes read every patch); most
        # reads are whole shards or long runs.
        for out_start, (start, stop) in _runs(rows_arr):
            out = patches[out_start : out_start + stop - start].reshape(-1, self.dim)
            patch_index.reconstruct_n(int(start) * m, int(stop - start) * m, out)
        return ShardVectors(shard, ids[rows_arr], cls[rows_arr], patches)

    def iter_live(
        self,
        locations: Sequence[tuple[int, int, int]],
        max_images: int = 2048,
        with_patches: bool = True,
    ) -> Iterator[ShardVectors]:
        """Stream the live images' vectors shard by shard, in chunks of at most `max_images`.

        `locations` are (image id, shard, row) triples from SQL, the source of truth; rows of
        removed or re-indexed images are simply never read.
        """
        for shard, rows in chunk_plan(locations, max_images):
            yield self.read_shard(shard, rows, with_patches)

    def vectors_for(self, image_id: int, shard: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        """One image's [CLS] vector and patches (used to reuse vectors of identical files)."""
        got = self.read_shard(shard, [row])
        if int(got.image_ids[0]) != image_id:
            raise VectorStoreError(
                f"vector shard {shard} row {row} holds image {int(got.image_ids[0])}, "
                f"expected {image_id}"
            )
        return got.cls[0], got.patches[0]

    def reconcile(self, referenced: set[int]) -> tuple[list[int], list[int]]:
        """Delete orphan shards (written, never committed) and temp files; report missing ones.

        Returns (orphans deleted, shards referenced by SQL but absent on disk).
        """
        for tmp in self.root.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        present = self.shard_ids()
        # A patch or checksum file without its cls file is a shard whose write was cut short.
        for path in [*self.root.glob("*.patch.faiss"), *self.root.glob("*.sum.json")]:
            shard = int(path.name.split(".", 1)[0])
            if shard not in present and shard not in referenced:
                path.unlink(missing_ok=True)
        orphans = sorted(present - referenced)
        for shard in orphans:
            self.delete_shard(shard)
        # A referenced shard is usable only with both files (a lost patch file counts as lost).
        complete = {s for s in present if self._path(s, "patch").exists()}
        missing = sorted(referenced - complete)
        return orphans, missing

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.faiss"))

    def shard_rows(self, shard: int) -> int:
        """How many images a shard holds, live or not."""
        faiss = _faiss()
        return int(faiss.read_index(str(self._path(shard, "cls"))).ntotal)


def chunk_plan(
    locations: Sequence[tuple[int, int, int]], max_images: int = 2048
) -> list[tuple[int, list[int]]]:
    """(shard, sorted rows) chunks of at most `max_images`, in shard order: the order every
    pass over the shards reads them in (iter_live, and the Ray engine's scoring tasks)."""
    by_shard: dict[int, list[int]] = {}
    for _image_id, shard, row in locations:
        by_shard.setdefault(shard, []).append(row)
    out = []
    for shard in sorted(by_shard):
        rows = sorted(by_shard[shard])
        for start in range(0, len(rows), max_images):
            out.append((shard, rows[start : start + max_images]))
    return out


def _runs(rows: np.ndarray) -> Iterator[tuple[int, tuple[int, int]]]:
    """(output offset, (start, stop)) for each run of consecutive row numbers."""
    if len(rows) == 0:
        return
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    for a, b in zip(starts, stops, strict=True):
        yield int(a), (int(rows[a]), int(rows[b - 1]) + 1)


def describe_identity(identity: dict) -> str:
    grid = identity.get("grid", ["?", "?"])
    return (
        f"model {identity.get('model')} ({identity.get('pretrained')}), front-end "
        f"{identity.get('front_end')}, dim {identity.get('dim')}, grid {grid[0]}x{grid[1]}"
    )
