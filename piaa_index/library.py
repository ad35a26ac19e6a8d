"""`Library`: the Python API. The CLI, the plugins and a DAM integration all call this.

    lib = Library.open()                       # PIAA_HOME / PIAA_DB / PIAA_MODEL …
    lib.index(["~/Pictures"])
    lib.set_vocabulary(["dog", "bicycle", "person"])
    lib.search("dog AND bicycle AND NOT person")

A vocabulary change makes the tags stale; the next query (or `fit()`) refits PVCL on the whole
collection and re-tags every image. Images indexed after a fit are tagged with the current
classifier at the next query, without refitting (`status()` says how many were added since).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from piaa_index import text_search as _text_search
from piaa_index.config import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    ModelSpec,
    Settings,
    default_front_end,
)
from piaa_index.errors import PiaaError, UsageError
from piaa_index.store import Store, VocabularyInfo, utcnow
from piaa_index.vectors import VectorStore

if TYPE_CHECKING:
    from piaa_index.encoder import Encoder
    from piaa_index.indexer import IndexReport
    from piaa_index.plugins import Plugins
    from piaa_index.pvcl import Classifier
    from piaa_index.scores import ScoreView, Segment


class LibraryError(PiaaError):
    """A user-facing problem: bad query, unknown label, no vocabulary, model mismatch…"""


class UserInputError(UsageError, LibraryError):
    """The user asked for something malformed or unknown (CLI exit code 2)."""


@dataclass
class FitReport:
    classifier_id: int
    n_images: int
    n_patches: int
    seconds: float
    bank_sizes: dict[str, int]
    kept_sizes: dict[str, int]
    weak_labels: list[str]
    thresholds: dict[str, float]
    tagged_present: dict[str, int] = field(default_factory=dict)
    fit_seconds: float = 0.0  # the streaming PVCL pass
    tag_seconds: float = 0.0  # the re-tag pass writing the score matrix and sparse tags

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Fitted:
    """A classifier with what is needed to tag: text prototypes and thresholds."""

    id: int
    classifier: Classifier
    text_protos: np.ndarray
    thresholds: np.ndarray


@dataclass
class _State:
    """What queries need, valid while the catalog version is `version`."""

    version: int
    vocab: VocabularyInfo
    fitted: _Fitted
    view: ScoreView
    image_counts: dict[str, int]
    pending: int  # indexed images not scored yet (only when loaded without scoring)


class _NotReady(Exception):
    """The scores need a fit or new rows scored, which the caller does not want to do."""


class Library:
    """One photo collection: SQL metadata + FAISS vectors + (lazily) the encoder."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        spec: ModelSpec,
        encoder_factory: Callable[[ModelSpec], Encoder] | None = None,
        plugins: Plugins | None = None,
    ):
        self.settings = settings
        self.store = store
        self.spec = spec
        self._encoder_factory = encoder_factory
        self._encoder: Encoder | None = None
        self._vectors: VectorStore | None = None
        self._plugins = plugins
        self.vectors_dir = settings.home / "vectors" / store.store_id
        # Query caches, checked against SQL's catalog version (see `_state`).
        self._cache: _State | None = None
        self._fitted_cache: _Fitted | None = None
        self._similar: Any = None
        self._text_index: Any = None  # text_search's patch index (piaa_index/text_search.py)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        home: str | Path | None = None,
        db: str | None = None,
        model: str | None = None,
        pretrained: str | None = None,
        front_end: str | None = None,
        device: str | None = None,
        plugins: Plugins | None = None,
        encoder_factory: Callable[[ModelSpec], Encoder] | None = None,
    ) -> Library:
        """Open (creating if needed) the library; refuse a model other than the index's."""
        settings = Settings.resolve(home, db, model, pretrained, front_end, device)
        store = Store.open(settings.db_url)
        stored = store.get_setting("model")
        if stored is None:
            model_name = settings.model or DEFAULT_MODEL
            spec = ModelSpec(
                model=model_name,
                pretrained=settings.pretrained or DEFAULT_PRETRAINED,
                front_end=settings.front_end or default_front_end(model_name),
            )
        else:
            spec = ModelSpec(stored["model"], stored["pretrained"], stored["front_end"])
            asked = {
                "model": settings.model,
                "pretrained": settings.pretrained,
                "front_end": settings.front_end,
            }
            clashes = [
                f"{key} {value!r} (index: {stored[key]!r})"
                for key, value in asked.items()
                if value is not None and value != stored[key]
            ]
            if clashes:
                raise LibraryError(
                    "this library was indexed with another model: asked for "
                    + ", ".join(clashes)
                    + "; use another --home/--db for a different model"
                )
        return cls(settings, store, spec, encoder_factory=encoder_factory, plugins=plugins)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def encoder(self) -> Encoder:
        """The model, loaded on first use (indexing, fitting, text queries)."""
        if self._encoder is None:
            if self._encoder_factory is not None:
                self._encoder = self._encoder_factory(self.spec)
            else:
                from piaa_index.encoder import Encoder

                self._encoder = Encoder(self.spec, device=self.settings.device)
        return self._encoder

    @property
    def plugins(self) -> Plugins:
        if self._plugins is None:
            from piaa_index.plugins import Plugins

            self._plugins = Plugins()
        return self._plugins

    @property
    def vectors(self) -> VectorStore:
        """The vector folder; the first index run records the model's identity in it."""
        if self._vectors is None:
            manifest = VectorStore.read_manifest(self.vectors_dir)
            if manifest is None and self.store.referenced_shards():
                # The database has images but this home has none of their vectors: a wrong
                # --home (or another machine). Refuse rather than re-encode the collection.
                raise LibraryError(
                    f"this database's vectors are not in {self.vectors_dir}; use the --home "
                    "(PIAA_HOME) the index was made with, or copy its vectors/ folder there"
                )
            if manifest is None:
                identity = self.encoder.identity()
                self.store.set_setting(
                    "model",
                    {
                        "model": self.spec.model,
                        "pretrained": self.spec.pretrained,
                        "front_end": self.spec.front_end,
                        "identity": identity,
                    },
                )
            else:
                identity = manifest["identity"]
            # The patch codec applies to a new index only; an existing one keeps its own.
            codec = os.environ.get("PIAA_VECTOR_CODEC") or None
            try:
                self._vectors = VectorStore.open(self.vectors_dir, identity, codec)
            except ValueError as exc:
                raise UserInputError(str(exc)) from None
            self._reconcile()
            self._reconcile_scores()
        return self._vectors

    def _reconcile(self) -> None:
        """Make SQL and the vector files agree after a crash (SQL is the source of truth)."""
        from piaa_index.vectors import LockedError

        assert self._vectors is not None
        try:
            # Under the writer lock: an index run in progress owns shards it has written but
            # not yet committed, and they must not be mistaken for a crash's orphans.
            with self._vectors.writer_lock():
                _orphans, missing = self._vectors.reconcile(self.store.referenced_shards())
        except LockedError:
            return
        if missing:
            self.store.mark_shards_missing(missing)

    def _reconcile_scores(self) -> None:
        """Delete score folders and segments SQL does not point at (a fit or a scoring pass cut
        short before its commit, or a replaced classifier's files)."""
        from piaa_index.scores import cleanup, writer_lock

        if not self.scores_dir.is_dir():
            return
        with writer_lock(self.scores_dir, blocking=False) as locked:
            if locked:  # a writer at work owns its uncommitted files
                cleanup(self.scores_dir, self.store.score_folders())

    # -- indexing ------------------------------------------------------------------------------

    def index(
        self,
        paths: Sequence[str | Path],
        prune: bool = False,
        progress: bool = False,
        batch_size: int = 32,
        exclude: Sequence[str] = (),
        default_excludes: bool = True,
        follow_symlinks: bool = False,
    ) -> IndexReport:
        """Index files and folders (recursive, incremental); see `IndexReport`.

        Folders are walked with the default excludes (NAS thumbnails, trash, hidden folders…;
        `piaa_index.scan.DEFAULT_EXCLUDES`), the gitignore-style `exclude` patterns and any
        `.piaaignore` file; only regular image files are read, the rest is counted.
        """
        from piaa_index.indexer import Indexer
        from piaa_index.scan import PathError

        if batch_size < 1:
            raise UserInputError(f"batch size must be at least 1, not {batch_size}")
        indexer = Indexer(self.store, self.vectors, lambda: self.encoder, batch_size=batch_size)
        try:
            return indexer.run(
                paths,
                prune=prune,
                progress=progress,
                exclude=exclude,
                default_excludes=default_excludes,
                follow_symlinks=follow_symlinks,
            )
        except PathError as exc:
            raise UserInputError(str(exc)) from None

    # -- vocabulary ----------------------------------------------------------------------------

    def vocabulary(self) -> VocabularyInfo | None:
        return self.store.vocabulary()

    def labels(self) -> list[str]:
        vocab = self.store.vocabulary()
        return vocab.names if vocab else []

    def set_vocabulary(
        self, labels: Sequence[str], templates: Sequence[str] | None = None
    ) -> VocabularyInfo:
        """Replace the vocabulary (a new version; tags become stale)."""
        names = _clean_labels(labels)
        if templates is None:
            current = self.store.vocabulary()
            templates = current.templates if current else _default_templates()
        templates = list(templates)
        for template in templates:
            if "{}" not in template:
                raise UserInputError(f"prompt template {template!r} has no '{{}}' for the label")
        current = self.store.vocabulary()
        if current and current.names == names and current.templates == templates:
            return current
        return self.store.new_vocabulary(names, templates)

    def add_labels(self, labels: Sequence[str]) -> VocabularyInfo:
        current = self.labels()
        new = [x for x in _clean_labels(labels) if x not in current]
        return self.set_vocabulary(current + new)

    def remove_labels(self, labels: Sequence[str]) -> VocabularyInfo:
        current = self.labels()
        gone = _clean_labels(labels)
        unknown = [x for x in gone if x not in current]
        if unknown:
            raise UserInputError(f"not in the vocabulary: {', '.join(unknown)}")
        return self.set_vocabulary([x for x in current if x not in gone])

    def set_preset(self, name: str) -> VocabularyInfo:
        from piaa_index.presets import preset_classes

        try:
            classes = preset_classes(name)
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
        return self.set_vocabulary(classes)

    def _require_vocabulary(self) -> VocabularyInfo:
        vocab = self.store.vocabulary()
        if vocab is None or not vocab.labels:
            raise UserInputError(
                "the vocabulary is empty: set one with `piaa vocab set LABEL...` "
                "or `piaa vocab preset voc|coco|nus`"
            )
        return vocab

    # -- fit and tag ---------------------------------------------------------------------------

    def text_prototypes(self, vocab: VocabularyInfo) -> np.ndarray:
        """[C, d] text prototypes of the vocabulary's labels (per-label templates honoured)."""
        # One batched text pass per distinct template list (usually one for the whole vocabulary).
        protos = np.zeros((len(vocab.labels), self.encoder.dim), dtype=np.float32)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, lb in enumerate(vocab.labels):
            groups.setdefault(tuple(lb.templates), []).append(i)
        for templates, rows in groups.items():
            names = [vocab.labels[i].name for i in rows]
            protos[rows] = self.encoder.text_prototypes(names, list(templates))
        return protos

    def is_stale(self) -> bool:
        """True when the vocabulary changed since the last fit (or nothing was fitted)."""
        vocab = self.store.vocabulary()
        latest = self.store.latest_classifier()
        return vocab is not None and (latest is None or latest.vocabulary_id != vocab.id)

    def fit_classifier(
        self,
        vocab: VocabularyInfo,
        locations: list[tuple[int, int, int]],
        progress: bool = False,
        bank_size: int | None = None,
    ) -> tuple[Classifier, np.ndarray, int]:
        """PVCL on the patches of `locations` (one streaming pass): (classifier, T, n patches)."""
        from piaa_index.pvcl import BankBuilder, PvclParams, fit_from_banks

        if not locations:
            raise UserInputError("no indexed images: run `piaa index PATH` first")
        T = self.text_prototypes(vocab)
        if bank_size is None:
            pool = len(locations) * self.vectors.n_patches
            bank_size = default_bank_size(pool, len(vocab.labels))
        params = PvclParams(bank_size=bank_size)
        builder = BankBuilder(T, bank_size=params.bank_size, text_scale=params.text_scale)
        n_patches = 0
        for chunk in self._stream(locations, progress, "fitting"):
            flat = chunk.patches.reshape(-1, chunk.patches.shape[-1])
            builder.update(flat)
            n_patches += len(flat)
        return fit_from_banks(builder.banks(), T, params), T, n_patches

    def fit(self, progress: bool = False, bank_size: int | None = None) -> FitReport:
        """Fit PVCL on the collection's patch pool (one streaming pass), then re-tag everything
        (a second pass writing the score matrix)."""
        vocab = self._require_vocabulary()
        locations = self.store.live_locations()
        started = time.perf_counter()
        classifier, T, n_patches = self.fit_classifier(vocab, locations, progress, bank_size)
        fit_seconds = time.perf_counter() - started
        fitted, present = self._tag_all(vocab, classifier, T, locations, progress, fit_seconds)
        names = vocab.names
        return FitReport(
            classifier_id=fitted.id,
            n_images=len(locations),
            n_patches=n_patches,
            seconds=round(time.perf_counter() - started, 3),
            bank_sizes=dict(zip(names, classifier.bank_sizes, strict=True)),
            kept_sizes=dict(zip(names, classifier.kept_sizes, strict=True)),
            weak_labels=[names[c] for c in classifier.weak_labels],
            thresholds={n: float(t) for n, t in zip(names, fitted.thresholds, strict=True)},
            tagged_present=present,
            fit_seconds=round(fit_seconds, 3),
            tag_seconds=round(time.perf_counter() - started - fit_seconds, 3),
        )

    def _stream(self, locations: list[tuple[int, int, int]], progress: bool, desc: str) -> Iterator:
        import sys

        from tqdm import tqdm

        with tqdm(
            total=len(locations), unit="img", desc=desc, file=sys.stderr, disable=not progress
        ) as bar:
            for chunk in self.vectors.iter_live(locations):
                yield chunk
                bar.update(len(chunk.image_ids))

    def _scores(
        self, chunk: Any, classifier: Classifier, T: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fused, patch evidence, cls scores) for one chunk of images."""
        from piaa_index import fusion

        scores = fusion.score_images(chunk.cls, chunk.patches, T, classifier)
        return scores.fused, scores.patch, scores.cls

    @property
    def scores_dir(self) -> Path:
        from piaa_index.scores import scores_root

        return scores_root(self.vectors_dir)

    def _write_segment(
        self,
        key: str,
        segment: str,
        n_labels: int,
        fitted: tuple[Classifier, np.ndarray],
        locations: list[tuple[int, int, int]],
        thresholds: np.ndarray | None,
        progress: bool,
        desc: str,
    ) -> np.ndarray:
        """Score `locations` in one streaming pass into a durable segment; returns the
        thresholds (computed from this segment's evidence when not given)."""
        from piaa_index import fusion
        from piaa_index.scores import SegmentWriter

        classifier, T = fitted
        writer = SegmentWriter(self.scores_dir / key, segment, len(locations), n_labels)
        try:
            for chunk in self._stream(locations, progress, desc):
                S, E, Cs = self._scores(chunk, classifier, T)
                shards = np.full(len(chunk.image_ids), chunk.shard, dtype=np.int32)
                writer.write(chunk.image_ids, shards, S, E, Cs)
            if thresholds is None:
                # Present/absent is decided on the patch evidence m, not the fused S: S sums to
                # one over labels, so it shrinks as an image holds more objects (docs/method.md).
                thresholds = cast(np.ndarray, fusion.decision_thresholds(writer.evidence))
            writer.finish(thresholds)
        except BaseException:
            writer.abort()
            raise
        return np.asarray(thresholds, dtype=np.float64)

    def _tag_all(
        self,
        vocab: VocabularyInfo,
        classifier: Classifier,
        T: np.ndarray,
        locations: list[tuple[int, int, int]],
        progress: bool,
        fit_seconds: float,
    ) -> tuple[_Fitted, dict[str, int]]:
        from piaa_index.schema import Classifier as ClassifierRow
        from piaa_index.scores import Segment, cleanup, new_key, writer_lock

        names = vocab.names
        label_ids = [lb.id for lb in vocab.labels]
        key, segment = new_key(), "seg000001"
        with writer_lock(self.scores_dir):
            # Files durable first; the SQL commit below is what makes them the current scores.
            thresholds = self._write_segment(
                key, segment, len(names), (classifier, T), locations, None, progress, "tagging"
            )
            seg = Segment.open(self.scores_dir / key, segment)
            row = ClassifierRow(
                vocabulary_id=vocab.id,
                created_at=utcnow(),
                n_images=len(locations),
                n_patches=len(locations) * self.vectors.n_patches,
                fit_seconds=fit_seconds,
                report={
                    "bank_sizes": classifier.bank_sizes,
                    "kept_sizes": classifier.kept_sizes,
                    "weak_labels": classifier.weak_labels,
                    "params": classifier.params,
                },
                thresholds=[float(t) for t in thresholds],
                weights=_pack(classifier, T),
            )
            classifier_id = self.store.install_classifier(
                row, key, [segment], _present_triples(seg, label_ids)
            )
            cleanup(self.scores_dir, self.store.score_folders())
        self._cache = None
        fitted = _Fitted(classifier_id, classifier, T, thresholds)
        self._fitted_cache = fitted
        counts = [int(np.count_nonzero(seg.mats["present"][c])) for c in range(len(names))]
        return fitted, dict(zip(names, counts, strict=True))

    def _fitted_for(self, row: Any) -> _Fitted:
        """The classifier of an SQL row, unpacked once per classifier version."""
        cached = self._fitted_cache
        if cached is not None and cached.id == row.id:
            return cached
        classifier, T = _unpack(row.weights)
        fitted = _Fitted(row.id, classifier, T, np.asarray(row.thresholds, dtype=np.float64))
        self._fitted_cache = fitted
        return fitted

    def _open_view(self, row: Any) -> ScoreView | None:
        from piaa_index.scores import ScoreView

        if not row.scores_key or not row.score_segments:
            return None
        try:
            return ScoreView.open(
                self.scores_dir / row.scores_key, row.scores_key, row.score_segments
            )
        except (OSError, ValueError):
            return None  # lost or damaged: re-scored with the stored classifier

    def _sync_view(self, view: ScoreView) -> list[tuple[int, int, int]]:
        """Mask rows SQL no longer vouches for; return the images still to score.

        Cheap path: images in shards newer than any scored row (each index commit writes a new
        shard) supersede their old rows, and if the counts then agree with SQL nothing was
        removed. Otherwise (prune, lost shard, failed re-encode) compare (id, shard) pairs with
        every indexed image once.
        """
        new = self.store.locations_after(view.max_shard)
        if new:
            new_ids = np.fromiter((loc[0] for loc in new), np.int64, len(new))
            view.invalidate(view.valid & np.isin(view.ids, new_ids))
        if view.n_valid + len(new) == self.store.indexed_count():
            return new
        live = self.store.live_locations()
        live_arr = np.asarray(live, dtype=np.int64).reshape(-1, 3)
        base = int(max(view.max_shard, int(live_arr[:, 1].max(initial=0)))) + 1
        live_keys = live_arr[:, 0] * base + live_arr[:, 1]
        view_keys = view.ids * base + view.shards
        view.invalidate(view.valid & ~np.isin(view_keys, live_keys))
        held = np.isin(live_keys, view_keys[view.valid])
        return [live[i] for i in np.nonzero(~held)[0]]

    def _state(self, progress: bool = False, score_new: bool = True) -> _State:
        """The current classifier and score matrix, cached until the catalog version moves.

        Refits when the vocabulary changed; scores images indexed (or re-encoded) since, as a
        new segment. One indexed SELECT per call when nothing changed.
        """
        from piaa_index.scores import new_key, segment_name, writer_lock

        while True:
            version = self.store.data_version()
            cached = self._cache
            if cached is not None and cached.version == version:
                if cached.pending == 0 or not score_new:
                    return cached
            vocab = self._require_vocabulary()
            if self.is_stale():
                if not score_new:
                    raise _NotReady
                self.fit(progress=progress)
                continue
            row = self.store.latest_classifier()
            assert row is not None
            fitted = self._fitted_for(row)
            view = self._open_view(row)
            todo = self._sync_view(view) if view is not None else self.store.live_locations()
            if view is not None and (not todo or not score_new):
                counts = self.store.image_counts()
                self._cache = _State(version, vocab, fitted, view, counts, len(todo))
                return self._cache
            if not score_new:
                raise _NotReady
            with writer_lock(self.scores_dir):
                # Another writer may have moved on meanwhile: only write on top of what is
                # still the latest commit, else look again.
                again = self.store.latest_classifier()
                if (
                    again is None
                    or again.id != row.id
                    or again.score_segments != row.score_segments
                ):
                    continue
                label_ids = [lb.id for lb in vocab.labels]
                pair = (fitted.classifier, fitted.text_protos)
                if view is None or not row.scores_key:
                    key, segments = new_key(), []
                else:
                    key, segments = row.scores_key, list(row.score_segments or [])
                name = segment_name(segments)
                self._write_segment(
                    key,
                    name,
                    len(label_ids),
                    pair,
                    todo,
                    fitted.thresholds,
                    progress,
                    "tagging new images",
                )
                from piaa_index.scores import Segment

                seg = Segment.open(self.scores_dir / key, name)
                self.store.commit_segment(
                    row.id,
                    segments + [name],
                    [loc[0] for loc in todo],
                    _present_triples(seg, label_ids),
                    key=key if view is None else None,
                )

    def ensure_tags(self, progress: bool = False) -> VocabularyInfo:
        """Refit when stale; tag images indexed since the last fit with the current classifier."""
        return self._state(progress).vocab

    def _ensure_fitted(self, progress: bool = False) -> tuple[VocabularyInfo, _Fitted]:
        """`ensure_tags`, also handing back the classifier it checked (loaded once)."""
        state = self._state(progress)
        return state.vocab, state.fitted

    # -- queries -------------------------------------------------------------------------------

    def query(self, name: str, **params: Any) -> list[dict[str, Any]]:
        """Run a registered query plugin by name (`tags`, `search`, `similar`, …)."""
        from piaa_index.plugins import PluginError, run_query

        try:
            return run_query(self, self.plugins, name, **params)
        except PluginError as exc:
            raise UserInputError(str(exc)) from None

    def image_id(self, path: str | Path) -> int:
        """The id of an indexed image, by path (as given, or resolved)."""
        from piaa_index.schema import INDEXED

        resolved = str(Path(path).expanduser().resolve())
        row = self.store.image_by_path(resolved) or self.store.image_by_path(str(path))
        if row is None:
            raise UserInputError(f"not in the index: {path} (run `piaa index` on its folder)")
        if row.status != INDEXED:
            raise UserInputError(f"{path} could not be indexed: {row.error}")
        return row.id

    def tags(self, path: str | Path, progress: bool = False) -> list[dict[str, Any]]:
        """Every label's fused, patch and [CLS] score for one image, with the decision (each row
        also carries the image's stored path, so rows stand on their own in `--json` output)."""
        image_id = self.image_id(path)
        state = self._state(progress)
        found = state.view.row_of(image_id)
        if found is None:
            raise UserInputError(f"{path} has no scores yet; run `piaa fit`")
        seg, r = found
        S = np.asarray(seg.mats["S"][:, r], dtype=np.float64)
        E = np.asarray(seg.mats["E"][:, r], dtype=np.float64)
        Cs = np.asarray(seg.mats["C"][:, r], dtype=np.float64)
        present = np.asarray(seg.mats["present"][:, r], dtype=bool)
        stored_path = self.store.paths([image_id])[image_id]
        thresholds = state.fitted.thresholds
        order = np.lexsort((np.arange(len(S)), -S))  # best first, vocabulary order on ties
        return [
            {
                "path": stored_path,
                "label": state.vocab.labels[c].name,
                "score": float(S[c]),
                "patch_score": float(E[c]),
                "cls_score": float(Cs[c]),
                "present": bool(present[c]),
                "threshold": float(thresholds[c]),
            }
            for c in order
        ]

    def search(
        self, expression: str, limit: int | None = 20, include_absent: bool = False
    ) -> list[dict[str, Any]]:
        """Images matching a boolean label expression, ranked; each row has every label's score.

        Matching uses the tag decisions; ranking uses the fused scores (AND = weakest label).
        With `include_absent`, non-matching images are ranked too (below the matches).
        The expression is compiled once to numpy over the score matrix; paths are fetched for
        the returned rows only.
        """
        from piaa_index.query_engine import compile_query, top_k
        from piaa_index.query_language import QueryError, normalize_label, parse

        vocab = self._require_vocabulary()
        try:
            node = parse(expression, known_labels=vocab.names)
        except QueryError as exc:
            raise UserInputError(str(exc)) from None
        state = self._state()
        view = state.view
        plan = compile_query(node)
        # The parser normalises names; rows show them as the vocabulary spells them.
        column = {normalize_label(lb.name): c for c, lb in enumerate(state.vocab.labels)}
        present = {key: view.column("present", column[key]) for key in plan.labels}
        fused = {key: view.column("S", column[key]) for key in plan.labels}
        match, score = plan.run(present, fused)
        match = match & view.valid
        hit_rows = np.nonzero(match)[0]
        rows = hit_rows[top_k(view.ids[hit_rows], score[hit_rows], limit)]
        if include_absent and (limit is None or len(rows) < limit):
            rest = np.nonzero(view.valid & ~match)[0]
            more = None if limit is None else limit - len(rows)
            rows = np.concatenate([rows, rest[top_k(view.ids[rest], score[rest], more)]])
        ids = [int(i) for i in view.ids[rows]]
        paths = self.store.paths(ids)
        wanted = sorted((state.vocab.labels[column[key]].name, key) for key in plan.labels)
        return [
            {
                "path": paths[image_id],
                "score": round(float(score[r]), 6),
                "match": bool(match[r]),
                "labels": {
                    name: {
                        "score": round(float(fused[key][r]), 6),
                        "present": bool(present[key][r]),
                    }
                    for name, key in wanted
                },
            }
            for r, image_id in zip(rows, ids, strict=True)
        ]

    def present_tags(self) -> dict[str, list[tuple[str, float]]]:
        """path -> [(label, fused score)] of the labels decided present, best first, for every
        indexed image (from SQL's sparse tags: one join, no score matrix needed)."""
        self.ensure_tags()
        out: dict[str, list[tuple[str, float]]] = {p: [] for p in self.store.indexed_paths()}
        for path, name, score in self.store.present_tags():
            if path in out:
                out[path].append((name, score))
        return out

    def text_search(self, text: str, limit: int | None = 20) -> list[dict[str, Any]]:
        """Open-vocabulary search: a phrase scored on the fly, no refit.

        Max over patches and the [CLS] branch are fused as in PAA, with the phrase contrasted
        against the vocabulary's labels when there is one (plain cosine otherwise).
        """
        text = " ".join(text.split())
        if not text:
            raise UserInputError("empty search text")
        if self._text_index is None and not self.store.indexed_count():
            return []
        vocab = self.store.vocabulary()
        phrase = self.encoder.text_prototypes(
            [text], vocab.templates if vocab else _default_templates()
        )
        others: np.ndarray | None = None
        if vocab is not None and vocab.labels:
            keep = [i for i, name in enumerate(vocab.names) if name.lower() != text.lower()]
            others = self.text_prototypes(vocab)[keep] if keep else None
        # Large libraries: ANN candidates (patch index + [CLS] index) re-ranked exactly.
        ids, scores = _text_search.search(self, phrase, others, _open_vocabulary_scores, limit)
        return self._top(ids, scores, limit)

    def similar(self, path: str | Path, limit: int | None = 20) -> list[dict[str, Any]]:
        """Nearest neighbours by [CLS] embedding (the image itself excluded), from the FAISS
        index kept beside the shards (`piaa_index/similar.py`)."""
        p = Path(path).expanduser()
        query_id: int | None = None
        try:
            query_id = self.image_id(p)
        except UserInputError:
            if not p.is_file():
                raise
        index = self._similar_index()
        if query_id is not None:
            loc = self.store.location(query_id)
            if loc is None:
                raise UserInputError(f"not in the index: {path}")
            q = self.vectors.read_shard(loc[0], [loc[1]], with_patches=False).cls[0]
        else:
            from piaa_index.images import ImageDecodeError, load_image

            try:
                img = load_image(p)
            except ImageDecodeError as exc:
                raise UserInputError(f"{path}: {exc}") from None
            q = self.encoder.encode_images(self.encoder.preprocess(img)[None])[0][0]
        # A few extra so that the query image and ties at the cut do not shorten the list.
        want = len(index.ids) if limit is None else limit + 1 + 8
        ids, sims = index.search(q, want)
        if query_id is not None:
            keep = ids != query_id
            ids, sims = ids[keep], sims[keep]
        return self._top(ids, sims, limit)

    def _similar_index(self) -> Any:
        """The [CLS] FAISS index, built on first use and synced with the catalog after."""
        from piaa_index.similar import ClsIndex

        folder = self.vectors_dir / "similar"
        version = self.store.data_version()
        index = self._similar
        if index is None:
            index = ClsIndex.load(folder)
        if index is not None and index.version == version:
            self._similar = index
            return index
        if index is None or len(index.ids) > 2 * max(1, index.trained_on) + 10_000:
            # None yet, or an IVF trained on far fewer images than it holds: build afresh.
            live = self.store.live_locations()
            index = ClsIndex.build(self.vectors.dim, *self._cls_of(live))
        else:
            new = self.store.locations_after(index.max_shard)
            new_ids = np.fromiter((loc[0] for loc in new), np.int64, len(new))
            index.remove(np.isin(index.ids, new_ids))
            if len(index.ids) + len(new) != self.store.indexed_count():
                live = self.store.live_locations()
                arr = np.asarray(live, dtype=np.int64).reshape(-1, 3)
                base = int(max(index.max_shard, int(arr[:, 1].max(initial=0)))) + 1
                live_keys = arr[:, 0] * base + arr[:, 1]
                held_keys = index.ids * base + index.shards
                index.remove(~np.isin(held_keys, live_keys))
                held = np.isin(live_keys, index.ids * base + index.shards)
                new = [live[i] for i in np.nonzero(~held)[0]]
            index.add(*self._cls_of(new))
        index.version = version
        index.save(folder)
        self._similar = index
        return index

    def _cls_of(
        self, locations: list[tuple[int, int, int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, shards, [CLS] vectors) of these images, read without their patches."""
        ids, shards, vecs = [], [], []
        for chunk in self.vectors.iter_live(locations, with_patches=False):
            ids.append(chunk.image_ids)
            shards.append(np.full(len(chunk.image_ids), chunk.shard, np.int32))
            vecs.append(chunk.cls)
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, self.vectors.dim))
        return np.concatenate(ids), np.concatenate(shards), np.concatenate(vecs)

    def _similar_exact(self, path: str | Path, limit: int | None = 20) -> list[dict[str, Any]]:
        """The exact scan over every [CLS] vector (the reference `similar` is checked against)."""
        query_id = self.image_id(path)
        live = self.store.live_locations()
        loc = self.store.location(query_id)
        assert loc is not None
        q = self.vectors.read_shard(loc[0], [loc[1]], with_patches=False).cls[0]
        ids, _, vecs = self._cls_of(live)
        keep = ids != query_id
        return self._top(ids[keep], (vecs @ q)[keep], limit)

    def _top(self, ids: np.ndarray, scores: np.ndarray, limit: int | None) -> list[dict]:
        order = np.lexsort((ids, -scores))
        if limit is not None:
            order = order[:limit]
        paths = self.store.paths([int(ids[i]) for i in order])
        return [{"path": paths[int(ids[i])], "score": round(float(scores[i]), 6)} for i in order]

    # -- maintenance ---------------------------------------------------------------------------

    def vacuum(self, min_live: float = 0.5, small: int = 64, group: int = 256) -> dict[str, int]:
        """Rewrite shards that are mostly dead rows (pruned or re-encoded images) or small.

        Crash-safe like indexing: new shards are written first, SQL then points at them in
        one transaction, and only then are the old files deleted (a crash in between leaves
        orphans that the next open removes).
        """
        vectors = self.vectors
        before = vectors.disk_bytes()
        with vectors.writer_lock():
            live: dict[int, list[tuple[int, int]]] = {}
            for image_id, shard, row in self.store.live_locations():
                live.setdefault(shard, []).append((image_id, row))
            dead = [s for s in vectors.shard_ids() if s not in live]
            garbage = {
                s for s, rows in live.items() if len(rows) < min_live * vectors.shard_rows(s)
            }
            smalls = {s for s, rows in live.items() if len(rows) < small} - garbage
            # Small shards are merged with each other; a lone one has nothing to merge with.
            rewrite = sorted(garbage | (smalls if len(smalls) > 1 else set()))
            moved = 0
            batch: list[tuple[int, np.ndarray, np.ndarray]] = []

            def flush() -> None:
                nonlocal batch, moved
                if not batch:
                    return
                new = vectors.next_shard_id()
                ids = [b[0] for b in batch]
                vectors.write_shard(
                    new, ids, np.stack([b[1] for b in batch]), np.stack([b[2] for b in batch])
                )
                self.store.move_images(ids, new)
                moved += len(ids)
                batch = []

            for shard in rewrite:
                rows = sorted(live[shard], key=lambda t: t[1])
                got = vectors.read_shard(shard, [r for _, r in rows])
                for k, image_id in enumerate(got.image_ids):
                    batch.append((int(image_id), got.cls[k], got.patches[k]))
                    if len(batch) >= group:
                        flush()
            flush()
            for shard in rewrite + dead:
                vectors.delete_shard(shard)
        return {
            "shards_rewritten": len(rewrite),
            "shards_deleted": len(rewrite) + len(dead),
            "images_moved": moved,
            "bytes_before": before,
            "bytes_after": vectors.disk_bytes(),
        }

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counts, model, vocabulary, classifier version and staleness."""
        # Opening the vectors first reconciles them with SQL, so the counts are current.
        vectors_bytes = self.vectors.disk_bytes() if self.store.get_setting("model") else 0
        state: _State | None = None
        if self.store.latest_classifier() is not None:
            try:  # the cached matrix when current; never fits or scores from here
                state = self._state(score_new=False)
            except (_NotReady, UserInputError):
                state = None
        counts = state.image_counts if state is not None else self.store.image_counts()
        vocab = self.store.vocabulary()
        latest = self.store.latest_classifier()
        model = self.store.get_setting("model")
        indexed = counts.get("indexed", 0)
        out: dict[str, Any] = {
            "home": str(self.settings.home),
            "database": self.store.engine.url.render_as_string(hide_password=True),
            "schema_revision": self.store.schema_revision(),
            "model": model,
            "images": {
                "indexed": indexed,
                "failed": counts.get("failed", 0),
                "pending": counts.get("pending", 0) + counts.get("missing_vectors", 0),
            },
            "vectors_bytes": vectors_bytes,
            "vocabulary": {
                "version": vocab.id if vocab else None,
                "labels": vocab.names if vocab else [],
                "templates": vocab.templates if vocab else [],
            },
            "classifier": None,
            "stale": self.is_stale(),
        }
        if latest is not None:
            out["classifier"] = {
                "version": latest.id,
                "vocabulary_version": latest.vocabulary_id,
                "fitted_at": latest.created_at.isoformat(timespec="seconds"),
                "n_images": latest.n_images,
                "images_added_since": max(0, indexed - latest.n_images),
                "weak_labels": latest.report.get("weak_labels", []),
                "tagged": self._tagged_counts(state),
            }
        return out

    def _tagged_counts(self, state: _State | None) -> dict[str, int]:
        """Images decided present per label: the matrix's present bits when it is current,
        else the sparse SQL tags (the previous fit's, while the vocabulary is stale)."""
        if state is None:
            return self.store.tag_counts()
        counts = state.view.present_counts(len(state.vocab.labels))
        return {lb.name: int(n) for lb, n in zip(state.vocab.labels, counts, strict=True) if n}


# -- helpers -----------------------------------------------------------------------------------

# The paper's K = 512 patches per class is ~1% of a VOC-sized pool (5k images x 196 patches
# over 20 classes). Small libraries keep that proportion: with K = 512 on a 400-image pool the
# banks held half of all patches, background included, and the class means blurred.
PAPER_BANK_SIZE = 512
BANK_FRACTION = 1 / 50  # of the pool per class, at most
MIN_BANK_SIZE = 16


def default_bank_size(pool_patches: int, n_classes: int) -> int:
    """K per class: the paper's 512, or 1/50 of the pool per class when the pool is small."""
    per_class = int(pool_patches * BANK_FRACTION / max(1, n_classes))
    return max(MIN_BANK_SIZE, min(PAPER_BANK_SIZE, per_class))


def _default_templates() -> list[str]:
    from piaa_index.encoder import DEFAULT_TEMPLATES

    return list(DEFAULT_TEMPLATES)


def _clean_labels(labels: Sequence[str]) -> list[str]:
    """Whitespace-normalised labels, duplicates (case-insensitive) dropped, order kept."""
    seen: set[str] = set()
    out = []
    for raw in labels:
        name = " ".join(str(raw).split())
        if not name:
            raise UserInputError("empty label")
        if any(ch in name for ch in "()\"'&|!"):
            raise UserInputError(
                f"label {name!r} contains a character reserved by the query language"
            )
        if name.lower() in {"and", "or", "not"}:
            raise UserInputError(f"{name!r} is a query operator, not a label")
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out


def _open_vocabulary_scores(
    cls: np.ndarray, patches: np.ndarray, phrase: np.ndarray, others: np.ndarray | None
) -> np.ndarray:
    """[N] scores of a phrase: PAA's fusion of max patch evidence and [CLS] evidence.

    With other labels to contrast against, both branches are the phrase's softmax probability
    among them (as in the patch-text ablation); alone, plain cosines.
    """
    from piaa_index import fusion

    prm = fusion.PaaParams()
    if others is None:
        m = (patches @ phrase[0]).max(axis=1)
        c = cls @ phrase[0]
    else:
        T = np.vstack([phrase, others]).astype(np.float32)
        m = fusion.patch_text_evidence(patches, T, prm.text_scale, prm.batch_images)[:, 0]
        c = fusion.cls_scores(cls, T, prm.tau_cls)[:, 0]
    return prm.alpha * m + (1 - prm.alpha) * c


def _present_triples(
    seg: Segment, label_ids: Sequence[int], batch: int = 50_000
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image ids, label ids, fused scores) of a segment's present cells, in batches of images:
    the rows of SQL's sparse tags table."""
    labels = np.asarray(label_ids, dtype=np.int64)
    for start in range(0, len(seg.ids), batch):
        stop = start + batch
        c_idx, r_idx = np.nonzero(np.asarray(seg.mats["present"][:, start:stop]))
        if len(c_idx):
            S = np.asarray(seg.mats["S"][:, start:stop])
            yield seg.ids[start:stop][r_idx], labels[c_idx], S[c_idx, r_idx].astype(np.float64)


def _pack(classifier: Classifier, T: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, classifier=np.frombuffer(classifier.to_bytes(), dtype=np.uint8), text_protos=T)
    return buf.getvalue()


def _unpack(data: bytes) -> tuple[Classifier, np.ndarray]:
    import io

    from piaa_index.pvcl import Classifier

    with np.load(io.BytesIO(data)) as z:
        return Classifier.from_bytes(z["classifier"].tobytes()), z["text_protos"]
