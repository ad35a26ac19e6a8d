"""PVCL on a synthetic Gaussian patch world with a simulated vision–language modality gap."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piaa_index.method.pvcl import (
    BankBuilder,
    Classifier,
    PvclParams,
    calibrate_scale,
    fit_from_banks,
    fit_pvcl,
    log_odds,
    softmax,
)
from tools.synthetic import patch_world, unit


@pytest.fixture(scope="module")
def world() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The default world, shared by the tests of this module."""
    return patch_world(C=10, n_per_class=1500, text_noise=2.0, seed=2)


@pytest.fixture(scope="module")
def fitted(world) -> Classifier:
    """PVCL fitted on the default world, streamed in chunks."""
    X = world[0]
    return fit_pvcl((X[i : i + 4000] for i in range(0, len(X), 4000)), world[3], bank_size=512)


def test_recovers_visual_means_and_beats_text(world, fitted):
    X, y, means, T = world
    obj = y >= 0
    cos_fit = (unit(fitted.means) * means).sum(axis=1)
    cos_text = (T * means).sum(axis=1)
    assert cos_fit.mean() > 0.95 and cos_fit.min() > 0.9, cos_fit
    assert cos_fit.min() > cos_text.max() + 0.3  # the gap is crossed, not just reduced
    acc_text = ((X[obj] @ T.T).argmax(1) == y[obj]).mean()
    acc_pvcl = (fitted.logits(X[obj]).argmax(1) == y[obj]).mean()
    assert acc_text < 0.8  # the world really has a modality gap
    assert acc_pvcl > acc_text + 0.15, (acc_text, acc_pvcl)
    assert fitted.weak_labels == []


def test_streaming_gives_the_same_banks_as_one_chunk(world):
    X, _, _, T = world
    one = BankBuilder(T, bank_size=64)
    one.update(X)
    many = BankBuilder(T, bank_size=64)
    for i in range(0, len(X), 997):  # uneven chunks, several per bank refresh
        many.update(X[i : i + 997])
    for a, b in zip(one.banks(), many.banks(), strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.X, b.X)
    assert one.n_seen == many.n_seen == len(X)
    c1 = fit_from_banks(one.banks(), T)
    c2 = fit_pvcl([X[i : i + 997] for i in range(0, len(X), 997)], T, bank_size=64)
    np.testing.assert_allclose(c1.W, c2.W, rtol=1e-5, atol=1e-6)


def test_banks_are_the_lowest_entropy_patches_of_their_class(world):
    X, _, _, T = world
    X = X[:3000]
    K = 40
    bb = BankBuilder(T, bank_size=K)
    for i in range(0, len(X), 256):
        bb.update(X[i : i + 256], ids=np.arange(i, min(i + 256, len(X))) + 10_000)
    # Brute force over the whole pool.
    p = softmax(60.0 * (X @ T.T).astype(np.float64))
    H = -(p * np.log(p)).sum(1)
    cls = p.argmax(1)
    for c, bank in enumerate(bb.banks()):
        idx = np.flatnonzero(cls == c)
        want = idx[np.argsort(H[idx], kind="stable")][:K] + 10_000
        assert set(bank.ids.tolist()) == set(want.tolist())
        assert len(bank.ids) == min(K, idx.size)
        assert np.all(np.diff(bank.H) >= 0)
        np.testing.assert_allclose(bank.P.sum(1), 1.0, rtol=1e-5)


def test_empty_class_falls_back_to_its_text_prototype(world):
    X, y, means, T = world
    # A label no patch can prefer: the average of two prototypes (not renormalised) never has a
    # higher cosine than both of them, so it never wins the text argmax.
    ghost = (0.5 * (T[0] + T[1]))[None, :].astype(np.float32)
    T2 = np.concatenate([T, ghost])
    clf = fit_pvcl([X], T2, bank_size=256)
    C = T.shape[0]
    assert clf.bank_sizes[C] == 0
    assert clf.weak_labels == [C]
    np.testing.assert_allclose(clf.means[C], ghost[0], atol=1e-6)
    # The other labels are still learnt from the visual bank.
    assert ((unit(clf.means[:C]) * means).sum(1) > 0.9).all()
    obj = y >= 0
    assert (clf.logits(X[obj]).argmax(1) == y[obj]).mean() > 0.95


