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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from piaa_index.durable import (
    damaged_files,
    replace_all,
)
from piaa_index.progress import Progress, note
from piaa_index.vectors import similar_files
from piaa_index.vectors.faiss_lib import faiss as _faiss
from piaa_index.vectors.parts import Parts

# 200k images at 128 dims (50k at 512): a flat scan stays within a few ms per query there.
MAX_FLAT_CELLS = 25_600_000
NPROBE = 32
BUILD_CHUNK = 65_536  # images read and added at a time by a build


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
    """The [CLS] vectors of the images `ids`, kept as `parts.Parts` (an IVF's parts share its
    quantiser; a flat index, ≤ `MAX_FLAT_CELLS`, is one part)."""

    def __init__(
        self, parts: Parts, ids: np.ndarray, shards: np.ndarray, part_of: np.ndarray, kind: str
    ):
        self.parts = parts
        self.ids = ids  # int64 [n] images held
        self.shards = shards  # int32 [n] the shard each was read from
        self.part_of = part_of  # int32 [n] the part holding each
        self.kind = kind
        self.version = -1  # catalog version it was last synced with
        self.trained_on = len(ids)

    @classmethod
    def build(
        cls,
        dim: int,
        ids: np.ndarray,
        shards: np.ndarray,
        vectors: np.ndarray,
        folder: Path | None = None,
    ) -> ClsIndex:
        """An index of these images (in memory: tests and small libraries)."""

        def rows(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return ids[pos], shards[pos], vectors[pos]

        return cls.build_from(dim, len(ids), rows, folder)

    @classmethod
    def build_from(
        cls,
        dim: int,
        n: int,
        rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]],
        folder: Path | None,
    ) -> ClsIndex:
        """An index of `n` images, `rows(positions)` giving (ids, shards, vectors) of some of
        them: read a chunk at a time, full parts written to `folder` as they fill, so a build
        holds about one part, whatever `n`."""
        faiss = _faiss()
        if n * dim <= MAX_FLAT_CELLS:
            trained = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            kind = "flat"
        else:
            nlist = int(min(65536, max(16, 4 * math.sqrt(n))))
            quantizer = faiss.IndexFlatIP(dim)
            trained = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)
            trained.train(np.ascontiguousarray(rows(np.sort(sample))[2], dtype=np.float32))
            trained.nprobe = NPROBE
            kind = "ivf"
        out = cls(
            Parts.fresh(folder, "cls", trained),
            np.zeros(0, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
            kind,
        )
        for start in range(0, n, BUILD_CHUNK):
            out.add(*rows(np.arange(start, min(n, start + BUILD_CHUNK))))
        out.trained_on = n
        return out

    def add(self, ids: np.ndarray, shards: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            part_of = self.parts.add(vectors, np.asarray(ids, np.int64))
            self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])
            self.shards = np.concatenate([self.shards, np.asarray(shards, np.int32)])
            self.part_of = np.concatenate([self.part_of, part_of])

    def remove(self, mask: np.ndarray) -> None:
        """Drop the held images selected by `mask`."""
        if mask.any():
            for part in np.unique(self.part_of[mask]).tolist():
                self.parts.remove(part, self.ids[mask & (self.part_of == part)])
            keep = ~mask
            self.ids, self.shards, self.part_of = (
                self.ids[keep],
                self.shards[keep],
                self.part_of[keep],
            )

    @property
    def max_shard(self) -> int:
        return int(self.shards.max()) if len(self.shards) else 0

    def search(
        self, q: np.ndarray, k: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of up to k nearest by inner product, best first (ties by id); an IVF
        probes `nprobe` lists (default `NPROBE`)."""
        k = min(k, self.parts.ntotal)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.kind == "ivf" and k >= self.parts.ntotal:
            self.parts.set_nprobe(1 << 30)  # everything asked for: probe every list
        elif self.kind == "ivf" and nprobe is not None:
            self.parts.set_nprobe(max(1, nprobe))
        try:
            scores, ids = self.parts.search(q, k)
        finally:
            if self.kind == "ivf":
                self.parts.set_nprobe(NPROBE)
        order = np.lexsort((ids, -scores))[:k]
        return ids[order], scores[order]

    # -- persistence ------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        self.part_of = self.parts.drop_emptied(self.part_of)
        held = {"ids": self.ids, "shards": self.shards, "parts": self.part_of}
        meta = {"kind": self.kind, "version": self.version, "trained_on": self.trained_on}
        self.parts.save(folder, held, meta)

    @classmethod
    def load(cls, folder: Path, mapped: bool = False) -> ClsIndex | None:
        """The saved index, or None (none, or damaged: rebuilt from the shards). Its IVF parts
        are memory-mapped (a probe reads its lists only; a writer reads a part whole to change
        it). `mapped`: for searching only, in a fresh query process: each part read with
        `similar_files` (no FAISS) where it can."""
        try:
            found = read_held(folder)
            if found is None:
                return None  # damaged: rebuilt from the shards
            meta, held = found
            ids, shards = held["ids"], held["shards"]
            part_of = held.get("parts", np.zeros(len(ids), np.int32))  # (saved before parts)
            kind = meta["kind"]

            def reader(path: Path) -> Any:
                return similar_files.open_saved(str(path), kind)

            parts = Parts.open(folder, "cls", meta, reader if mapped else None)
        except Exception:  # noqa: BLE001 - any damage (BadZipFile, FAISS, JSON): rebuild
            return None
        if parts.ntotal != len(ids):
            return None
        out = cls(parts, ids, shards, part_of, kind)
        if out.kind == "ivf":
            parts.set_nprobe(NPROBE)
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
