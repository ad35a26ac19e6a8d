"""Multi-label metrics: per-class AP, mAP, and the CP/CR/CF1/OP/OR/OF1 family (numpy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["average_precision", "mean_average_precision", "f1_scores"]


def _as_binary(targets: np.ndarray, name: str = "targets") -> np.ndarray:
    """Return `targets` as a bool array, refusing anything but 0/1 (or bool) values."""
    t = np.asarray(targets)
    if t.dtype == bool:
        return t
    # -1/0/1 VOC-style targets would silently turn -1 into "present" under astype(bool).
    if t.size and not np.isin(t, (0, 1)).all():
        raise ValueError(f"{name} must be boolean or 0/1")
    return t.astype(bool)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Non-interpolated AP of one class (sklearn-style, ties grouped); NaN if no positives."""
    s = np.asarray(scores, dtype=np.float64)
    t = _as_binary(targets)
    if s.ndim != 1 or t.shape != s.shape:
        raise ValueError(
            f"scores and targets must be 1-D of equal length, got {s.shape}, {t.shape}"
        )
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(t.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    # Tied scores form one threshold, so AP does not depend on the order of tied images.
    last_of_group = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tp = np.cumsum(t)[last_of_group]
    precision = tp / (last_of_group + 1)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_step * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Return (mAP, per-class AP) in percent; classes without positives are NaN and skipped."""
    s = np.asarray(scores, dtype=np.float64)
    t = _as_binary(targets)
    if s.ndim != 2 or t.shape != s.shape:
        raise ValueError(
            f"scores and targets must be [N, C] of equal shape, got {s.shape}, {t.shape}"
        )
    ap = np.array([average_precision(s[:, c], t[:, c]) for c in range(s.shape[1])]) * 100.0
    valid = ~np.isnan(ap)
    m = float(ap[valid].mean()) if valid.any() else float("nan")
    return m, ap


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """Elementwise num/den with 0 where den is 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den != 0)
    return out


def f1_scores(pred: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Return CP, CR, CF1 (per-class, macro) and OP, OR, OF1 (overall, micro), in percent."""
    p = _as_binary(pred, "pred")
    t = _as_binary(targets)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(
            f"pred and targets must be [N, C] of equal shape, got {p.shape}, {t.shape}"
        )
    tp = (p & t).sum(axis=0)
    n_pred = p.sum(axis=0)
    n_true = t.sum(axis=0)
    # As in the multi-label literature (ML-GCN and successors): CF1 is the harmonic mean of the
    # averaged CP and CR, not the average of per-class F1; every class counts in the averages.
    cp = float(_ratio(tp, n_pred).mean()) if p.shape[1] else 0.0
    cr = float(_ratio(tp, n_true).mean()) if p.shape[1] else 0.0
    op = float(_ratio(tp.sum(), n_pred.sum()))
    o_r = float(_ratio(tp.sum(), n_true.sum()))
    cf1 = float(_ratio(2 * cp * cr, cp + cr))
    of1 = float(_ratio(2 * op * o_r, op + o_r))
    return {
        "CP": 100 * cp,
        "CR": 100 * cr,
        "CF1": 100 * cf1,
        "OP": 100 * op,
        "OR": 100 * o_r,
        "OF1": 100 * of1,
    }
