"""Fit and tag: PVCL fitted from the collection's patch pool, and every image's scores.

A vocabulary change makes the tags stale; the next query (or `fit()`) refits PVCL on the whole
collection and writes the score matrix (`piaa_index/scores.py`) in one streaming pass, with the
present tags in SQL. Images indexed after a fit are scored with the current classifier at the
next query, as a new segment, without refitting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.errors import LibraryError, UserInputError
from piaa_index.part import Part
from piaa_index.store import VocabularyInfo, utcnow

if TYPE_CHECKING:
    from piaa_index.decisions import Decisions
    from piaa_index.library import Library
    from piaa_index.progress import Progress
    from piaa_index.pvcl import Classifier
    from piaa_index.scores import ScoreView, Segment


@dataclass
class FitReport:
    classifier_id: int
    n_images: int
    n_patches: int
    seconds: float
    bank_sizes: dict[str, int]
    kept_sizes: dict[str, int]
    weak_labels: list[str]  # too little evidence: tagged only where the text support is sure
    thresholds: dict[str, float | None]  # None: an absent label, which no image reaches
    tagged_present: dict[str, int] = field(default_factory=dict)
    fit_seconds: float = 0.0  # the streaming PVCL pass
    tag_seconds: float = 0.0  # the re-tag pass writing the score matrix and sparse tags
    absent_labels: list[str] = field(default_factory=list)  # look absent: never tagged
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)  # status and numbers, by name
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Fitted:
    """A classifier with what is needed to tag: text prototypes and the tag rule."""

    id: int
    classifier: Classifier
    text_protos: np.ndarray
    decisions: Decisions

    @property
    def thresholds(self) -> np.ndarray:
        return self.decisions.thresholds


@dataclass
class State:
    """What queries need, valid while the catalog version is `version`."""

    version: int
    vocab: VocabularyInfo
    fitted: Fitted
    view: ScoreView
    image_counts: dict[str, int]
    pending: int  # indexed images not scored yet (only when loaded without scoring)


class NotReady(Exception):
    """The scores need a fit or new rows scored, which the caller does not want to do."""


class NeedsFit(LibraryError):
    """The vocabulary changed since the last fit and this Library does not fit on a read
    (`Tagger.auto_fit` off: the HTTP API fits in a background job instead)."""


class Tagger(Part):
    """Owns the classifier and the score matrix, cached against SQL's catalog version."""

    def __init__(self, library: Library):
        super().__init__(library)
        # Query caches, checked against SQL's catalog version (see `state`).
        self._cache: State | None = None
        self._fitted_cache: Fitted | None = None
        # A stale vocabulary refits on the next query (the CLI); off, it raises NeedsFit.
        self.auto_fit = True

    def is_stale(self) -> bool:
        """True when the vocabulary changed since the last fit (or nothing was fitted)."""
        vocab = self.store.vocabulary()
        latest = self.store.latest_classifier()
        return vocab is not None and (latest is None or latest.vocabulary_id != vocab.id)

    def fit_classifier(
        self,
        vocab: VocabularyInfo,
        locations: list[tuple[int, int, int]],
        progress: Progress = False,
        bank_size: int | None = None,
    ) -> tuple[Classifier, np.ndarray, int]:
        """PVCL on the patches of `locations` (one streaming pass): (classifier, T, n patches)."""
        classifier, T, n_patches, _support = self._fit_pass(vocab, locations, progress, bank_size)
        return classifier, T, n_patches

    def _fit_pass(
        self,
        vocab: VocabularyInfo,
        locations: list[tuple[int, int, int]],
        progress: Progress,
        bank_size: int | None,
    ) -> tuple[Classifier, np.ndarray, int, list[tuple[np.ndarray, np.ndarray]]]:
        """`fit_classifier`, also returning each chunk's (image ids, text support [n, C]): the
        pass computes every patch's text cosines for its banks, and the re-tag would otherwise
        compute them again (half of its GEMM work)."""
        from piaa_index.fusion import patch_text_cosines
        from piaa_index.open_pvcl import (
            LabelBanks,
            OpenParams,
            default_bank_size,
            fit_background,
            fit_open,
            sample_keys,
            sample_mask,
        )

        if not locations:
            raise UserInputError("no indexed images: run `piaa index PATH` first")
        T = self.library.vocab.text_prototypes(vocab)
        if bank_size is not None and bank_size < 1:
            raise UserInputError(f"bank size must be at least 1, not {bank_size}")
        M = self.vectors.n_patches
        pool = len(locations) * M
        params = OpenParams()
        if bank_size is None:
            bank_size = default_bank_size(pool, params)
        params = OpenParams(bank_size=bank_size)
        banks = LabelBanks(len(T), T.shape[1], bank_size)
        # The background's sample: whole images chosen by content hash, the same whatever the
        # vocabulary, the engine, the ids or the order of the shards.
        rate = min(1.0, params.sample / max(1, pool))
        hashes = self.store.content_hashes() if rate < 1.0 else {}
        sample: list[np.ndarray] = []
        n_patches = 0
        support = []
        for chunk in self.stream(locations, progress, "fitting"):
            n, M, d = chunk.patches.shape
            flat = np.asarray(chunk.patches, dtype=np.float32).reshape(n * M, d)
            sims = patch_text_cosines(flat, T)
            patch_ids = (chunk.image_ids.astype(np.int64)[:, None] * M + np.arange(M)).ravel()
            banks.update(flat, patch_ids, sims)
            if rate < 1.0:
                chosen = sample_mask(sample_keys(chunk.image_ids, hashes), rate)
                sample.append(flat.reshape(n, M, d)[chosen].reshape(-1, d))
            else:  # a small pool: every patch is in the sample
                sample.append(flat)
            # float32 cosines, exact: [N, C] of them is ~1/(4M) of the patch data.
            support.append((chunk.image_ids, sims.reshape(n, M, -1).max(axis=1)))
            n_patches += len(flat)
        pooled = np.concatenate(sample) if sample else np.empty((0, T.shape[1]), np.float32)
        background = fit_background(pooled, params)
        classifier = fit_open(banks.banks(), banks.cosines(), T, background, params)
        classifier.params["n_pool"] = n_patches
        return classifier, T, n_patches, support

    def fit(
        self,
        progress: Progress = False,
        bank_size: int | None = None,
        engine: str = "local",
        address: str | None = None,
    ) -> FitReport:
        """Fit PVCL on the collection's patch pool (one streaming pass), then re-tag everything
        (a second pass writing the score matrix; with `engine="ray"`, as Ray tasks)."""
        vocab = self.library.vocab.require_vocabulary()
        started = time.perf_counter()
        with self.vectors.reading(), _engine(engine, address) as ray:
            # (reading: a vacuum meanwhile must not delete these shards)
            locations = self.store.live_locations()
            classifier, T, n_patches, support = self._fit_pass(
                vocab, locations, progress, bank_size
            )
            fit_seconds = time.perf_counter() - started
            fitted, present = self._tag_all(
                vocab, classifier, T, locations, progress, fit_seconds, ray, support
            )
            del support
        names = vocab.names
        status = label_status(names, fitted.decisions)
        return FitReport(
            classifier_id=fitted.id,
            n_images=len(locations),
            n_patches=n_patches,
            seconds=round(time.perf_counter() - started, 3),
            bank_sizes=dict(zip(names, classifier.bank_sizes, strict=True)),
            kept_sizes=dict(zip(names, classifier.kept_sizes, strict=True)),
            weak_labels=[n for n in names if status[n]["status"] == "weak"],
            thresholds={
                n: float(t) if np.isfinite(t) else None
                for n, t in zip(names, fitted.thresholds, strict=True)
            },
            tagged_present=present,
            fit_seconds=round(fit_seconds, 3),
            tag_seconds=round(time.perf_counter() - started - fit_seconds, 3),
            absent_labels=[n for n in names if status[n]["status"] == "absent"],
            labels=status,
            warnings=list(fitted.decisions.info.get("warnings", [])),
        )

    def stream(
        self, locations: list[tuple[int, int, int]], progress: Progress, desc: str
    ) -> Iterator:
        from piaa_index.progress import progress_bar

        with progress_bar(len(locations), desc, progress) as advance:
            for chunk in self.vectors.iter_live(locations):
                yield chunk
                advance(len(chunk.image_ids))

    def _scores(
        self, chunk: Any, classifier: Classifier, T: np.ndarray, support: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(fused, patch evidence, cls scores, text support) for one chunk of images (`support`
        given when the fit's pass computed it)."""
        from piaa_index import fusion

        scores = fusion.score_images(chunk.cls, chunk.patches, T, classifier, support=support)
        assert scores.support is not None  # score_images always fills it
        return scores.fused, scores.patch, scores.cls, scores.support

    def _score_stream(
        self,
        locations: list[tuple[int, int, int]],
        classifier: Classifier,
        T: np.ndarray,
        progress: Progress,
        desc: str,
        ray: Any = None,
        support: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    ) -> Iterator[tuple[np.ndarray, int, tuple[np.ndarray, ...]]]:
        """(image ids, shard, scores) per chunk in shard order: here, or as Ray tasks when
        `ray` is a connected Ray module (piaa_index/ray_engine.py); the same chunks either way.
        `support`: the fit pass's (image ids, text support) per chunk, in the same order."""
        if ray is None:
            known = iter(support)
            for chunk in self.stream(locations, progress, desc):
                ids, U = next(known, (None, None))
                if ids is None or not np.array_equal(ids, chunk.image_ids):
                    U = None  # not the pass's chunk: compute it
                yield chunk.image_ids, chunk.shard, self._scores(chunk, classifier, T, U)
            return
        from piaa_index.progress import progress_bar
        from piaa_index.ray_engine import score_chunks
        from piaa_index.vectors import chunk_plan

        with progress_bar(len(locations), desc + " (ray)", progress) as advance:
            for ids, shard, scores in score_chunks(
                ray, self.library, chunk_plan(locations), classifier, T
            ):
                yield ids, shard, scores
                advance(len(ids))

    @property
    def scores_dir(self) -> Path:
        from piaa_index.scores import scores_root

        return scores_root(self.library.vectors_dir)

    def _write_segment(
        self,
        key: str,
        segment: str,
        n_labels: int,
        fitted: tuple[Classifier, np.ndarray],
        locations: list[tuple[int, int, int]],
        decisions: Decisions | None,
        progress: Progress,
        desc: str,
        ray: Any = None,
        support: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    ) -> Decisions:
        """Score `locations` in one streaming pass into a durable segment; returns the tag rule
        (fitted on this segment's scores when not given: the fit's re-tag)."""
        from piaa_index.decisions import open_decisions
        from piaa_index.scores import SegmentWriter

        classifier, T = fitted
        writer = SegmentWriter(self.scores_dir / key, segment, len(locations), n_labels)
        try:
            for ids, shard, (S, E, Cs, U) in self._score_stream(
                locations, classifier, T, progress, desc, ray, support
            ):
                writer.write(ids, np.full(len(ids), shard, dtype=np.int32), S, E, Cs, U)
            if decisions is None:
                # The one home of the tag rule (decisions.py, docs/method.md): per label, a
                # confidence calibrated on the collection's own scores; labels whose banks look
                # absent from the collection never tag.
                decisions = open_decisions(
                    writer.evidence,
                    writer.cls,
                    writer.support,
                    classifier.params.get("support") or {},
                )
            writer.finish(decisions)
        except BaseException:
            writer.abort()
            raise
        return decisions

    def _tag_all(
        self,
        vocab: VocabularyInfo,
        classifier: Classifier,
        T: np.ndarray,
        locations: list[tuple[int, int, int]],
        progress: Progress,
        fit_seconds: float,
        ray: Any = None,
        support: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    ) -> tuple[Fitted, dict[str, int]]:
        from piaa_index.schema import Classifier as ClassifierRow
        from piaa_index.scores import Segment, cleanup, new_key, writer_lock

        names = vocab.names
        label_ids = [lb.id for lb in vocab.labels]
        key, segment = new_key(), "seg000001"
        with writer_lock(self.scores_dir):
            # Files durable first; the SQL commit below is what makes them the current scores.
            decisions = self._write_segment(
                key,
                segment,
                len(names),
                (classifier, T),
                locations,
                None,
                progress,
                "tagging",
                ray,
                support,
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
                    "decisions": decisions.to_json(),
                },
                thresholds=[float(t) for t in decisions.thresholds],
                weights=pack(classifier, T),
            )
            classifier_id = self.store.install_classifier(
                row, key, [segment], present_triples(seg, label_ids)
            )
            cleanup(self.scores_dir, self.store.score_folders())
        self._cache = None
        fitted = Fitted(classifier_id, classifier, T, decisions)
        self._fitted_cache = fitted
        counts = [int(np.count_nonzero(seg.mats["present"][c])) for c in range(len(names))]
        return fitted, dict(zip(names, counts, strict=True))

    def fitted_for(self, row: Any) -> Fitted:
        """The classifier of an SQL row, unpacked once per classifier version."""
        cached = self._fitted_cache
        if cached is not None and cached.id == row.id:
            return cached
        classifier, T = unpack(row.weights)
        fitted = Fitted(row.id, classifier, T, stored_decisions(row))
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

    def _sync_view(self, view: ScoreView) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Mask rows SQL no longer vouches for; return the images still to score and the ids
        of the images that left the index (not scored again: they need tombstones)."""
        stale, new = self.store.changes_since(view.ids, view.shards, view.max_shard, view.valid)
        view.invalidate(stale)
        rescored = np.fromiter((loc[0] for loc in new), np.int64, len(new))
        gone = np.setdiff1d(view.ids[stale], rescored)
        return new, [int(i) for i in gone]

    def state(self, progress: Progress = False, score_new: bool = True) -> State:
        """The current classifier and score matrix, cached until the catalog version moves.

        Refits when the vocabulary changed; scores images indexed (or re-encoded) since, as a
        new segment. One indexed SELECT per call when nothing changed.
        """
        from piaa_index.scores import new_key, segment_name, write_removed, writer_lock

        while True:
            version = self.store.data_version()
            cached = self._cache
            if cached is not None and cached.version == version:
                if cached.pending == 0 or not score_new:
                    return cached
            vocab = self.library.vocab.require_vocabulary()
            if self.is_stale():
                if not score_new:
                    raise NotReady
                if not self.auto_fit:
                    raise NeedsFit(
                        "the vocabulary changed since the last fit: fit first (`piaa fit`, or "
                        "POST /api/jobs/fit)"
                    )
                self.fit(progress=progress)
                continue
            row = self.store.latest_classifier()
            assert row is not None
            fitted = self.fitted_for(row)
            view = self._open_view(row)
            # The shards of `todo` stay on disk while they are scored (see VectorStore.reading).
            with self.vectors.reading():
                if view is not None:
                    todo, gone = self._sync_view(view)
                else:
                    todo, gone = self.store.live_locations(), []
                if view is not None and ((not todo and not gone) or not score_new):
                    counts = self.store.image_counts()
                    self._cache = State(version, vocab, fitted, view, counts, len(todo))
                    return self._cache
                if not score_new:
                    raise NotReady
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
                    if view is not None and gone:
                        # Tombstones first (a small file, no scoring), then look again.
                        segments = list(row.score_segments or [])
                        name = segment_name(segments)
                        write_removed(self.scores_dir / str(row.scores_key), name, gone)
                        self.store.commit_segment(row.id, segments + [name], [], [])
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
                        fitted.decisions,
                        progress,
                        "tagging new images",
                    )
                    from piaa_index.scores import Segment

                    seg = Segment.open(self.scores_dir / key, name)
                    self.store.commit_segment(
                        row.id,
                        segments + [name],
                        [loc[0] for loc in todo],
                        present_triples(seg, label_ids),
                        key=key if view is None else None,
                    )

    def ensure_tags(self, progress: Progress = False) -> VocabularyInfo:
        """Refit when stale; tag images indexed since the last fit with the current classifier."""
        return self.state(progress).vocab


@contextmanager
def _engine(engine: str, address: str | None) -> Iterator[Any]:
    """None for the local engine, a connected Ray module for `ray`."""
    if engine == "local":
        yield None
        return
    if engine != "ray":
        raise UserInputError(f"unknown engine {engine!r}; choose local or ray")
    from piaa_index.ray_engine import connected

    with connected(address) as ray:
        yield ray


def stored_decisions(row: Any) -> Decisions:
    """The tag rule a classifier row was installed with (one from before the rule existed:
    its thresholds, every label present, no gate)."""
    from piaa_index.decisions import Decisions

    stored = (row.report or {}).get("decisions")
    if stored:
        return Decisions.from_json(stored)
    thresholds = np.asarray(row.thresholds or [], dtype=np.float64)
    gates = np.full(len(thresholds), -np.inf)
    return Decisions(thresholds, gates, [{"status": "present"} for _ in thresholds])


def label_status(names: Sequence[str], decisions: Decisions) -> dict[str, dict[str, Any]]:
    """Each label's status (present / weak / absent) and the numbers behind it, by name."""
    return {name: dict(record) for name, record in zip(names, decisions.status, strict=True)}


def present_triples(
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


def pack(classifier: Classifier, T: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, classifier=np.frombuffer(classifier.to_bytes(), dtype=np.uint8), text_protos=T)
    return buf.getvalue()


def unpack(data: bytes) -> tuple[Classifier, np.ndarray]:
    import io

    from piaa_index.pvcl import Classifier

    with np.load(io.BytesIO(data)) as z:
        return Classifier.from_bytes(z["classifier"].tobytes()), z["text_protos"]
