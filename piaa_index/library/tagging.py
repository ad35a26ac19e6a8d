"""Fit and tag: PVCL fitted from the collection's patch pool, and every image's scores.

A vocabulary change makes the tags stale; the next query (or `fit()`) refits PVCL on the whole
collection and writes the score matrix (`piaa_index/vectors/scores.py`) in one streaming pass, with the
present tags in SQL. Images indexed after a fit are scored with the current classifier at the
next query, as a new segment, without refitting.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from piaa_index.catalog.schema import Classifier as ClassifierRow
from piaa_index.catalog.store import VocabularyInfo, utcnow
from piaa_index.errors import LibraryError, UserInputError
from piaa_index.library.part import Part
from piaa_index.method.open_pvcl import (
    HashKeys,
    LabelBanks,
    OpenParams,
    cluster_agreement,
    default_bank_size,
    fit_background,
    fit_open,
    gaussian_rows,
    label_discriminants,
    padded_cosines,
    sample_keys,
    sample_mask,
    unpadded_cosines,
)
from piaa_index.method.pvcl import Classifier, pack, unpack
from piaa_index.progress import note, progress_bar
from piaa_index.query.language import normalize_label
from piaa_index.spill import SpilledArray
from piaa_index.vectors.shards import chunk_plan

if TYPE_CHECKING:
    from piaa_index.library.resources import Resources
    from piaa_index.library.vocabulary import VocabularyEditor
    from piaa_index.method.decisions import Decisions
    from piaa_index.method.learning import Learnt
    from piaa_index.method.pvcl import Classifier
    from piaa_index.progress import Progress
    from piaa_index.vectors.scores import ScoreView, Segment


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
    # The labels this fit learnt; the others kept the last fit's classifier and scores.
    fitted_labels: list[str] = field(default_factory=list)
    # What was learnt from the user's labels: which labels use it, and why (keywords.py).
    learning: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class UserLabels(NamedTuple):
    """The user's labels as one fit reads them."""

    version: int  # read before the labels: a change after it is learnt by the next fit
    rows: dict[int, np.ndarray]  # [C] int8 by image id: 1 present, 0 absent, -1 not labelled
    digests: dict[str, str]  # by label name: what its learning read (keywords.label_digests)


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