def test_classifier_round_trips_through_bytes(fitted, world):
    blob = fitted.to_bytes()
    assert isinstance(blob, bytes)
    back = Classifier.from_bytes(blob)
    X = world[0][:100]
    np.testing.assert_array_equal(back.logits(X), fitted.logits(X))
    assert back.bank_sizes == fitted.bank_sizes and back.kept_sizes == fitted.kept_sizes
    assert back.params == fitted.params and back.scale == fitted.scale


def test_calibrated_scale_does_not_depend_on_bank_size(world):
    """Raw GDA logits shrink roughly like 1/n; the calibrated ones keep a fixed typical margin."""
    X, _, _, T = world
    raw, cal = [], []
    for K in (32, 1024):
        clf = fit_pvcl([X], T, bank_size=K)
        for store, y in ((raw, clf.raw_logits(X)), (cal, clf.logits(X))):
            top2 = np.sort(y, axis=1)[:, -2:]
            store.append(np.median(top2[:, 1] - top2[:, 0]))
    assert raw[0] / raw[1] > 5  # the problem is real ...
    assert 0.5 < cal[0] / cal[1] < 2  # ... and calibration removes it


def test_calibrate_scale_rules():
    y = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    assert calibrate_scale(y, "margin") == pytest.approx(2.0)  # margins 2, 1, 5
    assert calibrate_scale(7 * y, "margin") == pytest.approx(14.0)
    assert calibrate_scale(y, "none") == 1.0
    assert calibrate_scale(np.zeros((4, 3)), "margin") == 1.0  # no spread: left alone
    with pytest.raises(ValueError):
        calibrate_scale(y, "bogus")


def test_log_odds_matches_definition_and_does_not_saturate():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 6)) * 4
    p = softmax(y)
    np.testing.assert_allclose(log_odds(y), np.log(p / (1 - p)), rtol=1e-9, atol=1e-9)
    big = log_odds(np.array([[900.0, 0.0, -1.0]]))
    assert np.isfinite(big).all() and big[0, 0] == pytest.approx(900.0 - np.log1p(np.exp(-1.0)))


def _world_for(C: int, K: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A pool about three banks deep per class, for the Stage II property."""
    X, _, _, T = patch_world(C=C, d=48, n_per_class=max(3 * K, 200), seed=seed, text_noise=1.5)
    return X, T


def _stage2_fractions(clf: Classifier) -> np.ndarray:
    """Per-class kept fraction among the bank patches Stage II assigned to that class."""
    assigned = np.array(clf.params["stage2_assigned"])
    kept = np.array(clf.kept_sizes)
    big = assigned >= 20  # a fraction of a handful of patches says nothing
    return kept[big] / assigned[big]


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    C=st.sampled_from([3, 8, 20]),
    K=st.sampled_from([32, 128, 512]),
    seed=st.integers(0, 10_000),
)
def test_stage2_keeps_a_sensible_fraction_per_class(C, K, seed):
    X, T = _world_for(C, K, seed)
    clf = fit_pvcl([X], T, bank_size=K)
    frac = _stage2_fractions(clf)
    assert frac.size > 0
    assert ((frac >= 0.05) & (frac <= 0.6)).all(), frac
    assert clf.weak_labels == []


def test_stage2_with_the_authors_fixed_temperature_can_keep_nothing():
    """The pitfall the calibrated scale exists for: raw logits at τ = 100 saturate q."""
    X, T = _world_for(20, 512, 1)
    banks = BankBuilder(T, 512)
    banks.update(X)
    b = banks.banks()
    fixed = fit_from_banks(b, T, PvclParams(calibration="none", tau=100.0, keep_domain="prob"))
    ours = fit_from_banks(b, T)
    assert sum(fixed.kept_sizes) < 0.01 * sum(fixed.bank_sizes)
    assert ((_stage2_fractions(ours) >= 0.05) & (_stage2_fractions(ours) <= 0.6)).all()


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        BankBuilder(np.zeros(5, np.float32))
    bb = BankBuilder(np.eye(3, dtype=np.float32), bank_size=2)
    with pytest.raises(ValueError):
        bb.update(np.eye(3, dtype=np.float32), ids=np.arange(2))


def test_an_empty_pool_gives_a_text_only_classifier():
    T = np.eye(4, 8, dtype=np.float32)
    clf = fit_pvcl([], T)
    assert clf.weak_labels == [0, 1, 2, 3] and clf.bank_sizes == [0, 0, 0, 0]
    assert np.isfinite(clf.W).all() and np.isfinite(clf.b).all()
    # With text prototypes as means, the classifier still ranks like the text classifier.
    X = np.eye(8, dtype=np.float32)[:4]
    assert (clf.logits(X).argmax(1) == np.arange(4)).all()
