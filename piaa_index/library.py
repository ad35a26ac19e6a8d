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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Fitted:
    """A classifier with what is needed to tag: text prototypes and thresholds."""

    id: int
    classifier: Classifier
    text_protos: np.ndarray
    thresholds: np.ndarray


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

    # -- indexing ------------------------------------------------------------------------------

    def index(
        self,
        paths: Sequence[str | Path],
        prune: bool = False,
        progress: bool = False,
        batch_size: int = 32,
    ) -> IndexReport:
        """Index files and folders (recursive, incremental); see `IndexReport`."""
        from piaa_index.indexer import Indexer, PathError

        indexer = Indexer(self.store, self.vectors, lambda: self.encoder, batch_size=batch_size)
        try:
            return indexer.run(paths, prune=prune, progress=progress)
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
        """Fit PVCL on the collection's patch pool (one streaming pass), then re-tag everything."""
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

    def _tag_all(
        self,
        vocab: VocabularyInfo,
        classifier: Classifier,
        T: np.ndarray,
        locations: list[tuple[int, int, int]],
        progress: bool,
        fit_seconds: float,
    ) -> tuple[_Fitted, dict[str, int]]:
        from piaa_index import fusion
        from piaa_index.schema import Classifier as ClassifierRow

        evidence: list[np.ndarray] = []  # [N, C] float32: all the thresholds need in memory
        names = vocab.names
        label_ids = [lb.id for lb in vocab.labels]

        def batches() -> Iterator[list[dict]]:
            for chunk in self._stream(locations, progress, "tagging"):
                S, E, Cs = self._scores(chunk, classifier, T)
                evidence.append(E.astype(np.float32))
                yield _tag_rows(chunk.image_ids, vocab, 0, S, E, Cs, np.zeros(E.shape, bool))

        def thresholds_after() -> dict[int, float]:
            # Present/absent is decided on the patch evidence m, not the fused S: S sums to one
            # over labels, so it shrinks as an image holds more objects (docs/method.md).
            E = np.concatenate(evidence) if evidence else np.zeros((0, len(names)), np.float32)
            # Without return_info, decision_thresholds returns the [C] array alone.
            found = cast(np.ndarray, fusion.decision_thresholds(E))
            return {lid: float(t) for lid, t in zip(label_ids, found, strict=True)}

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
            thresholds=None,
            weights=_pack(classifier, T),
        )
        classifier_id = self.store.replace_classifier_and_tags(row, batches(), thresholds_after)
        thresholds = np.asarray(row.thresholds, dtype=np.float64)
        tagged = self.store.tag_counts()
        counts = {name: tagged.get(name, 0) for name in names}
        fitted = _Fitted(classifier_id, classifier, T, thresholds)
        return fitted, counts

    def _current(self) -> _Fitted | None:
        row = self.store.latest_classifier()
        if row is None:
            return None
        classifier, T = _unpack(row.weights)
        return _Fitted(row.id, classifier, T, np.asarray(row.thresholds, dtype=np.float64))

    def ensure_tags(self, progress: bool = False) -> VocabularyInfo:
        """Refit when stale; tag images indexed since the last fit with the current classifier."""
        return self._ensure_fitted(progress)[0]

    def _ensure_fitted(self, progress: bool = False) -> tuple[VocabularyInfo, _Fitted]:
        """`ensure_tags`, also handing back the classifier it checked (loaded once)."""
        vocab = self._require_vocabulary()
        if self.is_stale():
            self.fit(progress=progress)
        fitted = self._current()
        assert fitted is not None
        todo = set(self.store.untagged_image_ids(fitted.id))
        if not todo:
            return vocab, fitted
        from piaa_index import fusion

        locations = [loc for loc in self.store.live_locations() if loc[0] in todo]
        rows: list[dict] = []
        for chunk in self._stream(locations, progress, "tagging new images"):
            S, E, Cs = self._scores(chunk, fitted.classifier, fitted.text_protos)
            present = fusion.decide(E, fitted.thresholds)
            rows.extend(_tag_rows(chunk.image_ids, vocab, fitted.id, S, E, Cs, present))
        self.store.add_tags(rows)
        return vocab, fitted

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
        vocab, fitted = self._ensure_fitted(progress)
        thresholds = dict(zip(vocab.names, fitted.thresholds, strict=True))
        stored_path = self.store.paths([image_id])[image_id]
        return [
            {
                "path": stored_path,
                "label": name,
                "score": score,
                "patch_score": patch,
                "cls_score": cls_score,
                "present": present,
                "threshold": float(thresholds.get(name, float("nan"))),
            }
            for name, score, patch, cls_score, present in self.store.tags_of(image_id)
        ]

    def search(
        self, expression: str, limit: int | None = 20, include_absent: bool = False
    ) -> list[dict[str, Any]]:
        """Images matching a boolean label expression, ranked; each row has every label's score.

        Matching uses the tag decisions; ranking uses the fused scores (AND = weakest label).
        With `include_absent`, non-matching images are ranked too (below the matches).
        """
        from piaa_index.query_language import QueryError, normalize_label, parse

        vocab = self._require_vocabulary()
        try:
            node = parse(expression, known_labels=vocab.names)
        except QueryError as exc:
            raise UserInputError(str(exc)) from None
        self.ensure_tags()
        # The parser normalises names; rows show them as the vocabulary spells them.
        by_key = {normalize_label(lb.name): lb for lb in vocab.labels}
        wanted = sorted(by_key[key].name for key in node.labels())
        label_ids = {by_key[normalize_label(n)].name: by_key[normalize_label(n)].id for n in wanted}
        table = self.store.tag_table(list(label_ids.values()))
        hits = []
        for image_id, per_label in table.items():
            scores = {n: per_label.get(i, (0.0, False))[0] for n, i in label_ids.items()}
            present = {n: per_label.get(i, (0.0, False))[1] for n, i in label_ids.items()}
            match = node.evaluate(present)
            if match or include_absent:
                unit = {n: min(1.0, max(0.0, v)) for n, v in scores.items()}
                hits.append((match, node.score(unit), image_id, scores, present))
        hits.sort(key=lambda h: (not h[0], -h[1], h[2]))
        if limit is not None:
            hits = hits[:limit]
        paths = self.store.paths([h[2] for h in hits])
        return [
            {
                "path": paths[image_id],
                "score": round(score, 6),
                "match": match,
                "labels": {
                    n: {"score": round(scores[n], 6), "present": present[n]} for n in wanted
                },
            }
            for match, score, image_id, scores, present in hits
        ]

    def text_search(self, text: str, limit: int | None = 20) -> list[dict[str, Any]]:
        """Open-vocabulary search: a phrase scored on the fly, no refit.

        Max over patches and the [CLS] branch are fused as in PAA, with the phrase contrasted
        against the vocabulary's labels when there is one (plain cosine otherwise).
        """
        text = " ".join(text.split())
        if not text:
            raise UserInputError("empty search text")
        locations = self.store.live_locations()
        if not locations:
            return []
        vocab = self.store.vocabulary()
        phrase = self.encoder.text_prototypes(
            [text], vocab.templates if vocab else _default_templates()
        )
        others: np.ndarray | None = None
        if vocab is not None and vocab.labels:
            keep = [i for i, name in enumerate(vocab.names) if name.lower() != text.lower()]
            others = self.text_prototypes(vocab)[keep] if keep else None
        ids, scores = [], []
        for chunk in self.vectors.iter_live(locations):
            scores.append(_open_vocabulary_scores(chunk.cls, chunk.patches, phrase, others))
            ids.append(chunk.image_ids)
        return self._top(np.concatenate(ids), np.concatenate(scores), limit)

    def similar(self, path: str | Path, limit: int | None = 20) -> list[dict[str, Any]]:
        """Nearest neighbours by [CLS] embedding (the image itself excluded)."""
        p = Path(path).expanduser()
        query_id: int | None = None
        try:
            query_id = self.image_id(p)
        except UserInputError:
            if not p.is_file():
                raise
        locations = self.store.live_locations()
        if query_id is not None:
            loc = next(loc for loc in locations if loc[0] == query_id)
            q, _ = self.vectors.vectors_for(*loc)
        else:
            from piaa_index.images import ImageDecodeError, load_image

            try:
                img = load_image(p)
            except ImageDecodeError as exc:
                raise UserInputError(f"{path}: {exc}") from None
            q = self.encoder.encode_images(self.encoder.preprocess(img)[None])[0][0]
        ids, sims = [], []
        for chunk in self.vectors.iter_live(locations, with_patches=False):
            ids.append(chunk.image_ids)
            sims.append(chunk.cls @ q)
        all_ids, all_sims = np.concatenate(ids), np.concatenate(sims)
        if query_id is not None:
            keep = all_ids != query_id
            all_ids, all_sims = all_ids[keep], all_sims[keep]
        return self._top(all_ids, all_sims, limit)

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
        from sqlalchemy import update

        from piaa_index.schema import Image

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
                with self.store.session() as s:
                    for row_no, image_id in enumerate(ids):
                        s.execute(
                            update(Image)
                            .where(Image.id == image_id)
                            .values(shard=new, shard_row=row_no)
                        )
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
        counts = self.store.image_counts()
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
                "tagged": self.store.tag_counts(),
            }
        return out


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
    """[N] scores of a phrase (fusion.open_vocabulary_scores); `others` is deliberately unused:
    the score must not depend on which vocabulary is set (issue 8)."""
    from piaa_index import fusion

    prm = fusion.PaaParams()
    return fusion.open_vocabulary_scores(cls, patches, phrase[0], prm.alpha, prm.batch_images)


def _tag_rows(
    image_ids: np.ndarray,
    vocab: VocabularyInfo,
    classifier_id: int,
    S: np.ndarray,
    E: np.ndarray,
    Cs: np.ndarray,
    present: np.ndarray,
) -> list[dict]:
    label_ids = [lb.id for lb in vocab.labels]
    rows = []
    for r, image_id in enumerate(image_ids):
        for c, label_id in enumerate(label_ids):
            rows.append(
                {
                    "image_id": int(image_id),
                    "label_id": label_id,
                    "classifier_id": classifier_id,
                    "score": float(S[r, c]),
                    "patch_score": float(E[r, c]),
                    "cls_score": float(Cs[r, c]),
                    "present": bool(present[r, c]),
                }
            )
    return rows


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