class SupportRows:
    """The fit pass's text support, chunk by chunk ((image ids, [n, C] float32)), read back in
    the same chunks by the re-tag. The rows go to an unnamed file in `folder` (SpilledArray):
    held in memory, [N, C] of them was 320 MB at 1M images and 80 labels; in a file they are
    page cache, which the kernel writes out and drops as it needs."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._rows: SpilledArray | None = None  # made at the first chunk, which gives C
        self._chunks: list[tuple[np.ndarray, int, int]] = []  # ids, first row, end row

    def append(self, ids: np.ndarray, support: np.ndarray) -> None:
        if self._rows is None:
            self._rows = SpilledArray(support.shape[1:], np.float32, self._folder)
        start = len(self._rows)
        self._rows.append(support)
        self._chunks.append((ids, start, len(self._rows)))

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, start, end in self._chunks:
            assert self._rows is not None  # (a chunk was appended)
            yield ids, self._rows[start:end]

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()


class NotReady(Exception):
    """The scores need a fit or new rows scored, which the caller does not want to do."""


class NeedsFit(LibraryError):
    """The vocabulary changed since the last fit and this Library does not fit on a read
    (`Tagger.auto_fit` off: the HTTP API fits in a background job instead)."""


class Tagger(Part):
    """Owns the classifier and the score matrix, cached against SQL's catalog version."""

    def __init__(self, resources: Resources, vocab: VocabularyEditor):
        super().__init__(resources)
        self.vocab = vocab
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

    def labels_changed(self) -> bool:
        """True when the user's labels changed since the last fit learnt from them: the tags
        still stand (queries answer), and the next `fit` learns again (keywords.py)."""
        return self.store.user_labels_version() != _learnt_version(self.store.latest_classifier())

    def fit_classifier(
        self,
        vocab: VocabularyInfo,
        locations: list[tuple[int, int, int]],
        progress: Progress = False,
        bank_size: int | None = None,
    ) -> tuple[Classifier, np.ndarray, int]:
        """PVCL on the patches of `locations` (one streaming pass): (classifier, T, n patches)."""
        classifier, T, n_patches, support = self._fit_pass(vocab, locations, progress, bank_size)
        support.close()
        return classifier, T, n_patches

    def _fit_pass(
        self,
        vocab: VocabularyInfo,
        locations: list[tuple[int, int, int]],
        progress: Progress,
        bank_size: int | None,
    ) -> tuple[Classifier, np.ndarray, int, SupportRows]:
        """`fit_classifier`, also returning each chunk's (image ids, text support [n, C]): the
        pass computes every patch's text cosines for its banks, and the re-tag would otherwise
        compute them again (half of its GEMM work)."""

        if not locations:
            raise UserInputError("no indexed images: run `piaa index PATH` first")
        T = self.vocab.text_prototypes(vocab)
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
        hashes = HashKeys(self.store.content_hashes() if rate < 1.0 else {})
        sample: list[np.ndarray] = []
        n_patches = 0
        support = SupportRows(self.scores_dir)
        for chunk, flat in self._bank_pass(locations, T, banks, support, progress, "fitting"):
            n, M, d = chunk.patches.shape
            if rate < 1.0:
                chosen = sample_mask(sample_keys(chunk.image_ids, hashes), rate)
                sample.append(flat.reshape(n, M, d)[chosen].reshape(-1, d))
            else:  # a small pool: every patch is in the sample
                sample.append(flat)
            n_patches += len(flat)
        pooled = np.concatenate(sample) if sample else np.empty((0, T.shape[1]), np.float32)
        background = fit_background(pooled, params)
        classifier = fit_open(banks.banks(), banks.cosines(), T, background, params)
        classifier.params["n_pool"] = n_patches
        classifier.params["labels"] = _label_keys(vocab)
        return classifier, T, n_patches, support

    def _bank_pass(
        self,
        locations: list[tuple[int, int, int]],
        T: np.ndarray,
        banks: Any,
        support: SupportRows,
        progress: Progress,
        desc: str,
    ) -> Iterator[tuple[Any, np.ndarray]]:
        """Stage I's streaming pass: every patch's cosines to the prototypes `T` update `banks`
        (`open_pvcl.LabelBanks`), and each chunk's (image ids, text support [n, C]) is appended
        to `support` for the re-tag; yields (chunk, its patches [n·M, d] float32)."""
        from piaa_index.method.fusion import patch_text_cosines

        for chunk in self.stream(locations, progress, desc):
            n, M, d = chunk.patches.shape
            flat = np.asarray(chunk.patches, dtype=np.float32).reshape(n * M, d)
            sims = patch_text_cosines(flat, T)
            patch_ids = (chunk.image_ids.astype(np.int64)[:, None] * M + np.arange(M)).ravel()
            banks.update(flat, patch_ids, sims)
            # float32 cosines, exact: [N, C] of them is ~1/(4M) of the patch data.
            support.append(chunk.image_ids, sims.reshape(n, M, -1).max(axis=1))
            yield chunk, flat

    def fit(
        self,
        progress: Progress = False,
        bank_size: int | None = None,
        engine: str = "local",
        address: str | None = None,
        full: bool = False,
    ) -> FitReport:
        """Fit PVCL on the collection's patch pool (one streaming pass), then re-tag everything
        (a second pass writing the score matrix; with `engine="ray"`, as Ray tasks).

        When the last fit's classifier can be kept (`_refit_base`), only the labels the
        vocabulary gained are fitted and scored, the labels whose user labels changed learn
        again and are scored, and the other labels' classifiers and scores are carried over
        (`_fit_changed_labels`); `full` refits every label from the current pool."""
        vocab = self.vocab.require_vocabulary()
        started = time.perf_counter()
        # The Ray engine and an explicit bank size always refit every label. Labels whose user
        # labels changed learn again there (`_fit_changed_labels`).
        if not full and bank_size is None and engine == "local":
            with self.vectors.reading():
                base = self._refit_base(vocab)
                if base is not None:
                    return self._fit_changed_labels(vocab, base, progress, started)
        with self.vectors.reading(), _engine(engine, address) as ray:
            # (reading: a vacuum meanwhile must not delete these shards)
            locations = self.store.live_locations()
            classifier, T, n_patches, support = self._fit_pass(
                vocab, locations, progress, bank_size
            )
            classifier, learnt = self._learn(vocab, classifier, T, locations, progress)
            fit_seconds = time.perf_counter() - started
            fitted, present = self._tag_all(
                vocab, classifier, T, locations, progress, fit_seconds, ray, support, learnt
            )
            support.close()
        return self._report(vocab, fitted, present, len(locations), n_patches, started, fit_seconds)

    def _learn(
        self,
        vocab: VocabularyInfo,
        classifier: Classifier,
        T: np.ndarray,
        locations: list[tuple[int, int, int]],
        progress: Progress,
        relearn: Sequence[int] | None = None,
        kept: dict[str, Any] | None = None,
        user: UserLabels | None = None,
    ) -> tuple[Classifier, Learnt | None]:
        """The classifier after learning from the user's labels of the vocabulary's labels
        (piaa_index/library/keywords.py), and what was learnt (None when nothing was).

        `relearn`: learn these labels only (their rows in `classifier` training-free); the
        others keep their rows, and their part of `kept` (the last fit's `learning` record).
        `user`: the user's labels as `_user_labels` read them (default: read now)."""
        from piaa_index.library.keywords import (
            learn_labels,
            presume_negatives,
            summary,
            widened,
            with_learnt,
        )

        names = vocab.names
        user = user if user is not None else self._user_labels(vocab, locations)
        rows = user.rows
        live = {loc[0]: loc for loc in locations}
        columns = list(range(len(names))) if relearn is None else list(relearn)
        learnt = None
        if rows and columns:
            note(f"learning from the labels of {len(rows)} images", progress)
            train, presumed = presume_negatives(rows, list(live))
            labelled = [live[i] for i in sorted(train, key=lambda i: live[i][1:])]
            part = _subset(classifier, columns)
            learnt = widened(
                learn_labels(
                    self.vectors, part, T[columns], labelled,
                    {i: r[columns] for i, r in train.items()}, locations,
                    folder=self.scores_dir,
                ),
                columns,
                len(names),
            )  # fmt: skip
            for c, k in presumed.items():
                if str(c) in learnt.report:
                    learnt.report[str(c)]["presumed_negatives"] = k
            classifier = with_learnt(classifier, learnt, T)
        record: dict[str, Any] = {"learnt": [], "seconds": 0.0, "labels": {}}
        if learnt is not None:
            record = summary(learnt, names)
        if kept:  # the labels not learnt again keep their record
            again = {names[c] for c in columns}
            for name, rec in (kept.get("labels") or {}).items():
                if name in names and name not in again:
                    record["labels"][name] = rec
            record["learnt"] = [
                n for n in names
                if n in record["learnt"] or (n not in again and n in kept.get("learnt", []))
            ]  # fmt: skip
        record["images"] = len(rows)
        record["digests"] = user.digests
        record["relearnt"] = [names[c] for c in columns]  # (to training-free, without labels)
        classifier.params = {
            **classifier.params,
            "user_labels_version": user.version,
            "learning": record if (rows or kept) else {},
        }
        return classifier, learnt

    def _user_labels(
        self, vocab: VocabularyInfo, locations: list[tuple[int, int, int]]
    ) -> UserLabels:
        """The user's labels of the live images, read once per fit (`UserLabels`)."""
        from piaa_index.library.keywords import label_digests, user_label_rows

        version = self.store.user_labels_version()  # before the labels: a change after, learns
        live = {loc[0] for loc in locations}
        rows = user_label_rows(self.store.user_labels(), vocab.names, live)
        return UserLabels(version, rows, label_digests(rows, vocab.names))

    def _report(
        self,
        vocab: VocabularyInfo,
        fitted: Fitted,
        present: dict[str, int],
        n_images: int,
        n_patches: int,
        started: float,
        fit_seconds: float,
        fitted_labels: list[str] | None = None,
    ) -> FitReport:
        classifier = fitted.classifier
        names = vocab.names
        status = label_status(names, fitted.decisions)
        return FitReport(
            classifier_id=fitted.id,
            n_images=n_images,
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
            fitted_labels=list(names) if fitted_labels is None else fitted_labels,
            learning={
                k: v for k, v in (classifier.params.get("learning") or {}).items() if k != "digests"
            },
        )

    def _refit_base(self, vocab: VocabularyInfo) -> _RefitBase | None:
        """The last fit, if its classifier and scores can be kept for the labels the new
        vocabulary shares with it (same name, same prompt templates): an open-world classifier
        that stored what a label fitted alone needs, and a score matrix that opens whole."""
        row = self.store.latest_classifier()
        if row is None:
            return None
        # The same vocabulary again (`piaa fit` right after another process's fit): every label
        # is kept, so the tags do not depend on which of two concurrent fits ran last.
        fitted = self.fitted_for(row)
        clf = fitted.classifier
        labels = clf.params.get("labels")
        if (
            not clf.open_world
            or clf.precision is None
            or clf.bank_cosines is None
            or clf.background_means is None
            or not isinstance(labels, list)
            or len(labels) != clf.n_classes
        ):
            return None  # fitted before labels could be added alone
        position = {(str(n), tuple(t)): c for c, (n, t) in enumerate(labels)}
        kept = [position.get((name, tuple(t)), -1) for name, t in _label_keys(vocab)]
        # A concept taught again (or a label taught since) has a new prototype: fitted anew.
        from piaa_index.library.teaching import taught_prototypes

        taught = taught_prototypes(self.store)
        for c, lb in enumerate(vocab.labels):
            proto = taught.get(normalize_label(lb.name))
            if kept[c] >= 0 and proto is not None:
                if not np.allclose(proto, fitted.text_protos[kept[c]], atol=1e-6):
                    kept[c] = -1
        if all(c == -1 for c in kept):
            return None
        view = self._open_view(row)
        if view is None or len(view.segments) != len(row.score_segments or []):
            return None  # lost or damaged scores: score everything again
        todo, _gone = self._sync_view(view)
        return _RefitBase(row, fitted, view, kept, todo)

    def _fit_changed_labels(
        self, vocab: VocabularyInfo, base: _RefitBase, progress: Progress, started: float
    ) -> FitReport:
        """Fit only the labels the vocabulary gained; carry the kept labels' classifiers and
        score columns over. Each label's classifier depends on its own bank and the
        collection's background alone (open_pvcl.py), so a kept label's scores are what a full
        fit on the same pool gives them, and adding or removing a label leaves them alone; so do
        their calibration and status (`Decisions.carry_over`): only new labels are calibrated."""
        from piaa_index.library.keywords import learnt_decisions
        from piaa_index.method.decisions import bank_support, open_decisions
        from piaa_index.method.fusion import score_images
        from piaa_index.vectors.scores import SegmentWriter, new_key, writer_lock

        old = base.fitted.classifier
        assert old.bank_cosines is not None and old.precision is not None  # (_refit_base)
        kept = np.asarray(base.kept)
        fresh = [c for c, k in enumerate(base.kept) if k == -1]
        locations = self.store.live_locations()
        if not locations:
            raise UserInputError("no indexed images: run `piaa index PATH` first")
        C = len(vocab.labels)
        d = old.W.shape[1]
        T = np.zeros((C, d), np.float32)
        T[kept >= 0] = base.fitted.text_protos[kept[kept >= 0]]
        bank_size = int(old.params.get("bank_size", 0)) or int(old.bank_cosines.shape[1])
        fresh_banks = LabelBanks(len(fresh), d, bank_size)
        fresh_support = SupportRows(self.scores_dir)
        if fresh:
            sub = VocabularyInfo(vocab.id, vocab.templates, [vocab.labels[c] for c in fresh])
            T[fresh] = self.vocab.text_prototypes(sub)
            passed = self._bank_pass(
                locations, T[fresh], fresh_banks, fresh_support, progress, "fitting new labels"
            )
            for _ in passed:
                pass
        # Labels whose user labels changed since the last fit learnt (their digests moved),
        # and new labels with some, learn; their rows start training-free.
        user = self._user_labels(vocab, locations)
        before = old.params.get("learning") or {}
        old_digests = before.get("digests")
        if old_digests is None:  # learnt before digests were kept: what it learnt, again
            old_digests = {n: "?" for n in before.get("labels") or {}}
        relearn = [
            c for c, lb in enumerate(vocab.labels)
            if user.digests[lb.name] != (old_digests.get(lb.name, "") if base.kept[c] >= 0 else "")
        ]  # fmt: skip
        fit_seconds = time.perf_counter() - started

        # The new vocabulary's classifier: kept rows as they were, new rows from their banks.
        W = np.zeros((C, d), np.float32)
        b = np.zeros(C, np.float32)
        means = np.zeros((C, d), np.float32)
        cosines: list[np.ndarray] = [np.empty(0)] * C
        agreement: list[float | None] = [None] * C
        old_cosines = unpadded_cosines(old.bank_cosines)
        old_agreement = list(old.params.get("support", {}).get("cluster_agreement") or [])
        for c, k in enumerate(base.kept):
            if k >= 0:
                W[c], b[c] = old.W[k], old.b[k]
                means[c] = old.means[k] if old.means is not None else 0.0
                cosines[c] = old_cosines[k]
                agreement[c] = old_agreement[k] if k < len(old_agreement) else None
        if fresh:
            assert old.precision is not None and old.background_b is not None
            assert old.background_means is not None  # (_refit_base)
            new_banks, new_cosines = fresh_banks.banks(), fresh_banks.cosines()  # (copies)
            Wf, bf, muf = label_discriminants(
                new_banks, T[fresh], old.precision.astype(np.float64), len(old.background_b)
            )
            W[fresh], b[fresh], means[fresh] = Wf, bf, muf
            for j, c in enumerate(fresh):
                cosines[c] = new_cosines[j]
                agreement[c] = cluster_agreement(
                    new_banks[j], cosines[c], T[c], old.background_means
                )
        learnt_before = set(before.get("learnt") or [])
        for c in relearn:  # training-free again: re-derived from the label's Gaussian
            k = int(base.kept[c])
            if k >= 0 and vocab.labels[c].name in learnt_before and old.means is not None:
                assert old.background_b is not None  # (_refit_base: open world)
                Wk, bk = gaussian_rows(old.means[k : k + 1], old.precision, len(old.background_b))
                W[c], b[c] = Wk[0], bk[0]
        sizes = [int(len(v)) for v in cosines]
        params = {
            **old.params,
            "support": bank_support(cosines, agreement=agreement),
            "n_classes": C,
            "labels": _label_keys(vocab),
            "fit_seconds": fit_seconds,
            "kept_from_classifier": int(base.row.id),
        }
        classifier = Classifier(
            W=W,
            b=b,
            bank_sizes=sizes,
            kept_sizes=sizes,
            weak_labels=[c for c in range(C) if sizes[c] == 0],
            params=params,
            scale=old.scale,
            means=means,
            background_W=old.background_W,
            background_b=old.background_b,
            precision=old.precision,
            bank_cosines=padded_cosines(cosines),
            background_means=old.background_means,
            cls_protos=_kept_cls_protos(old, base.kept, T, relearn),
        )
        classifier, learnt = self._learn(
            vocab, classifier, T, locations, progress, relearn, before, user
        )
        fit_seconds = time.perf_counter() - started

        # Kept columns come from the old matrix; new labels, labels learnt again (and images the
        # old classifier had not scored) are scored from the stored patches.
        view = base.view
        valid_rows = np.flatnonzero(view.valid)
        by_id = np.argsort(view.ids[valid_rows], kind="stable")
        sorted_ids, sorted_rows = view.ids[valid_rows][by_id], valid_rows[by_id]
        again = set(relearn)
        kept_pairs = [(c, int(k)) for c, k in enumerate(base.kept) if k >= 0 and c not in again]
        relearnt = [c for c in relearn if base.kept[c] >= 0]  # (new labels are in `fresh`)
        unscored = {loc[0] for loc in base.todo}
        all_labels = list(range(C))

        def columns(ids: np.ndarray, chunk: Any, U: np.ndarray | None) -> tuple[np.ndarray, ...]:
            E = np.zeros((len(ids), C), np.float32)
            Cs = np.zeros_like(E)
            Us = np.zeros_like(E)
            scored = np.array([int(i) not in unscored for i in ids], bool)
            pos = np.searchsorted(sorted_ids, ids)
            rows = sorted_rows[np.minimum(pos, max(0, len(sorted_rows) - 1))]
            for c, k in kept_pairs:
                E[scored, c] = view.take("E", k, rows[scored])
                Cs[scored, c] = view.take("C", k, rows[scored])
                Us[scored, c] = view.take("U", k, rows[scored])
            for labels, mask in ((fresh, scored), (relearnt, scored), (all_labels, ~scored)):
                if not labels or not mask.any():
                    continue
                part = _subset(classifier, labels)
                sup = None
                if U is not None and labels is fresh:  # (the bank pass's text support)
                    sup = U[mask]
                got = score_images(
                    chunk.cls[mask], chunk.patches[mask], T[labels], part, support=sup
                )
                assert got.support is not None
                at = np.ix_(np.flatnonzero(mask), np.asarray(labels, np.int64))
                E[at], Cs[at], Us[at] = got.patch, got.cls, got.support
            return E, Cs, Us

        key, segment = new_key(), "seg000001"
        with writer_lock(self.scores_dir):
            writer = SegmentWriter(self.scores_dir / key, segment, len(locations), C)
            try:
                if fresh or relearnt or base.todo:
                    known = iter(fresh_support)
                    for chunk in self.stream(locations, progress, "tagging"):
                        ids_u, U = next(known, (None, None))
                        if ids_u is None or not np.array_equal(ids_u, chunk.image_ids):
                            U = None
                        E, Cs, Us = columns(chunk.image_ids, chunk, U)
                        shards = np.full(len(chunk.image_ids), chunk.shard, np.int32)
                        writer.write(chunk.image_ids, shards, np.zeros_like(E), E, Cs, Us)
                else:  # labels removed only: no patch is read
                    ids = np.fromiter((loc[0] for loc in locations), np.int64, len(locations))
                    shards = np.fromiter((loc[1] for loc in locations), np.int32, len(locations))
                    for a in range(0, len(ids), 65_536):
                        part = ids[a : a + 65_536]
                        E, Cs, Us = columns(part, None, None)
                        writer.write(part, shards[a : a + 65_536], np.zeros_like(E), E, Cs, Us)
                carried = [-1 if c in again else k for c, k in enumerate(base.kept)]
                decisions = open_decisions(
                    writer.evidence, writer.cls, writer.support, params["support"]
                ).carry_over(base.fitted.decisions, carried)
                if learnt is not None:  # the labels learnt again: their own calibration
                    decisions = learnt_decisions(decisions, learnt)
                writer.finish(decisions)
            except BaseException:
                writer.abort()
                raise
            finally:
                fresh_support.close()
            fitted, present = self._install(
                vocab, classifier, T, key, segment, decisions, fit_seconds
            )
        return self._report(
            vocab,
            fitted,
            present,
            len(locations),
            len(locations) * self.vectors.n_patches,
            started,
            fit_seconds,
            fitted_labels=[vocab.labels[c].name for c in sorted({*fresh, *relearn})],
        )

    def stream(
        self, locations: list[tuple[int, int, int]], progress: Progress, desc: str
    ) -> Iterator:
        with progress_bar(len(locations), desc, progress) as advance:
            for chunk in self.vectors.iter_live(locations):
                yield chunk
                advance(len(chunk.image_ids))

    def _scores(
        self, chunk: Any, classifier: Classifier, T: np.ndarray, support: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(fused, patch evidence, cls scores, text support) for one chunk of images (`support`
        given when the fit's pass computed it)."""
        from piaa_index.method import fusion

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
        support: Iterable[tuple[np.ndarray, np.ndarray]] = (),
    ) -> Iterator[tuple[np.ndarray, int, tuple[np.ndarray, ...]]]:
        """(image ids, shard, scores) per chunk in shard order: here, or as Ray tasks when
        `ray` is a connected Ray module (piaa_index/engines/ray_engine.py); the same chunks either way.
        `support`: the fit pass's (image ids, text support) per chunk, in the same order."""
        if ray is None:
            known = iter(support)
            for chunk in self.stream(locations, progress, desc):
                ids, U = next(known, (None, None))
                if ids is None or not np.array_equal(ids, chunk.image_ids):
                    U = None  # not the pass's chunk: compute it
                yield chunk.image_ids, chunk.shard, self._scores(chunk, classifier, T, U)
            return
        from piaa_index.engines.ray_engine import score_chunks

        with progress_bar(len(locations), desc + " (ray)", progress) as advance:
            for ids, shard, scores in score_chunks(
                ray, self.vectors, chunk_plan(locations), classifier, T
            ):
                yield ids, shard, scores
                advance(len(ids))

    @property
    def scores_dir(self) -> Path:
        return self.resources.scores_dir

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
        support: Iterable[tuple[np.ndarray, np.ndarray]] = (),
        learnt: Learnt | None = None,
    ) -> Decisions:
        """Score `locations` in one streaming pass into a durable segment; returns the tag rule
        (fitted on this segment's scores when not given: the fit's re-tag)."""
        from piaa_index.method.decisions import open_decisions
        from piaa_index.vectors.scores import SegmentWriter

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
                if learnt is not None:  # labels learnt from the user's: their own calibration
                    from piaa_index.library.keywords import learnt_decisions

                    decisions = learnt_decisions(decisions, learnt)
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
        support: Iterable[tuple[np.ndarray, np.ndarray]] = (),
        learnt: Learnt | None = None,
    ) -> tuple[Fitted, dict[str, int]]:
        from piaa_index.vectors.scores import new_key, writer_lock

        names = vocab.names
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
                learnt,
            )
            return self._install(vocab, classifier, T, key, segment, decisions, fit_seconds)

    def _install(
        self,
        vocab: VocabularyInfo,
        classifier: Classifier,
        T: np.ndarray,
        key: str,
        segment: str,
        decisions: Decisions,
        fit_seconds: float,
    ) -> tuple[Fitted, dict[str, int]]:
        """Commit a classifier whose (durable) first segment holds every indexed image, with its
        sparse tags (under the scores' writer lock)."""
        from piaa_index.vectors.scores import Segment, cleanup

        names = vocab.names
        label_ids = [lb.id for lb in vocab.labels]
        seg = Segment.open(self.scores_dir / key, segment)
        n_images = len(seg.ids)
        row = ClassifierRow(
            vocabulary_id=vocab.id,
            created_at=utcnow(),
            n_images=n_images,
            n_patches=n_images * self.vectors.n_patches,
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
        from piaa_index.vectors.scores import ScoreView

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
        from piaa_index.vectors.scores import new_key, segment_name, write_removed, writer_lock

        while True:
            version = self.store.data_version()
            cached = self._cache
            if cached is not None and cached.version == version:
                if cached.pending == 0 or not score_new:
                    return cached
            vocab = self.vocab.require_vocabulary()
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
                    from piaa_index.vectors.scores import Segment

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
    from piaa_index.engines import check_engine

    if check_engine(engine) == "local":
        yield None
        return
    from piaa_index.engines.ray_engine import connected

    with connected(address) as ray:
        yield ray


@dataclass
class _RefitBase:
    """What a fit of the changed labels keeps from the last fit."""

    row: Any  # its SQL classifier row
    fitted: Fitted
    view: ScoreView  # its score matrix, synced with the index
    kept: list[int]  # per label of the new vocabulary: its column in the last fit, -1 if new
    todo: list[tuple[int, int, int]]  # images indexed since: scored from their patches


def _label_keys(vocab: VocabularyInfo) -> list[list[Any]]:
    """[name, templates] per label: what a label's classifier and text prototype depend on."""
    return [[lb.name, list(lb.templates)] for lb in vocab.labels]


def _subset(classifier: Classifier, labels: Sequence[int]) -> Classifier:
    """The classifier of some labels only (open world: each label's log-odds is its own)."""

    idx = list(labels)
    return Classifier(
        W=classifier.W[idx],
        b=classifier.b[idx],
        bank_sizes=[classifier.bank_sizes[c] for c in idx],
        kept_sizes=[classifier.kept_sizes[c] for c in idx],
        weak_labels=[],
        params=classifier.params,
        scale=classifier.scale,
        background_W=classifier.background_W,
        background_b=classifier.background_b,
        cls_protos=None if classifier.cls_protos is None else classifier.cls_protos[idx],
    )


def _kept_cls_protos(
    old: Classifier, kept: Sequence[int], T: np.ndarray, relearn: Sequence[int] = ()
) -> np.ndarray | None:
    """[CLS] prototypes of a vocabulary change: kept labels keep what they learnt, new labels
    and those to learn again start from their text (None when no label ever learnt one)."""
    if old.cls_protos is None:
        return None
    protos = np.array(T, np.float32)
    again = set(relearn)
    for c, k in enumerate(kept):
        if k >= 0 and c not in again:
            protos[c] = old.cls_protos[k]
    return protos


def _learnt_version(row: Any) -> int:
    """The user-labels version a classifier row learnt from (0: none; keywords.py)."""
    if row is None:
        return 0
    params = (row.report or {}).get("params") or {}
    return int(params.get("user_labels_version", 0))


def stored_decisions(row: Any) -> Decisions:
    """The tag rule a classifier row was installed with (one from before the rule existed:
    its thresholds, every label present, no gate)."""
    from piaa_index.method.decisions import Decisions

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
