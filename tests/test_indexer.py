"""The `Library` API end to end on real files: indexing (incremental, prune, crash recovery,
model identity) and the vocabulary → fit → tags/search/similar flow, with the tiny random model."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from piaa_index.catalog.schema import INDEXED
from piaa_index.library.core import Library, LibraryError, UserInputError
from tests.image_files import (
    PhotoFolder,
    copy_photo_folder,
    make_photo_folder,
    rewrite_with_new_pixels,
    shapes_image,
)

LABELS = ["red circle", "blue circle", "green circle"]


def open_library(home: Path, model_config: Path, **kw: str) -> Library:
    """The library in `home` (its own SQLite file), on the tiny random model, on CPU."""
    kw.setdefault("model", str(model_config))
    kw.setdefault("pretrained", "none")
    return Library.open(home=home, db=f"sqlite:///{home / 'piaa.sqlite3'}", device="cpu", **kw)


def vectors_by_path(lib: Library) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """path → ([CLS], patches) of every indexed image, as stored."""
    locations = lib.store.live_locations()
    paths = lib.store.paths([loc[0] for loc in locations])
    out = {}
    for chunk in lib.vectors.iter_live(locations):
        for k, image_id in enumerate(chunk.image_ids):
            out[paths[int(image_id)]] = (chunk.cls[k], chunk.patches[k])
    return out


@pytest.fixture(scope="module")
def photo_template(tmp_path_factory: pytest.TempPathFactory) -> PhotoFolder:
    return make_photo_folder(tmp_path_factory.mktemp("photo-template") / "photos", n=60)


@pytest.fixture
def photos(photo_template: PhotoFolder, tmp_path: Path) -> PhotoFolder:
    """A fresh copy of the 60-photo folder for a test that changes files."""
    return copy_photo_folder(photo_template, tmp_path / "photos")


@pytest.fixture
def library(piaa_home: Path, tiny_model_config: Path) -> Iterator[Library]:
    lib = open_library(piaa_home, tiny_model_config)
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def fitted(
    photo_template: PhotoFolder, tiny_model_config: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Library, PhotoFolder]]:
    """An indexed, vocabulary-set and fitted library shared by the read-only query tests."""
    base = tmp_path_factory.mktemp("fitted")
    folder = copy_photo_folder(photo_template, base / "photos")
    lib = open_library(base / "home", tiny_model_config)
    lib.index([folder.root])
    lib.set_vocabulary(LABELS)
    lib.fit()
    yield lib, folder
    lib.close()


# -- indexing ----------------------------------------------------------------------------------


def test_first_index_reports_good_and_broken_files(library: Library, photos: PhotoFolder) -> None:
    """Every decodable image is indexed; broken files are listed with a reason, not fatal."""
    report = library.index([photos.root])

    assert report.indexed == photos.n_good == 60
    assert (report.unchanged, report.reused, report.removed) == (0, 0, 0)
    failed = {f["path"]: f["error"] for f in report.failed}
    assert set(failed) == {str(p) for p in photos.broken}
    for path, reason in photos.broken.items():
        assert reason in failed[str(path)]
    summary = report.as_dict()
    assert summary["indexed"] == 60 and len(summary["failed"]) == 2
    status = library.status()
    assert status["images"] == {"indexed": 60, "failed": 2, "pending": 0}
    assert status["model"]["model"] == library.spec.model
    # Every good file, including the non-ASCII name, can be looked up by its path.
    for path in photos.good:
        library.image_id(path)
    with pytest.raises(UserInputError, match="could not be indexed"):
        library.image_id(next(iter(photos.broken)))
    with pytest.raises(UserInputError, match="not in the index"):
        library.image_id(photos.root / "scans" / "README.txt")


def test_second_run_indexes_nothing(library: Library, photos: PhotoFolder) -> None:
    """Re-running on an unchanged folder re-encodes nothing and re-reports no failure."""
    library.index([photos.root])
    again = library.index([photos.root])
    assert again.indexed == 0 and again.reused == 0
    assert again.unchanged == 60
    assert again.still_failing == 2
    assert again.failed == []


def test_changed_and_copied_files(library: Library, photos: PhotoFolder) -> None:
    """Changed files are re-encoded; a copy of an indexed file reuses its vectors."""
    library.index([photos.root])
    before = vectors_by_path(library)
    changed = [photos.good[5], photos.heic, photos.good[40]]
    for k, path in enumerate(changed):
        rewrite_with_new_pixels(path, seed=k)
    original = photos.good[12]
    copy = original.with_name("copy of " + original.name)
    shutil.copyfile(original, copy)

    report = library.index([photos.root])

    assert (report.indexed, report.reused, report.unchanged) == (3, 1, 57)
    after = vectors_by_path(library)
    assert len(after) == 61
    for path in changed:
        assert not np.allclose(after[str(path)][0], before[str(path)][0])
    np.testing.assert_array_equal(after[str(copy)][0], after[str(original)][0])
    np.testing.assert_array_equal(after[str(copy)][1], after[str(original)][1])
    # The copy's nearest neighbour is its original, at similarity 1.
    top = library.similar(copy, limit=1)[0]
    assert top["path"] == str(original)
    assert top["score"] == pytest.approx(1.0, abs=1e-5)


def test_prune_forgets_deleted_files(library: Library, photos: PhotoFolder) -> None:
    """`prune` removes deleted files from the index; they leave similar and search results."""
    library.index([photos.root])
    library.set_vocabulary(LABELS)
    library.fit()
    gone = [photos.good[3], photos.unicode]
    for path in gone:
        path.unlink()

    plain = library.index([photos.root])
    assert plain.removed == 0  # without prune, nothing is forgotten
    report = library.index([photos.root], prune=True)

    assert report.removed == 2
    assert library.status()["images"]["indexed"] == 58
    neighbours = {row["path"] for row in library.similar(photos.good[0], limit=None)}
    assert len(neighbours) == 57
    assert not neighbours & {str(p) for p in gone}
    rows = library.search("red circle OR NOT red circle", limit=None, include_absent=True)
    found = {r["path"] for r in rows}
    assert len(found) == 58
    assert not found & {str(p) for p in gone}
    for path in gone:
        with pytest.raises(UserInputError):
            library.image_id(path)


def test_prune_is_limited_to_the_given_paths(library: Library, photos: PhotoFolder) -> None:
    """Pruning one sub-folder never forgets images indexed from elsewhere."""
    library.index([photos.root])
    report = library.index([photos.root / "2023"], prune=True)
    assert report.removed == 0
    assert library.status()["images"]["indexed"] == 60


def test_heic_and_exif_rotated_images(library: Library, photos: PhotoFolder) -> None:
    """HEIC files are indexed; EXIF-rotated JPEGs are stored with their upright size."""
    report = library.index([photos.root / "2023" / "summer", photos.heic])
    assert report.failed == []
    heic = library.store.image_by_path(str(photos.heic))
    assert heic is not None and heic.status == INDEXED
    assert heic.width and heic.height
    for path, (w, h) in photos.rotated.items():
        row = library.store.image_by_path(str(path))
        assert row is not None and row.status == INDEXED
        assert (row.width, row.height) == (h, w)


def test_single_file_and_missing_path(library: Library, photos: PhotoFolder) -> None:
    """A file can be indexed on its own; a path that does not exist is a user error."""
    report = library.index([photos.heic])
    assert report.indexed == 1
    with pytest.raises(UserInputError, match="no such file or folder"):
        library.index([photos.root / "does-not-exist"])


def test_another_model_on_the_same_index_is_refused(
    library: Library, photos: PhotoFolder, piaa_home: Path, tiny_model_config: Path
) -> None:
    """An index made with one model cannot be opened with another (vectors would not mix)."""
    library.index([photos.root / "scans"])
    library.close()

    with pytest.raises(LibraryError) as err:
        open_library(piaa_home, tiny_model_config, model="ViT-B-32")
    message = str(err.value)
    assert "ViT-B-32" in message and str(tiny_model_config) in message

    # Without --model, the index's own model is used.
    reopened = Library.open(home=piaa_home, db=f"sqlite:///{piaa_home / 'piaa.sqlite3'}")
    try:
        assert reopened.spec.model == str(tiny_model_config)
        assert reopened.spec.pretrained == "none"
    finally:
        reopened.close()


def test_random_tiny_model_is_deterministic(
    photos: PhotoFolder, tiny_model_config: Path, tmp_path: Path
) -> None:
    """pretrained='none' must build the same weights every time, or a later process would
    score stored image vectors against text from a different random model."""
    subset = photos.root / "2024"
    libs = [open_library(tmp_path / f"home{i}", tiny_model_config) for i in range(2)]
    try:
        for lib in libs:
            lib.index([subset])
        a, b = (vectors_by_path(lib) for lib in libs)
        assert set(a) == set(b) and a
        for path in a:
            np.testing.assert_allclose(a[path][0], b[path][0], atol=1e-6)
            np.testing.assert_allclose(a[path][1], b[path][1], atol=1e-3)
        ta, tb = (lib.encoder.text_prototypes(["red circle"]) for lib in libs)
        np.testing.assert_allclose(ta, tb, atol=1e-6)
    finally:
        for lib in libs:
            lib.close()


# -- crash recovery ----------------------------------------------------------------------------


def test_orphan_shard_is_deleted_on_open(
    library: Library, photos: PhotoFolder, piaa_home: Path, tiny_model_config: Path
) -> None:
    """A shard written by a run that died before its SQL commit is cleaned up on next open."""
    n = library.index([photos.root / "2024"]).indexed
    vs = library.vectors
    orphan = vs.next_shard_id()
    rng = np.random.default_rng(0)
    cls = rng.standard_normal((2, vs.dim)).astype(np.float32)
    patches = rng.standard_normal((2, vs.n_patches, vs.dim)).astype(np.float32)
    vs.write_shard(orphan, [10_001, 10_002], cls, patches)
    (vs.root / "000099.patch.faiss.tmp").write_bytes(b"cut short")
    library.close()

    lib = open_library(piaa_home, tiny_model_config)
    try:
        assert orphan not in lib.vectors.shard_ids()
        assert not list(lib.vectors_dir.glob(f"{orphan:06d}.*"))
        assert not list(lib.vectors_dir.glob("*.tmp"))
        report = lib.index([photos.root / "2024"])
        assert (report.indexed, report.unchanged) == (0, n)
        assert len(lib.similar(photos.heic, limit=None)) == n - 1
    finally:
        lib.close()


@pytest.mark.parametrize("lost", ["cls", "patch", "both"])
def test_lost_shard_is_reindexed(
    library: Library, photos: PhotoFolder, piaa_home: Path, tiny_model_config: Path, lost: str
) -> None:
    """Images whose vector shard vanished are sent back to, and fixed by, the next run."""
    n_lost = library.index([photos.root / "2023"]).indexed  # shard 1
    n_kept = library.index([photos.root / "2024"]).indexed  # shard 2
    n = n_lost + n_kept
    assert n_lost > 0 and n_kept > 0
    kinds = ["cls", "patch"] if lost == "both" else [lost]
    for kind in kinds:
        (library.vectors_dir / f"000001.{kind}.faiss").unlink()
    library.close()

    lib = open_library(piaa_home, tiny_model_config)
    try:
        status = lib.status()  # the first use after a crash already shows the truth
        assert status["images"]["indexed"] == n_kept
        assert status["images"]["pending"] == n_lost
        assert len(lib.similar(photos.heic, limit=None)) == n_kept - 1
        report = lib.index([photos.root / "2023", photos.root / "2024"])
        assert (report.indexed, report.unchanged) == (n_lost, n_kept)
        assert lib.status()["images"]["indexed"] == n
        assert len(lib.similar(photos.heic, limit=None)) == n - 1
        lib.set_vocabulary(LABELS)
        assert len(lib.search("red circle", limit=None, include_absent=True)) == n
    finally:
        lib.close()


class _InterruptedEncoder:
    """The real encoder, with Ctrl-C pressed during its `n`-th batch."""

    def __init__(self, encoder: object, n: int):
        self._encoder, self._n, self.calls = encoder, n, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._encoder, name)

    def encode_images(self, batch):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == self._n:
            raise KeyboardInterrupt
        return self._encoder.encode_images(batch)


def test_interrupted_run_resumes(
    library: Library, photos: PhotoFolder, piaa_home: Path, tiny_model_config: Path
) -> None:
    """Ctrl-C keeps the commit groups already written; the next run does only the rest."""
    from piaa_index.engines.indexer import Indexer

    flaky = _InterruptedEncoder(library.encoder, n=4)
    indexer = Indexer(library.store, library.vectors, lambda: flaky, batch_size=8, commit_every=16)
    with pytest.raises(KeyboardInterrupt):
        indexer.run([photos.root], progress=False)
    library.close()

    lib = open_library(piaa_home, tiny_model_config)
    try:
        images = lib.status()["images"]
        done = images["indexed"]
        assert 0 < done < 60
        assert images["pending"] == 0
        report = lib.index([photos.root])
        assert (report.indexed, report.unchanged) == (60 - done, done)
        assert lib.status()["images"] == {"indexed": 60, "failed": 2, "pending": 0}
        assert len(lib.similar(photos.good[0], limit=None)) == 59
    finally:
        lib.close()


# -- the pipeline: the next chunk decodes while this one encodes ------------------------------


def _numbered_photos(folder: Path, n: int) -> list[Path]:
    """`n` distinct PNGs, p_00.png..., in scan order."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    paths = [folder / f"p_{i:02d}.png" for i in range(n)]
    for path in paths:
        shapes_image(rng, (96, 64)).save(path)
    return paths


