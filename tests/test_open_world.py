"""Open world (issue 19): a label's confidence and tags depend on that label and the photos,
never on which other labels the vocabulary holds. A real ShapesWorld library on the shipped
model, driven through the CLI as a user does; and the fit's parts on thousands of patches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from piaa_index.cli import cli
from piaa_index.method.decisions import PRESENT_AT, calibrate
from piaa_index.method.open_pvcl import (
    LabelBanks,
    OpenParams,
    fit_background,
    sample_keys,
    sample_mask,
)
from piaa_index.shapes.dataset import generate_dataset
from piaa_index.shapes.world import CLASSES


def run(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    base = tmp_path_factory.mktemp("open-world")
    generate_dataset(base / "scenes", 300, seed=4711, size=96, progress=False)
    opts = ["--home", str(base / "home"), "-q"]
    run(["index", str(base / "scenes" / "images"), "--model", "shapesworld", *opts])
    return opts


def scores_of(opts: list[str], label: str) -> dict[str, tuple[float, bool]]:
    """path -> (confidence, tagged) of one label on every image, from `search --all-images`."""
    rows = json.loads(
        run(["search", f'"{label}"', "--all-images", "--limit", "0", "--json", *opts])
    )
    return {r["path"]: (r["labels"][label]["score"], r["labels"][label]["present"]) for r in rows}


def test_a_label_s_scores_and_tags_ignore_the_other_labels(library: list[str]) -> None:
    opts = library
    watched = ["car", "sun", "house", "mug"]
    run(["vocab", "set", *CLASSES, *opts])
    full = {label: scores_of(opts, label) for label in watched}
    assert all(len(v) == 300 for v in full.values())
    assert sum(t for v in full.values() for _, t in v.values()) > 20  # something is tagged

    # Removing one label leaves every other label's confidence and tags exactly as they were.
    run(["vocab", "remove", "star", *opts])
    assert {label: scores_of(opts, label) for label in watched} == full
    # Four labels alone: the same confidences and tags as under all 24, whether the four keep
    # their classifiers (what a vocabulary change does) or are fitted again from scratch.
    run(["vocab", "set", *watched, *opts])
    assert {label: scores_of(opts, label) for label in watched} == full
    run(["fit", "--full", *opts])
    assert {label: scores_of(opts, label) for label in watched} == full

    # The confidence is the tag rule: tagged exactly where it reaches one half.
    for label, rows in full.items():
        for score, is_tagged in rows.values():
            assert 0.0 <= score <= 1.0
            assert is_tagged == (score >= PRESENT_AT), label


def test_banks_do_not_depend_on_chunking_or_order() -> None:
    """Stage I banks from one pass or from shuffled chunks of it are the same patches."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(20_000, 32)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    T = rng.normal(size=(5, 32)).astype(np.float32)
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    X[5000:5100] = X[4000]  # ties: identical patches, broken on the id
    ids = np.arange(len(X), dtype=np.int64)
    sims = X @ T.T
    whole = LabelBanks(5, 32, 200)
    whole.update(X, ids, sims)
    chunked = LabelBanks(5, 32, 200)
    order = rng.permutation(len(X))
    for part in np.array_split(order, 37):
        chunked.update(X[part], ids[part], sims[part])
    for a, b in zip(whole.banks(), chunked.banks(), strict=True):
        np.testing.assert_array_equal(a, b)
    # A label's bank is its own top-K by cosine, whatever the other labels are.
    alone = LabelBanks(1, 32, 200)
    alone.update(X, ids, sims[:, 2:3])
    np.testing.assert_array_equal(alone.banks()[0], whole.banks()[2])


def test_background_sample_is_chosen_by_content_hash() -> None:
    """The same photos are sampled whatever ids they got or the order they stream in."""
    import hashlib

    ids = np.arange(1, 50_001)
    hashes = {int(i): hashlib.sha256(str(i).encode()).hexdigest() for i in ids}
    mask = sample_mask(sample_keys(ids, hashes), 0.1)
    assert 0.09 < mask.mean() < 0.11
    other_ids = {int(i) + 7_000: h for i, h in hashes.items()}  # another engine's ids
    again = sample_mask(sample_keys(ids + 7_000, other_ids), 0.1)
    np.testing.assert_array_equal(again, mask)
    shuffled = np.random.default_rng(0).permutation(ids)
    np.testing.assert_array_equal(
        sample_mask(sample_keys(shuffled, hashes), 0.1), mask[shuffled - 1]
    )
    # A hashed image's number is its hash's first 13 hex digits; one without a hash, its id's.
    keys = sample_keys(np.array([3, 2, 1]), {1: hashes[1], 3: hashes[3]})
    assert keys[0] == int(hashes[3][:13], 16) / 2**52
    assert keys[2] == int(hashes[1][:13], 16) / 2**52
    assert keys[1] == sample_keys(np.array([2]), {})[0] != sample_keys(np.array([2]), hashes)[0]
    bg = fit_background(np.random.default_rng(1).normal(size=(2000, 16)), OpenParams())
    assert len(bg.priors) == 2000 // OpenParams().patches_per_cluster  # 50: a small sample
    assert bg.priors.sum() == pytest.approx(1.0)


