"""PAA scores and the per-label decision rule on a synthetic multi-label image world."""

from __future__ import annotations

import numpy as np
import pytest

from piaa_index.eval.metrics import f1_scores, mean_average_precision
from piaa_index.method.fusion import (
    PaaParams,
    cls_scores,
    fuse,
    patch_evidence,
    patch_text_evidence,
    score_images,
)
from piaa_index.method.pvcl import fit_pvcl, softmax
from piaa_index.method.thresholds import decide, decision_thresholds, split_scores
from tools.synthetic import image_world


@pytest.fixture(scope="module")
def world():
    """World, its fitted PVCL classifier and all scores, shared by this module."""
    P, Z, Y, T = image_world(N=700, C=10, M=36)
    clf = fit_pvcl((P[i : i + 100] for i in range(0, len(P), 100)), T, bank_size=256)
    return P, Z, Y, T, clf, score_images(Z, P, T, clf)


def test_shapes_ranges_and_sums(world):
    P, Z, Y, T, clf, sc = world
    N, C = Y.shape
    for s in (sc.cls, sc.patch, sc.fused):
        assert s.shape == (N, C) and np.isfinite(s).all()
        assert (s >= 0).all() and (s <= 1).all()
    np.testing.assert_allclose(sc.cls.sum(1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(sc.fused.sum(1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(fuse(sc.cls, sc.patch, alpha=1.0), softmax(2.0 * sc.patch))
    np.testing.assert_allclose(fuse(sc.cls, sc.patch, alpha=0.0), sc.cls)


def test_patch_evidence_is_the_max_over_patches(world):
    P, _, _, T, clf, sc = world
    brute = np.stack([softmax(clf.logits(P[i]).astype(np.float64)).max(0) for i in range(20)])
    np.testing.assert_allclose(sc.patch[:20], brute, rtol=1e-6)
    # Blocking is an implementation detail: any block size gives the same evidence.
    np.testing.assert_allclose(patch_evidence(P[:50], clf, batch_images=7), sc.patch[:50])
    pt = patch_text_evidence(P[:20], T)
    # float32 cosines (batch-independent GEMM), softmax at scale 60: float32 rounding only.
    P64, T64 = P.astype(np.float64), T.astype(np.float64)
    brute_t = np.stack([softmax(60.0 * (P64[i] @ T64.T)).max(0) for i in range(20)])
    np.testing.assert_allclose(pt, brute_t, rtol=1e-4)
    with pytest.raises(ValueError):
        patch_evidence(P[0], clf)


@pytest.mark.parametrize("block", [None, 64 * 100])
def test_an_image_scores_the_same_bits_in_any_batch(world, monkeypatch, block):
    """Tags must not depend on which images share a chunk (the fit's re-tag, a new segment,
    a Ray task): float32 BLAS rounds differently by call shape, so gemm_rows fixes the shape.
    block=6400: 100-row GEMM calls asked for, rounded up to one row tile (384 rows), so a
    300-image batch takes dozens of calls; before that rounding, OpenBLAS on AMD EPYC gave
    rows in a call's partial tile other last bits."""
    from piaa_index.method import pvcl
    from piaa_index.method.fusion import patch_text_cosines

    P, Z, _, T, clf, _ = world
    if block is not None:
        monkeypatch.setattr(pvcl, "GEMM_BLOCK", block)
    full = score_images(Z[:300], P[:300], T, clf)
    for part in (slice(0, 1), slice(5, 6), slice(37, 38), slice(3, 40), slice(290, 300)):
        got = score_images(Z[part], P[part], T, clf, PaaParams(batch_images=7))
        for kind in ("cls", "patch", "fused", "support"):
            np.testing.assert_array_equal(getattr(got, kind), getattr(full, kind)[part])
    # The text support the fit's pass hands to the re-tag is the same bits it would compute.
    flat = P[:300].reshape(-1, P.shape[-1])
    pooled = patch_text_cosines(flat, T).reshape(300, P.shape[1], -1).max(axis=1)
    np.testing.assert_array_equal(pooled, full.support)
    given = score_images(Z[:300], P[:300], T, clf, support=pooled.astype(np.float64))
    np.testing.assert_array_equal(given.fused, full.fused)


def test_pvcl_evidence_ranks_better_than_text_and_cls(world):
    P, Z, Y, T, clf, sc = world
    map_text = mean_average_precision(patch_text_evidence(P, T), Y)[0]
    map_cls = mean_average_precision(sc.cls, Y)[0]
    map_pvcl = mean_average_precision(sc.patch, Y)[0]
    map_fused = mean_average_precision(sc.fused, Y)[0]
    assert map_pvcl > map_text + 10, (map_text, map_pvcl)
    assert map_pvcl > map_cls + 5, (map_cls, map_pvcl)
    assert map_fused > map_cls + 5, (map_cls, map_fused)


def test_decisions_separate_present_from_absent(world):
    _, _, Y, _, _, sc = world
    thr, info = decision_thresholds(sc.patch, return_info=True)
    assert thr.shape == (Y.shape[1],) and ((thr > 0) & (thr < 1)).all()
    pred = decide(sc.patch, thr)
    assert pred.dtype == bool and pred.shape == Y.shape
    f = f1_scores(pred, Y)
    trivial = f1_scores(np.ones_like(Y), Y)
    assert f["CF1"] > trivial["CF1"] + 35, (f, trivial)
    assert f["OF1"] > trivial["OF1"] + 35, (f, trivial)
    assert sum(i["source"] == "label" for i in info) >= Y.shape[1] // 2


def test_patch_evidence_decides_better_than_fused_scores(world):
    """The documented choice: threshold m, not S (S sums to one over labels)."""
    _, _, Y, _, _, sc = world
    f_m = f1_scores(decide(sc.patch, decision_thresholds(sc.patch)), Y)
    f_s = f1_scores(decide(sc.fused, decision_thresholds(sc.fused)), Y)
    assert f_m["CF1"] > f_s["CF1"]


def _bimodal(rng: np.random.Generator, n: int, frac: float) -> np.ndarray:
    """Scores in (0, 1): a 'present' mode of fraction `frac` well above an absent bulk."""
    pos = rng.random(n) < frac
    x = np.where(pos, rng.normal(2.0, 0.7, n), rng.normal(-3.0, 0.8, n))
    return 1 / (1 + np.exp(-x)), pos


def test_split_finds_a_rare_mode_and_rejects_a_unimodal_one():
    rng = np.random.default_rng(1)
    s, pos = _bimodal(rng, 3000, 0.02)
    x = np.log(s / (1 - s))
    t, d_sep, w_hi, lo, hi, gain = split_scores(x)
    assert d_sep > 3 and lo < t < hi and gain > 0
    assert abs(w_hi - pos.mean()) < 0.01
    assert ((x >= t) == pos).mean() > 0.99
    assert split_scores(np.ones(10)) is None
    # A minimum-error cut through one Gaussian splits off its last few values, which look far
    # apart by Ashman's D; the rule must not call that a present/absent split.
    uni = 1 / (1 + np.exp(-rng.normal(-1.0, 1.0, 3000)))
    _, info = decision_thresholds(np.stack([s, uni], axis=1), return_info=True)
    assert info[0]["source"] == "label" and info[1]["source"] == "fallback"
    assert info[1]["split"].separation > 2.0  # D alone would have accepted it


def test_rare_absent_and_ubiquitous_labels_fall_back_sensibly():
    rng = np.random.default_rng(2)
    cols, truth = [], []
    for frac in (0.3, 0.2, 0.1, 0.05, 0.02):
        s, pos = _bimodal(rng, 2000, frac)
        cols.append(s)
        truth.append(pos)
    absent, _ = _bimodal(rng, 2000, 0.0)  # label absent from the whole collection
    everywhere = 1 / (1 + np.exp(-rng.normal(2.0, 0.7, 2000)))  # present in every image
    S = np.stack([*cols, absent, everywhere], axis=1)
    thr, info = decision_thresholds(S, PaaParams(), return_info=True)
    pred = decide(S, thr)
    for c, pos in enumerate(truth):
        assert info[c]["source"] == "label"
        assert (pred[:, c] == pos).mean() > 0.98
    assert info[5]["source"] == info[6]["source"] == "fallback"
    assert pred[:, 5].mean() < 0.01
    assert pred[:, 6].mean() > 0.99


def test_decision_rule_rejects_bad_input():
    with pytest.raises(ValueError):
        decision_thresholds(np.zeros(5))
    with pytest.raises(ValueError):
        split_scores(np.arange(10.0), method="bogus")
    # Tiny collections still get thresholds (the fallback), never NaN.
    thr = decision_thresholds(np.full((2, 3), 0.5))
    assert np.isfinite(thr).all()


def test_cls_scores_temperature():
    T = np.eye(3, dtype=np.float32)
    z = np.array([[0.9, 0.1, 0.0]], np.float32)
    z /= np.linalg.norm(z)
    sharp, soft = cls_scores(z, T, 80.0), cls_scores(z, T, 1.0)
    assert sharp[0, 0] > soft[0, 0] > 1 / 3


def test_labels_keep_their_own_split_when_the_pooled_split_is_unrepresentative():
    """Compressed evidence (SCLIP patches on ShapesWorld): every label is clearly bimodal, but a
    few very confident labels pull the pooled split above all the others' upper modes. Before,
    every label was rejected and almost nothing was tagged; now each keeps its own split."""
    rng = np.random.default_rng(0)
    N, C_weak, C_strong = 1000, 10, 3
    Y = rng.random((N, C_weak + C_strong)) < 0.15
    Y[:, C_weak:] = rng.random((N, C_strong)) < 0.5  # frequent and very confident
    logodds = np.where(Y, rng.normal(-1.5, 0.35, Y.shape), rng.normal(-3.0, 0.3, Y.shape))
    logodds[:, C_weak:] = np.where(
        Y[:, C_weak:], rng.normal(4.0, 0.3, (N, C_strong)), rng.normal(-3.0, 0.3, (N, C_strong))
    )
    scores = 1.0 / (1.0 + np.exp(-logodds))
    thresholds, info = decision_thresholds(scores, return_info=True)
    assert all(d["source"] == "label" for d in info[:C_weak])
    pred = decide(scores, thresholds)
    for c in range(C_weak):
        tp = (pred[:, c] & Y[:, c]).sum()
        f1 = 2 * tp / (pred[:, c].sum() + Y[:, c].sum())
        assert f1 > 0.8, (c, f1)
