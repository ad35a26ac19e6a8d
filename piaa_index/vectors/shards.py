"""All FAISS use: `[CLS]` and patch vectors in append-only shards.

Each index run writes its vectors in shards, one per commit group: `NNNNNN.cls.faiss` (an
IndexIDMap2 over a flat inner-product index, ids = image ids) and `NNNNNN.patch.faiss` (a
scalar-quantised index holding M rows per image, in the same order as the cls shard). A shard
is written to a temporary name, fsynced and renamed *before* SQL commits the rows that point
at it, so after a crash a shard can be orphaned (deleted on reconcile) but an SQL row never
points at vectors that were not written (and if a shard was lost anyway, its images are sent
back to the next index run).

`manifest.json` records the model the vectors were made with; opening with another model fails.
The database keeps a copy of it (setting `vectors_manifest`, piaa_index/library/core.py): a manifest
that differs from the copy, or is gone while its shards are there, is damage that `piaa db
check` repairs from the copy. `checksums_from` is the first shard written with a checksum file
(0 in a library created since; an older library's is set when it is first opened): from there on
a shard without its checksum file is damaged, not "written before checksums existed".

Lossy patch codecs (sq8, sq4, pq4, opq4) quantise with ONE quantiser per library, trained once
on the first shard large enough and kept as `patch-quantizer.<digest>.faiss`. Every later shard
is encoded with it, so decoding a patch and encoding it again gives back the same codes: vacuum
and the reuse of an identical file's vectors copy patches without degrading them. Shards written
before the quantiser exists (a first run of a few photos) are stored in fp16, losslessly.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from piaa_index.durable import bytes_digest, file_digest, file_lock, fsync_dir, write_bytes_atomic
from piaa_index.errors import PiaaError
from piaa_index.layout import MANIFEST, VectorsLayout
from piaa_index.vectors import shard_files
from piaa_index.vectors.faiss_lib import faiss as _faiss
from piaa_index.vectors.shard_files import FLAT_QTYPE

__all__ = ["MANIFEST"]  # re-exported: the manifest's name is the layout's
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


def _mapped() -> int:
    """read_index flags: the file's codes are mapped, not copied (the shards never change)."""
    faiss = _faiss()
    return int(faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)


def _serialized(index) -> bytes:  # type: ignore[no-untyped-def]
    return _faiss().serialize_index(index).tobytes()


