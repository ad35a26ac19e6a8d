"""Read-only answers that read the vector files: `similar` of an indexed image and text
search, for a fresh CLI process (issue 23). They use what `readonly.py` uses (SQLite through
`sqlite3`, no SQLAlchemy) plus the saved [CLS] and patch indexes, the memory-mapped shards and
the cached numpy text tower (no torch).

Each returns None whenever the `Library` must answer instead: anything `Library.open` would
write, a derived index not built yet (the Library scans exactly and says so), no cached text
tower yet (the Library loads the model once and caches it), a path that is not an indexed
image (the Library encodes a new file or names the problem). Images indexed or removed since
an index was saved are handled as the Library handles them (`Store.changes_since` through
the read-only twin): the new ones compared exactly, the changed rows left out, and said
through `progress`. The rows are the ones `Searcher.similar` and `Searcher.text_search`
return; tests/test_readonly_vectors.py checks both paths against each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from piaa_index.catalog.readonly import ReadOnlyStore, _in_snapshot, _marker_current, open_vectors
from piaa_index.catalog.status import INDEXED
from piaa_index.config import DEFAULT_TEMPLATES, ModelSpec, Settings
from piaa_index.layout import VectorsLayout
from piaa_index.progress import Progress
from piaa_index.vectors.similar import ClsIndex, neighbours


def similar(
    settings: Settings, path: str, limit: int | None, progress: Progress = False
) -> list[dict[str, Any]] | None:
    """`Searcher.similar`'s rows for an indexed image, from the saved [CLS] index (images it
    does not hold yet compared exactly, as the Library does, and said through `progress`)."""
    from piaa_index.query.engine import path_candidates

    def read(store: ReadOnlyStore) -> list[dict[str, Any]] | None:
        found = next(filter(None, map(store.image_by_path, path_candidates(path))), None)
        if found is None or found[1] != INDEXED:
            return None
        opened = _vectors(settings, store)
        if opened is None:
            return None
        vectors, _model = opened
        index = ClsIndex.load(VectorsLayout(vectors.root).similar, mapped=True)
        located = store.location(found[0])
        if index is None or located is None:
            return None  # not built yet: the Library scans exactly and says so
        q = vectors.read_shard(located[0], [located[1]], with_patches=False).cls[0]
        ids, sims = neighbours(index, q, store, vectors, limit, progress)
        keep = ids != found[0]
        return _top(store, ids[keep], sims[keep], limit)

    return _in_snapshot(settings, read)


def text_search(
    settings: Settings, text: str, limit: int | None, progress: Progress = False
) -> list[dict[str, Any]] | None:
    """`Searcher.text_search`'s rows when the library's text tower is cached (else None): the
    saved indexes' candidates, plus the images they do not hold yet scored exactly, as the
    Library does (and says through `progress`). An empty phrase is left to the Library."""
    from piaa_index.method.fusion import phrase_scores
    from piaa_index.model import text_tower
    from piaa_index.vectors import text_search as ann

    text = " ".join(text.split())
    if not text:
        return None

    def read(store: ReadOnlyStore) -> list[dict[str, Any]] | None:
        opened = _vectors(settings, store)
        if opened is None:
            return None
        vectors, model = opened
        layout = VectorsLayout(vectors.root)
        n = store.indexed_count()
        spec = ModelSpec(model["model"], model["pretrained"], model["front_end"])
        cached = text_tower.cache_path(settings.home, spec, model)
        tower = text_tower.load_text_tower(cached) if cached is not None else None
        if tower is None:
            return None
        if n == 0:
            return []
        searcher = _Searcher(store, vectors, vectors.root, None)
        if limit is not None and n >= ann.EXACT_BELOW:
            searcher._text_index = ann.PatchIndex.load(layout.text)
            searcher.cls_index = ClsIndex.load(layout.similar, mapped=True)
            if searcher._text_index is None:
                return None  # not built yet: the Library scans exactly and says so
        phrase = tower.text_prototypes([text], list(DEFAULT_TEMPLATES))[0]
        with vectors.reading():  # the shards of the candidates stay while they are read
            ids, scores = ann.search(
                searcher, phrase, None, phrase_scores, limit, progress=progress
            )
        return _top(store, np.asarray(ids, np.int64), np.asarray(scores), limit)

    return _in_snapshot(settings, read)


@dataclass
class _Searcher:
    """What `vectors.text_search.search` reads from the `Searcher` it is given."""

    store: ReadOnlyStore
    vectors: Any
    vectors_dir: Path
    _text_index: Any
    cls_index: Any = None

    def _similar_index(self) -> Any:
        return self.cls_index


def _vectors(settings: Settings, store: ReadOnlyStore) -> tuple[Any, dict[str, Any]] | None:
    """(the library's VectorStore opened without writing, its model record), or None where
    opening the Library would write first (the database marker, a manifest to create or
    upgrade) or refuse (a damaged or mismatched manifest). Leftover shards or score files are
    no matter here: a query reads only what the catalog and its current indexes point at."""
    store_id, model = store.get_setting("store_id"), store.get_setting("model")
    if store_id is None or not model:
        return None
    if not {"model", "pretrained", "front_end"} <= set(model):
        return None
    vectors_dir = settings.layout.vectors(str(store_id["uuid"])).root
    if not _marker_current(store, settings.db_url, vectors_dir):
        return None
    vectors = open_vectors(store, vectors_dir, model)
    if vectors is None:
        return None
    return vectors, model


def _top(
    store: ReadOnlyStore, ids: np.ndarray, scores: np.ndarray, limit: int | None
) -> list[dict[str, Any]]:
    """As `Searcher._top`: best first, ties by id, with stored paths."""
    order = np.lexsort((ids, -scores))
    if limit is not None:
        order = order[:limit]
    paths = store.paths([int(ids[i]) for i in order])
    return [{"path": paths[int(ids[i])], "score": round(float(scores[i]), 6)} for i in order]
