"""Tests for piaa_index.eval.metrics: hand-computed cases and brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from piaa_index.eval.metrics import average_precision, f1_scores, mean_average_precision

# ---------------------------------------------------------------- brute-force references


def ref_average_precision(scores: list[float], targets: list[bool]) -> float:
    """AP straight from its definition: sum over distinct thresholds of ΔRecall · Precision."""
    n_pos = sum(targets)
    if n_pos == 0:
        return math.nan
    ap, prev_recall = 0.0, 0.0
    for th in sorted(set(scores), reverse=True):
        picked = [t for s, t in zip(scores, targets, strict=True) if s >= th]
        tp = sum(picked)
        recall = tp / n_pos
        ap += (recall - prev_recall) * (tp / len(picked))
        prev_recall = recall
    return ap


def ref_f1(pred: list[list[bool]], targets: list[list[bool]]) -> dict[str, float]:
    """CP/CR/CF1/OP/OR/OF1 with plain loops, zero divisions as 0."""

    def div(a: float, b: float) -> float:
        return a / b if b else 0.0

    n_cls = len(pred[0])
    precisions, recalls = [], []
    all_tp = all_pred = all_true = 0
    for c in range(n_cls):
        tp = sum(1 for p, t in zip(pred, targets, strict=True) if p[c] and t[c])
        n_pred = sum(1 for p in pred if p[c])
        n_true = sum(1 for t in targets if t[c])
        precisions.append(div(tp, n_pred))
        recalls.append(div(tp, n_true))
        all_tp, all_pred, all_true = all_tp + tp, all_pred + n_pred, all_true + n_true
    cp, cr = sum(precisions) / n_cls, sum(recalls) / n_cls
    op, o_r = div(all_tp, all_pred), div(all_tp, all_true)
    return {
        "CP": 100 * cp,
        "CR": 100 * cr,
        "CF1": 100 * div(2 * cp * cr, cp + cr),
        "OP": 100 * op,
        "OR": 100 * o_r,
        "OF1": 100 * div(2 * op * o_r, op + o_r),
    }


# ---------------------------------------------------------------- hand-computed cases


def test_ap_sklearn_doc_example():
    # sklearn's docstring example: average_precision_score([0,0,1,1], [.1,.4,.35,.8]) == 0.8333
    assert average_precision(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == (
        pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    )


def test_ap_ranked_list():
    # hits at ranks 1 and 3 -> (1/1 + 2/3) / 2
    ap = average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False]))
    assert ap == pytest.approx((1 + 2 / 3) / 2)


def test_ap_ties_form_one_threshold_and_ignore_row_order():
    # threshold 0.5 admits 3 images (1 hit): P=1/3, R=1/2; threshold 0.1: P=2/4, R=1
    scores = np.array([0.5, 0.5, 0.5, 0.1])
    expected = 0.5 * (1 / 3) + 0.5 * (2 / 4)
    for order in ([0, 1, 2, 3], [1, 2, 0, 3], [2, 0, 1, 3]):
        targets = np.array([True, False, False, True])
        assert average_precision(scores[order], targets[order]) == pytest.approx(expected)


def test_ap_perfect_and_all_positive_and_no_positive():
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0])) == 1.0
    assert average_precision(np.array([1.0, 1.0, 0.0]), np.array([1, 1, 1])) == 1.0
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))
    assert math.isnan(average_precision(np.zeros(0), np.zeros(0, bool)))


def test_ap_ties_at_infinity():
    assert average_precision(np.array([np.inf, np.inf]), np.array([1, 0])) == pytest.approx(0.5)


def test_ap_rejects_bad_input():
    with pytest.raises(ValueError):
        average_precision(np.array([0.1, 0.2]), np.array([1, -1]))  # VOC-style -1
    with pytest.raises(ValueError):
        average_precision(np.array([0.1, np.nan]), np.array([1, 0]))
    with pytest.raises(ValueError):
        average_precision(np.array([0.1, 0.2]), np.array([1, 0, 1]))


def test_map_skips_classes_without_positives_and_is_in_percent():
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.9, 0.4], [0.7, 0.2, 0.3], [0.6, 0.3, 0.2]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    m, per_class = mean_average_precision(scores, targets)
    assert per_class.shape == (3,)
    assert per_class[0] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert per_class[1] == pytest.approx(100.0)
    assert math.isnan(per_class[2])
    assert m == pytest.approx((per_class[0] + per_class[1]) / 2)


def test_map_all_classes_empty_is_nan():
    m, per_class = mean_average_precision(np.ones((2, 2)), np.zeros((2, 2), bool))
    assert math.isnan(m) and np.isnan(per_class).all()


def test_f1_hand_example_with_an_empty_class():
    pred = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    targets = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    # class 0: P=1/2 R=1; class 1: P=1 R=1/2; class 2: nothing predicted or present -> P=R=0
    got = f1_scores(pred, targets)
    assert got == pytest.approx(
        {"CP": 50.0, "CR": 50.0, "CF1": 50.0, "OP": 200 / 3, "OR": 200 / 3, "OF1": 200 / 3}
    )


def test_f1_cf1_is_harmonic_mean_of_cp_and_cr_not_mean_of_f1():
    pred = np.array([[1, 1], [1, 0], [1, 0], [1, 0]], dtype=bool)
    targets = np.array([[1, 1], [0, 1], [0, 1], [0, 1]], dtype=bool)
    got = f1_scores(pred, targets)
    cp, cr = (0.25 + 1.0) / 2, (1.0 + 0.25) / 2
    assert got["CP"] == pytest.approx(100 * cp) and got["CR"] == pytest.approx(100 * cr)
    assert got["CF1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))  # 62.5, not 40.0


def test_f1_all_zero_is_zero():
    got = f1_scores(np.zeros((3, 2), bool), np.zeros((3, 2), bool))
    assert got == {"CP": 0.0, "CR": 0.0, "CF1": 0.0, "OP": 0.0, "OR": 0.0, "OF1": 0.0}
    assert all(isinstance(v, float) for v in got.values())


# ---------------------------------------------------------------- properties

# Scores from a handful of values so that ties are common.
_tie_scores = st.integers(0, 4).map(lambda v: v / 4)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(1, 12))
def test_ap_matches_brute_force(data, n):
    scores = data.draw(st.lists(_tie_scores | st.floats(-1, 1), min_size=n, max_size=n))
    targets = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    got = average_precision(np.array(scores), np.array(targets))
    want = ref_average_precision(scores, targets)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-12)
        assert 0.0 < got <= 1.0


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 10))
def test_ap_invariant_to_row_permutation_and_monotone_rescaling(data, n):
    scores = np.array(data.draw(st.lists(_tie_scores, min_size=n, max_size=n)))
    targets = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    perm = np.array(data.draw(st.permutations(range(n))))
    base = average_precision(scores, targets)
    for s, t in ((scores[perm], targets[perm]), (np.exp(3 * scores) - 7, targets)):
        other = average_precision(s, t)
        assert (math.isnan(base) and math.isnan(other)) or other == pytest.approx(base)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 8), c=st.integers(1, 5))
def test_map_matches_per_class_brute_force(data, n, c):
    scores = data.draw(arrays(np.float64, (n, c), elements=_tie_scores))
    targets = data.draw(arrays(np.bool_, (n, c)))
    m, per_class = mean_average_precision(scores, targets)
    want = [ref_average_precision(list(scores[:, j]), list(targets[:, j])) for j in range(c)]
    valid = [100 * w for w in want if not math.isnan(w)]
    np.testing.assert_allclose(per_class, 100 * np.array(want), equal_nan=True)
    if valid:
        assert m == pytest.approx(sum(valid) / len(valid))
    else:
        assert math.isnan(m)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 8), c=st.integers(1, 5))
def test_f1_matches_brute_force(data, n, c):
    pred = data.draw(arrays(np.bool_, (n, c)))
    targets = data.draw(arrays(np.bool_, (n, c)))
    got = f1_scores(pred, targets)
    want = ref_f1(pred.tolist(), targets.tolist())
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
