"""Housekeeping: reclaiming vector space (`vacuum`) and the library's status."""

from __future__ import annotations

import json
import shutil
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.catalog.readonly import classifier_report, status_report
from piaa_index.durable import damaged_files
from piaa_index.errors import DAMAGED_DATABASE_WAY_OUT, UserInputError
from piaa_index.layout import VectorsLayout
from piaa_index.library.part import Part
from piaa_index.library.tagging import NotReady, State, stored_decisions
from piaa_index.method.pvcl import unpack
from piaa_index.vectors.shards import (
    MANIFEST,
    MANIFEST_SETTING,
    VectorStore,
    VectorStoreError,
    infer_codec,
    manifest_problem,
)

if TYPE_CHECKING:
    from piaa_index.library.resources import Resources
    from piaa_index.library.tagging import Tagger


class Maintenance(Part):
    """Vacuum and status."""

    def __init__(self, resources: Resources, tagger: Tagger):
        super().__init__(resources)
        self.tagger = tagger

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
            with vectors.deleting():  # after every fit or search still reading them
                for shard in rewrite + dead:
                    vectors.delete_shard(shard)
        return {
            "shards_rewritten": len(rewrite),
            "shards_deleted": len(rewrite) + len(dead),
            "images_moved": moved,
            "bytes_before": before,
            "bytes_after": vectors.disk_bytes(),
        }

    def check(self, progress: bool = False) -> dict[str, Any]:
        """Verify the database (SQLite's integrity check) and every vector shard against its
        checksum. A damaged shard's images go back to the next index run's to-do list (SQL
        first, then the files are removed), so `piaa index` re-encodes them from the photos."""

        from tqdm import tqdm

        problems = self.store.integrity_problems()
        # The trigger-kept counts every query reads, against a real count (a sound file only).
        wrong_counts = None if problems else self.store.repair_image_counts()
        manifest = self._check_manifest()
        vectors = self.vectors
        damaged: list[dict[str, Any]] = []
        unchecked = 0
        with vectors.writer_lock():
            shards = sorted(self.store.referenced_shards())
            for shard in tqdm(shards, desc="checking", file=sys.stderr, disable=not progress):
                if not vectors.has_checksum(shard) and vectors.predates_checksums(shard):
                    unchecked += 1  # written before checksums existed
                    continue
                problem = vectors.verify_shard(shard)
                if problem is not None:
                    damaged.append({"shard": shard, "problem": problem})
            bad = [d["shard"] for d in damaged]
            sent_back = self.store.mark_shards_missing(bad)
            if bad:
                with vectors.deleting():  # after every fit or search still reading them
                    for shard in bad:
                        vectors.delete_shard(shard)
            derived = self._check_derived()
        scores = self._check_scores()
        classifier = self._check_classifier()
        return {
            "ok": not problems
            and wrong_counts is None
            and not damaged
            and not derived
            and not scores["damaged"]
            and manifest is None
            and classifier is None,
            # The vector folder's manifest.json, when damaged or lost (and rebuilt).
            "manifest": manifest,
            "database": {
                "ok": not problems,
                "problems": problems[:20],
                **({"way_out": DAMAGED_DATABASE_WAY_OUT} if problems else {}),
                # Images per status as the database held them, when they disagreed with a real
                # count (and were rewritten from it).
                "image_counts_rewritten": wrong_counts,
            },
            "vectors": {
                "shards": len(shards),
                "without_checksum": unchecked,
                "damaged": damaged,
                "images_to_reencode": sent_back,
            },
            # Indexes rebuilt from the shards (similar, text search): damage is removed here
            # and the next query that needs one builds it again.
            "derived_damaged": derived,
            # Score segments: a damaged one is no longer listed, its images are scored again.
            "scores": scores,
            # The latest classifier, when its stored weights cannot be read (and it was removed).
            "classifier": classifier,
        }

    def _check_classifier(self) -> dict[str, Any] | None:
        """Unpack the latest classifier's stored weights; remove it when they are damaged (a
        flipped byte in the database's blob), so that the next query fits it again."""
        from piaa_index.vectors.scores import cleanup, writer_lock

        latest = self.store.latest_classifier()
        if latest is None:
            return None
        try:
            unpack(latest.weights)
            return None
        except Exception as exc:  # noqa: BLE001 - any damage (BadZipFile, a short blob, …)
            problem = f"its stored weights cannot be read: {exc}"
        self.store.drop_classifier(int(latest.id))
        with writer_lock(self.tagger.scores_dir):
            cleanup(self.tagger.scores_dir, self.store.score_folders())
        return {
            "version": int(latest.id),
            "problem": problem,
            "action": "removed; the next query (or `piaa fit`) fits the vocabulary again",
        }

    def _check_manifest(self) -> dict[str, Any] | None:
        """Compare the vector manifest with the database's copy of it; rewrite a damaged or
        lost one from that copy (from the model record and the shards for a library older
        than the copy). None when it is sound."""

        root = self.vectors_dir
        recorded = self.store.get_setting(MANIFEST_SETTING)
        model = self.store.get_setting("model")
        try:
            manifest = VectorStore.read_manifest(root)
        except VectorStoreError:
            problem: str | None = "unreadable"
        else:
            if manifest is None:
                if not VectorStore.has_shards(root):
                    return None  # nothing indexed in this home
                problem = "missing"
            else:
                problem = manifest_problem(manifest, recorded, model)
        if problem is None:
            return None
        rebuilt = recorded
        if rebuilt is None and isinstance((model or {}).get("identity"), dict):
            assert model is not None
            rebuilt = {"identity": model["identity"], "codec": infer_codec(root)}
        if rebuilt is None:
            raise VectorStoreError(
                f"the vector manifest {root / MANIFEST} is damaged ({problem}) and the "
                "database has no record to rebuild it from: restore it from a backup"
            )
        VectorStore.write_manifest(root, rebuilt)
        return {
            "file": str(root / MANIFEST),
            "problem": problem,
            "action": "rebuilt from the database's record",
        }

    def _check_scores(self) -> dict[str, Any]:
        """Hash every committed score segment against its checksums; stop listing the damaged
        ones (SQL first, then their files go) so that the next query scores their images
        again from the vectors."""
        from piaa_index.vectors.scores import (
            check_segment,
            has_checksum,
            remove_segment,
            writer_lock,
        )

        root = self.tagger.scores_dir
        damaged: list[dict[str, Any]] = []
        total = unchecked = 0
        with writer_lock(root):
            for key, names in self.store.score_folders().items():
                folder = root / key
                bad = []
                for name in names:
                    total += 1
                    problem = check_segment(folder, name, full=True)
                    if problem is not None:
                        bad.append(name)
                        damaged.append({"segment": f"{key}/{name}", "problem": problem})
                    elif not has_checksum(folder, name):
                        unchecked += 1  # written before checksums existed
                if bad:
                    self.store.drop_score_segments(key, bad)
                    for name in bad:
                        remove_segment(folder, name)
        return {"segments": total, "without_checksum": unchecked, "damaged": damaged}

    def _check_derived(self) -> list[dict[str, Any]]:
        """Verify the derived indexes against the checksums in their meta.json; remove any
        that is damaged (or unreadable) so that it is rebuilt."""

        found = []
        layout = VectorsLayout(self.vectors_dir)
        for folder in (layout.similar, layout.text):
            if not (folder / "meta.json").exists():
                continue
            try:
                sums = json.loads((folder / "meta.json").read_text()).get("sums") or {}
                bad = damaged_files(folder, sums) if sums else []
            except (OSError, ValueError, AttributeError):
                bad = ["meta.json"]
            if bad:
                shutil.rmtree(folder, ignore_errors=True)
                found.append(
                    {"index": folder.name, "files": bad, "action": "removed; rebuilt when needed"}
                )
        return found

    def status(self) -> dict[str, Any]:
        """Counts, model, vocabulary, classifier version and staleness."""
        # Opening the vectors first reconciles them with SQL, so the counts are current.
        vectors_bytes = self.vectors.disk_bytes() if self.store.get_setting("model") else 0
        state: State | None = None
        if self.store.latest_classifier() is not None:
            try:  # the cached matrix when current; never fits or scores from here
                state = self.tagger.state(score_new=False)
            except (NotReady, UserInputError):
                state = None
        counts = state.image_counts if state is not None else self.store.image_counts()
        vocab = self.store.vocabulary()
        latest = self.store.latest_classifier()
        out = status_report(
            home=self.resources.settings.home,
            database=self.store.engine.url.render_as_string(hide_password=True),
            schema_revision=self.store.schema_revision(),
            model=self.store.get_setting("model"),
            counts=counts,
            vectors_bytes=vectors_bytes,
            vocabulary=(vocab.id, vocab.names, vocab.templates) if vocab else None,
            stale=self.tagger.is_stale(),
            labels_changed=self.tagger.labels_changed(),
        )
        if latest is not None:
            out["classifier"] = classifier_report(
                version=latest.id,
                vocabulary_version=latest.vocabulary_id,
                fitted_at=latest.created_at,
                n_images=latest.n_images,
                indexed=counts.get("indexed", 0),
                fitted_on=self.store.vocabulary_names(latest.vocabulary_id),
                decisions=stored_decisions(latest),
                tagged=self._tagged_counts(state),
            )
        return out

    def _tagged_counts(self, state: State | None) -> dict[str, int]:
        """Images decided present per label: the matrix's present bits when it is current,
        else the sparse SQL tags (the previous fit's, while the vocabulary is stale)."""
        if state is None:
            return self.store.tag_counts()
        counts = state.view.present_counts(len(state.vocab.labels))
        return {lb.name: int(n) for lb, n in zip(state.vocab.labels, counts, strict=True) if n}
