"""Per-label present/absent thresholds on patch evidence, adapted to the collection without
labels (numpy only), and `PaaParams`, the constants of PAA scoring and of this rule.

The fused score S ranks images per label but sums to one over labels, so it cannot say present
or absent. ``decision_thresholds`` splits each label's patch evidence m across the collection
into two modes (Kittler–Illingworth minimum-error cut on the log-odds), with a collection-wide
fallback for labels whose split is not credible. See docs/method.md for the numbers. Split out
of fusion.py so that the tag rule (decisions.py) needs no scoring code: pvcl → decisions →
thresholds has no way back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["PaaParams", "Split", "decide", "decision_thresholds", "split_scores"]


@dataclass(frozen=True)
class PaaParams:
    """Every constant of PAA scoring and of the decision rule, with its default."""

    tau_cls: float = 80.0  # [CLS] softmax scale on cosine similarities (authors: 80; NUS 10)
    tau_evidence: float = 1.0  # patch softmax scale on the calibrated PVCL logits (authors: 1/500
    # on raw logits; calibration makes 1 right for any K, C)
    tau_patch: float = 2.0  # softmax scale over labels of m (authors: 200/400 on their softer m)
    alpha: float = 0.9  # weight of the patch branch (authors: 0.9)
    text_scale: float = 60.0  # patch-text ablation: softmax scale of patch–text cosines
    batch_images: int = 256  # images per block when scoring patches (bounds memory)
    # Decision rule (see decision_thresholds).
    split_method: str = "met"  # "met" (Kittler–Illingworth) or "otsu"
    min_separation: float = 2.0  # Ashman's D the two modes need for a per-label split
    min_count: int = 3  # images each side of a per-label split needs
    min_excess: float = 3.0  # upper mode ≥ this × the lower mode's Gaussian tail above the cut
    min_gain: float = 0.0  # nats the two-mode fit must beat one Gaussian by (minimum-error J)
    max_pooled: int = 200_000  # values sampled for the collection-wide reference split
    eps: float = 1e-12  # clip of scores before the log-odds transform


def _logit(s: np.ndarray, eps: float) -> np.ndarray:
    """log(s / (1 − s)) with s clipped to [eps, 1 − eps]."""
    s = np.clip(np.asarray(s, dtype=np.float64), eps, 1 - eps)
    return np.log(s) - np.log1p(-s)


class Split(NamedTuple):
    """A two-mode split of 1-D values."""

    threshold: float
    separation: float  # Ashman's D = |μ_hi − μ_lo| / sqrt((σ_lo² + σ_hi²) / 2)
    upper_weight: float  # fraction of values above the threshold
    mean_lo: float
    mean_hi: float
    gain: float  # minimum-error criterion of one Gaussian minus that of the split (nats)


def split_scores(x: np.ndarray, method: str = "met", min_count: int = 3) -> Split | None:
    """Best two-mode split of 1-D values, or None if no cut leaves min_count values each side.

    ``met``: Kittler–Illingworth minimum-error cut, minimising
    J = ½(P0 log σ0² + P1 log σ1²) − P0 log P0 − P1 log P1 (a hard two-Gaussian fit allowing
    unequal mode sizes and widths); ``gain`` = ½ log σ² − J > 0 means two modes explain the
    values better than one. ``otsu``: the cut maximising the between-mode variance (assumes
    similar sizes; kept for comparison).
    """
    x = np.sort(np.asarray(x, dtype=np.float64)[np.isfinite(x)])
    n = x.size
    if n < 2 * max(1, min_count) or x[0] == x[-1]:
        return None
    c1, c2 = np.cumsum(x), np.cumsum(x * x)
    k = np.arange(1, n)
    m0, m1 = c1[:-1] / k, (c1[-1] - c1[:-1]) / (n - k)
    floor = max(1e-12, 1e-3 * x.var())  # a tiny mode must not win by shrinking to zero width
    v0 = np.maximum(c2[:-1] / k - m0**2, floor)
    v1 = np.maximum((c2[-1] - c2[:-1]) / (n - k) - m1**2, floor)
    p0 = k / n
    p1 = 1.0 - p0
    J = 0.5 * (p0 * np.log(v0) + p1 * np.log(v1)) - (p0 * np.log(p0) + p1 * np.log(p1))
    if method == "met":
        crit = J
    elif method == "otsu":
        crit = -p0 * p1 * (m1 - m0) ** 2
    else:
        raise ValueError(f"unknown split method {method!r}")
    ok = (k >= min_count) & (n - k >= min_count) & (x[1:] > x[:-1])
    if not ok.any():
        return None
    i = int(np.argmin(np.where(ok, crit, np.inf)))
    return Split(
        threshold=float(0.5 * (x[i] + x[i + 1])),
        separation=float((m1[i] - m0[i]) / np.sqrt(0.5 * (v0[i] + v1[i]))),
        upper_weight=float(p1[i]),
        mean_lo=float(m0[i]),
        mean_hi=float(m1[i]),
        gain=float(0.5 * np.log(max(x.var(), floor)) - J[i]),
    )


def _excess(x: np.ndarray, t: float) -> float:
    """How many times more values lie above t than the lower mode's Gaussian tail predicts.

    A cut through a single skewed or Gaussian bulk leaves about what the tail predicts (≈ 1);
    a real upper mode leaves far more. This guards against minimum-error cuts that split off
    the last few values of a unimodal distribution, which look well separated by Ashman's D.
    """
    lo = x[x < t]
    n_hi = x.size - lo.size
    if lo.size < 2 or lo.std() == 0:
        return np.inf
    z = (t - lo.mean()) / lo.std()
    tail = 0.5 * math.erfc(z / math.sqrt(2))  # P(X > t) under the lower mode's Gaussian
    return n_hi / max(lo.size * tail / max(1.0 - tail, 1e-300), 1e-12)


def _credible(x: np.ndarray, sp: Split, prm: PaaParams) -> bool:
    """Whether a split is a real present/absent boundary rather than a cut through one mode."""
    return (
        sp.gain > prm.min_gain
        and sp.separation >= prm.min_separation
        and _excess(x, sp.threshold) >= prm.min_excess
    )


def decision_thresholds(
    scores: np.ndarray, params: PaaParams | None = None, return_info: bool = False
) -> np.ndarray | tuple[np.ndarray, list[dict]]:
    """Per-label thresholds [C] on `scores` in (0, 1), adapted to the collection without labels.

    Meant for the patch evidence m (see docs/method.md for why not the fused S). Each label's
    scores, as log-odds, are split in two (`split_scores`). The split is credible when two
    modes fit better than one (gain > min_gain), they are well separated (Ashman's D ≥
    min_separation), the upper one is not just the lower one's tail (`_excess`), and it
    straddles the split of all labels' scores pooled (when most credible labels do; otherwise
    the pooled split is not a reference). A label without a credible split
    (rare, absent everywhere, present everywhere) takes the median threshold of the credible
    labels (the calibrated scale makes log-odds comparable across labels), else the pooled
    threshold, else p = 0.5. With ``return_info`` also returns per-label dicts.
    """
    prm = params or PaaParams()
    S = np.asarray(scores, dtype=np.float64)
    if S.ndim != 2:
        raise ValueError(f"scores must be [N, C], got {S.shape}")
    N, C = S.shape
    X = _logit(S, prm.eps)
    flat = X.ravel()
    if flat.size > prm.max_pooled:  # deterministic subsample keeps the reference split cheap
        flat = flat[np.linspace(0, flat.size - 1, prm.max_pooled).astype(np.int64)]
    pooled = split_scores(flat, prm.split_method, prm.min_count)
    pooled_ok = pooled is not None and _credible(flat, pooled, prm)
    g = pooled.threshold if pooled is not None and pooled_ok else 0.0
    splits = [split_scores(X[:, c], prm.split_method, prm.min_count) for c in range(C)]
    candidates = [
        c for c, res in enumerate(splits) if res is not None and _credible(X[:, c], res, prm)
    ]
    straddling = {
        c
        for c in candidates
        if splits[c].mean_lo <= g <= splits[c].mean_hi  # type: ignore[union-attr]
    }
    # The pooled split guards against a label split inside its absent mode. It is only a
    # reference when most credible labels agree with it; when none do (seen with SCLIP patches
    # on ShapesWorld: every label rejected, nothing tagged), the pooled split is the outlier.
    use_pooled = pooled_ok and 2 * len(straddling) >= len(candidates)
    thr = np.full(C, np.nan)
    info: list[dict] = []
    for c in range(C):
        res = splits[c]
        credible = c in candidates and (not use_pooled or c in straddling)
        if credible and res is not None:
            thr[c] = res.threshold
        info.append({"source": "label" if credible else "fallback", "split": res})
    have = ~np.isnan(thr)
    fallback = float(np.median(thr[have])) if have.any() else g
    thr[~have] = fallback
    for d in info:
        d["fallback"] = fallback
    out = 1.0 / (1.0 + np.exp(-thr))  # back to score space
    return (out, info) if return_info else out


def decide(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Present/absent [N, C]: score ≥ the label's threshold."""
    return np.asarray(scores) >= np.asarray(thresholds)[None, :]
