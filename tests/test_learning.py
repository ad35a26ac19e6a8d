"""Learning from users' own labels (issue 21): the method on arrays, and the library path
from `piaa labels import csv` to a fit that says which labels use what it learnt."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from piaa_index.method.learning import Examples, LearnParams, average_precision, learn
from tests.cli_main import run_main


def _synthetic(n: int, seed: int) -> tuple[Examples, np.ndarray, np.ndarray]:
    """Images of 8 unit patches in 16 dims; label 0 is held where one patch points along a
    hidden direction, label 1 is a coin flip. The training-free row of label 0 is off by 60°
    from the hidden direction: labels must turn it."""
    rng = np.random.default_rng(seed)
    d, M = 16, 8
    truth = np.zeros(d, np.float32)
    truth[0] = 1.0
    X = rng.normal(size=(n, M, d)).astype(np.float32)
    held = rng.random(n) < 0.3
    X[held, 0] += 3.0 * truth
    X /= np.linalg.norm(X, axis=2, keepdims=True)
    start = np.zeros(d, np.float32)
    start[0], start[1] = 0.5, np.sqrt(0.75)
    W0 = np.stack([2.0 * start, rng.normal(size=d).astype(np.float32)])
    Y = np.stack([held, rng.random(n) < 0.5], axis=1).astype(np.int8)
    cls = X.mean(axis=1)
    ex = Examples(X, np.zeros((n, M), np.float32), cls, Y)
    return ex, W0, np.zeros(2, np.float32)


def test_learning_turns_a_label_where_held_out_labels_say_so_and_leaves_noise_alone() -> None:
    ex, W0, b0 = _synthetic(3000, seed=1)
    T = np.eye(2, 16, dtype=np.float32)
    learnt = learn(ex, W0, b0, T, 1.0, params=LearnParams(steps=150, lr=0.01))
    report = {int(k): v for k, v in learnt.report.items()}
    # Label 0: the labels carry signal; held-out AP must beat the training-free row's.
    assert learnt.chosen[0], report[0]
    gain = report[0]["held_out_AP"]
    assert gain["learnt"] > gain["training_free"] + 1.0
    # On fresh images the learnt row ranks better too (not only on the labelled ones).
    test, _, _ = _synthetic(3000, seed=2)
    free = (test.patches @ W0[0]).max(axis=1)
    mine = (test.patches @ learnt.W[0]).max(axis=1)
    assert (
        average_precision(mine, test.Y[:, 0] == 1)
        > average_precision(free, test.Y[:, 0] == 1) + 1.0
    )
    # Label 1 is noise: nothing to learn, so the training-free score stays.
    assert not learnt.chosen[1], report[1]
    assert report[1]["used"] == "training-free"


def test_a_label_with_too_few_labels_keeps_the_training_free_score() -> None:
    ex, W0, b0 = _synthetic(2000, seed=3)
    ex.Y[:, 0] = -1
    ex.Y[:3, 0] = 1  # three images say "held": fewer than min_positives
    learnt = learn(ex, W0, b0, np.eye(2, 16, dtype=np.float32), 1.0)
    assert not learnt.chosen[0]
    assert "too few labels" in learnt.report["0"]["why"]


@pytest.fixture
def labelled_home(shapes_home: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the shared fitted library and the ground truth of its images as a
    `path,label` CSV (the user's keywords)."""
    home = tmp_path / "home"
    shutil.copytree(shapes_home, home)
    data = shapes_home.parent / "library"
    classes = json.loads((data / "classes.json").read_text())
    rows = []
    for line in (data / "labels.txt").read_text().splitlines():
        rel, *ids = line.split()
        path = str((data / rel).resolve())
        rows += [(path, classes[int(i)]) for i in ids] or [(path, "")]
    csv_file = tmp_path / "keywords.csv"
    with csv_file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return home, csv_file


