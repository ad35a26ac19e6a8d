"""Open-vocabulary text search without reading the whole collection.

Candidates, then a cheap exact pre-score, then the exact scorer on a few:

1. candidates: an ANN index over the *patch* pool (FAISS IVF-PQ, inner product; every patch
   carries its image's id) returns the patches nearest the phrase, grouped by image (max over
   patches); ∪ the [CLS] index of `similar`'s images nearest the phrase. The [CLS] pool grows
   with the library (`Budget.for_limit`): among the thousands of images sharing a frequent label
   the max patch cosines are near-ties the patch index's PQ codes cannot order, and the [CLS]
   term decides;
2. pre-score: each candidate's exact max patch cosine and [CLS] cosine, computed on the stored
   sq4/sq8 codes without decoding them (`VectorStore.patch_maxima`, ~25 µs per ViT-B/16 image);
3. the candidates that fewer than k others beat on both numbers (the k-skyband, usually 50–150
   images) are re-ranked with the *exact* scorer `Library.text_search` passes in, on their
   decoded vectors, and the top k returned. Dropping the rest loses nothing for any scorer that
   does not decrease when either cosine grows (PAA's α·max patch + (1 − α)·[CLS] does not).

The patch index is kept beside the shards like `similar.py`'s: persisted under
`<vectors_dir>/text/` with the (image id, shard, row) triples it covers, built and brought up to
date incrementally (new shards added; superseded, re-encoded and removed images deleted by id)
by `sync` as part of `index`, `fit` and `vacuum`, never by a query. A query finds it as it is:
the images it does not hold yet (an index run still going, in this process or another) are
pre-scored exactly beside its candidates, and the images it holds that changed since are left
out, so the answer is the same as from an up-to-date index; with no index at all (a library
made before indexes were built by `index`, or a damaged one) the query scans exactly and says
so. Libraries below `EXACT_BELOW` images keep the exact scan.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from piaa_index.layout import VectorsLayout
from piaa_index.progress import Progress, note, progress_bar
from piaa_index.vectors import similar
from piaa_index.vectors.faiss_lib import faiss as _faiss
from piaa_index.vectors.parts import Parts
from piaa_index.vectors.shards import ShardVectors, VectorStore

# Below this many images the exact scan is used (it reads every vector; see docs/scale.md for
# the measured crossover).
EXACT_BELOW = 2_000
MAX_NLIST = 256  # lists of the patch index: adding a patch costs nlist dot products
MAX_CLS_POOL = 20_000
TRAIN_IMAGES = 2_000  # images sampled to train the coarse quantiser and the PQ codebooks
TRAIN_PATCHES = 65_536
SCORE_IMAGES = 256  # small chunks scored together up to this many images (exact_scores)


# (cls [n, d], patches [n, M, d], phrase [d], other labels or None) -> [n] scores; it must not
# decrease when an image's max patch cosine or [CLS] cosine to the phrase grows (the skyband).
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True)
class Budget:
    """How many candidates the ANN path pre-scores on the stored codes."""

    patch_hits: int = 32_768  # patches retrieved from the patch index
    from_patches: int = 2_000  # best images by approximate max patch similarity
    from_cls: int = 2_000  # best images by [CLS] similarity

    @classmethod
    def for_limit(cls, limit: int, images: int = 0) -> Budget:
        """The budget for a top `limit` in a library of `images`. The [CLS] pool grows with
        the library (a tenth of it, capped): among the thousands of images that share a
        frequent label the max patch cosines are near-ties (too close for the patch index's
        PQ codes to order), and the exact top 20 reached [CLS] rank 927 of 20k (docs/scale.md)."""
        scale = max(1.0, limit / 20)
        from_cls = min(MAX_CLS_POOL, max(2_000, images // 10))
        return cls(int(32_768 * scale), int(2_000 * scale), int(from_cls * scale))


def _nprobe(nlist: int) -> int:
    """Lists probed: about 1/16 of the patches (the candidates are pre-scored exactly after)."""
    return min(nlist, max(4, nlist // 16))


def _pq_m(dim: int) -> int:
    """PQ sub-quantisers: 8 dims each (dim/8 bytes per patch: 16 B at 128 dims, 64 B at 512)."""
    for m in (dim // 8, dim // 4, dim // 2, dim):
        if m > 0 and dim % m == 0:
            return m
    return dim


class PatchIndex:
    """IVF-PQ over every live patch, kept as `parts.Parts` sharing one quantiser and codebook;
    ids are image ids (an image's patches share its id, and one part)."""

    def __init__(
        self,
        parts: Parts,
        ids: np.ndarray,
        shards: np.ndarray,
        rows: np.ndarray,
        part_of: np.ndarray,
    ):
        self.parts = parts
        self.ids = ids  # int64 [n] images held, sorted
        self.shards = shards  # int32 [n] the shard each was read from
        self.rows = rows  # int32 [n] its row in that shard
        self.part_of = part_of  # int32 [n] the part holding its patches
        self.version = -1
        self.trained_on = len(ids)

    @classmethod
    def build(
        cls,
        vectors: VectorStore,
        live: list[tuple[int, int, int]],
        nlist: int | None = None,
        advance: Callable[[int], None] | None = None,
        folder: Path | None = None,
    ) -> PatchIndex:
        """Trained on a sample, then every image added a chunk at a time; full parts are
        written to `folder` (where it will be saved) as they fill."""
        faiss = _faiss()
        d, m_patches = vectors.dim, vectors.n_patches
        total = len(live) * m_patches
        if nlist is None:
            # ~sqrt(patches)/8 lists, capped: adding a patch costs nlist dot products (1024
            # lists built 100k ViT-B/16 images in 18 min; 256 cost a quarter of that).
            nlist = int(min(MAX_NLIST, max(16, math.sqrt(max(1, total)) / 8)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, _pq_m(d), 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        picks = sorted(
            rng.choice(len(live), size=min(len(live), TRAIN_IMAGES), replace=False).tolist()
        )
        sample = np.concatenate(
            [c.patches.reshape(-1, d) for c in vectors.iter_live([live[i] for i in picks])]
        )
        if len(sample) > TRAIN_PATCHES:
            sample = sample[np.sort(rng.choice(len(sample), TRAIN_PATCHES, replace=False))]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = _nprobe(nlist)
        parts = Parts.fresh(folder, "patches", index)
        empty = np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32)
        out = cls(parts, empty[0], empty[1], empty[2], empty[2])
        out.add(vectors, live, advance)
        out.trained_on = len(out.ids)
        return out

    def add(
        self,
        vectors: VectorStore,
        locations: list[tuple[int, int, int]],
        advance: Callable[[int], None] | None = None,
    ) -> None:
        if not locations:
            return
        where = {i: (s, r) for i, s, r in locations}
        got, part_of = [], []
        for chunk in vectors.iter_live(locations, max_images=1024):
            n, m = chunk.patches.shape[:2]
            flat = chunk.patches.reshape(n * m, -1)
            ids = np.repeat(chunk.image_ids.astype(np.int64), m)
            part_of.append(self.parts.add(flat, ids, rows_per_image=m))
            got.append(chunk.image_ids.astype(np.int64))
            if advance is not None:
                advance(n)
        new = np.concatenate(got)
        shards = np.fromiter((where[int(i)][0] for i in new), np.int32, len(new))
        rows = np.fromiter((where[int(i)][1] for i in new), np.int32, len(new))
        ids_all = np.concatenate([self.ids, new])
        order = np.argsort(ids_all, kind="stable")
        self.ids = ids_all[order]
        self.shards = np.concatenate([self.shards, shards])[order]
        self.rows = np.concatenate([self.rows, rows])[order]
        self.part_of = np.concatenate([self.part_of, *part_of])[order]

    def remove(self, mask: np.ndarray) -> None:
        """Drop the held images selected by `mask` (all their patches)."""
        if mask.any():
            for part in np.unique(self.part_of[mask]).tolist():
                self.parts.remove(part, self.ids[mask & (self.part_of == part)])
            keep = ~mask
            self.ids, self.shards, self.rows = self.ids[keep], self.shards[keep], self.rows[keep]
            self.part_of = self.part_of[keep]

    @property
    def max_shard(self) -> int:
        return int(self.shards.max()) if len(self.shards) else 0

    def locations(self, ids: np.ndarray) -> list[tuple[int, int, int]]:
        """(id, shard, row) of the held images among `ids` (others are dropped)."""
        ids = np.asarray(ids, np.int64)
        if not len(self.ids) or not len(ids):
            return []
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        pos = pos[self.ids[pos] == ids]
        return [(int(self.ids[p]), int(self.shards[p]), int(self.rows[p])) for p in pos]

    def best_images(self, q: np.ndarray, patch_hits: int, images: int) -> np.ndarray:
        """Ids of up to `images` images with the highest approximate max patch similarity."""
        sims, ids = self.parts.search(q, patch_hits)
        if not len(ids):
            return np.zeros(0, np.int64)
        order = np.lexsort((ids, -sims))[:patch_hits]  # best first; an image's first is its max
        uniq, first = np.unique(ids[order], return_index=True)
        best = uniq[np.argsort(first, kind="stable")]
        return best[:images]

    # -- persistence ------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        self.part_of = self.parts.drop_emptied(self.part_of)
        held = {"ids": self.ids, "shards": self.shards, "rows": self.rows, "parts": self.part_of}
        meta = {"version": self.version, "trained_on": self.trained_on}
        self.parts.save(folder, held, meta)

    @classmethod
    def load(cls, folder: Path) -> PatchIndex | None:
        """The saved index, or None (none, or damaged: rebuilt from the shards). Its parts are
        memory-mapped, read-only (1.5 GB at 1M not read; a probe touches its lists only); a
        writer reads a part whole to change it."""
        try:
            found = similar.read_held(folder)
            if found is None:
                return None  # damaged: rebuilt from the shards
            meta, held = found
            ids, shards, rows = held["ids"], held["shards"], held["rows"]
            part_of = held.get("parts", np.zeros(len(ids), np.int32))  # (saved before parts)
            parts = Parts.open(folder, "patches", meta)
            parts.set_nprobe(_nprobe(parts.nlist))
        except Exception:  # noqa: BLE001 - any damage (BadZipFile, FAISS, JSON): rebuild
            return None
        out = cls(parts, ids, shards, rows, part_of)
        out.version = int(meta["version"])
        out.trained_on = int(meta.get("trained_on", len(ids)))
        return out


def sync(
    index: PatchIndex | None,
    store: Any,
    vectors: VectorStore,
    folder: Path,
    progress: Progress = False,
) -> PatchIndex:
    """The patch index brought up to date with the catalog (built if there is none yet) and
    saved: the writers' step (`index`, `fit`, `vacuum`; Searcher.update_indexes)."""
    version = store.data_version()
    if index is None or index.version != similar.saved_version(folder):
        index = PatchIndex.load(folder)
    if index is not None and index.version == version:
        return index
    if (
        index is None
        or len(index.ids) > 4 * max(1, index.trained_on) + 10_000
        or index.parts.needs_rebuild
    ):
        # None yet, trained on far fewer images than it holds, or thinned out: build afresh.
        live = store.live_locations()
        with progress_bar(len(live), "text index", progress) as advance:
            index = PatchIndex.build(vectors, live, advance=advance, folder=folder)
    else:
        stale, new = store.changes_since(index.ids, index.shards, index.max_shard)
        index.remove(stale)
        if new:
            with progress_bar(len(new), "text index", progress) as advance:
                index.add(vectors, new, advance)
    index.version = version
    index.save(folder)
    return index


def current(index: PatchIndex | None, folder: Path) -> PatchIndex | None:
    """The newest saved patch index (`index` when it is that one); None when there is none. A
    query's step: it never builds or writes."""
    saved = similar.saved_version(folder)
    if saved is None:
        return index
    if index is not None and index.version == saved:
        return index
    return PatchIndex.load(folder) or index


def exact_scores(
    vectors: VectorStore,
    locations: list[tuple[int, int, int]],
    scorer: Scorer,
    phrase: np.ndarray,
    others: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, exact scores) of the images at `locations`, reading only their vectors. Small
    chunks (a re-rank's candidates lie one or two per shard) are scored together, up to
    SCORE_IMAGES: each scorer call costs a padded GEMM block (`gemm_rows`, whose rows score
    the same in any batch), 3-8 ms that ~180 calls paid one by one. A scan's chunks (whole
    shards) are scored one by one as they come."""
    ids: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    batch: list[ShardVectors] = []

    def score() -> None:
        cls, patches = batch[0].cls, batch[0].patches
        if len(batch) > 1:
            cls = np.concatenate([c.cls for c in batch])
            patches = np.concatenate([c.patches for c in batch])
        scores.append(np.asarray(scorer(cls, patches, phrase, others)))
        ids.extend(c.image_ids for c in batch)
        batch.clear()

    chunks: Iterator[ShardVectors] = vectors.iter_live(locations)
    for chunk in chunks:  # streamed: a scan's chunk is scored before the next is read
        if batch and sum(len(c.image_ids) for c in batch) + len(chunk.image_ids) > SCORE_IMAGES:
            score()
        batch.append(chunk)
        if sum(len(c.image_ids) for c in batch) >= SCORE_IMAGES:
            score()
    if batch:
        score()
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(ids).astype(np.int64), np.concatenate(scores)


def candidates(
    patch_index: PatchIndex,
    cls_search: Callable[[np.ndarray, int], np.ndarray],
    phrase: np.ndarray,
    budget: Budget,
) -> np.ndarray:
    """Ids to pre-score: best by patches ∪ best by [CLS] (sorted, unique)."""
    q = np.asarray(phrase, np.float32).reshape(-1)
    by_patch = patch_index.best_images(q, budget.patch_hits, budget.from_patches)
    by_cls = cls_search(q, budget.from_cls) if budget.from_cls > 0 else np.zeros(0, np.int64)
    return np.union1d(by_patch, np.asarray(by_cls, np.int64))


def skyband(m: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """Positions of the points that fewer than `k` others dominate (m and c both at least as
    high): every top k of any score non-decreasing in both lies among them."""
    order = np.lexsort((-c, -m))  # by m, best first; equal m: by c
    keep = np.zeros(len(m), bool)
    best_c: list[float] = []  # the k highest c seen so far (a min-heap)
    for i in order:
        ci = float(c[i])
        if len(best_c) < k or ci >= best_c[0]:  # ties kept: the final order breaks them
            keep[i] = True
        if len(best_c) < k:
            heapq.heappush(best_c, ci)
        elif ci > best_c[0]:
            heapq.heapreplace(best_c, ci)
    return np.nonzero(keep)[0]


def search(
    library: Any,
    phrase: np.ndarray,
    others: np.ndarray | None,
    scorer: Scorer,
    limit: int | None,
    budget: Budget | None = None,
    exact_below: int | None = None,
    progress: Progress = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, exact scores) of the images to rank for a text search: every image of a small
    library (or when every image is asked for), else the ANN candidates re-ranked. `library` is
    the `Searcher`: its store, vectors, vectors_dir, cached `_text_index` and [CLS] index.
    Nothing is built or written here (see the module's docstring); what the indexes do not
    hold yet is said through `progress`'s note."""
    store, vectors = library.store, library.vectors
    version = store.data_version()
    index = current(library._text_index, VectorsLayout(library.vectors_dir).text)
    library._text_index = index
    if index is not None and index.version == version:
        n = len(index.ids)
    else:
        n = store.indexed_count()
    threshold = EXACT_BELOW if exact_below is None else exact_below
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    if limit is None or n < threshold:
        return exact_scores(vectors, store.live_locations(), scorer, phrase, others)
    if index is None:
        note(
            f"the text index is not built yet: scanning all {n:,} images exactly (slow; "
            "`piaa index` builds it)",
            progress,
        )
        return exact_scores(vectors, store.live_locations(), scorer, phrase, others)
    # Images indexed since the index was saved: pre-scored exactly beside its candidates;
    # rows it holds that changed since (re-encoded, removed) are not its to answer for.
    if index.version == version:
        gone, fresh = np.zeros(0, np.int64), []
    else:
        stale, fresh = store.changes_since(index.ids, index.shards, index.max_shard)
        gone = index.ids[stale]
        if fresh or len(gone):
            note(
                f"the text index is being updated: {len(fresh):,} images it does not hold "
                "yet are scored exactly",
                progress,
            )
    cls_index = library._similar_index()

    def by_cls(q: np.ndarray, k: int) -> np.ndarray:
        if cls_index is None:  # not built yet: the patch index's candidates alone
            return np.zeros(0, np.int64)
        # An IVF probes lists holding ~4k images (the default probes too few for k in the
        # thousands); a full probe of 100k [CLS] vectors costs tens of ms.
        nlist = cls_index.parts.nlist
        nprobe = max(similar.NPROBE, math.ceil(4 * k * nlist / max(1, len(cls_index.ids))))
        return np.asarray(cls_index.search(q, k, nprobe=nprobe)[0], np.int64)

    pool = candidates(index, by_cls, phrase, budget or Budget.for_limit(limit, n))
    pool = pool[~np.isin(pool, gone)]
    located = index.locations(pool) + list(fresh)
    ids, best_patch, cls_sim = vectors.patch_maxima(located, phrase)
    where = {loc[0]: loc for loc in located}
    keep = np.sort(ids[skyband(best_patch, cls_sim, limit)])
    return exact_scores(vectors, [where[int(i)] for i in keep], scorer, phrase, others)
