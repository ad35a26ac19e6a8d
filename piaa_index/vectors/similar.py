"""A FAISS index over the [CLS] vectors for `similar`, kept beside the shards as a cache.

Exact inner product (IndexFlatIP) while the collection is small enough for a scan to be cheap
(`MAX_FLAT_CELLS` = images x dims); an inverted-file index (IVF, `nprobe` lists probed) beyond.
Built lazily from the shards, persisted under `<vectors_dir>/similar/` with the (image id,
shard) pairs it covers, and brought up to date with the catalog incrementally: new shards are
added, superseded and removed images deleted by id. It is a cache: SQL never points at it, and a
damaged or missing one is rebuilt.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from piaa_index.durable import (
    content_stamp,
    damaged_files,
    file_checksum,
    file_digest,
    replace_all,
)
from piaa_index.progress import Progress, note
from piaa_index.vectors import similar_files
from piaa_index.vectors.faiss_lib import faiss as _faiss

# 200k images at 128 dims (50k at 512): a flat scan stays within a few ms per query there.
MAX_FLAT_CELLS = 25_600_000
NPROBE = 32


def saved_version(folder: Path) -> int | None:
    """The catalog version the index saved in `folder` (this one or text
    search's) was synced with (None: no readable index)."""
    try:
        return int(json.loads((folder / "meta.json").read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_held(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(meta.json, the held arrays: ids, shards, …) of the index saved in `folder` (this one
    or text search's); None when its held ids are damaged (crc32, unless their stamp is the
    one recorded when they were hashed). Raises on a missing or unreadable file."""
    meta = json.loads((folder / "meta.json").read_text())
    sums = meta.get("sums") or {}
    if "held.npz" in sums and damaged_files(
        folder, {"held.npz": sums["held.npz"]}, meta.get("stamps")
    ):
        return None
    with np.load(folder / "held.npz") as held:
        return meta, {name: held[name] for name in held.files}


def restamp(folder: Path, store: Any, version: int) -> bool:
    """Record catalog `version` in the index saved in `folder` (this one or text search's)
    when nothing since it was saved concerns it: no image it holds changed or left, none was
    added (a fit, a vocabulary or a label change moves the version too). Loading the index to
    find that out held ~2 GB at a million images after every fit; this reads its held ids.
    False (nothing written) when there is something to sync or no sound index: the caller
    syncs. `version` is read before this call, so a change made meanwhile is synced next."""
    try:
        found = read_held(folder)
    except Exception:  # noqa: BLE001 - any damage: the sync rebuilds
        return False
    if found is None:
        return False
    meta, held = found
    ids, shards = held["ids"], held["shards"]
    max_shard = int(shards.max()) if len(shards) else 0
    stale, new = store.changes_since(ids, shards, max_shard)
    if stale.any() or new:
        return False
    meta["version"] = int(version)
    (folder / "meta.json.tmp").write_text(json.dumps(meta))
    replace_all([(folder / "meta.json.tmp", folder / "meta.json")])  # fsynced, then renamed
    return True


def exact_search(
    ids: np.ndarray, vectors: np.ndarray, q: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, inner products) of the `k` vectors nearest `q`, compared one by one: FAISS's flat
    inner product, so the scores are those a flat `ClsIndex` gives, to the last digit (computed
    without FAISS where `similar_files` reproduces its kernel: `similar_files.top_k`)."""
    if not len(ids):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if similar_files.supported(vectors.shape[1]):
        rows, sims = similar_files.top_k(
            np.ascontiguousarray(vectors, dtype=np.float32), q, min(k, len(ids))
        )
        return np.asarray(ids, np.int64)[rows], sims
    flat = _faiss().IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    sims, rows = flat.search(np.asarray(q, np.float32).reshape(1, -1), min(k, len(ids)))
    keep = rows[0] >= 0
    return np.asarray(ids, np.int64)[rows[0][keep]], sims[0][keep]


class ClsIndex:
    def __init__(self, index: Any, ids: np.ndarray, shards: np.ndarray, kind: str):
        self.index = index
        self.ids = ids  # int64 [n] images held
        self.shards = shards  # int32 [n] the shard each was read from
        self.kind = kind
        self.version = -1  # catalog version it was last synced with
        self.trained_on = len(ids)

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, shards: np.ndarray, vectors: np.ndarray) -> ClsIndex:
        faiss = _faiss()
        n = len(ids)
        if n * dim <= MAX_FLAT_CELLS:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            kind = "flat"
        else:
            nlist = int(min(65536, max(16, 4 * math.sqrt(n))))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)
            index.train(np.ascontiguousarray(vectors[np.sort(sample)], dtype=np.float32))
            index.nprobe = NPROBE
            kind = "ivf"
        out = cls(index, np.zeros(0, np.int64), np.zeros(0, np.int32), kind)
        out.add(ids, shards, vectors)
        out.trained_on = n
        return out

    def add(self, ids: np.ndarray, shards: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64)
            )
            self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])
            self.shards = np.concatenate([self.shards, np.asarray(shards, np.int32)])

    def remove(self, mask: np.ndarray) -> None:
        """Drop the held images selected by `mask`."""
        if mask.any():
            faiss = _faiss()
            gone = np.ascontiguousarray(self.ids[mask], dtype=np.int64)
            self.index.remove_ids(faiss.IDSelectorBatch(len(gone), faiss.swig_ptr(gone)))
            self.ids, self.shards = self.ids[~mask], self.shards[~mask]

    @property
    def max_shard(self) -> int:
        return int(self.shards.max()) if len(self.shards) else 0

    def search(
        self, q: np.ndarray, k: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of up to k nearest by inner product, best first (ties by id); an IVF
        probes `nprobe` lists (default `NPROBE`)."""
        k = min(k, int(self.index.ntotal))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.kind == "ivf" and k >= self.index.ntotal:
            self.index.nprobe = self.index.nlist  # everything asked for: probe every list
        elif self.kind == "ivf" and nprobe is not None:
            self.index.nprobe = int(min(max(1, nprobe), self.index.nlist))
        try:
            scores, ids = self.index.search(np.asarray(q, np.float32)[None], k)
        finally:
            if self.kind == "ivf":
                self.index.nprobe = NPROBE
        keep = ids[0] >= 0
        ids_out, scores_out = ids[0][keep], scores[0][keep]
        order = np.lexsort((ids_out, -scores_out))
        return ids_out[order], scores_out[order]

    # -- persistence ------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        faiss = _faiss()
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "cls.faiss.tmp"))
        np.savez(folder / "held.npz.tmp", ids=self.ids, shards=self.shards)
        meta = {
            "kind": self.kind,
            "version": self.version,
            "trained_on": self.trained_on,
            # Checksums: the held ids are verified on every load, both files by `db check`.
            "sums": {
                "cls.faiss": file_digest(folder / "cls.faiss.tmp"),
                # crc32: verified on every load, a quick check
                "held.npz": file_checksum(folder / "held.npz.tmp.npz"),
            },
            # ... unless it is still the file hashed here (the rename keeps the stamp)
            "stamps": {"held.npz": content_stamp(folder / "held.npz.tmp.npz")},
        }
        (folder / "meta.json.tmp").write_text(json.dumps(meta))
        # meta.json last: it is what says the other two belong together.
        replace_all(
            [
                (folder / "cls.faiss.tmp", folder / "cls.faiss"),
                (folder / "held.npz.tmp.npz", folder / "held.npz"),  # np.savez appends .npz
                (folder / "meta.json.tmp", folder / "meta.json"),
            ],
            last_vouches=True,
        )

    @classmethod
    def load(cls, folder: Path, mapped: bool = False) -> ClsIndex | None:
        """The saved index, or None (none, or damaged: rebuilt from the shards). `mapped`: for
        searching only, in a fresh query process: its file read with `similar_files` (no FAISS;
        a probe reads its lists only), else memory-mapped through FAISS; writers load it whole
        to change it."""
        try:
            found = read_held(folder)
            if found is None:
                return None  # damaged: rebuilt from the shards
            meta, held = found
            ids, shards = held["ids"], held["shards"]
            index: Any = None
            if mapped:
                index = similar_files.open_saved(str(folder / "cls.faiss"), meta["kind"])
            if index is None:
                faiss = _faiss()
                flags = faiss.IO_FLAG_MMAP if mapped else 0
                index = faiss.read_index(str(folder / "cls.faiss"), flags)
        except Exception:  # noqa: BLE001 - any damage (BadZipFile, FAISS, JSON): rebuild
            return None
        if int(index.ntotal) != len(ids):
            return None
        out = cls(index, ids, shards, meta["kind"])
        if out.kind == "ivf":
            index.nprobe = NPROBE
        out.version = int(meta["version"])
        out.trained_on = int(meta.get("trained_on", len(ids)))
        return out


def cls_of(
    vectors: Any, locations: list[tuple[int, int, int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, shards, [CLS] vectors) of the images at `locations`, read without their patches."""
    ids, shards, vecs = [], [], []
    for chunk in vectors.iter_live(locations, with_patches=False):
        ids.append(chunk.image_ids)
        shards.append(np.full(len(chunk.image_ids), chunk.shard, np.int32))
        vecs.append(chunk.cls)
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, vectors.dim))
    return np.concatenate(ids), np.concatenate(shards), np.concatenate(vecs)


