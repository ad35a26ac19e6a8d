"""What a library's parts share: its settings, store, model spec and vector folder, and the
encoder and vector store, each loaded on first use and once, whichever part asks first.

`Library` owns one `Resources` and hands it to each part (`VocabularyEditor(resources)`,
`Tagger(resources, vocab)`, …): no part holds the Library.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from piaa_index.durable import write_bytes_atomic
from piaa_index.errors import LibraryError, UserInputError
from piaa_index.layout import DATABASE_MARKER
from piaa_index.model import model_record
from piaa_index.progress import note
from piaa_index.textio import json_text
from piaa_index.vectors.shards import (
    MANIFEST,
    MANIFEST_SETTING,
    LockedError,
    VectorStore,
    VectorStoreError,
    manifest_problem,
)

if TYPE_CHECKING:
    from piaa_index.catalog.store import Store
    from piaa_index.config import ModelSpec, Settings
    from piaa_index.model.encoder import Encoder
    from piaa_index.progress import Progress


class Resources:
    """One library's shared collaborators. The model and the vector store load lazily: the
    CLI's reads that need neither never pay for them."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        spec: ModelSpec,
        encoder_factory: Callable[[ModelSpec], Encoder] | None = None,
    ):
        self.settings = settings
        self.store = store
        self.spec = spec
        self.encoder_factory = encoder_factory
        self.vectors_dir = settings.layout.vectors(store.store_id).root
        self._encoder: Encoder | None = None
        self._vectors: VectorStore | None = None

    @property
    def scores_dir(self) -> Path:
        """The score matrix's folder beside the shards (piaa_index/vectors/scores.py)."""
        from piaa_index.vectors.scores import scores_root

        return scores_root(self.vectors_dir)

    @property
    def loaded_encoder(self) -> Encoder | None:
        """The encoder if it is loaded already, else None (loads nothing)."""
        return self._encoder

    @property
    def loaded_vectors(self) -> VectorStore | None:
        """The vector store if it is open already, else None (opens nothing)."""
        return self._vectors

    def load_encoder(self, progress: Progress) -> Encoder:
        """`encoder`, saying so while a model loads (seconds: torch, then the weights)."""
        if self._encoder is not None:
            return self._encoder

        started = time.perf_counter()
        note(f"loading the model {self.spec.model} ({self.spec.pretrained})…", progress)
        encoder = self.encoder
        note(f"model loaded in {time.perf_counter() - started:.1f}s", progress)
        return encoder

    @property
    def encoder(self) -> Encoder:
        """The model, loaded on first use (indexing, fitting, text queries)."""
        if self._encoder is None:
            record = self.store.get_setting("model")
            if record is not None:
                model_record.check_file(record, self.settings.home)
            if self.encoder_factory is not None:
                self._encoder = self.encoder_factory(self.spec)
            else:
                from piaa_index.model import weights

                weights.check_before_loading(self.spec.model, self.spec.pretrained)
                from piaa_index.model.encoder import Encoder

                self._encoder = Encoder(self.spec, device=self.settings.device)
        return self._encoder

    @property
    def vectors(self) -> VectorStore:
        """The vector folder; the first index run records the model's identity in it."""
        if self._vectors is None:
            manifest = VectorStore.read_manifest(self.vectors_dir)
            recorded = self.store.get_setting(MANIFEST_SETTING)
            path = self.vectors_dir / MANIFEST
            if manifest is None and VectorStore.has_shards(self.vectors_dir):
                if self.store.referenced_shards():
                    raise VectorStoreError(
                        f"the vector manifest {path} is missing while its shards are there "
                        "(damage): `piaa db check` rebuilds it from the database"
                    )
            if manifest is not None:
                problem = manifest_problem(manifest, recorded, self.store.get_setting("model"))
                if problem is not None:
                    raise VectorStoreError(
                        f"the vector manifest {path} does not match the database's record of "
                        f"it ({problem}): it is damaged; `piaa db check` rebuilds it"
                    )
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
                        **model_record.weights_fields(self.spec.pretrained, self.settings.home),
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
            if recorded != self._vectors.manifest:
                self.store.set_setting(MANIFEST_SETTING, self._vectors.manifest)
            if (sqlite_file := sqlite_file_of(self.settings.db_url)) is not None:
                remember_database(sqlite_file, self.vectors_dir)
            self._reconcile()
            self._reconcile_scores()
        return self._vectors

    def _reconcile(self) -> None:
        """Make SQL and the vector files agree after a crash (SQL is the source of truth)."""

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
        from piaa_index.vectors.scores import cleanup, writer_lock

        if not self.scores_dir.is_dir():
            return
        with writer_lock(self.scores_dir, blocking=False) as locked:
            if locked:  # a writer at work owns its uncommitted files
                cleanup(self.scores_dir, self.store.score_folders())


def sqlite_file_of(db_url: str) -> Path | None:
    """The SQLite database file of `db_url`; None for another database or an in-memory one."""
    if not db_url.startswith("sqlite:///") or "?" in db_url:
        return None
    path = db_url.removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path).expanduser().absolute()


def remember_database(sqlite_file: Path, vectors_dir: Path) -> None:
    """Name the database file in its vector folder (`Library.open` refuses to start a new,
    empty database where these vectors' one went missing)."""

    marker = vectors_dir / DATABASE_MARKER
    try:
        if marker.is_file() and json.loads(marker.read_text())["path"] == str(sqlite_file):
            return
        write_bytes_atomic(json_text({"path": str(sqlite_file)}).encode(), marker)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a read-only home still opens; the guard is best effort
