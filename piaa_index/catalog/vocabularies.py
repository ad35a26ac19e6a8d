"""Vocabularies, classifiers, their score segments and the sparse tags they leave."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, delete, func, select
from sqlalchemy.orm import Session

from piaa_index.catalog.batching import chunks
from piaa_index.catalog.common import utcnow
from piaa_index.catalog.schema import Classifier, Image, Label, Tag, Vocabulary


@dataclass(frozen=True)
class LabelInfo:
    id: int
    name: str
    position: int
    templates: list[str]


@dataclass(frozen=True)
class VocabularyInfo:
    id: int
    templates: list[str]
    labels: list[LabelInfo]

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]


# Declarative typing gives `__table__` as a FromClause; for a mapped class it is the Table.
_TAG_TABLE = cast(Table, Tag.__table__)


class VocabulariesMixin:
    """The `Store`'s vocabularies, classifiers and tags."""

    if TYPE_CHECKING:
        # Given by `Store` and the other parts it is composed of.
        def session(self) -> AbstractContextManager[Session]: ...

        @staticmethod
        def _mark_changed(s: Session, ids: Iterable[int]) -> None: ...

        def _retag_changes(self, s: Session) -> AbstractContextManager[None]: ...

    # -- vocabulary ----------------------------------------------------------------------------

    def vocabulary(self) -> VocabularyInfo | None:
        """The current (newest) vocabulary, or None when none was ever set."""
        with self.session() as s:
            vocab = s.scalars(select(Vocabulary).order_by(Vocabulary.id.desc())).first()
            if vocab is None:
                return None
            labels = s.scalars(
                select(Label).where(Label.vocabulary_id == vocab.id).order_by(Label.position)
            ).all()
            return VocabularyInfo(
                id=vocab.id,
                templates=list(vocab.templates),
                labels=[
                    LabelInfo(lb.id, lb.name, lb.position, list(lb.templates or vocab.templates))
                    for lb in labels
                ],
            )

    def vocabulary_names(self, vocabulary_id: int) -> list[str]:
        """The label names of one vocabulary version, in order."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Label.name)
                    .where(Label.vocabulary_id == vocabulary_id)
                    .order_by(Label.position)
                )
            )

    def new_vocabulary(
        self,
        names: Sequence[str],
        templates: Sequence[str],
        label_templates: dict[str, list[str]] | None = None,
    ) -> VocabularyInfo:
        """Record a new vocabulary version (the old one stays for the classifiers made on it)."""
        label_templates = label_templates or {}
        with self.session() as s:
            vocab = Vocabulary(templates=list(templates), created_at=utcnow())
            s.add(vocab)
            s.flush()
            for position, name in enumerate(names):
                s.add(
                    Label(
                        vocabulary_id=vocab.id,
                        position=position,
                        name=name,
                        templates=label_templates.get(name),
                    )
                )
        info = self.vocabulary()
        assert info is not None
        return info

    # -- classifiers and tags ------------------------------------------------------------------

    def latest_classifier(self) -> Classifier | None:
        with self.session() as s:
            return s.scalars(select(Classifier).order_by(Classifier.id.desc())).first()

    def install_classifier(
        self,
        classifier: Classifier,
        scores_key: str,
        segments: list[str],
        tags: Iterable[tuple[Any, Any, Any]],
    ) -> int:
        """Install a new classifier, pointing at its (already durable) score segments, with its
        sparse tags, in one transaction; older classifiers and their tags go.

        `tags` yields (image ids, label ids, fused scores) arrays of the present labels.
        Readers see the old classifier until the commit.
        """
        with self.session() as s:
            classifier.scores_key = scores_key
            classifier.score_segments = list(segments)
            s.add(classifier)
            s.flush()
            with self._retag_changes(s):
                s.execute(delete(Tag))
                self._insert_tags(s, int(classifier.id), tags)
            s.execute(delete(Classifier).where(Classifier.id != classifier.id))
            return int(classifier.id)

    def commit_segment(
        self,
        classifier_id: int,
        segments: list[str],
        rescored: Sequence[int],
        tags: Iterable[tuple[Any, Any, Any]],
        key: str | None = None,
    ) -> bool:
        """Point a classifier at one more (durable) segment and replace the sparse tags of the
        images it scored, in one transaction. With `key`, the classifier moves to a rebuilt
        score folder (its files were lost or predate score matrices) and all tags are replaced.
        False if the classifier is gone meanwhile."""
        with self.session() as s:
            row = s.get(Classifier, classifier_id)
            if row is None:
                return False
            row.score_segments = list(segments)
            if key is not None:
                row.scores_key = key
                with self._retag_changes(s):
                    s.execute(delete(Tag))
                    self._insert_tags(s, classifier_id, tags)
                return True
            for part in chunks(rescored):
                chunk = [int(i) for i in part]
                s.execute(delete(Tag).where(Tag.image_id.in_(chunk)))
            self._insert_tags(s, classifier_id, tags)
            # New or re-encoded images: their tags were cleared by their index commit.
            self._mark_changed(s, rescored)
            return True

    @staticmethod
    def _insert_tags(s: Session, classifier_id: int, tags: Iterable[tuple[Any, Any, Any]]) -> None:
        conn = s.connection()
        copy = conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg"
        for image_ids, label_ids, scores in tags:
            if copy:
                _copy_tags(conn, classifier_id, image_ids, label_ids, scores)
                continue
            rows = [
                {"image_id": i, "label_id": lb, "classifier_id": classifier_id, "score": sc}
                for i, lb, sc in zip(
                    image_ids.tolist(), label_ids.tolist(), scores.tolist(), strict=True
                )
            ]
            for chunk in chunks(rows, 10_000):
                s.execute(_TAG_TABLE.insert(), chunk)

    def drop_classifier(self, classifier_id: int) -> None:
        """Remove a classifier whose stored weights are damaged (`piaa db check`), its tags with
        it: the next query (or `piaa fit`) fits the vocabulary again."""
        with self.session() as s:
            with self._retag_changes(s):
                s.execute(delete(Tag).where(Tag.classifier_id == classifier_id))
                s.execute(delete(Classifier).where(Classifier.id == classifier_id))

    def drop_score_segments(self, key: str, names: Sequence[str]) -> None:
        """Stop listing damaged segments of a score folder (`piaa db check`): the next query
        scores the images they held again."""
        drop = set(names)
        with self.session() as s:
            for row in s.scalars(select(Classifier).where(Classifier.scores_key == key)):
                row.score_segments = [n for n in row.score_segments or [] if n not in drop]

    def score_folders(self) -> dict[str, list[str]]:
        """Score folder key -> committed segment names, of every classifier."""
        with self.session() as s:
            rows = s.execute(select(Classifier.scores_key, Classifier.score_segments)).all()
        return {k: list(segs or []) for k, segs in rows if k}

    def present_tags(self) -> Iterator[tuple[str, str, float]]:
        """(path, label, fused score) of every present tag, by path then best score first."""
        with self.session() as s:
            rows = s.execute(
                select(Image.path, Label.name, Tag.score)
                .join(Image, Image.id == Tag.image_id)
                .join(Label, Label.id == Tag.label_id)
                .order_by(Image.path, Tag.score.desc())
            )
            for path, name, score in rows:
                yield str(path), str(name), float(score)

    def tag_counts(self) -> dict[str, int]:
        """Images tagged present, per label name (the sparse table holds present rows only)."""
        with self.session() as s:
            rows = s.execute(
                select(Label.name, func.count())
                .join(Tag, Tag.label_id == Label.id)
                .group_by(Label.name)
            ).all()
        return {n: int(c) for n, c in rows}

    def present_tags_of(self, ids: Sequence[int]) -> dict[int, list[tuple[str, float]]]:
        """image id -> [(label, fused score)] of its present tags, best first."""
        out: dict[int, list[tuple[str, float]]] = {int(i): [] for i in ids}
        with self.session() as s:
            for part in chunks(ids, 1000):
                chunk = [int(i) for i in part]
                rows = s.execute(
                    select(Tag.image_id, Label.name, Tag.score)
                    .join(Label, Label.id == Tag.label_id)
                    .where(Tag.image_id.in_(chunk))
                    .order_by(Tag.image_id, Tag.score.desc())
                )
                for image_id, name, score in rows:
                    out[int(image_id)].append((str(name), float(score)))
        return out


def _copy_tags(conn: Any, classifier_id: int, image_ids: Any, label_ids: Any, scores: Any) -> None:
    """Sparse tag rows by COPY, in the session's transaction: psycopg's executemany sends one
    INSERT per row (2.5 s for the 50k rows of a 20k-image re-tag, half of the re-tag)."""
    table = conn.dialect.identifier_preparer.format_table(_TAG_TABLE)
    # repr: the shortest text that reads back as the same float64, so COPY stores the same
    # values as the INSERT path.
    text = "".join(
        f"{i}\t{lb}\t{classifier_id}\t{sc!r}\n"
        for i, lb, sc in zip(image_ids.tolist(), label_ids.tolist(), scores.tolist(), strict=True)
    )
    cursor = conn.connection.driver_connection.cursor()
    try:
        columns = "image_id, label_id, classifier_id, score"
        with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            copy.write(text.encode())
    finally:
        cursor.close()
