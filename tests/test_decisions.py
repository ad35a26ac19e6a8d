"""The tag rule (decisions.py): absent labels, rare labels, small libraries, text search."""

from __future__ import annotations

import json

import numpy as np
import pytest

from piaa_index.method.decisions import (
    DecisionParams,
    Decisions,
    apply_decisions,
    bank_support,
    label_decisions,
)
from piaa_index.method.fusion import open_vocabulary_scores, score_images, text_support
from piaa_index.method.pvcl import fit_pvcl
from tools.synthetic import image_world, unit

C_HELD, C_ABSENT = 20, 4


def held_world(N: int = 3000, M: int = 36, d: int = 64, seed: int = 5):
    """Images of 0–4 objects from C_HELD labels (Zipf frequencies: the rarest in 1–3 % of images)
    on 6 backgrounds, with C_ABSENT more labels of the same kind (own visual mean, own text) that
    no image holds. Unlike `image_world`'s random extra prototypes, the text of every label,
    held or not, sits across the same modest modality gap, as Stage I assumes: patches of a
    label match its text better than other patches do."""
    rng = np.random.default_rng(seed)
    C = C_HELD + C_ABSENT
    means = unit(0.3 * unit(rng.normal(size=d)) + unit(rng.normal(size=(C, d))))
    T = unit(means + 0.5 * unit(rng.normal(size=d)) + 0.5 * unit(rng.normal(size=(C, d))))
    bgs = unit(rng.normal(size=(6, d)))
    freq = 1.0 / np.arange(1, C_HELD + 1)
    freq /= freq.sum()
    P = np.empty((N, M, d), np.float32)
    Z = np.empty((N, d), np.float32)
    Y = np.zeros((N, C), bool)
    for n in range(N):
        cs = rng.choice(C_HELD, size=min(rng.poisson(1.8), 4), replace=False, p=freq)
        Y[n, cs] = True
        bg = bgs[rng.integers(6)]
        lab = np.full(M, -1)
        slots = rng.permutation(M)
        pos = 0
        for c in cs:
            a = int(rng.integers(2, M // 3))
            lab[slots[pos : pos + a]] = c
            pos += a
        centres = np.where(lab[:, None] >= 0, means[np.maximum(lab, 0)], bg)
        P[n] = unit(centres + 1.5 * rng.normal(size=(M, d)) / np.sqrt(d))
        Z[n] = unit((means[cs].sum(0) if len(cs) else 0) + 0.5 * bg)
    return P, Z, Y, T.astype(np.float32)


@pytest.fixture(scope="module")
def world():
    """3,000 images: 20 held labels (the rarest in a few % of images) and 4 vocabulary labels
    that no image holds."""
    P, Z, Y, T = held_world()
    clf = fit_pvcl((P[i : i + 500] for i in range(0, len(P), 500)), T, bank_size=256)
    sc = score_images(Z, P, T, clf)
    return P, Z, Y, T, clf, sc


def test_labels_in_no_image_are_absent_and_rare_ones_stay_present(world):
    P, Z, Y, T, clf, sc = world
    dec = label_decisions(sc.patch, sc.support, clf.params["support"])
    status = [s["status"] for s in dec.status]
    share = Y.mean(axis=0)
    assert share[:C_HELD].min() < 0.04  # the world does hold rare labels
    # A label in no image is never "present": "absent" (no image reaches the matching level)
    # or "weak" (a few do; only those, at the sure level, may be tagged).
    assert all(s in ("absent", "weak") for s in status[C_HELD:]), dec.status[C_HELD:]
    assert status[:C_HELD] == ["present"] * C_HELD, (share, dec.status[:C_HELD])
    tags = apply_decisions(sc.patch, sc.support, dec)
    assert tags[:, C_HELD:].mean() <= 0.003, tags[:, C_HELD:].mean()
    for c in range(C_HELD, C_HELD + C_ABSENT):
        if status[c] == "absent":
            assert not tags[:, c].any()  # absent labels decide False for every image
    # Before the rule, the same world tagged its absent labels (the symptom).
    from piaa_index.method.thresholds import decide, decision_thresholds

    old = decide(sc.patch, np.asarray(decision_thresholds(sc.patch)))
    assert old[:, C_HELD:].any(axis=0).sum() >= 1


def test_status_is_json_and_decisions_round_trip(world):
    P, Z, Y, T, clf, sc = world
    dec = label_decisions(sc.patch, sc.support, clf.params["support"])
    blob = json.dumps(dec.to_json())
    back = Decisions.from_json(json.loads(blob))
    np.testing.assert_array_equal(
        apply_decisions(sc.patch, sc.support, back), apply_decisions(sc.patch, sc.support, dec)
    )
    for rec in dec.status:
        assert rec["status"] in {"present", "weak", "absent"}
        assert {"matching_fraction", "images_at_level", "threshold"} <= rec.keys()
    # The fit's bank test survives the classifier's own serialisation.
    from piaa_index.method.pvcl import Classifier

    again = Classifier.from_bytes(clf.to_bytes())
    assert again.params["support"] == json.loads(json.dumps(clf.params["support"]))


def test_a_vocabulary_the_collection_fully_holds_loses_no_label():
    P, Z, Y, T = image_world(N=2000, C=8, M=36, seed=9)
    clf = fit_pvcl([P], T, bank_size=128)
    sc = score_images(Z, P, T, clf)
    dec = label_decisions(sc.patch, sc.support, clf.params["support"])
    assert [s["status"] for s in dec.status] == ["present"] * 8


def test_small_library_gets_per_label_thresholds_fewer_tags_and_a_warning(world):
    P, Z, Y, T, clf, sc = world
    n = 60
    small = fit_pvcl([P[:n]], T, bank_size=16)
    s = score_images(Z[:n], P[:n], T, small)
    dec = label_decisions(s.patch, s.support, small.params["support"])
    assert dec.info["small_library"] and dec.info["warnings"]
    kept = np.isfinite(dec.thresholds)
    assert kept.sum() >= 3
    assert np.unique(np.round(dec.thresholds[kept], 9)).size > 1  # not one threshold for all
    big = label_decisions(
        sc.patch[:n], sc.support[:n], small.params["support"], DecisionParams(small_library=0)
    )
    assert (
        apply_decisions(s.patch, s.support, dec).sum()
        <= apply_decisions(sc.patch[:n], sc.support[:n], big).sum() + n
    )  # gated: not more tags than the ungated rule gives (plus slack for refit)


def test_bank_support_without_two_modes_calls_every_bank_matching():
    rng = np.random.default_rng(0)
    out = bank_support([0.7 + 0.02 * rng.normal(size=200) for _ in range(12)])
    assert out["level"] is None and out["matching_fraction"] == [1.0] * 12
    mixed = [0.7 + 0.02 * rng.normal(size=200) for _ in range(8)]
    mixed += [0.3 + 0.05 * rng.normal(size=200) for _ in range(4)]
    out = bank_support(mixed)
    assert out["level"] is not None and 0.35 < out["level"] < 0.65
    assert [f >= 0.5 for f in out["matching_fraction"]] == [True] * 8 + [False] * 4


def test_rejects_mismatched_shapes(world):
    P, Z, Y, T, clf, sc = world
    with pytest.raises(ValueError):
        label_decisions(sc.patch, sc.support[:, :3], clf.params["support"])
    with pytest.raises(ValueError):
        label_decisions(sc.patch[:, :3], sc.support[:, :3], clf.params["support"])


def test_text_search_scores_do_not_depend_on_the_vocabulary_and_do_not_tie(world):
    P, Z, Y, T, clf, sc = world
    phrase = T[3]
    s = open_vocabulary_scores(Z, P, phrase)
    # The same phrase scored in blocks, or next to any vocabulary, gives the same numbers:
    # nothing but the phrase enters the score.
    np.testing.assert_allclose(open_vocabulary_scores(Z, P, phrase, batch_images=7), s)
    top = np.sort(s)[::-1][:20]
    assert np.unique(top).size == 20
    np.testing.assert_allclose(
        s, 0.9 * text_support(P, phrase[None, :])[:, 0] + 0.1 * (Z @ phrase), rtol=1e-5
    )
    # It ranks the phrase's images first.
    prec = Y[np.argsort(-s)[:20], 3].mean()
    assert prec >= 0.8, prec