def neighbours(
    index: ClsIndex | None,
    q: np.ndarray,
    store: Any,
    vectors: Any,
    limit: int | None,
    progress: Progress = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, inner products) of the images nearest `q`: the saved index's answer, less the rows
    it holds that changed since it was saved, plus the images it does not hold yet compared
    exactly; with no index, every image compared exactly (and `progress` says so). `store` is
    the catalog (`Store`, or the read-only twin of a fresh query process); nothing is written."""
    if index is None:
        live = store.live_locations()
        note(
            f"the similar-images index is not built yet: comparing all {len(live):,} "
            "images exactly (`piaa index` builds it)",
            progress,
        )
        every, _, vecs = cls_of(vectors, live)
        return exact_search(every, vecs, q, len(every))
    if index.version == store.data_version():
        gone, fresh = np.zeros(0, np.int64), []
    else:
        stale, fresh = store.changes_since(index.ids, index.shards, index.max_shard)
        gone = index.ids[stale]
    # A few extra so that the query image, rows changed since the index was saved and ties at
    # the cut do not shorten the list.
    want = len(index.ids) if limit is None else limit + 1 + 8 + len(gone)
    ids, sims = index.search(q, want)
    if len(gone):
        keep = ~np.isin(ids, gone)
        ids, sims = ids[keep], sims[keep]
    if fresh:
        note(
            f"the similar-images index is being updated: {len(fresh):,} images it "
            "does not hold yet are compared exactly",
            progress,
        )
        new_ids, _, vecs = cls_of(vectors, fresh)
        new_ids, new_sims = exact_search(new_ids, vecs, q, want)
        ids = np.concatenate([np.asarray(ids, np.int64), new_ids])
        sims = np.concatenate([np.asarray(sims, np.float32), new_sims])
    return ids, sims