class VectorStore:
    """A folder of FAISS shards for one library."""

    def __init__(
        self, root: Path, identity: dict, codec: str = DEFAULT_CODEC, checksums_from: int = 0
    ):
        self.root = Path(root)
        self.identity = dict(identity)
        self.codec = codec
        self.checksums_from = checksums_from
        self.dim = int(identity["dim"])
        grid = identity["grid"]
        self.n_patches = int(grid[0]) * int(grid[1])
        # Shards mapped by earlier queries, kept so that the next one finds their pages mapped
        # (re-mapping 100 shards per query cost ~0.3 s of page faults at 100k ViT-B/16): the
        # FAISS path, for the shards `_direct` does not read (PQ codecs' patches).
        self._mapped: dict[int, _MappedShard] = {}
        # Shards' layouts parsed by earlier reads (`_direct`): a few ints and the quantiser's
        # ranges each, so a later query reads rows with pread and parses no header again.
        self._layouts: dict[int, _Layout] = {}

    # -- opening -------------------------------------------------------------------------------

    @staticmethod
    def read_manifest(root: Path) -> dict | None:
        path = Path(root) / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
            identity = manifest["identity"]
            int(identity["dim"]), [int(v) for v in identity["grid"]]
            if manifest["codec"] not in CODECS:
                raise ValueError(f"unknown codec {manifest['codec']!r}")
            int(manifest.get("checksums_from", 0))
            return dict(manifest)
        except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise VectorStoreError(
                f"damaged vector manifest {path}: {exc!r}; `piaa db check` rebuilds it"
            ) from None

    @staticmethod
    def write_manifest(root: Path, manifest: dict) -> None:
        write_bytes_atomic(
            json.dumps(manifest, indent=2, sort_keys=True).encode(), Path(root) / MANIFEST
        )
        fsync_dir(root)

    @staticmethod
    def has_shards(root: Path) -> bool:
        return any(Path(root).glob("*.cls.faiss"))

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
            manifest = {
                "identity": identity,
                "codec": codec or DEFAULT_CODEC,
                "version": 2,
                "checksums_from": 0,  # every shard of this library carries a checksum file
            }
            try:
                root.mkdir(parents=True, exist_ok=True)
                cls.write_manifest(root, manifest)
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
        elif "checksums_from" not in manifest:
            # Written before shards were told apart from the ones that predate checksums: the
            # shards on disk without a checksum file are the old ones, every later one has it.
            store = cls(root, manifest["identity"], manifest["codec"])
            old = [s for s in store.shard_ids() if not store.has_checksum(s)]
            manifest = {**manifest, "version": 2, "checksums_from": max(old, default=-1) + 1}
            try:
                cls.write_manifest(root, manifest)
            except OSError:
                pass  # a read-only library: decided again next time
        return cls(
            root, manifest["identity"], manifest["codec"], int(manifest.get("checksums_from", 0))
        )

    @property
    def manifest(self) -> dict:
        return {
            "identity": self.identity,
            "codec": self.codec,
            "version": 2,
            "checksums_from": self.checksums_from,
        }

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
            if not self._path(shard, "cls").exists():
                return "missing"
            if self.predates_checksums(shard):
                return None
            return (
                "its checksum file is missing (every shard from shard "
                f"{self.checksums_from} on is written with one): damaged"
            )
        except (OSError, ValueError) as exc:
            return f"unreadable checksum file: {exc}"
        for kind in ("cls", "patch"):
            path = self._path(shard, kind)
            try:
                if file_digest(path) != sums.get(kind):
                    return f"{path.name} does not match its checksum (damaged)"
            except OSError as exc:
                return f"cannot read {path.name}: {exc.strerror or exc}"
        return None

    def has_checksum(self, shard: int) -> bool:
        return self._sum_path(shard).exists()

    def predates_checksums(self, shard: int) -> bool:
        """A shard written before checksum files existed (it may lack one)."""
        return shard < self.checksums_from

    def _names(self) -> list[str]:
        """The folder's file names, one listing (a million images lie in ~1,000 shards: a
        `piaa status` listed them with several globs and a stat per shard, ~45 ms)."""
        with os.scandir(self.root) as entries:
            return [e.name for e in entries if e.is_file()]

    def shard_ids(self) -> set[int]:
        return _shards_named(self._names(), ".cls.faiss")

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
        write_bytes_atomic(str(first + n).encode(), self.root / RESERVED)
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
        write_bytes_atomic(patch_bytes, self._path(shard, "patch"))
        sums = {"patch": bytes_digest(patch_bytes), "cls": bytes_digest(cls_bytes)}
        write_bytes_atomic(json.dumps(sums).encode(), self._sum_path(shard))
        write_bytes_atomic(cls_bytes, self._path(shard, "cls"))
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
            if bytes_digest(data) != path.name.split(".")[1]:
                path.rename(path.with_name(path.name + ".damaged"))
                continue
            return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return None

    def needs_quantizer(self) -> bool:
        """True while this library's lossy codec has no trained patch quantiser yet."""
        return CODECS[self.codec] not in (None, "QT_fp16") and self.patch_quantizer() is None

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
        # A scalar quantiser's ranges are per-dimension extremes: trained on every patch, they
        # depend on which images the shard holds, not on their order or the shard's number
        # (the Ray engine writes the same first shard under another number and order).
        if len(flat) > MAX_TRAIN and "PQ" in qname:
            rng = np.random.default_rng(shard)
            sample = flat[np.sort(rng.choice(len(flat), MAX_TRAIN, replace=False))]
        index.train(sample)
        data = _serialized(index)
        path = self.root / f"patch-quantizer.{bytes_digest(data)}.faiss"
        write_bytes_atomic(data, path)
        fsync_dir(self.root)
        return self.patch_quantizer()

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Exclusive right to add shards: a second index run on the same library fails fast."""
        # Windows: no advisory locks; single-writer is on the user.
        with file_lock(VectorsLayout(self.root).writer_lock, blocking=False) as held:
            if not held:
                raise LockedError(
                    f"another piaa process is indexing this library ({self.root}); "
                    "wait for it to finish"
                )
            yield

    @contextmanager
    def _readers_lock(self, shared: bool) -> Iterator[None]:
        with file_lock(VectorsLayout(self.root).readers_lock, shared=shared):  # Windows: none
            yield

    def reading(self) -> AbstractContextManager[None]:
        """Held by a pass over the shards (fit, re-tag, text search): the shards it was given
        stay on disk until it ends. Many readers at once; vacuum's deletion waits for them."""
        return self._readers_lock(shared=True)

    def deleting(self) -> AbstractContextManager[None]:
        """Held while shards that SQL no longer points at are deleted (vacuum): waits for every
        reader that may still hold their old locations."""
        return self._readers_lock(shared=False)

    def delete_shard(self, shard: int) -> None:
        self._mapped.pop(shard, None)
        self._layouts.pop(shard, None)
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
            raise self._damaged(shard, exc) from None

    def _damaged(self, shard: int, exc: Exception) -> VectorStoreError:
        return VectorStoreError(
            f"vector shard {shard} in {self.root} is damaged ({str(exc).splitlines()[0]}); "
            "run `piaa db check` to send its images back to be re-encoded"
        )

    def _read_shard(
        self, shard: int, rows: Sequence[int] | None, with_patches: bool
    ) -> ShardVectors:
        rows_arr = None if rows is None else np.asarray(rows, dtype=np.int64)
        direct = self._direct(shard, rows_arr, with_codes=with_patches)
        if direct is not None:
            ids, cls, codes, form = direct
            if codes is None:
                empty = np.empty((len(cls), 0, self.dim), dtype=np.float32)
                return ShardVectors(shard, ids, cls, empty)
            assert form is not None
            return ShardVectors(shard, ids, cls, form.decode(len(cls), _slices(codes)))
        got = self._shard_map(shard)  # VectorStoreError when a file is missing
        if rows_arr is None:
            rows_arr = np.arange(len(got.ids))
            cls = got.cls_index.reconstruct_n(0, len(got.ids))
        else:
            cls = got.cls_index.reconstruct_batch(rows_arr)
        if not with_patches:
            empty = np.empty((len(rows_arr), 0, self.dim), dtype=np.float32)
            return ShardVectors(shard, got.ids[rows_arr], cls, empty)
        patches = self.patch_codes(shard).decode(rows_arr)
        return ShardVectors(shard, got.ids[rows_arr], cls, patches)

    def _direct(
        self, shard: int, rows: np.ndarray | None, with_codes: bool, with_ids: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, CodeForm | None] | None:
        """(image ids, [CLS] rows, patch codes [n, M · code size], how they decode) of a shard's
        `rows` (None: all), read with pread at offsets its headers give (`shard_files`):
        nothing mapped, no FAISS index opened. Ids and codes are empty / None when not asked
        for. None when the cls file is not a layout shard_files reads (a damaged file), the
        codes are asked for and numpy does not decode them (PQ codecs), or a row is out of
        range: the FAISS path reads it, or says what is wrong."""
        if not shard_files.AVAILABLE:
            return None
        cls_path, patch_path = str(self._path(shard, "cls")), str(self._path(shard, "patch"))
        try:
            with (
                shard_files.opened(cls_path) as (cls_fd, cls_st),
                shard_files.opened(patch_path) as (patch_fd, patch_st),
            ):
                stamp = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (cls_st, patch_st))
                layout = self._layouts.get(shard)
                if layout is None or layout.stamp != stamp:
                    layout = self._layout(stamp, cls_fd, patch_fd)
                    self._layouts[shard] = layout
                if layout.cls is None or (with_codes and layout.form is None):
                    return None
                n = layout.cls.ntotal
                if rows is None:
                    rows = np.arange(n, dtype=np.int64)
                elif len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
                    return None
                order = None
                if len(rows) > 1 and bool((np.diff(rows) < 0).any()):
                    order = np.argsort(rows, kind="stable")
                    rows = rows[order]
                cls = shard_files.read_rows(cls_fd, layout.cls.rows_at, 4 * self.dim, rows)
                cls = cls.view("<f4").astype(np.float32, copy=False)
                ids = np.zeros(0, np.int64)
                if with_ids:
                    ids = shard_files.read_rows(cls_fd, layout.cls.ids_at, 8, rows)
                    ids = ids.view("<i8").reshape(-1).astype(np.int64, copy=False)
                codes = None
                if layout.patch is not None and layout.form is not None and with_codes:
                    code_bytes = self.n_patches * layout.form.code_size
                    codes = shard_files.read_rows(patch_fd, layout.patch.codes_at, code_bytes, rows)
        except FileNotFoundError:
            self._layouts.pop(shard, None)
            raise VectorStoreError(f"vector shard {shard} is missing from {self.root}") from None
        except OSError as exc:  # cut short or unreadable since it was opened
            raise self._damaged(shard, exc) from None
        if order is not None:  # back to the order asked for
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            cls = cls[back]
            ids = ids[back] if with_ids else ids
            codes = None if codes is None else codes[back]
        return ids, cls, codes, layout.form

    def _layout(
        self, stamp: tuple[tuple[int, int, int], ...], cls_fd: int, patch_fd: int
    ) -> _Layout:
        """A shard's parsed headers; parts left None when they are not this library's (another
        dimension or patch grid, a codec numpy does not decode): the FAISS path reads it."""
        cls = shard_files.parse_cls(cls_fd, stamp[0][1])
        patch = shard_files.parse_patch(patch_fd, stamp[1][1])
        if cls is None or cls.dim != self.dim:
            return _Layout(stamp, None, None, None)
        if patch is None or (patch.dim, patch.ntotal) != (self.dim, cls.ntotal * self.n_patches):
            return _Layout(stamp, cls, None, None)
        form = CodeForm.of(patch.qtype, patch.trained, self.n_patches, self.dim)
        if form is None or form.code_size != patch.code_size:
            return _Layout(stamp, cls, patch, None)
        return _Layout(stamp, cls, patch, form)

    def patch_codes(self, shard: int) -> PatchCodes:
        """The patch file of a shard, memory-mapped (see `PatchCodes`)."""
        got = self._shard_map(shard)
        if got.patches is None:  # mapped on first use: [CLS]-only reads never open it
            try:
                got.patches = PatchCodes(self._path(shard, "patch"), self.n_patches, self.dim)
            except RuntimeError as exc:  # faiss on a truncated or garbled file
                raise self._damaged(shard, exc) from None
        return got.patches

    def _shard_map(self, shard: int) -> _MappedShard:
        """Both files of a shard, memory-mapped; reused while the files are the same ones."""
        cls_path, patch_path = self._path(shard, "cls"), self._path(shard, "patch")
        try:
            stamp = tuple(
                (st.st_ino, st.st_size, st.st_mtime_ns)
                for st in (cls_path.stat(), patch_path.stat())
            )
        except FileNotFoundError:
            self._mapped.pop(shard, None)
            raise VectorStoreError(f"vector shard {shard} is missing from {self.root}") from None
        got = self._mapped.get(shard)
        if got is not None and got.stamp == stamp:
            return got
        faiss = _faiss()
        try:
            cls_index = faiss.read_index(str(cls_path), _mapped())
            got = _MappedShard(
                stamp,
                faiss.vector_to_array(cls_index.id_map).astype(np.int64),
                cls_index.index,
                None,
                cls_index,
            )
        except RuntimeError as exc:  # faiss on a truncated or garbled file
            raise self._damaged(shard, exc) from None
        self._mapped[shard] = got
        while len(self._mapped) > mapped_shard_cap():
            self._mapped.pop(next(iter(self._mapped)))
        return got

    def _forget_deleted(self) -> None:
        """Unmap shards deleted since (by vacuum in another process): their space comes back."""
        for shard in [s for s in self._mapped if not self._path(s, "cls").exists()]:
            self._mapped.pop(shard, None)

    def patch_maxima(
        self, locations: Sequence[tuple[int, int, int]], query: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image ids, max over each image's patches of patch · query, [CLS] · query) of the
        images at `locations`, computed on the stored codes where the codec allows it: a few
        percent of what decoding the patches (`read_shard`) costs."""
        q = np.asarray(query, np.float32).reshape(-1)
        self._forget_deleted()
        ids, best, cls_dots = [], [], []
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for image_id, shard, row in locations:
            by_shard.setdefault(shard, []).append((row, image_id))
        for shard in sorted(by_shard):  # chunk_plan's order: by shard, then row
            located = np.array(sorted(by_shard[shard]), np.int64).reshape(-1, 2)
            rows_arr = located[:, 0]
            # the ids come with the locations: the shard's id map is not read
            direct = self._direct(shard, rows_arr, with_codes=True, with_ids=False)
            if direct is not None:
                _, cls, codes, form = direct
                assert codes is not None and form is not None
                ids.append(located[:, 1])
                best.append(form.dots(len(rows_arr), q, _slices(codes)).max(axis=1))
                cls_dots.append(cls @ q)
                continue
            got = self._shard_map(shard)
            best.append(self.patch_codes(shard).dots(rows_arr, q).max(axis=1))
            ids.append(got.ids[rows_arr])
            cls_dots.append(got.cls_index.reconstruct_batch(rows_arr) @ q)
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
        return np.concatenate(ids), np.concatenate(best), np.concatenate(cls_dots)

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
        leftovers, orphans, missing = self.to_reconcile(referenced)
        for path in leftovers:
            path.unlink(missing_ok=True)
        for shard in orphans:
            self.delete_shard(shard)
        return orphans, missing

    def to_reconcile(self, referenced: set[int]) -> tuple[list[Path], list[int], list[int]]:
        """What `reconcile` would do, touching nothing: (temp files and parts of shards cut
        short, to delete; orphan shards, to delete; referenced shards absent or incomplete).
        All empty: the folder agrees with SQL (a read-only `piaa status` relies on it)."""
        names = self._names()
        leftovers = [self.root / n for n in names if n.endswith(".tmp")]
        present = _shards_named(names, ".cls.faiss")
        # A patch or checksum file without its cls file is a shard whose write was cut short.
        for name in names:
            if name.endswith((".patch.faiss", ".sum.json")):
                shard = _shard_number(name)
                if shard is not None and shard not in present and shard not in referenced:
                    leftovers.append(self.root / name)
        orphans = sorted(present - referenced)
        # A referenced shard is usable only with both files (a lost patch file counts as lost).
        complete = present & _shards_named(names, ".patch.faiss")
        missing = sorted(referenced - complete)
        return leftovers, orphans, missing

    def disk_bytes(self) -> int:
        with os.scandir(self.root) as entries:
            return sum(e.stat().st_size for e in entries if e.name.endswith(".faiss"))

    def shard_rows(self, shard: int) -> int:
        """How many images a shard holds, live or not."""
        faiss = _faiss()
        return int(faiss.read_index(str(self._path(shard, "cls"))).ntotal)


def _shard_number(name: str) -> int | None:
    """The shard a file named as `_path` names it belongs to (None: not a shard's file)."""
    try:
        return int(name.split(".", 1)[0])
    except ValueError:
        return None


def _shards_named(names: list[str], suffix: str) -> set[int]:
    """The shard numbers of the files named `<number><suffix>`."""
    found = {_shard_number(n) for n in names if n.endswith(suffix)}
    return {s for s in found if s is not None}


@functools.cache
def mapped_shard_cap() -> int:
    """How many shards stay mapped between queries. Each holds two file descriptors (FAISS's
    mapped [CLS] index, the patch codes' mmap), so the cap follows the open-files limit, first
    raised to its hard maximum as databases do. A 1M-image library has ~1,000 shards: with 256
    mapped, text search re-opened most of them on every query (1.2 s of its ~2 s at 1M).
    Decided when the first shard is mapped, not on import: the limit is process-wide."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        unlimited = resource.RLIM_INFINITY
        want = 65536 if hard == unlimited else min(hard, 65536)
        if soft != unlimited and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    except (ImportError, ValueError, OSError):  # Windows, or a limit we may not raise
        return 256
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(64, min(4096, (soft - 1024) // 2))


@dataclass(frozen=True)
class _Layout:
    """A shard's files as `shard_files` parsed them; None parts are read through FAISS."""

    stamp: tuple[tuple[int, int, int], ...]  # (inode, size, mtime) of the cls and patch files
    cls: shard_files.ClsFile | None
    patch: shard_files.PatchFile | None
    form: CodeForm | None  # how the patch codes decode


def _slices(codes: np.ndarray) -> Callable[[int, int], np.ndarray]:
    """`CodeForm`'s codes_of over codes already read: rows a to b."""
    return lambda a, b: codes[a:b]


@dataclass
class _MappedShard:
    stamp: tuple[tuple[int, int, int], ...]  # (inode, size, mtime) of the cls and patch files
    ids: np.ndarray  # [n] int64 image ids of its rows
    cls_index: Any  # the flat [CLS] index (codes mapped)
    patches: PatchCodes | None
    owner: Any  # the IndexIDMap2 that owns cls_index


class CodeForm:
    """How a shard's patch codes decode, when they decode elementwise with numpy: the one home
    of that rule, for the memory-mapped codes (`PatchCodes`) and the ones read with pread
    (`VectorStore.patch_maxima`, `read_shard`).

    fp32, fp16 and the scalar quantisers qualify. Scalar quantisation is affine per dimension
    (x = vmin + (code + ½) / (2^bits − 1) · vdiff), so a patch's dot product with a query is a
    dot product of its raw codes with per-dimension weights: no decoded float is written.
    """

    def __init__(
        self, kind: str, vmin: np.ndarray, vdiff: np.ndarray, levels: int, m: int, dim: int
    ):
        self.kind, self.vmin, self.vdiff, self.levels = kind, vmin, vdiff, levels
        self.m, self.dim = m, dim
        self.code_size = {"fp32": 4 * dim, "fp16": 2 * dim, "8bit": dim, "4bit": dim // 2}[kind]

    @classmethod
    def of(cls, qtype: int, trained: np.ndarray, m: int, dim: int) -> CodeForm | None:
        """The form of codes made by a ScalarQuantizer of this qtype and trained ranges (or of
        an IndexFlat: qtype shard_files.FLAT_QTYPE); None when FAISS must decode them. The
        qtypes are FAISS's numbers (`shard_files.QT_*`: stored in its files, so fixed): a
        [CLS]-only read parses the shard headers without importing FAISS."""
        if qtype == FLAT_QTYPE:
            return cls("fp32", np.zeros(0), np.zeros(0), 1, m, dim)
        if qtype == shard_files.QT_FP16:
            return cls("fp16", np.zeros(0), np.zeros(0), 1, m, dim)
        levels = {
            shard_files.QT_4BIT: ("4bit", 15),
            shard_files.QT_4BIT_UNIFORM: ("4bit", 15),
            shard_files.QT_8BIT: ("8bit", 255),
            shard_files.QT_8BIT_UNIFORM: ("8bit", 255),
        }
        if qtype not in levels or (levels[qtype][0] == "4bit" and dim % 2):
            return None
        kind, top = levels[qtype]
        trained = np.asarray(trained, np.float32)
        half = len(trained) // 2
        if half not in (1, dim) or len(trained) != 2 * half:
            return None
        vmin = np.broadcast_to(trained[:half], (dim,)).astype(np.float32)
        vdiff = np.broadcast_to(trained[half:], (dim,)).astype(np.float32)
        return cls(kind, vmin, vdiff, top, m, dim)

    def decode(self, n: int, codes_of: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """[n, M, d] float32 patches of n images, whose codes `codes_of(a, b)` gives for images
        a to b ([b − a, M · code size] uint8), as FAISS decodes them (to a rounding error)."""
        m, d = self.m, self.dim
        out = np.empty((n, m, d), dtype=np.float32)
        # numpy, in small blocks: FAISS's threaded decoder was 3-30x slower on the 2 busy cores
        # this was measured on, and one decoder everywhere keeps exact and ANN scores equal.
        for a in range(0, n, _BLOCK):
            codes = codes_of(a, min(n, a + _BLOCK)).reshape(-1, self.code_size)
            out[a : a + _BLOCK] = self._decode_codes(codes).reshape(-1, m, d)
        return out

    def _decode_codes(self, c: np.ndarray) -> np.ndarray:
        kind, vmin, vdiff, levels = self.kind, self.vmin, self.vdiff, self.levels
        if kind == "fp32":
            return c.view(np.float32)
        if kind == "fp16":
            return c.view(np.float16).astype(np.float32)
        if kind == "4bit":  # dimension 2j in the low nibble of byte j, 2j+1 in the high one
            x = np.empty((len(c), self.dim), dtype=np.float32)
            x[:, 0::2] = c & 15
            x[:, 1::2] = c >> 4
        else:
            x = c.astype(np.float32)
        x += np.float32(0.5)  # FAISS: vmin + (code + 0.5) / levels * vdiff
        x /= np.float32(levels)
        x *= vdiff
        x += vmin
        return x

    def dots(
        self, n: int, query: np.ndarray, codes_of: Callable[[int, int], np.ndarray]
    ) -> np.ndarray:
        """[n, M] float32: each patch of n images (codes as for `decode`) · query."""
        q = np.asarray(query, np.float32).reshape(-1)
        out = np.empty((n, self.m), dtype=np.float32)
        kind, vmin, vdiff, levels = self.kind, self.vmin, self.vdiff, self.levels
        if kind in ("4bit", "8bit"):
            w = q * vdiff / np.float32(levels)  # x·q = vmin·q + Σ_d w_d (code_d + ½)
            base = np.float32(vmin @ q + 0.5 * w.sum())
        for a in range(0, n, _BLOCK):
            c = codes_of(a, min(n, a + _BLOCK)).reshape(-1, self.code_size)
            if kind == "4bit":
                got = (c & 15).astype(np.float32) @ w[0::2] + (c >> 4).astype(np.float32) @ w[1::2]
                got += base
            elif kind == "8bit":
                got = c.astype(np.float32) @ w + base
            else:
                got = self._decode_codes(c) @ q
            out[a : a + _BLOCK] = got.reshape(-1, self.m)
        return out


class PatchCodes:
    """One shard's patch file, memory-mapped: rows decoded or dotted with a query without
    reading the rest of the file.

    fp32, fp16 and the scalar quantisers store their codes as the file's last array ([images ×
    M × code size] bytes), so they are viewed in place and decoded with numpy (`CodeForm`).
    PQ codecs are decoded by FAISS.
    """

    def __init__(self, path: Path, n_patches: int, dim: int):
        faiss = _faiss()
        self.index = faiss.read_index(str(path), _mapped())
        self.m, self.dim = n_patches, dim
        self.code_size = int(self.index.sa_code_size())
        n_codes = int(self.index.ntotal) * self.code_size
        offset = path.stat().st_size - n_codes
        self.codes: np.ndarray | None = None  # [images, M * code size] uint8, in place
        if offset >= 8 and n_codes:
            raw = np.memmap(path, dtype=np.uint8, mode="r")
            # The array's length, in bytes (in floats for IndexFlat); IndexPQ writes more
            # fields after its codes and is read through FAISS instead.
            if int(raw[offset - 8 : offset].view("<u8")[0]) in (n_codes, n_codes // 4):
                # a plain array over the map: memmap slicing costs ~70 µs a call
                self.codes = np.asarray(raw[offset:]).reshape(-1, self.m * self.code_size)
        self._form = self._code_form(faiss.downcast_index(self.index))

    def _code_form(self, index: Any) -> CodeForm | None:
        faiss = _faiss()
        if self.codes is None:
            return None
        if isinstance(index, faiss.IndexFlat):
            form = CodeForm.of(FLAT_QTYPE, np.zeros(0), self.m, self.dim)
        elif isinstance(index, faiss.IndexScalarQuantizer):
            trained = faiss.vector_to_array(index.sq.trained)
            form = CodeForm.of(int(index.sq.qtype), trained, self.m, self.dim)
        else:
            return None
        return form if form is not None and form.code_size == self.code_size else None

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), M, d] float32 patches (as FAISS decodes them, to a rounding error)."""
        if self._form is not None:
            return self._form.decode(len(rows), lambda a, b: self._gather(rows[a:b]))
        m, d = self.m, self.dim
        out = np.empty((len(rows), m, d), dtype=np.float32)
        # PQ codes: FAISS decodes them, one run of rows at a time
        for out_start, (start, stop) in _runs(rows):
            # straight into `out`: a decode into a new array and a copy cost twice the decode
            block = out[out_start : out_start + stop - start].reshape(-1, d)
            self.index.reconstruct_n(int(start) * m, int(stop - start) * m, block)
        return out

    def dots(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """[len(rows), M] float32: each patch of these rows · query."""
        if self._form is not None:
            return self._form.dots(len(rows), query, lambda a, b: self._gather(rows[a:b]))
        q = np.asarray(query, np.float32).reshape(-1)
        out = np.empty((len(rows), self.m), dtype=np.float32)
        for a in range(0, len(rows), _BLOCK):
            out[a : a + _BLOCK] = self.decode(rows[a : a + _BLOCK]) @ q
        return out

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        assert self.codes is not None
        if len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1:
            return np.asarray(self.codes[int(rows[0]) : int(rows[-1]) + 1])  # one run: a view
        return self.codes[rows]


_BLOCK = 4  # images per block: codes and decoded floats stay in cache


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


MANIFEST_SETTING = "vectors_manifest"  # the database's copy of manifest.json


def manifest_problem(manifest: dict, recorded: dict | None, model: dict | None) -> str | None:
    """How a manifest differs from the database's copy of it (None when they agree). A library
    from before the copy is compared with the model record's identity (dim, grid, model)."""
    if recorded is not None:
        for key in ("identity", "codec", "checksums_from"):
            got, want = manifest.get(key), recorded.get(key)
            if key not in recorded or got == want:
                continue
            if key == "identity" and isinstance(want, dict) and isinstance(got, dict):
                wrong = [k for k in sorted(want) if got.get(k) != want[k]] or sorted(got)
                return ", ".join(f"{k} {got.get(k)!r}, recorded {want.get(k)!r}" for k in wrong)
            return f"{key} {got!r}, recorded {want!r}"
        return None
    identity = (model or {}).get("identity")
    if isinstance(identity, dict):
        for key in ("dim", "grid", "model"):
            if key in identity and manifest["identity"].get(key) != identity[key]:
                return f"{key} {manifest['identity'].get(key)!r}, recorded {identity[key]!r}"
    return None


def infer_codec(root: Path) -> str:
    """The patch codec of a library whose manifest is lost: its trained quantiser's, else the
    newest shard's (a lossy library still without a quantiser stores fp16)."""
    faiss = _faiss()
    paths = sorted(Path(root).glob(QUANTIZER_GLOB)) or sorted(Path(root).glob("*.patch.faiss"))[-1:]
    for path in paths:
        try:
            index = faiss.downcast_index(faiss.read_index(str(path), _mapped()))
        except RuntimeError:
            continue
        if isinstance(index, faiss.IndexPreTransform):
            return "opq4"
        if isinstance(index, faiss.IndexPQ):
            return "pq4"
        if isinstance(index, faiss.IndexScalarQuantizer):
            qt = faiss.ScalarQuantizer
            names = {qt.QT_fp16: "fp16", qt.QT_8bit: "sq8", qt.QT_4bit: "sq4"}
            return names.get(index.sq.qtype, DEFAULT_CODEC)
        if isinstance(index, faiss.IndexFlat):
            return "fp32"
    return DEFAULT_CODEC


def describe_identity(identity: dict) -> str:
    grid = identity.get("grid", ["?", "?"])
    return (
        f"model {identity.get('model')} ({identity.get('pretrained')}), front-end "
        f"{identity.get('front_end')}, dim {identity.get('dim')}, grid {grid[0]}x{grid[1]}"
    )