class _WatchedEncoder:
    """The real encoder; `hook` runs before each encode_images call."""

    def __init__(self, encoder: object, hook: Callable[[], None]):
        self._encoder, self._hook = encoder, hook

    def __getattr__(self, name: str) -> object:
        return getattr(self._encoder, name)

    def encode_images(self, batch):  # type: ignore[no-untyped-def]
        self._hook()
        return self._encoder.encode_images(batch)


def test_the_next_chunk_decodes_while_this_one_encodes(
    library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from piaa_index.engines import indexer

    paths = _numbered_photos(tmp_path / "photos", 8)
    next_chunk = {str(p) for p in paths[4:]}
    started = threading.Event()
    real_load = indexer.load_image

    def load_image(path: str, *args: object, **kw: object) -> object:
        if str(path) in next_chunk:
            started.set()
        return real_load(path, *args, **kw)

    monkeypatch.setattr(indexer, "load_image", load_image)
    seen: list[bool] = []
    watched = _WatchedEncoder(library.encoder, lambda: seen.append(started.wait(30)))
    run = indexer.Indexer(library.store, library.vectors, lambda: watched, batch_size=4)
    report = run.run([tmp_path / "photos"], progress=False)

    assert report.indexed == 8
    assert seen == [True, True]  # chunk 1 was decoding before chunk 0 was encoded


def test_a_copy_of_a_file_committed_after_the_last_chunk_reuses_its_vectors(
    library: Library, tmp_path: Path
) -> None:
    """The next chunk is hashed before this chunk's commit: what it reuses is looked up again
    after the commit, so that a run reuses what a serial run would."""
    from piaa_index.engines.indexer import Indexer

    paths = _numbered_photos(tmp_path / "photos", 8)
    shutil.copyfile(paths[1], paths[5])  # in chunk 1; its original commits with chunk 0
    run = Indexer(library.store, library.vectors, lambda: library.encoder, 4, commit_every=4)
    report = run.run([tmp_path / "photos"], progress=False)

    assert (report.indexed, report.reused) == (7, 1)
    stored = vectors_by_path(library)
    for a, b in zip(stored[str(paths[1])], stored[str(paths[5])], strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("stage", ["decode", "preprocess"])
def test_an_error_in_the_background_is_raised_after_the_commits_before_it(
    stage: str, library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a file's failure: the run stops where a serial run would, chunk 0 committed."""
    from piaa_index.engines import indexer

    paths = _numbered_photos(tmp_path / "photos", 12)
    victim = str(paths[6])  # in chunk 1
    real_load = indexer.load_image

    def load_image(path: str, *args: object, **kw: object) -> object:
        if str(path) == victim:
            if stage == "decode":
                raise RuntimeError("boom")
            img = real_load(path, *args, **kw)
            img.info["boom"] = True  # type: ignore[attr-defined]
            return img
        return real_load(path, *args, **kw)

    def preprocess(img: object) -> object:
        if getattr(img, "info", {}).get("boom"):
            raise RuntimeError("boom")
        return library.encoder.preprocess(img)  # type: ignore[arg-type]

    monkeypatch.setattr(indexer, "load_image", load_image)
    encoder = _WatchedEncoder(library.encoder, lambda: None)
    encoder.preprocess = preprocess  # type: ignore[attr-defined]
    run = indexer.Indexer(library.store, library.vectors, lambda: encoder, 4, commit_every=4)
    with pytest.raises(RuntimeError, match="boom"):
        run.run([tmp_path / "photos"], progress=False)

    assert library.status()["images"] == {"indexed": 4, "failed": 0, "pending": 0}
    for thread in threading.enumerate():
        if thread.name == "piaa-decode":
            thread.join(30)  # it ends after the call it was running
            assert not thread.is_alive()


def test_preprocessing_in_the_decode_threads_changes_nothing(
    library: Library, photos: PhotoFolder
) -> None:
    """`decode_files` with the encoder's preprocess (the local indexer) and without it (the Ray
    engine, which preprocesses in `encode_decoded`): the same vectors and sizes, to the byte."""
    from piaa_index.engines.indexer import decode_files, encode_decoded
    from piaa_index.ingest.images import MemoryBudget
    from piaa_index.ingest.scan import scan

    special = {*photos.rotated, photos.heic, photos.unicode}  # EXIF-rotated: original size
    good = [f for f in scan([photos.root]).files if Path(f.path) in set(photos.good)]
    files = [f for f in good if Path(f.path) in special] + good[:8]
    assert len(files) >= 12
    encoder = library.encoder
    hashes = {f.path: "h" for f in files}
    draft = max(encoder.image_size)
    outs = []
    for preprocess in (None, encoder.preprocess):
        decoded = decode_files(files, draft, MemoryBudget(1 << 28), 3, 60.0, preprocess)
        outs.append(encode_decoded(encoder, decoded, hashes, 5))
    for a, b in zip(*outs, strict=True):
        assert (a.info, a.width, a.height) == (b.info, b.width, b.height)
        assert a.cls.tobytes() == b.cls.tobytes()
        assert a.patches.tobytes() == b.patches.tobytes()


# -- vocabulary, fit, tags, search -------------------------------------------------------------


def test_vocabulary_change_makes_tags_stale_and_search_fits(
    library: Library, photos: PhotoFolder
) -> None:
    """Setting labels marks tags stale; the first search fits and tags, then they are fresh."""
    library.index([photos.root])
    assert not library.is_stale()
    library.set_vocabulary(LABELS)
    assert library.is_stale()
    assert library.status()["stale"] is True
    assert library.status()["classifier"] is None

    rows = library.search("red circle AND blue circle", limit=None, include_absent=True)

    assert not library.is_stale()
    status = library.status()
    assert status["classifier"]["n_images"] == 60
    assert len(rows) == 60
    good = {str(p) for p in photos.good}
    for row in rows:
        assert row["path"] in good
        assert 0.0 <= row["score"] <= 1.0
        assert set(row["labels"]) == {"red circle", "blue circle"}
        both = row["labels"]["red circle"]["present"] and row["labels"]["blue circle"]["present"]
        assert row["match"] == both
    # Matches first, then by score.
    keys = [(not r["match"], -r["score"]) for r in rows]
    assert keys == sorted(keys)
    matching = library.search("red circle AND blue circle", limit=None)
    assert [r["path"] for r in matching] == [r["path"] for r in rows if r["match"]]
    # Same vocabulary again: no new version, still fresh.
    library.set_vocabulary(LABELS)
    assert not library.is_stale()


def test_search_needs_a_vocabulary(library: Library, photos: PhotoFolder) -> None:
    """Searching before any labels are set says how to set them."""
    library.index([photos.root / "scans"])
    with pytest.raises(UserInputError, match="vocab set"):
        library.search("dog")


def test_unknown_label_and_bad_syntax_are_user_errors(
    fitted: tuple[Library, PhotoFolder],
) -> None:
    """A label outside the vocabulary is named in the error; malformed queries are refused."""
    lib, _ = fitted
    version = lib.status()["classifier"]["version"]
    with pytest.raises(UserInputError, match="zebra"):
        lib.search("red circle AND zebra")
    with pytest.raises(UserInputError):
        lib.search("red circle AND (")
    with pytest.raises(UserInputError):
        lib.search("")
    assert lib.status()["classifier"]["version"] == version


def assert_tag_rule(row: dict) -> None:
    """The rule (docs/method.md): patch evidence at its threshold and text support at its gate.
    None means no gate (-inf) or, for an absent label, a threshold no image reaches (+inf).
    Scores are stored as float32, so values within 1e-6 of a bound are not judged."""
    threshold = float("inf") if row["threshold"] is None else row["threshold"]
    gate = float("-inf") if row["support_gate"] is None else row["support_gate"]
    if min(abs(row["patch_score"] - threshold), abs(row["text_support"] - gate)) > 1e-6:
        expected = row["patch_score"] >= threshold and row["text_support"] >= gate
        assert row["present"] == expected, row


def test_tags_of_one_image(fitted: tuple[Library, PhotoFolder]) -> None:
    """tags(path) gives every label with its score, threshold and present decision."""
    lib, folder = fitted
    rows = lib.tags(folder.unicode)
    assert sorted(r["label"] for r in rows) == sorted(LABELS)
    for row in rows:
        assert {"score", "patch_score", "cls_score", "present", "threshold"} <= set(row)
        assert {"text_support", "support_gate", "label_status", "why"} <= set(row)
        assert 0.0 <= row["score"] <= 1.0
        assert_tag_rule(row)
        assert row["why"]
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    # The decision stored in tags is the one search uses.
    present = {r["label"] for r in rows if r["present"]}
    hits = {r["path"] for r in lib.search("red circle", limit=None)}
    assert (str(folder.unicode) in hits) == ("red circle" in present)


def test_text_search_does_not_refit(fitted: tuple[Library, PhotoFolder]) -> None:
    """A free-text phrase is scored on the fly; the classifier and tags are untouched."""
    lib, folder = fitted
    version = lib.status()["classifier"]["version"]

    rows = lib.text_search("red circle", limit=5)

    assert len(rows) == 5
    assert all(set(r) >= {"path", "score"} for r in rows)
    assert all(r["path"] in {str(p) for p in folder.good} for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert len(lib.text_search("a yellow umbrella", limit=None)) == 60
    assert lib.status()["classifier"]["version"] == version
    assert not lib.is_stale()
    with pytest.raises(UserInputError):
        lib.text_search("   ")


def test_similar_excludes_the_query_image(fitted: tuple[Library, PhotoFolder]) -> None:
    """similar(path) returns `limit` other images, most similar first."""
    lib, folder = fitted
    query = folder.good[7]
    rows = lib.similar(query, limit=5)
    assert len(rows) == 5
    assert str(query) not in {r["path"] for r in rows}
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert len(lib.similar(query, limit=None)) == 59


def test_similar_to_a_file_outside_the_index(
    fitted: tuple[Library, PhotoFolder], tmp_path: Path
) -> None:
    """A photo that was never indexed can be used as the query (it is encoded on the fly)."""
    lib, folder = fitted
    outside = tmp_path / "new.png"
    shapes_image(np.random.default_rng(99), (80, 80)).save(outside)
    rows = lib.similar(outside, limit=3)
    assert len(rows) == 3
    # A byte-identical copy of an indexed image finds that image first.
    twin = tmp_path / ("twin" + folder.good[20].suffix)
    shutil.copyfile(folder.good[20], twin)
    assert lib.similar(twin, limit=1)[0]["path"] == str(folder.good[20])
    with pytest.raises(UserInputError):
        lib.similar(tmp_path / "nothing-here.jpg")


def test_new_images_are_tagged_without_refit(library: Library, photos: PhotoFolder) -> None:
    """Images indexed after a fit get tags at the next query from the same classifier."""
    library.index([photos.root / "2023"])
    library.set_vocabulary(LABELS)
    fit = library.fit()
    assert fit.n_images < 60
    assert set(fit.thresholds) == set(LABELS)
    library.index([photos.root])
    assert library.status()["classifier"]["images_added_since"] == 60 - fit.n_images

    rows = library.search("green circle", limit=None, include_absent=True)

    assert len(rows) == 60
    assert library.status()["classifier"]["version"] == fit.classifier_id
    assert {r["label"] for r in library.tags(photos.heic)} == set(LABELS)


def test_vocabulary_change_refits(library: Library, photos: PhotoFolder) -> None:
    """Adding or removing labels makes a new classifier on the next query."""
    library.index([photos.root / "2024"])
    library.set_vocabulary(LABELS[:2])
    first = library.fit().classifier_id
    library.add_labels(["green circle"])
    assert library.is_stale()
    library.search("green circle")
    second = library.status()["classifier"]["version"]
    assert second != first
    assert {r["label"] for r in library.tags(photos.heic)} == set(LABELS)
    library.remove_labels(["red circle"])
    with pytest.raises(UserInputError, match="red circle"):
        library.search("red circle")
    with pytest.raises(UserInputError, match="not in the vocabulary"):
        library.remove_labels(["zebra"])


def test_other_home_on_the_same_database_does_not_lose_the_index(
    library: Library, photos: PhotoFolder, piaa_home: Path, tiny_model_config: Path, tmp_path: Path
) -> None:
    """Pointing at an indexed database from a home without its vector files (forgotten --home,
    a second machine on the same Postgres) must fail clearly, not mark every image lost."""
    library.index([photos.root / "2024"])
    n = library.status()["images"]["indexed"]
    library.close()
    db = f"sqlite:///{piaa_home / 'piaa.sqlite3'}"

    elsewhere = Library.open(home=tmp_path / "other-home", db=db)
    refused = None
    try:
        elsewhere.status()
    except LibraryError as exc:
        refused = exc
    finally:
        elsewhere.close()
    back = open_library(piaa_home, tiny_model_config)
    try:
        assert back.status()["images"]["indexed"] == n, "images were marked lost"
        assert back.index([photos.root / "2024"]).indexed == 0
    finally:
        back.close()
    assert refused is not None and "home" in str(refused)


def test_file_that_became_unreadable_leaves_search_results(
    library: Library, photos: PhotoFolder
) -> None:
    """A photo overwritten by a broken file is reported failed and no longer found by search."""
    library.index([photos.root / "2024"])
    library.set_vocabulary(LABELS)
    library.fit()
    victim = photos.heic
    victim.write_bytes(b"\x00" * 100)

    report = library.index([photos.root / "2024"])

    assert [f["path"] for f in report.failed] == [str(victim)]
    with pytest.raises(UserInputError, match="could not be indexed"):
        library.tags(victim)
    rows = library.search("red circle OR NOT red circle", limit=None, include_absent=True)
    assert str(victim) not in {r["path"] for r in rows}
    assert str(victim) not in {r["path"] for r in library.similar(photos.unicode, limit=None)}


def test_a_reader_during_an_index_run_leaves_its_uncommitted_shard_alone(
    tmp_path, tiny_model_config
):
    """`piaa status` while another process indexes must not delete the shard in flight."""
    import numpy as np

    from piaa_index.library.core import Library

    photos = tmp_path / "p"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 30)).save(photos / "a.png")
    opts = dict(home=tmp_path / "h", model=str(tiny_model_config), pretrained="none")
    with Library.open(**opts) as writer:
        writer.index([photos])
        vectors = writer.vectors
        in_flight = vectors.next_shard_id()
        d, m = vectors.dim, vectors.n_patches
        with vectors.writer_lock():  # the "other process" has written but not committed
            vectors.write_shard(
                in_flight, [999], np.ones((1, d), np.float32), np.ones((1, m, d), np.float32)
            )
            with Library.open(**opts) as reader:
                reader.status()
            assert in_flight in vectors.shard_ids()
    with Library.open(**opts) as later:  # no writer any more: now it is a crash's orphan
        later.status()
        assert in_flight not in later.vectors.shard_ids()


def test_search_matches_labels_case_insensitively_and_shows_the_vocabulary_spelling(
    library: Library, photos: PhotoFolder
) -> None:
    """`straße AND "RED circle"` finds the labels "Straße" and "Red Circle" (casefolded, so ß
    matches "ss" too) and the rows name them as the vocabulary spells them."""
    library.index([photos.root])
    library.set_vocabulary(["Straße", "Red Circle", "blue circle"])
    for query in ('straße AND "RED circle"', "STRASSE AND red   circle"):
        rows = library.search(query, limit=3, include_absent=True)
        assert rows and set(rows[0]["labels"]) == {"Straße", "Red Circle"}


def test_vacuum_reclaims_dead_rows_and_merges_small_shards(
    library: Library, photos: PhotoFolder
) -> None:
    """After re-encoding and pruning, `vacuum` rewrites shards: every image keeps exactly its
    vectors, the dead rows' space is reclaimed, queries still work, and a second run is a no-op."""
    folders = sorted({p.parent for p in photos.good})
    for folder in folders:  # one small shard per run
        library.index([folder])
    changed = photos.good[:8]
    for k, path in enumerate(changed):
        rewrite_with_new_pixels(path, seed=100 + k)
    library.index([photos.root])
    gone = photos.good[-5:]
    for path in gone:
        path.unlink()
    library.index([photos.root], prune=True)
    shards_before = len(library.vectors.shard_ids())
    vectors_before = vectors_by_path(library)

    report = library.vacuum()

    assert report["shards_rewritten"] >= 2 and report["bytes_after"] < report["bytes_before"]
    assert len(library.vectors.shard_ids()) < shards_before
    after = vectors_by_path(library)
    assert after.keys() == vectors_before.keys()
    for path, (cls, patches) in vectors_before.items():
        assert np.array_equal(after[path][0], cls) and np.array_equal(after[path][1], patches)
    assert library.similar(photos.good[10], limit=3)
    assert library.vacuum()["shards_rewritten"] == 0


def test_vacuum_waits_for_a_pass_that_reads_the_old_shards(
    library: Library, photos: PhotoFolder
) -> None:
    """A fit or a text search holds the shards it was given (`VectorStore.reading`): a vacuum
    meanwhile rewrites and switches SQL, but deletes the old files only once the pass ends
    (before, `db vacuum` during a fit killed the fit: "vector shard N is missing")."""
    import threading
    import time

    for folder in sorted({p.parent for p in photos.good}, key=lambda p: -len(p.parts)):
        library.index([folder])  # deepest first: many small shards, which vacuum merges
    old = set(library.vectors.shard_ids())
    assert len(old) >= 3
    locations = library.store.live_locations()
    done = threading.Event()

    with library.vectors.reading():
        vacuum = threading.Thread(target=lambda: (library.vacuum(), done.set()))
        vacuum.start()
        deadline = time.monotonic() + 120
        while {loc[1] for loc in library.store.live_locations()} & old:
            assert time.monotonic() < deadline, "vacuum never switched SQL to new shards"
            time.sleep(0.05)
        assert not done.is_set()
        # The pass still reads every image through the locations it started with.
        got = sum(len(c.image_ids) for c in library.vectors.iter_live(locations))
        assert got == len(locations)
    vacuum.join(timeout=120)
    assert done.is_set()
    assert not (old & library.vectors.shard_ids())