def test_imported_keywords_are_learnt_by_the_next_fit_which_says_what_it_used(
    labelled_home: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home, csv_file = labelled_home
    base = ["--home", str(home), "--model", "shapesworld"]
    code, out, _ = run_main([*base, "labels", "import", "csv", str(csv_file), "--json"],
                            monkeypatch, capsys)  # fmt: skip
    assert code == 0
    imported = json.loads(out)
    assert imported["images"] == 48 and not imported["not_indexed"]
    # Complete labelling: every vocabulary label of every listed image is recorded.
    assert imported["labels_written"] == 48 * 24
    # The tags still stand (queries answer); status says a fit would learn.
    code, out, _ = run_main([*base, "status", "--json"], monkeypatch, capsys)
    assert json.loads(out)["stale"] is False and json.loads(out)["labels_changed"] is True
    code, out, _ = run_main([*base, "fit", "--json"], monkeypatch, capsys)
    assert code == 0
    report = json.loads(out)
    learning = report["learning"]
    assert learning["images"] == 48
    assert set(learning["labels"]) == set(report["labels"])
    for name, rec in learning["labels"].items():
        assert rec["used"] in ("learnt", "training-free")
        assert (name in learning["learnt"]) == (rec["used"] == "learnt")
        assert report["labels"][name]["learning"] == rec
    code, out, _ = run_main([*base, "status", "--json"], monkeypatch, capsys)
    assert json.loads(out)["labels_changed"] is False
    # One correction is a change the next fit learns from.
    some_image = next(iter(csv.reader(csv_file.open())))  # header
    first = next(r for r in csv.reader(csv_file.open()) if r != some_image)
    code, _, _ = run_main([*base, "labels", "set", first[0], "mug", "yes"], monkeypatch, capsys)
    assert code == 0
    code, out, _ = run_main([*base, "status", "--json"], monkeypatch, capsys)
    assert json.loads(out)["labels_changed"] is True
    # Export reads back what was imported, with the correction.
    code, out, _ = run_main([*base, "labels", "export"], monkeypatch, capsys)
    exported = {(r[0], r[1]) for r in list(csv.reader(out.splitlines()))[1:]}
    given = {(r[0], r[1]) for r in list(csv.reader(csv_file.open()))[1:]}
    assert exported - given == {(first[0], "mug")} or (first[0], "mug") in given
    assert given - exported <= {(first[0], "")}


def test_bad_label_files_and_images_are_usage_errors(
    labelled_home: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    home, _ = labelled_home
    base = ["--home", str(home), "--model", "shapesworld"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,tag\na.jpg,dog\n")
    code, _, err = run_main([*base, "labels", "import", "csv", str(bad)], monkeypatch, capsys)
    assert code == 2 and "line 1" in err and "Traceback" not in err
    bad.write_text("path,label\na.jpg,dog,cat\n")
    code, _, err = run_main([*base, "labels", "import", "csv", str(bad)], monkeypatch, capsys)
    assert code == 2 and "line 2" in err
    code, _, err = run_main([*base, "labels", "import", "csv", str(tmp_path / "none.csv")],
                            monkeypatch, capsys)  # fmt: skip
    assert code == 2 and "no such file" in err
    code, _, err = run_main([*base, "labels", "set", str(tmp_path / "missing.jpg"), "dog", "yes"],
                            monkeypatch, capsys)  # fmt: skip
    assert code == 2 and "no such file" in err


def test_user_labels_are_stored_apart_and_versioned(postgres_database) -> None:  # type: ignore[no-untyped-def]
    """On Postgres (the SQLite path runs above): upsert by case-folded label, forget, and a
    version every change moves."""
    from piaa_index.catalog.store import Store, utcnow

    store = Store.open(postgres_database())  # its own database: it adds 1,200 images
    try:
        store.commit_images(
            [],
            [
                {
                    "path": f"/p/{i}.jpg",
                    "content_hash": None,
                    "size": 1,
                    "mtime": 0.0,
                    "status": "failed",
                    "error": "x",
                    "indexed_at": utcnow(),
                }
                for i in range(1200)
            ],  # fmt: skip
        )
        ids = sorted(store.image_ids_by_path([f"/p/{i}.jpg" for i in range(1200)]).values())
        v0 = store.user_labels_version()
        assert store.set_user_labels([(i, "Dog", i % 2 == 0) for i in ids], "csv") == 1200
        assert store.set_user_labels([(ids[0], "DOG", False)], "cli") == 1
        # Saying again what is recorded changes nothing, and is no change to learn from.
        assert store.set_user_labels([(i, "Dog", i % 2 == 0) for i in ids[1:]], "api") == 0
        rows = store.user_labels()
        assert len(rows) == 1200 and rows[0][1:] == ("dog", "DOG", False, "cli")
        assert store.forget_user_labels(ids[:500], "dog") == 500
        assert len(store.user_labels()) == 700
        assert store.user_labels_version() == v0 + 3
    finally:
        store.close()


def test_a_label_learns_the_same_whatever_other_labels_are_learnt_beside_it() -> None:
    """The open world: label 0's learnt row, calibration and choice are the same learnt alone
    as beside another label (and with labels missing for half the images of the other)."""
    ex, W0, b0 = _synthetic(2000, seed=4)
    ex.Y[1000:, 1] = -1
    T = np.eye(2, 16, dtype=np.float32)
    params = LearnParams(steps=60, lr=0.01)
    both = learn(ex, W0, b0, T, 1.0, params=params)
    alone_ex = Examples(ex.patches, ex.background, ex.cls, ex.Y[:, :1])
    alone = learn(alone_ex, W0[:1], b0[:1], T[:1], 1.0, params=params)
    assert both.chosen[0] == alone.chosen[0]
    np.testing.assert_allclose(both.W[0], alone.W[0], atol=1e-6)
    np.testing.assert_allclose(both.cls_protos[0], alone.cls_protos[0], atol=1e-6)
    assert abs(both.slope[0] - alone.slope[0]) < 1e-6
    assert abs(both.intercept[0] - alone.intercept[0]) < 1e-6


def _truth_rows(home: Path, library: Any) -> list[tuple[int, str, bool]]:
    """Every (image id, label, present) of the shared library's ground truth: a complete
    labelling, as `labels import csv` stores one."""
    data = home.parent / "library"
    classes = json.loads((data / "classes.json").read_text())
    held: dict[str, set[str]] = {}
    for line in (data / "labels.txt").read_text().splitlines():
        rel, *ids = line.split()
        held[str((data / rel).resolve())] = {classes[int(i)] for i in ids}
    ids = library.store.image_ids_by_path(list(held))
    return [(ids[p], name, name in labels) for p, labels in held.items() for name in classes]


def _state(library: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    """(classifier rows W [C, d], the fused score matrix, the tag matrix) of the last fit."""
    fitted = library.tagger.fitted_for(library.store.latest_classifier())
    return fitted.classifier.W.copy(), fitted.classifier.b.copy(), library.tag_matrix()


def test_a_correction_relearns_its_own_label_only_as_a_full_fit_would(
    shapes_home: Path, tmp_path: Path
) -> None:
    from tests.shapes_library import open_shapes_library

    homes = {}
    for name in ("incremental", "full"):
        homes[name] = tmp_path / name / "index"
        shutil.copytree(shapes_home, homes[name])
    with open_shapes_library(homes["incremental"]) as library:
        W0, _, M0 = _state(library)  # training-free
        truth = _truth_rows(shapes_home, library)
        library.set_user_labels(truth, "import")
        first = library.fit()
        names = library.vocab.require_vocabulary().names
        # Every label has labels now: each learns (and says whether it used what it learnt).
        assert first.learning["relearnt"] == names and first.fitted_labels == names
        assert first.learning["learnt"], first.learning
        W1, b1, M1 = _state(library)
        # One correction: only its label learns again and is scored again.
        image, label, present = next(r for r in truth if r[1] == "mug" and r[2])
        library.set_user_labels([(image, label, not present)], "gallery")
        assert library.labels_changed()
        second = library.fit()
        assert second.fitted_labels == ["mug"] and second.learning["relearnt"] == ["mug"]
        assert not library.labels_changed()
        W2, b2, M2 = _state(library)
        mug = names.index("mug")
        others = [c for c in range(len(names)) if c != mug]
        assert np.array_equal(W2[others], W1[others]) and np.array_equal(b2[others], b1[others])
        assert np.array_equal(M2.scores[:, others], M1.scores[:, others])
        assert np.array_equal(M2.present[:, others], M1.present[:, others])
        assert set(second.learning["labels"]) == set(names)  # the kept labels' records too
        for name in names:  # each label's status holds its record, learnt again or kept
            assert second.labels[name]["learning"] == second.learning["labels"][name], name
        # Nothing changed: nothing learns again, and the tags stay.
        third = library.fit()
        assert third.fitted_labels == [] and third.learning["relearnt"] == []
        W3, _, M3 = _state(library)
        assert np.array_equal(W3, W2) and np.array_equal(M3.present, M2.present)
        # Every label forgotten: the labels that had learnt are training-free again.
        library.forget_user_labels(sorted({r[0] for r in truth}))
        fourth = library.fit()
        assert fourth.learning["relearnt"] == names and not fourth.learning.get("learnt")
        W4, _, M4 = _state(library)
        np.testing.assert_allclose(W4, W0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(M4.scores, M0.scores, atol=1e-5)
        assert np.array_equal(M4.present, M0.present)
    # A full fit from the same labels learns every label from scratch: the same rows and tags.
    with open_shapes_library(homes["full"]) as library:
        library.set_user_labels(truth, "import")
        library.set_user_labels([(image, label, not present)], "gallery")
        full = library.fit(full=True)
        Wf, bf, Mf = _state(library)
    assert full.learning["learnt"] == second.learning["learnt"]
    np.testing.assert_allclose(Wf, W2, atol=1e-4)
    np.testing.assert_allclose(Mf.scores, M2.scores, atol=1e-4)
    assert np.array_equal(Mf.present, M2.present)


def test_a_label_with_positives_only_learns_against_presumed_negatives() -> None:
    """Tags only ever confirmed, or a concept taught from examples alone: a fixed sample of
    the library stands in for the images without the label (5,000 live images)."""
    from piaa_index.library.keywords import PRESUMED_NEGATIVES, presume_negatives

    live = list(range(100, 5100))
    rows = {}
    for i in live[:10]:  # label 0: positives only; label 1: both; label 2: too few positives
        rows[i] = np.array([1, 1, -1], np.int8)
    for i in live[10:20]:
        rows[i] = np.array([-1, 0, 1 if i < live[12] else -1], np.int8)
    out, presumed = presume_negatives(rows, live)
    assert presumed == {0: PRESUMED_NEGATIVES}
    added = {i: r for i, r in out.items() if i not in rows}
    assert len(added) == PRESUMED_NEGATIVES
    assert all(r.tolist() == [0, -1, -1] for r in added.values())
    # The user's own rows are kept as they were (those labelled for the label never presumed).
    assert all(np.array_equal(out[i], r) or (r[0] == -1 and out[i][0] == 0)
               for i, r in rows.items())  # fmt: skip
    assert all(out[i][0] == 1 for i in live[:10])
    # The same sample whatever order the live ids come in: a refit presumes the same images.
    again, _ = presume_negatives(rows, live[::-1])
    assert set(again) == set(out)
    assert all(np.array_equal(again[i], out[i]) for i in out)


def test_a_label_added_to_a_library_that_learnt_fits_and_learns_alone(
    shapes_home: Path, tmp_path: Path
) -> None:
    """`vocab add` in a library whose labels learnt: the kept labels keep what they learnt
    (rows, scores, tags), and the new label is fitted and learns from its own labels."""
    from tests.shapes_library import open_shapes_library

    home = tmp_path / "index"
    shutil.copytree(shapes_home, home)
    with open_shapes_library(home) as library:
        names = library.vocab.require_vocabulary().names
        truth = _truth_rows(shapes_home, library)
        newcomer = names[-1]
        library.set_vocabulary(names[:-1])
        library.set_user_labels(truth, "import")  # labels of the newcomer too, unused yet
        first = library.fit()
        assert newcomer not in first.learning["labels"]
        W1, _, M1 = _state(library)
        library.set_vocabulary(names)
        added = library.fit()
        assert added.fitted_labels == [newcomer] and added.learning["relearnt"] == [newcomer]
        assert newcomer in added.learning["labels"]
        W2, _, M2 = _state(library)
        assert np.array_equal(W2[:-1], W1)
        assert np.array_equal(M2.scores[:, :-1], M1.scores)
        assert np.array_equal(M2.present[:, :-1], M1.present)
        kept, now = set(first.learning["learnt"]), set(added.learning["learnt"])
        assert kept <= now and now - kept <= {newcomer}
