"""`piaa teach` (a concept from a few examples) and `piaa vocab check` (entangled labels), on
a copy of the shared ShapesWorld library."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from piaa_index.eval.metrics import average_precision
from piaa_index.library.teaching import concept_prototype, taught_prototypes
from piaa_index.query.language import normalize_label
from tests.cli_main import run_main


@pytest.fixture
def home_and_truth(shapes_home: Path, tmp_path: Path) -> tuple[Path, dict[str, set[str]]]:
    home = tmp_path / "home"
    shutil.copytree(shapes_home, home)
    data = shapes_home.parent / "library"
    classes = json.loads((data / "classes.json").read_text())
    truth = {}
    for line in (data / "labels.txt").read_text().splitlines():
        rel, *ids = line.split()
        truth[str((data / rel).resolve())] = {classes[int(i)] for i in ids}
    return home, truth


def test_a_taught_concept_is_a_label_found_by_what_its_examples_share(
    home_and_truth: tuple[Path, dict[str, set[str]]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home, truth = home_and_truth
    base = ["--home", str(home), "--model", "shapesworld"]
    counts = {c: sum(c in ls for ls in truth.values()) for ls in truth.values() for c in ls}
    kind = max(counts, key=lambda c: counts[c])  # the class most images hold
    holders = sorted(p for p, ls in truth.items() if kind in ls)
    examples, others = holders[:5], sorted(p for p, ls in truth.items() if kind not in ls)
    code, out, err = run_main(
        [*base, "teach", "our thing", *examples, "--not", others[0], "--not", others[1],
         "--json"], monkeypatch, capsys,
    )  # fmt: skip
    assert code == 0, err
    done = json.loads(out)
    assert done["added_to_vocabulary"] and done["examples"] == 5
    assert done["fit"]["status"] in ("present", "weak")
    # A label like any other: in the vocabulary, in tags, in search.
    code, out, _ = run_main([*base, "vocab", "list", "--json"], monkeypatch, capsys)
    assert "our thing" in json.loads(out)["labels"]
    code, out, _ = run_main([*base, "search", '"our thing"', "--limit", "0", "--json"],
                            monkeypatch, capsys)  # fmt: skip
    assert code == 0
    # Ranked by what the examples share: the class they show comes first, well above chance.
    code, out, _ = run_main([*base, "tags", examples[0], "--json"], monkeypatch, capsys)
    assert code == 0 and "our thing" in out
    from tests.shapes_library import open_shapes_library

    with open_shapes_library(home) as library:
        m = library.tag_matrix(["our thing"])
        paths = library.store.paths(m.image_ids.tolist())
        y = np.array([kind in truth[str(Path(paths[i]).resolve())] for i in m.image_ids])
        rest = np.array([paths[i] not in examples for i in m.image_ids])
        ap = average_precision(m.scores[rest, 0], y[rest])
        assert ap > 2 * y[rest].mean(), (ap, y[rest].mean())
        labels = {(r[2], r[3], r[4]) for r in library.store.user_labels()}
        assert ("our thing", True, "teach") in labels and ("our thing", False, "teach") in labels
        before = taught_prototypes(library.store)[normalize_label("our thing")]
    # Taught again from other examples: the next fit fits the concept's new prototype (the
    # other labels keep theirs).
    code, out, err = run_main([*base, "teach", "our thing", *holders[5:8], "--json"],
                              monkeypatch, capsys)  # fmt: skip
    assert code == 0, err
    with open_shapes_library(home) as library:
        after = taught_prototypes(library.store)[normalize_label("our thing")]
        assert not np.allclose(after, before)
        fitted = library.tagger.fitted_for(library.store.latest_classifier())
        c = library.vocab.require_vocabulary().names.index("our thing")
        np.testing.assert_allclose(fitted.text_protos[c], after, atol=1e-6)


def test_teach_refuses_what_it_cannot_use(
    home_and_truth: tuple[Path, dict[str, set[str]]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    home, truth = home_and_truth
    base = ["--home", str(home), "--model", "shapesworld"]
    some = sorted(truth)[0]
    code, _, err = run_main([*base, "teach", "x", some, "--not", some], monkeypatch, capsys)
    assert code == 2 and "both as examples and with --not" in err
    code, _, err = run_main([*base, "teach", "x", str(tmp_path / "no.jpg")], monkeypatch, capsys)
    assert code == 2 and "no such file" in err
    code, _, err = run_main([*base, "teach", "a (b", some], monkeypatch, capsys)
    assert code == 2 and "reserved" in err


def test_concept_prototype_picks_the_shared_patch_not_the_background() -> None:
    """3,000 patches: each example holds one patch along a hidden direction among noise
    patches that negatives share; the prototype must point along the hidden direction."""
    rng = np.random.default_rng(0)
    d, M = 32, 30
    hidden = np.zeros(d, np.float32)
    hidden[3] = 1.0
    pos = rng.normal(size=(10, M, d)).astype(np.float32)
    pos[:, 7] = hidden + 0.1 * rng.normal(size=(10, d))
    neg = rng.normal(size=(90, M, d)).astype(np.float32)
    proto = concept_prototype(pos, neg)
    assert abs(float(np.linalg.norm(proto)) - 1.0) < 1e-5
    assert float(proto @ hidden) > 0.9


def test_concept_prototype_finds_the_concept_where_the_library_holds_it_too() -> None:
    """As in a real library: every image is mostly background (8 shared kinds of patch), and
    the concept is in 10 % of the library's images as well as in the examples. The concept's
    patches then have near-duplicates among the other images, as background patches do; what
    sets them apart is that they score the examples above most other images (600 images of
    30 patches)."""
    rng = np.random.default_rng(1)
    d, M = 32, 30
    directions = np.linalg.qr(rng.normal(size=(d, d)))[0][:9].astype(np.float32)
    hidden, backgrounds = directions[0], directions[1:]

    def images(n: int, with_concept: np.ndarray) -> np.ndarray:
        X = backgrounds[rng.integers(0, 8, size=(n, M))]
        X[with_concept, rng.integers(0, M, size=int(with_concept.sum()))] = hidden
        return (X + 0.15 * rng.normal(size=X.shape)).astype(np.float32)

    pos = images(10, np.ones(10, bool))
    library = images(590, rng.random(590) < 0.1)
    proto = concept_prototype(pos, library)
    assert float(proto @ hidden) > 0.9, float(proto @ hidden)
    # A single example: its patch least like the other images (noisy alone: a patch is
    # only so close to the concept's direction).
    one = concept_prototype(pos[:1], library)
    units = pos[0] / np.linalg.norm(pos[0], axis=1, keepdims=True)
    assert float(one @ hidden) >= 0.95 * float((units @ hidden).max()), float(one @ hidden)


def test_vocab_check_names_the_closest_pairs_with_how_often_they_fire_together(
    home_and_truth: tuple[Path, dict[str, set[str]]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home, _ = home_and_truth
    base = ["--home", str(home), "--model", "shapesworld"]
    code, out, err = run_main([*base, "vocab", "check", "--top", "50", "--json"],
                              monkeypatch, capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["labels"] == 24 and report["images"] == 48
    pairs = report["pairs"]
    assert len(pairs) == 50
    cosines = [p["text_cosine"] for p in pairs]
    assert cosines == sorted(cosines, reverse=True)
    for p in pairs:
        assert p["entangled"] == (p["z"] >= 2.0)
        assert 0 <= p["tagged_together"] <= min(p["tagged"])
        assert p["advice"]
    code, _, _ = run_main([*base, "vocab", "set", "sun"], monkeypatch, capsys)
    code, out, _ = run_main([*base, "vocab", "check", "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["pairs"] == []
