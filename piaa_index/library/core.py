"""`Library`: the Python API. The CLI, the plugins and a DAM integration all call this.

    lib = Library.open()                       # PIAA_HOME / PIAA_DB / PIAA_MODEL …
    lib.index(["~/Pictures"])
    lib.set_vocabulary(["dog", "bicycle", "person"])
    lib.search("dog AND bicycle AND NOT person")

A vocabulary change makes the tags stale; the next query (or `fit()`) refits PVCL on the whole
collection and re-tags every image. Images indexed after a fit are tagged with the current
classifier at the next query, without refitting (`status()` says how many were added since).

`Library` is a façade over parts with one job each: `vocab` (piaa_index/library/vocabulary.py),
`tagger` (fit and tag, piaa_index/library/tagging.py), `searcher` (queries,
piaa_index/library/searching.py) and `maintenance` (vacuum and status,
piaa_index/library/maintenance.py). They share one `Resources` (piaa_index/library/resources.py:
the store, the model spec, the vector folder, and the vector store and encoder, loaded lazily
and once), and each is given the other parts it uses; none holds the Library.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.catalog.store import Store, VocabularyInfo
from piaa_index.config import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    ModelSpec,
    Settings,
    default_front_end,
)
from piaa_index.errors import LibraryError, UserInputError
from piaa_index.ingest.bounded import READ_TIMEOUT
from piaa_index.layout import DATABASE_MARKER
from piaa_index.library.maintenance import Maintenance
from piaa_index.library.resources import Resources, remember_database, sqlite_file_of
from piaa_index.library.searching import Searcher, TagMatrix
from piaa_index.library.tagging import FitReport, Tagger
from piaa_index.library.thumbnails import DEFAULT_SIZE as THUMBNAIL_SIZE
from piaa_index.library.thumbnails import Thumbnails
from piaa_index.library.vocabulary import VocabularyEditor
from piaa_index.method.open_pvcl import default_bank_size
from piaa_index.model import model_record
from piaa_index.vectors.shards import VectorStore

# Re-exported: the public names callers import from here.
__all__ = ["FitReport", "Library", "LibraryError", "UserInputError", "default_bank_size"]

if TYPE_CHECKING:
    from piaa_index.engines.base import IndexReport
    from piaa_index.library.evidence import Evidence
    from piaa_index.library.thumbnails import Thumbnail, Thumbnails
    from piaa_index.method.pvcl import Classifier
    from piaa_index.model.encoder import Encoder
    from piaa_index.plugins import Plugins
    from piaa_index.progress import Progress
    from piaa_index.xmp.sidecars import Sidecars


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
        # What the parts share; each part is given the other parts it uses, never the Library.
        self.resources = Resources(settings, store, spec, encoder_factory)
        self._plugins = plugins
        self.vocab = VocabularyEditor(self.resources)
        self.tagger = Tagger(self.resources, self.vocab)
        self.searcher = Searcher(self.resources, self.vocab, self.tagger)
        self.maintenance = Maintenance(self.resources, self.tagger)
        self._thumbnails: Thumbnails | None = None
        self._thumbnails_lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        return self.resources.settings

    @property
    def store(self) -> Store:
        return self.resources.store

    @property
    def spec(self) -> ModelSpec:
        return self.resources.spec

    @property
    def vectors_dir(self) -> Path:
        return self.resources.vectors_dir

    @property
    def _encoder_factory(self) -> Callable[[ModelSpec], Encoder] | None:
        return self.resources.encoder_factory

    @property
    def _encoder(self) -> Encoder | None:
        """The encoder if it is loaded already (None: not loaded; loads nothing)."""
        return self.resources.loaded_encoder

    @property
    def _vectors(self) -> VectorStore | None:
        """The vector store if it is open already (None: not opened; opens nothing)."""
        return self.resources.loaded_vectors

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
        sqlite_file = sqlite_file_of(settings.db_url)
        if sqlite_file is not None and not sqlite_file.exists():
            _refuse_lost_database(sqlite_file, settings.layout.vectors_root)
        store = Store.open(settings.db_url)
        vectors_dir = settings.layout.vectors(store.store_id).root
        if sqlite_file is not None and vectors_dir.is_dir():
            remember_database(sqlite_file, vectors_dir)
        stored = store.get_setting("model")
        # A checkpoint path is kept absolute: the library is opened from other folders too.
        asked_weights = settings.pretrained
        if asked_weights is not None and (path := model_record.checkpoint_path(asked_weights)):
            asked_weights = str(path)
        if stored is None:
            model_name = settings.model or DEFAULT_MODEL
            spec = ModelSpec(
                model=model_name,
                pretrained=asked_weights or DEFAULT_PRETRAINED,
                front_end=settings.front_end or default_front_end(model_name),
            )
        else:
            stored = cls._update_record(store, stored, asked_weights, settings.home)
            spec = ModelSpec(stored["model"], stored["pretrained"], stored["front_end"])
            asked = {
                "model": settings.model,
                "pretrained": asked_weights,
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

    def reopen(self) -> Library:
        """Another Library on the same database, home and model (its own connections, caches
        and encoder), for another thread: one Library serves one thread at a time."""
        return Library(
            self.settings,
            Store.open(self.settings.db_url),
            self.spec,
            encoder_factory=self.resources.encoder_factory,
            plugins=self._plugins,
        )

    @staticmethod
    def _update_record(
        store: Store, record: dict[str, Any], asked: str | None, home: Path
    ) -> dict[str, Any]:
        """Add the weights' hash to an older record; take a moved checkpoint with the same
        bytes (`--pretrained NEWPATH`), refuse one with other bytes."""
        updated = model_record.migrate(record, home)
        current = updated or record
        moved = (
            asked is not None
            and asked != current["pretrained"]
            and model_record.looks_like_file(asked)
            and model_record.looks_like_file(str(current["pretrained"]))
        )
        if moved:
            assert asked is not None
            updated = model_record.accept_moved(current, asked, home)
        if updated is None:
            return record
        store.set_setting("model", updated)
        return updated

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def encoder(self) -> Encoder:
        """The model, loaded on first use (indexing, fitting, text queries)."""
        return self.resources.encoder

    @property
    def plugins(self) -> Plugins:
        if self._plugins is None:
            from piaa_index.plugins import Plugins

            self._plugins = Plugins()
        return self._plugins

    @property
    def vectors(self) -> VectorStore:
        """The vector folder; the first index run records the model's identity in it."""
        return self.resources.vectors

    @property
    def thumbnails(self) -> Thumbnails:
        """This library's thumbnail maker (piaa_index/library/thumbnails.py), made on first
        use and once (under a lock: two first requests at once must not make two), so that
        concurrent decodes share one memory budget."""
        thumbs = self._thumbnails
        if thumbs is None:
            with self._thumbnails_lock:
                thumbs = self._thumbnails
                if thumbs is None:
                    thumbs = Thumbnails(self.store, self.settings.layout.thumbnails)
                    self._thumbnails = thumbs
        return thumbs

    def index(
        self,
        paths: Sequence[str | Path],
        prune: bool = False,
        progress: Progress = False,
        batch_size: int = 32,
        exclude: Sequence[str] = (),
        default_excludes: bool = True,
        follow_symlinks: bool = False,
        engine: str = "local",
        address: str | None = None,
        commit_every: int = 256,
        read_timeout: float = READ_TIMEOUT,
    ) -> IndexReport:
        """Index files and folders (recursive, incremental); see `IndexReport`.

        Folders are walked with the default excludes (NAS thumbnails, trash, hidden folders…;
        `piaa_index.ingest.scan.DEFAULT_EXCLUDES`), the gitignore-style `exclude` patterns and any
        `.piaaignore` file; only regular image files are read, the rest is counted.
        `engine="ray"` runs decode, encode and shard writes on a Ray cluster (`address`:
        `auto`, `ray://host:10001`; None starts a local one; docs/ray.md). `commit_every`
        images make one shard and one SQL commit. Reading and decoding one file is bounded by
        `read_timeout` seconds: a file on a hung network share is recorded as failed.
        """
        from piaa_index.engines import engine_for
        from piaa_index.engines.base import IndexJob
        from piaa_index.ingest.scan import PathError

        def vectors() -> VectorStore:
            if (
                self.resources.loaded_vectors is None
                and VectorStore.read_manifest(self.vectors_dir) is None
            ):
                self.resources.load_encoder(progress)  # a new library records its model first
            return self.vectors

        job = IndexJob(
            paths=tuple(paths),
            store=self.store,
            vectors=vectors,
            encoder=lambda: self.resources.load_encoder(progress),
            spec=self.spec,
            db_url=self.settings.db_url,
            prune=prune,
            exclude=tuple(exclude),
            default_excludes=default_excludes,
            follow_symlinks=follow_symlinks,
            batch_size=batch_size,
            commit_every=commit_every,
            read_timeout=read_timeout,
            address=address,
        )
        try:
            report = engine_for(engine).run(job, progress)
        except PathError as exc:
            raise UserInputError(str(exc)) from None
        self.update_indexes(progress)
        return report

    def update_indexes(self, progress: Progress = False) -> None:
        """Bring the [CLS] and text-search indexes up to date with the vectors: run by `index`,
        `fit` and `vacuum`, so that no query builds one (Searcher.update_indexes)."""
        if VectorStore.read_manifest(self.vectors_dir) is None:
            return  # nothing indexed yet
        with self.vectors.reading():  # the shards it reads stay while it reads them
            self.searcher.update_indexes(progress)

    # -- vocabulary (VocabularyEditor) ---------------------------------------------------------

    def vocabulary(self) -> VocabularyInfo | None:
        return self.vocab.vocabulary()

    def labels(self) -> list[str]:
        return self.vocab.labels()

    def set_vocabulary(
        self, labels: Sequence[str], templates: Sequence[str] | None = None
    ) -> VocabularyInfo:
        """Replace the vocabulary (a new version; tags become stale)."""
        return self.vocab.set_vocabulary(labels, templates)

    def add_labels(self, labels: Sequence[str]) -> VocabularyInfo:
        return self.vocab.add_labels(labels)

    def remove_labels(self, labels: Sequence[str]) -> VocabularyInfo:
        return self.vocab.remove_labels(labels)

    def set_preset(self, name: str) -> VocabularyInfo:
        return self.vocab.set_preset(name)

    def text_prototypes(self, vocab: VocabularyInfo) -> np.ndarray:
        """[C, d] text prototypes of the vocabulary's labels."""
        return self.vocab.text_prototypes(vocab)

    # -- fit and tag (Tagger) ------------------------------------------------------------------

    def is_stale(self) -> bool:
        """True when the vocabulary changed since the last fit (or nothing was fitted)."""
        return self.tagger.is_stale()

    def fit_classifier(
        self,
        vocab: VocabularyInfo,
        locations: list[tuple[int, int, int]],
        progress: Progress = False,
        bank_size: int | None = None,
    ) -> tuple[Classifier, np.ndarray, int]:
        """PVCL on the patches of `locations` (one streaming pass): (classifier, T, n patches)."""
        return self.tagger.fit_classifier(vocab, locations, progress, bank_size)

    def fit(
        self,
        progress: Progress = False,
        bank_size: int | None = None,
        engine: str = "local",
        address: str | None = None,
        full: bool = False,
    ) -> FitReport:
        """Fit PVCL on the collection's patch pool (one streaming pass), then re-tag everything
        (with `engine="ray"` the re-tag's scoring runs as Ray tasks; docs/ray.md). After a
        vocabulary change only the new labels are fitted unless `full` (`Tagger.fit`)."""
        report = self.tagger.fit(progress, bank_size, engine, address, full)
        self.update_indexes(progress)  # a library indexed before `index` built them
        return report

    def ensure_tags(self, progress: Progress = False) -> VocabularyInfo:
        """Refit when stale; tag images indexed since the last fit with the current classifier."""
        return self.tagger.ensure_tags(progress)

    # -- queries (Searcher) --------------------------------------------------------------------

    def query(self, name: str, **params: Any) -> list[dict[str, Any]]:
        """Run a registered query plugin by name (`tags`, `search`, `similar`, …)."""
        from piaa_index.plugins import PluginError, run_query

        try:
            return run_query(self, self.plugins, name, **params)
        except PluginError as exc:
            raise UserInputError(str(exc)) from None

    def image_id(self, path: str | Path) -> int:
        """The id of an indexed image, by path (as given, or resolved)."""
        return self.searcher.image_id(path)

    def tags(self, path: str | Path, progress: bool = False) -> list[dict[str, Any]]:
        """Every label's fused, patch and [CLS] score for one image, with the decision."""
        return self.searcher.tags(path, progress)

    def search(
        self, expression: str, limit: int | None = 20, include_absent: bool = False
    ) -> list[dict[str, Any]]:
        """Images matching a boolean label expression, ranked; each row has every label's score."""
        return self.searcher.search(expression, limit, include_absent)

    def present_tags(self) -> dict[str, list[tuple[str, float]]]:
        """path -> [(label, fused score)] of the labels decided present, best first."""
        return self.searcher.present_tags()

    def tag_matrix(self, labels: list[str] | None = None) -> TagMatrix:
        """Fused scores and decisions of `labels` (default: all) for every indexed image, as
        arrays: the public bulk read for plugins (no reaching into the store)."""
        return self.searcher.tag_matrix(labels)

    def text_search(
        self, text: str, limit: int | None = 20, progress: Progress = False
    ) -> list[dict[str, Any]]:
        """Open-vocabulary search: a phrase scored on the fly, no refit. `progress` says when
        the text index does not hold every image yet (an index run still going)."""
        return self.searcher.text_search(text, limit, progress)

    def similar(
        self, path: str | Path, limit: int | None = 20, progress: Progress = False
    ) -> list[dict[str, Any]]:
        """Nearest neighbours by [CLS] embedding (the image itself excluded)."""
        return self.searcher.similar(path, limit, progress)

    def evidence(self, image: int | str | Path, label: str) -> Evidence:
        """Where the fitted classifier sees `label` on an indexed image (by id or path): the
        per-patch evidence grid, whose max is the image's patch score, and the tag decision.
        Render it with `piaa_index.library.evidence.evidence_png`."""
        from piaa_index.library.evidence import evidence

        return evidence(self.resources, self.tagger, self.searcher, image, label)

    def thumbnail(
        self,
        image_id: int,
        size: int = THUMBNAIL_SIZE,
        lock: AbstractContextManager[Any] | None = None,
    ) -> Thumbnail:
        """An indexed image's EXIF-upright JPEG thumbnail (its longer side `size`: 128, 256,
        512 or 2048), cached on disk by content hash and made on first request; by id only
        (piaa_index/library/thumbnails.py). `lock`, when given, is held for the database lookup
        only (a server's lock around this Library): decoding a new thumbnail happens outside
        it, so it does not hold up other reads. Raises `SourceChanged` when the file is not the
        indexed content any more."""
        thumbs = self.thumbnails
        with lock if lock is not None else nullcontext():
            thumb, source = thumbs.locate(image_id, size)
        return thumbs.make(thumb, source)

    # -- the catalog, for plugins (docs/plugins.md: the plugin API) ----------------------------
    # What first-party and third-party plugins read and write, so that none reaches into the
    # store, the tagger or the vectors: each call is one store operation, named here once.

    def indexed_count(self) -> int:
        """How many images are indexed."""
        return self.store.indexed_count()

    def indexed_paths(self) -> list[str]:
        """Every indexed image's path, as stored."""
        return self.store.indexed_paths()

    def image_info(self, image_id: int) -> dict[str, Any] | None:
        """An indexed image's row (id, path, content hash, size, dimensions, indexed_at);
        None when no indexed image has that id."""
        return self.store.image_info(int(image_id))

    def image_refs(self, paths: Sequence[str]) -> dict[str, tuple[int, str | None]]:
        """path -> (image id, content hash) of those of `paths` that are indexed, as stored."""
        return self.store.image_refs(paths)

    def indexed_ids(self, ids: Sequence[int]) -> set[int]:
        """Which of `ids` are indexed images."""
        return self.store.indexed_ids(ids)

    def indexed_ids_by_path(self, paths: Sequence[str]) -> dict[str, int]:
        """path -> id of those of `paths` (exactly as stored) that are indexed images."""
        return self.store.indexed_ids_by_path(paths)

    def image_page(
        self, after: int, limit: int, since: int | None = None, upto: int | None = None
    ) -> tuple[list[dict[str, Any]], list[int], int | None]:
        """Indexed images with id > `after`, in id order (with `since`: those changed since
        that feed version, up to `upto`): (images, ids removed since, last id or None)."""
        return self.store.image_page(after, limit, since, upto)

    def newest_images(
        self, before: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Up to `limit` indexed images, latest indexed first, below `before`; where to go on."""
        return self.store.newest_images(before, limit)

    def feed_version(self) -> int:
        """The change feed's current version (`image_page(since=...)`)."""
        return self.store.feed_version()

    def present_tags_of(self, ids: Sequence[int]) -> dict[int, list[tuple[str, float]]]:
        """id -> [(label, score)] of the labels tagged present on each of `ids`, best first."""
        return self.store.present_tags_of(ids)

    def tag_counts(self) -> dict[str, int]:
        """Images tagged present, per label."""
        return self.store.tag_counts()

    def is_fitted(self) -> bool:
        """True once a classifier has been fitted (the vocabulary may have changed since:
        `is_stale`)."""
        return self.store.latest_classifier() is not None

    @property
    def auto_fit(self) -> bool:
        """Whether a query fits a stale vocabulary itself (the CLI) or answers 409 `needs_fit`
        (a server, where fits are jobs)."""
        return self.tagger.auto_fit

    @auto_fit.setter
    def auto_fit(self, value: bool) -> None:
        self.tagger.auto_fit = value

    # -- the user's own labels (piaa labels, the gallery's ✓/✗, piaa teach) --

    def user_labels_of(self, image_id: int) -> list[dict[str, Any]]:
        """The user's labels of one image: label, present, source, updated_at."""
        return list(self.store.user_labels_of(image_id))

    def user_label_page(
        self,
        after: tuple[int, str] | None,
        limit: int,
        label_key: str | None = None,
        source: str | None = None,
    ) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
        """Up to `limit` user labels after (image id, label key); where to go on."""
        return self.store.user_label_page(after, limit, label_key, source)

    def set_user_labels(self, rows: Sequence[tuple[int, str, bool]], source: str) -> int:
        """Store (image id, label, present) rows as the user's labels; the rows that changed."""
        return self.store.set_user_labels(rows, source)

    def forget_user_labels(self, image_ids: Sequence[int], label: str | None = None) -> int:
        """Forget the user's labels of these images (of one label, or all); how many."""
        return self.store.forget_user_labels(image_ids, label)

    def labels_changed(self) -> bool:
        """True when the user's labels changed since the last fit (`fit` learns from them)."""
        return self.tagger.labels_changed()

    def teach(
        self, name: str, examples: Sequence[int], counter_examples: Sequence[int] = ()
    ) -> dict[str, Any]:
        """Store the concept `name` learnt from example images (ids) and the examples as the
        user's labels; a `fit` then tags with it (piaa_index/library/teaching.py)."""
        from piaa_index.library.teaching import teach

        return teach(self.store, self.vectors, name, examples, counter_examples)

    def sidecars(self) -> Sidecars:
        """The XMP sidecars of this library's images: export our keywords, undo them."""
        from piaa_index.xmp.sidecars import Sidecars

        return Sidecars(self.store)

    # -- API keys of `piaa serve` --

    def add_api_key(self, key_hash: str, prefix: str, scope: str, name: str | None) -> int:
        return self.store.add_api_key(key_hash, prefix, scope, name)

    def api_keys(self) -> list[dict[str, Any]]:
        return self.store.api_keys()

    def revoke_api_key(self, key_id: int) -> bool:
        return self.store.revoke_api_key(key_id)

    def api_key_scope(self, key_hash: str) -> str | None:
        """The scope of a live key, by its hash; None for an unknown or revoked key."""
        return self.store.api_key_scope(key_hash)

    def live_api_keys(self) -> int:
        return self.store.live_api_keys()

    # -- maintenance (Maintenance) -------------------------------------------------------------

    def vacuum(self, min_live: float = 0.5, small: int = 64, group: int = 256) -> dict[str, int]:
        """Rewrite shards that are mostly dead rows (pruned or re-encoded images) or small."""
        done = self.maintenance.vacuum(min_live, small, group)
        self.update_indexes()  # the rows moved to new shards
        return done

    def status(self) -> dict[str, Any]:
        """Counts, model, vocabulary, classifier version and staleness."""
        return self.maintenance.status()

    def check(self, progress: bool = False) -> dict[str, Any]:
        """Verify the database and the vector shards; damaged shards' images are re-encoded by
        the next index run."""
        report = self.maintenance.check(progress)
        self.update_indexes(progress)  # rebuilds what the check found damaged and removed
        return report


def _refuse_lost_database(sqlite_file: Path, vectors_root: Path) -> None:
    if not vectors_root.is_dir():
        return
    for marker in sorted(vectors_root.glob(f"*/{DATABASE_MARKER}")):
        try:
            named = json.loads(marker.read_text())["path"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if named == str(sqlite_file):
            folder = marker.parent
            shards = len(list(folder.glob("*.cls.faiss")))
            raise LibraryError(
                f"the database {sqlite_file} is missing, but its vectors are in {folder} "
                f"({shards} shards): restore the database file from a backup; to start a new, "
                "empty library instead, move that folder away first"
            )
