"""Queries: the tags of an image, boolean label search over the score matrix, open-vocabulary
text search and similar images (a FAISS index over [CLS], `piaa_index/vectors/similar.py`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.catalog.schema import INDEXED
from piaa_index.errors import UserInputError
from piaa_index.layout import VectorsLayout
from piaa_index.library.part import Part
from piaa_index.library.vocabulary import default_templates
from piaa_index.progress import Progress, note
from piaa_index.query.engine import parse_query, path_candidates, search_rows, tag_rows
from piaa_index.query.language import normalize_label

if TYPE_CHECKING:
    from piaa_index.library.resources import Resources
    from piaa_index.library.tagging import Tagger
    from piaa_index.library.vocabulary import VocabularyEditor


@dataclass(frozen=True)
class TagMatrix:
    """Every indexed image's scores for some labels, for plugins and bulk readers: row i is
    image `image_ids[i]`, column j label `labels[j]` (ids ascending)."""

    image_ids: np.ndarray  # [n] int64
    labels: list[str]
    scores: np.ndarray  # [n, L] float32 fused scores
    present: np.ndarray  # [n, L] bool decisions


class Searcher(Part):
    """Answers queries; keeps the [CLS] similarity index once loaded."""

    def __init__(self, resources: Resources, vocab: VocabularyEditor, tagger: Tagger):
        super().__init__(resources)
        self.vocab = vocab
        self.tagger = tagger
        self._similar: Any = None
        self._text_index: Any = (
            None  # text search's patch index (piaa_index/vectors/text_search.py)
        )

    def image_id(self, path: str | Path) -> int:
        """The id of an indexed image, by path (as given, or resolved)."""

        given = Path(path).expanduser()
        row = None
        for candidate in path_candidates(path):
            row = self.store.image_by_path(candidate)
            if row is not None:
                break
        if row is None:
            # A typo or a folder is not a photo to index: say so (a photo deleted since it was
            # indexed was found above).
            if not str(path) or not os.path.exists(given):
                raise UserInputError(f"no such file: {str(path) or repr('')}")
            if os.path.isdir(given):
                raise UserInputError(f"{path} is a folder, not an image file")
            raise UserInputError(f"not in the index: {path} (run `piaa index` on its folder)")
        if row.status != INDEXED:
            raise UserInputError(f"{path} could not be indexed: {row.error}")
        return row.id

    def tags(self, path: str | Path, progress: bool = False) -> list[dict[str, Any]]:
        """Every label's fused, patch and [CLS] score for one image, with the decision (each row
        also carries the image's stored path, so rows stand on their own in `--json` output)."""
        return self.tags_of(self.image_id(path), progress, shown=str(path))

    def tags_of(
        self, image_id: int, progress: bool = False, shown: str | None = None
    ) -> list[dict[str, Any]]:
        """`tags` of an image by its id (HTTP clients and evidence maps know ids, not paths)."""
        state = self.tagger.state(progress)
        found = state.view.row_of(image_id)
        if found is None:
            raise UserInputError(
                f"{shown or f'image {image_id}'} has no scores yet; run `piaa fit`"
            )
        seg, r = found
        stored_path = self.store.paths([image_id])[image_id]
        return tag_rows(state.vocab.names, state.fitted.decisions, seg.mats, r, stored_path)

    def search(
        self, expression: str, limit: int | None = 20, include_absent: bool = False
    ) -> list[dict[str, Any]]:
        """Images matching a boolean label expression, ranked; each row has every label's score.

        Matching uses the tag decisions; ranking uses the fused scores (AND = weakest label).
        With `include_absent`, non-matching images are ranked too (below the matches).
        The expression is compiled once to numpy over the score matrix; paths are fetched for
        the returned rows only.
        """

        vocab = self.vocab.require_vocabulary()
        node = parse_query(expression, vocab.names)  # a bad query is named before any fit
        state = self.tagger.state()
        labels = [lb.name for lb in state.vocab.labels]
        return search_rows(node, labels, state.view, self.store.paths, limit, include_absent)

    def tag_matrix(self, labels: list[str] | None = None) -> TagMatrix:
        """The fused scores and decisions of `labels` (default: the whole vocabulary) for every
        indexed image, straight from the score matrix: one column read per label."""

        state = self.tagger.state()
        column = {normalize_label(lb.name): c for c, lb in enumerate(state.vocab.labels)}
        if labels is None:
            cols = list(range(len(state.vocab.labels)))
        else:
            unknown = [name for name in labels if normalize_label(name) not in column]
            if unknown:
                raise UserInputError(f"unknown label(s): {', '.join(unknown)}")
            cols = [column[normalize_label(name)] for name in labels]
        view = state.view
        rows = np.nonzero(view.valid)[0]
        rows = rows[np.argsort(view.ids[rows], kind="stable")]
        scores = np.empty((len(rows), len(cols)), np.float32)
        present = np.empty((len(rows), len(cols)), bool)
        for j, c in enumerate(cols):
            scores[:, j] = view.column("S", c)[rows]
            present[:, j] = view.column("present", c)[rows]
        names = [state.vocab.labels[c].name for c in cols]
        return TagMatrix(view.ids[rows].astype(np.int64), names, scores, present)

    def present_tags(self) -> dict[str, list[tuple[str, float]]]:
        """path -> [(label, fused score)] of the labels decided present, best first, for every
        indexed image (from SQL's sparse tags: one join, no score matrix needed)."""
        self.tagger.ensure_tags()
        out: dict[str, list[tuple[str, float]]] = {p: [] for p in self.store.indexed_paths()}
        for path, name, score in self.store.present_tags():
            if path in out:
                out[path].append((name, score))
        return out

    def text_search(
        self, text: str, limit: int | None = 20, progress: Progress = False
    ) -> list[dict[str, Any]]:
        """Open-vocabulary search: a phrase scored on the fly, no refit.

        PAA's weighting of max patch cosine and [CLS] cosine (`phrase_scores`), with the
        default prompt templates: the ranking does not depend on which vocabulary happens to be
        set, and cosines do not saturate into ties. Large libraries take candidates from a
        patch ANN index and the [CLS] index and re-rank them exactly (piaa_index/vectors/text_search.py).
        """
        from piaa_index.model import text_tower
        from piaa_index.vectors import text_search

        text = " ".join(text.split())
        if not text:
            raise UserInputError("empty search text")
        if self._text_index is None and not self.store.indexed_count():
            return []
        # The numpy text tower cached in the home (no torch import), else the Encoder, whose
        # text tower is then cached (piaa_index/model/text_tower.py); default templates either way.
        # A library given its own encoder factory uses that encoder, never a cached tower.
        custom = self.resources.encoder_factory is not None
        phrase = text_tower.phrase_prototype(
            text,
            default_templates,
            home=self.resources.settings.home,
            spec=self.resources.spec,
            record=None if custom else self.store.get_setting("model"),
            custom_encoder=custom,
            encoder=lambda: self.encoder,
        )
        with self.vectors.reading():  # the shards of the candidates stay while they are read
            ids, scores = text_search.search(
                self, phrase, None, phrase_scores, limit, progress=progress
            )
        return self._top(ids, scores, limit)

    def similar(
        self, path: str | Path, limit: int | None = 20, progress: Progress = False
    ) -> list[dict[str, Any]]:
        """Nearest neighbours by [CLS] embedding (the image itself excluded), from the FAISS
        index kept beside the shards (`piaa_index/vectors/similar.py`). Images the index does
        not hold yet (an index run still going) are compared exactly; with no index at all,
        every image is (and `progress` says so)."""
        p = Path(path).expanduser()
        query_id: int | None = None
        try:
            query_id = self.image_id(p)
        except UserInputError:
            if not p.is_file():
                raise
        from piaa_index.vectors.similar import neighbours

        if query_id is not None:
            loc = self.store.location(query_id)
            if loc is None:
                raise UserInputError(f"not in the index: {path}")
            q = self.vectors.read_shard(loc[0], [loc[1]], with_patches=False).cls[0]
        else:
            from piaa_index.ingest.images import ImageDecodeError, load_image

            try:
                img = load_image(p)
            except ImageDecodeError as exc:
                raise UserInputError(f"{path}: {exc}") from None
            q = self.encoder.encode_images(self.encoder.preprocess(img)[None])[0][0]
        ids, sims = neighbours(self._similar_index(), q, self.store, self.vectors, limit, progress)
        if query_id is not None:
            keep = ids != query_id
            ids, sims = ids[keep], sims[keep]
        return self._top(ids, sims, limit)

    def update_indexes(self, progress: Progress = False) -> None:
        """Bring the derived indexes up to date with the catalog and save them: the [CLS]
        index (`similar`, and text search's [CLS] candidates) and, from `EXACT_BELOW` images,
        text search's patch index. Part of `index`, `fit` and `vacuum`, never of a query, so a
        first query at a million images does not build for minutes (issue 23)."""
        from piaa_index.vectors import text_search
        from piaa_index.vectors.similar import restamp, saved_version

        # Current on disk, or untouched by what moved the catalog's version (a fit): nothing
        # to load (at 1M the two indexes are ~2 GB in memory).
        version, layout = self.store.data_version(), VectorsLayout(self.vectors_dir)
        n = self.store.indexed_count()

        def current(folder: Path, held: Any) -> bool:
            """Saved at this version, or re-stamped to it (`held`: the one in memory)."""
            saved = saved_version(folder)
            if saved == version:
                return True
            if saved is None or not restamp(folder, self.store, version):
                return False
            if held is not None and held.version == saved:
                held.version = version  # the one on disk, still current
            return True

        if (n or self._similar is not None) and not current(layout.similar, self._similar):
            self._similar = self._sync_similar(progress)
        if n >= text_search.EXACT_BELOW and not current(layout.text, self._text_index):
            self._text_index = text_search.sync(
                self._text_index, self.store, self.vectors, layout.text, progress
            )

    def _similar_index(self) -> Any:
        """The newest saved [CLS] index (None: not built yet); a query's step, it never
        builds or writes (`_sync_similar` does, for `update_indexes`)."""
        from piaa_index.vectors.similar import ClsIndex, saved_version

        folder = VectorsLayout(self.vectors_dir).similar
        saved = saved_version(folder)
        if saved is not None and (self._similar is None or self._similar.version != saved):
            self._similar = ClsIndex.load(folder) or self._similar
        return self._similar

    def _sync_similar(self, progress: Progress = False) -> Any:
        """The [CLS] index brought up to date with the catalog (built if there is none yet)
        and saved."""
        from piaa_index.vectors.similar import ClsIndex

        folder = VectorsLayout(self.vectors_dir).similar
        version = self.store.data_version()
        index = self._similar_index()
        if index is not None and index.version == version:
            return index
        if (
            index is None
            or len(index.ids) > 2 * max(1, index.trained_on) + 10_000
            or index.parts.needs_rebuild
        ):
            # None yet, an IVF trained on far fewer images than it holds, or one thinned out
            # into many parts: build afresh.
            note("building the similar-images index…", progress)
            live = self.store.live_locations()

            def rows(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                return self._cls_of([live[i] for i in pos.tolist()])

            index = ClsIndex.build_from(self.vectors.dim, len(live), rows, folder)
        else:
            stale, new = self.store.changes_since(index.ids, index.shards, index.max_shard)
            index.remove(stale)
            index.add(*self._cls_of(new))
        index.version = version
        index.save(folder)
        return index

    def _cls_of(
        self, locations: list[tuple[int, int, int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, shards, [CLS] vectors) of these images, read without their patches."""
        from piaa_index.vectors.similar import cls_of

        return cls_of(self.vectors, locations)

    def _top(self, ids: np.ndarray, scores: np.ndarray, limit: int | None) -> list[dict]:
        order = np.lexsort((ids, -scores))
        if limit is not None:
            order = order[:limit]
        paths = self.store.paths([int(ids[i]) for i in order])
        return [{"path": paths[int(ids[i])], "score": round(float(scores[i]), 6)} for i in order]


def phrase_scores(
    cls: np.ndarray, patches: np.ndarray, phrase: np.ndarray, _others: np.ndarray | None
) -> np.ndarray:
    """The exact score of a phrase on some images (text_search's scorer): PAA's weighting of
    max patch cosine and [CLS] cosine, fusion.open_vocabulary_scores."""
    from piaa_index.method import fusion

    prm = fusion.PaaParams()
    return fusion.open_vocabulary_scores(
        cls, patches, np.asarray(phrase).reshape(-1), prm.alpha, prm.batch_images
    )