def test_calibration_finds_the_present_mode_of_each_label_alone() -> None:
    """Two labels, one present in 10 % of 5,000 images and one in 40 %: each label's confidence
    crosses one half between its own two modes, and is the same computed alone."""
    rng = np.random.default_rng(5)
    n = 5000
    truth = np.stack([rng.random(n) < 0.1, rng.random(n) < 0.4], axis=1)
    E = np.where(truth, rng.normal(3.0, 1.0, (n, 2)), rng.normal(-2.0, 1.0, (n, 2)))
    C = np.where(truth, rng.normal(0.3, 0.05, (n, 2)), rng.normal(0.2, 0.05, (n, 2)))
    cal = calibrate(E, C)
    conf = cal.confidence(E, C)
    assert ((conf >= PRESENT_AT) == truth).mean() > 0.97
    one = calibrate(E[:, :1], C[:, :1])
    np.testing.assert_allclose(one.confidence(E[:, :1], C[:, :1]), conf[:, :1])


def test_labels_a_library_lacks_are_found_absent_with_a_few_labels(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Four labels (too few for the pooled matching level), two of which no photo holds: the
    two are found absent from their own banks alone (the fringe of other things' clusters,
    open_pvcl.cluster_agreement) and tag nothing; the two held ones keep their tags."""
    from piaa_index.shapes.world import GROUPS

    base = tmp_path_factory.mktemp("few-labels")
    street_garden = sorted({CLASSES.index(n) for g in ("street", "garden") for n in GROUPS[g]})
    generate_dataset(
        base / "scenes", 300, seed=4713, size=96, progress=False, classes_allowed=street_garden
    )
    opts = ["--home", str(base / "home"), "-q"]
    run(["index", str(base / "scenes" / "images"), "--model", "shapesworld", *opts])
    held, lacking = ["car", "snail"], ["mug", "beach ball"]
    run(["vocab", "set", *held, *lacking, *opts])
    report = fit_report(opts)
    assert report["absent_labels"] == lacking, report["labels"]
    for label in lacking:
        assert report["labels"][label]["cluster_agreement"] < 0.75
        assert not any(t for _, t in scores_of(opts, label).values())
    for label in held:
        assert report["labels"][label]["status"] == "present"
        assert sum(t for _, t in scores_of(opts, label).values()) > 20


def fit_report(opts: list[str], *extra: str) -> dict:
    return json.loads(run(["fit", "--json", *extra, *opts]))


def test_vocab_add_fits_the_new_label_alone_as_a_full_fit_would(
    library: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    import shutil

    opts = library
    kept = ["car", "house", "sun"]
    run(["vocab", "set", *kept, *opts])
    assert fit_report(opts, "--full")["fitted_labels"] == kept
    before = {label: scores_of(opts, label) for label in kept}

    run(["vocab", "add", "mug", *opts])
    report = fit_report(opts)
    assert report["fitted_labels"] == ["mug"]
    assert {label: scores_of(opts, label) for label in kept} == before
    added = scores_of(opts, "mug")
    # The same classifier, scores and tags as fitting all four from scratch on these photos.
    assert fit_report(opts, "--full")["fitted_labels"] == [*kept, "mug"]
    full = scores_of(opts, "mug")
    assert {p: t for p, (_, t) in full.items()} == {p: t for p, (_, t) in added.items()}
    assert max(abs(full[p][0] - added[p][0]) for p in full) < 1e-5
    assert sum(t for _, t in added.values()) > 5

    # Removing a label reads no patch and moves nothing else.
    before = {label: scores_of(opts, label) for label in [*kept, "mug"]}
    run(["vocab", "remove", "house", *opts])
    assert fit_report(opts)["fitted_labels"] == []
    assert {label: scores_of(opts, label) for label in ["car", "sun", "mug"]} == {
        label: before[label] for label in ["car", "sun", "mug"]
    }

    # Photos indexed after the fit, then a label added: the kept labels score the new photos
    # exactly as the old classifier does when a query scores them (a copy of the library).
    base = tmp_path_factory.mktemp("open-world-more")
    generate_dataset(base / "more", 40, seed=4712, size=96, progress=False)
    run(["index", str(base / "more" / "images"), *opts])
    home = opts[opts.index("--home") + 1]
    shutil.copytree(home, base / "copy")
    queried = {label: scores_of(opts, label) for label in ["car", "sun"]}  # old classifier
    copy = ["--home", str(base / "copy"), "-q"]
    run(["vocab", "add", "star", *copy])
    assert fit_report(copy)["fitted_labels"] == ["star"]
    for label in ["car", "sun"]:
        after = scores_of(copy, label)
        assert len(after) == 340
        assert {p: t for p, (_, t) in after.items()} == {
            p: t for p, (_, t) in queried[label].items()
        }
        assert max(abs(after[p][0] - queried[label][p][0]) for p in after) < 1e-5
    assert len(scores_of(copy, "star")) == 340
