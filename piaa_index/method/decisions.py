"""Present / absent / weak: which labels a collection holds, and which images to tag (numpy).

The single place for the tag rule. The product's rule (issue 19, open world) is
``open_decisions``: per label, a confidence calibrated on the collection's own scores
(``Calibration``), tagged where it reaches one half (``Decisions.apply``), with the label's status
(present / weak / absent) from the fit's banks as below. ``label_decisions`` with per-label
thresholds on the paper's softmax evidence is the closed-world rule, kept for `piaa eval`'s
`pvcl-paper` / `piaa-paper` rows and for libraries fitted before the open world.

Status (issue 8, "Tags you can trust"):

1. **Does the collection hold the label at all?** PVCL fills every label's Stage I bank, even a
   label that is in no image: its bank is then the patches (background, distractors, parts of
   other classes) that happen to sit nearest its text prototype, and PVCL learns that cluster.
   What gives a ghost bank away is how well its patches match the label's text: a real class's
   bank patches reach the cosine level at which this model's patches match text they depict; a
   ghost bank's do not. ``bank_support`` splits the cosines of all bank patches to their own
   label's prototype, pooled over labels, into a "matching" and a "non-matching" mode (the same
   minimum-error split as the per-label thresholds), and a label whose bank is mostly below the
   cut is not held by the collection: ``absent`` when no image in the collection has a patch at
   the sure level (the matching mode's mean), ``weak`` when a few have (a rare label: its bank is
   mostly ghosts, but the images that reach the level are real candidates). This pooled level
   is the one quantity that reads other labels' banks.
2. **Which images?** (the closed-world rule; the open-world one is above) Present labels keep the paper's ranking core and the per-label split of the
   patch evidence m (``thresholds.decision_thresholds``), computed on the present labels only (ghost
   labels' m no longer pollutes the collection-wide reference). Weak labels and every label of a
   small library (fewer than ``small_library`` images, where per-label splits are not possible)
   are tagged only in images whose best patch reaches the matching level ("fewer, surer");
   absent labels decide False for every image.

Everything the rule needs is explicit: the [N, C] patch evidence m, the [N, C] text support
(max patch–text cosine per image, ``fusion.text_support``) and the fit's bank support
(``Classifier.params["support"]``, made by ``bank_support`` at fit time). The outcome is a
``Decisions`` object: thresholds and support gates per label (enough to tag images added later
with ``apply_decisions``), and a JSON-serialisable status dict per label with the numbers behind
it. See docs/method.md for the measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DecisionParams",
    "Calibration",
    "Decisions",
    "calibrate",
    "open_decisions",
    "apply_decisions",
    "bank_support",
    "label_decisions",
    "label_status",
]

STATUSES = ("present", "weak", "absent")


@dataclass(frozen=True)
class DecisionParams:
    """Constants of the rule, with their defaults (none is tuned per collection)."""

    # A label is held by the collection when at least this share of its bank matches its text:
    # a majority, so the classifier learnt mostly from real object patches.
    min_matching_fraction: float = 0.5
    # Images whose best patch must reach the matching level before a label with a mostly-ghost
    # bank is called weak rather than absent.
    min_support_images: int = 3
    # Gate weak labels (and small libraries) at the mean of the matching mode, not at the cut.
    sure_upper_mean: bool = True
    # Below this many images, per-label splits of m are not possible: gate every label on text
    # support and flag the library as small.
    small_library: int = 200
    # The pooled cosine split must beat one Gaussian and separate its modes (Ashman's D), as the
    # per-label splits of thresholds.decision_thresholds must.
    min_separation: float = 2.0
    min_gain: float = 0.0
    min_excess: float = 3.0
    # Banks the pooled matching level needs before any label may be called weak or absent.
    min_labels: int = 8
    # A bank whose clusters' centres match the label's text less than this share of how well
    # the bank's own patches do is the fringe of other things (`open_pvcl.cluster_agreement`).
    min_cluster_agreement: float = 0.75


# A tag is a confidence of at least one half: the one rule, for fit, new images, eval, evidence
# and Ray alike (`Decisions.apply`).
PRESENT_AT = 0.5


@dataclass
class Calibration:
    """Per label, how its patch evidence E (best patch's log-odds) and [CLS] cosine C become one
    confidence in [0, 1], learnt from the collection's own scores without labels.

    F = α·(E − e_center)/e_scale + (1 − α)·(C − c_center)/c_scale (robust per-label z-scores,
    so the paper's α weighs branches on one scale), and confidence = sigmoid(slope·F +
    intercept): the posterior of the upper of two equal-variance Gaussians fitted to the
    label's F over the collection (EM). Nothing in it depends on another label.
    """

    e_center: np.ndarray
    e_scale: np.ndarray
    c_center: np.ndarray
    c_scale: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    alpha: float = 0.9

    def fused(
        self, E: np.ndarray, C: np.ndarray, columns: slice | list[int] | int = slice(None)
    ) -> np.ndarray:
        """[N, C] fused per-label score F (unbounded); of one label's [N] column when `columns`
        is its index."""
        zE = (np.asarray(E, np.float64) - self.e_center[columns]) / self.e_scale[columns]
        zC = (np.asarray(C, np.float64) - self.c_center[columns]) / self.c_scale[columns]
        return self.alpha * zE + (1 - self.alpha) * zC

    def relative_evidence(
        self, E: np.ndarray, columns: slice | list[int] | int = slice(None)
    ) -> np.ndarray:
        """Patch log-odds shown to people, in (0, 1): sigmoid of the label's robust z-score,
        so one half is the best patch of a typical image of this collection. Applied to an
        image's best patch it is `tags`' patch score; to every patch, the evidence map."""
        z = (np.asarray(E, np.float64) - self.e_center[columns]) / self.e_scale[columns]
        return 0.5 * (1.0 + np.tanh(0.5 * z))

    def confidence(self, E: np.ndarray, C: np.ndarray) -> np.ndarray:
        """[N, C] calibrated confidence that each label is in each image."""
        z = self.slope * self.fused(E, C) + self.intercept
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the sigmoid, without overflow

    def to_json(self) -> dict[str, Any]:
        arrays = {k: [float(x) for x in v] for k, v in self.__dict__.items() if k != "alpha"}
        return {**arrays, "alpha": self.alpha}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        arrays = {k: np.asarray([float(x) for x in v]) for k, v in data.items() if k != "alpha"}
        return cls(**arrays, alpha=float(data.get("alpha", 0.9)))


@dataclass
class Decisions:
    """The tag rule fitted to one collection: enough to tag its images and any added later."""

    thresholds: np.ndarray  # [C] on the confidence S (legacy rule: on the patch evidence m)
    support_gate: np.ndarray  # [C] on the text support; -inf: no gate, +inf: never (absent)
    status: list[dict[str, Any]]  # per label, JSON-serialisable
    info: dict[str, Any] = field(default_factory=dict)  # collection-level facts and warnings
    calibration: Calibration | None = None  # None: a classifier fitted before the open world

    def apply(
        self, E: np.ndarray, C: np.ndarray, U: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(confidence S [N, C], present [N, C]) of images' evidence, [CLS] and text support.

        An image whose best patch does not reach a gated label's text level (weak and absent
        labels) keeps half its confidence: below one half, never tagged, and still ranked. Legacy rule (no calibration): no S (the stored one stands), present is
        E >= threshold and U >= gate."""
        E = np.asarray(E, dtype=np.float64)
        U = np.asarray(U, dtype=np.float64)
        gated = U >= self.support_gate[None, :]
        if self.calibration is None:
            return None, (E >= self.thresholds[None, :]) & gated
        conf = self.calibration.confidence(E, C)
        S = np.where(gated, conf, 0.5 * conf)
        return S, S >= PRESENT_AT

    def carry_over(self, old: Decisions, kept: Sequence[int]) -> Decisions:
        """This rule, with label c's part (calibration, status, gate) taken from `old`'s label
        kept[c] wherever kept[c] >= 0: labels kept through a vocabulary change keep their
        tags exactly, whatever the new labels and images indexed since (`Tagger.fit`)."""
        thresholds, gate = self.thresholds.copy(), self.support_gate.copy()
        status = list(self.status)
        cal = self.calibration
        if cal is not None:
            cal = Calibration(**{k: np.copy(v) for k, v in vars(cal).items() if k != "alpha"},
                              alpha=cal.alpha)  # fmt: skip
        for c, k in enumerate(kept):
            if k < 0:
                continue
            thresholds[c], gate[c], status[c] = (
                old.thresholds[k],
                old.support_gate[k],
                old.status[k],
            )
            if cal is not None and old.calibration is not None:
                for name, values in vars(cal).items():
                    if name != "alpha":
                        values[c] = getattr(old.calibration, name)[k]
        info = {
            **self.info,
            "counts": {s: [r["status"] for r in status].count(s) for s in STATUSES},
        }
        return Decisions(thresholds, gate, status, info, cal)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (infinities as strings) for storage next to the classifier."""
        out = {
            "thresholds": [_enc(float(t)) for t in self.thresholds],
            "support_gate": [_enc(float(g)) for g in self.support_gate],
            "status": self.status,
            "info": self.info,
        }
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decisions:
        """Inverse of ``to_json``."""
        calibration = data.get("calibration")
        return cls(
            thresholds=np.asarray([_dec(t) for t in data["thresholds"]], dtype=np.float64),
            support_gate=np.asarray([_dec(g) for g in data["support_gate"]], dtype=np.float64),
            status=list(data["status"]),
            info=dict(data["info"]),
            calibration=None if calibration is None else Calibration.from_json(calibration),
        )


def _enc(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _dec(x: float | str) -> float:
    return float(x)


def bank_support(
    bank_cosines: Sequence[np.ndarray],
    params: DecisionParams | None = None,
    agreement: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """Collection-level test of the Stage I banks; JSON-serialisable, stored with the classifier.

    ``bank_cosines[c]`` holds the cosines of label c's bank patches to its text prototype. All of
    them, pooled, are split in two (minimum-error cut). If the split is credible, ``level`` is the
    cut (the cosine at which a patch matches a label's text in this collection) and each label's
    ``matching_fraction`` is the share of its bank at or above it; otherwise every bank counts as
    matching (``level`` None), which is what a vocabulary fully held by the collection gives.
    """
    from piaa_index.method.thresholds import _excess, split_scores

    prm = params or DecisionParams()
    cos = [np.asarray(v, dtype=np.float64).ravel() for v in bank_cosines]
    pooled = np.concatenate(cos) if cos else np.empty(0)
    sp = split_scores(pooled, "met", 3) if pooled.size else None
    # Few banks cannot tell a matching mode from the differences between labels: with four held
    # labels on `shapesworld-gap` the split was credible and called held labels weak, so a
    # label's tags moved with the vocabulary. Below `min_labels` banks, no label is absent.
    enough = sum(v.size > 0 for v in cos) >= prm.min_labels
    credible = bool(
        enough
        and sp is not None
        and sp.gain > prm.min_gain
        and sp.separation >= prm.min_separation
        and _excess(pooled, sp.threshold) >= prm.min_excess
    )
    level = float(sp.threshold) if credible and sp is not None else None
    frac, hi = [], []
    for v in cos:
        if v.size == 0:
            frac.append(0.0)
        elif level is None:
            frac.append(1.0)
        else:
            frac.append(float((v >= level).mean()))
        hi.append(float(v.max()) if v.size else None)
    sure = float(sp.mean_hi) if credible and sp is not None and prm.sure_upper_mean else level
    return {
        "level": level,
        "sure_level": sure,
        "credible": credible,
        "split": None if sp is None else {k: float(x) for k, x in sp._asdict().items()},
        "bank_sizes": [int(v.size) for v in cos],
        "matching_fraction": frac,
        "median_cosine": [float(np.median(v)) if v.size else None for v in cos],
        "max_cosine": hi,
        # Per label, open_pvcl.cluster_agreement (None: not measured, e.g. the paper's fit).
        "cluster_agreement": list(agreement) if agreement is not None else [None] * len(cos),
    }


@dataclass
class LabelStatus:
    """Whether the collection holds each label, from the fit's banks (``bank_support``), and the
    text-support gate that follows: absent labels never pass, weak ones only at the sure level."""

    status: list[str]  # per label: present, weak or absent
    gate: np.ndarray  # [C] on the text support
    matching_fraction: list[float]
    bank_sizes: list[int]
    images_at_level: np.ndarray  # [C] images whose best patch reaches the sure level
    level: float | None  # the pooled matching level (None: not credible, or too few banks)
    agreement: list[float | None] = field(default_factory=list)  # cluster_agreement per label

    def record(self, c: int, threshold: float, source: str) -> dict[str, Any]:
        """Label c's JSON-serialisable status dict, with its threshold."""
        return {
            "status": self.status[c],
            "matching_fraction": round(float(self.matching_fraction[c]), 4),
            "bank_size": int(self.bank_sizes[c]),
            "images_at_level": int(self.images_at_level[c]),
            "threshold": _enc(float(threshold)),
            "support_gate": _enc(float(self.gate[c])),
            "threshold_source": source,
            "cluster_agreement": (
                None
                if c >= len(self.agreement) or self.agreement[c] is None
                else round(float(self.agreement[c]), 4)  # type: ignore[arg-type]
            ),
        }


def label_status(
    support: np.ndarray, fit_support: dict[str, Any], params: DecisionParams | None = None
) -> LabelStatus:
    """Each label's status and gate; support: [N, C] max patch–text cosine (``PaaScores.support``),
    fit_support: ``Classifier.params["support"]`` (``bank_support``)."""
    prm = params or DecisionParams()
    e = np.asarray(support)  # float64 a column at a time: [N, C] of it is 640 MB at 1M images
    N, C = e.shape
    frac = list(fit_support.get("matching_fraction", [1.0] * C))
    sizes = list(fit_support.get("bank_sizes", [1] * C))
    if len(frac) != C:
        raise ValueError(f"fit support covers {len(frac)} labels, evidence {C}")
    level = fit_support.get("level")
    # Weak labels tag only images as sure as a typical matching bank patch: the mean of the
    # pooled split's upper mode (at least the cut itself).
    sure = fit_support.get("sure_level", level)
    # A label with a mostly-ghost bank is weak (not absent) only if some images reach the sure
    # level, where weak labels are tagged: below it, it could never tag anything anyway.
    n_support = np.full(C, N, dtype=np.int64)
    if sure is not None and N:
        for c in range(C):
            n_support[c] = np.count_nonzero(e[:, c].astype(np.float64) >= sure)

    agreement = list(fit_support.get("cluster_agreement") or [None] * C)
    status: list[str] = []
    for c in range(C):
        # A ghost bank: mostly below the pooled matching level, or the fringe of clusters of
        # other things (its own test, `open_pvcl.cluster_agreement`, reads no other label).
        ghost = frac[c] < prm.min_matching_fraction or (
            agreement[c] is not None and agreement[c] < prm.min_cluster_agreement
        )
        if sizes[c] == 0:
            status.append("weak")  # no visual bank at all: too little evidence
        elif not ghost:
            status.append("present")
        elif level is not None and n_support[c] >= prm.min_support_images:
            status.append("weak")  # a rare label: some images reach the sure level
        else:
            status.append("absent")
    gate = np.full(C, -np.inf)
    for c in range(C):
        if status[c] == "absent":
            gate[c] = np.inf
        elif status[c] == "weak":
            # No matching level: no visual bank and nothing to vouch for any image.
            gate[c] = float(sure) if level is not None else np.inf  # type: ignore[arg-type]
    return LabelStatus(status, gate, frac, sizes, n_support, level, agreement)


def _info(N: int, st: LabelStatus, small_library: int | None = None) -> dict[str, Any]:
    """Collection-level facts and warnings of a rule (`small_library`: its gate, if it has one)."""
    small = small_library is not None and N < small_library
    return {
        "n_images": int(N),
        "level": st.level,
        "small_library": bool(small),
        "warnings": (
            [f"small library ({N} images < {small_library}): fewer, surer tags"] if small else []
        )
        + ([] if st.level is not None else ["no matching level: no label can be called absent"]),
        "counts": {s: st.status.count(s) for s in STATUSES},
    }


def label_decisions(
    evidence: np.ndarray,
    support: np.ndarray,
    fit_support: dict[str, Any],
    params: DecisionParams | None = None,
    paa_params: Any = None,
) -> Decisions:
    """The closed-world tag rule: per-label status, thresholds on m and support gates.

    evidence: [N, C] patch evidence m (``PaaScores.patch``); support: [N, C] max patch–text cosine
    (``PaaScores.support``); fit_support: ``Classifier.params["support"]`` (``bank_support``).
    """
    from piaa_index.method.thresholds import PaaParams, decision_thresholds

    prm = params or DecisionParams()
    m = np.asarray(evidence, dtype=np.float64)
    e = np.asarray(support, dtype=np.float64)
    if m.ndim != 2 or e.shape != m.shape:
        raise ValueError(f"evidence and support must be [N, C] alike, got {m.shape}, {e.shape}")
    N, C = m.shape
    st = label_status(e, fit_support, prm)
    small = N < prm.small_library
    surer = st.level is not None

    thr = np.full(C, np.inf)
    kept = [c for c in range(C) if st.status[c] != "absent"]
    split_info: list[dict] = [{} for _ in range(C)]
    if kept and N:
        found, info = decision_thresholds(m[:, kept], paa_params or PaaParams(), return_info=True)
        found = np.asarray(found, dtype=np.float64)
        for j, c in enumerate(kept):
            thr[c] = found[j]
            split_info[c] = {"source": info[j]["source"]}
    gate = st.gate  # the records below show it with the small-library gate
    if small and surer:
        # Small libraries gate present labels too, at the matching level (fewer, surer).
        for c in range(C):
            if st.status[c] == "present":
                gate[c] = float(st.level)  # type: ignore[arg-type]
    if small and not surer:
        # No matching level to gate on: in a small library, tag only where the label's own
        # evidence is above the collection's median of it (fewer, surer; thresholds per label).
        for c in kept:
            thr[c] = max(thr[c], float(np.quantile(m[:, c], 0.5)) if N else thr[c])

    if small and kept and N:
        # Per-label thresholds even where no split was possible: the label's own evidence in
        # the images that reach the matching level sets the bar (fewer, surer tags).
        for c in kept:
            if split_info[c].get("source") != "label":
                sel = e[:, c] >= gate[c]
                if sel.any():
                    thr[c] = max(thr[c], float(np.median(m[sel, c])))

    records = [st.record(c, thr[c], split_info[c].get("source", "none")) for c in range(C)]
    return Decisions(thr, gate, records, _info(N, st, prm.small_library))


def apply_decisions(evidence: np.ndarray, support: np.ndarray, decisions: Decisions) -> np.ndarray:
    """Present/absent [N, C] bool by the legacy rule: m ≥ the label's threshold and support ≥
    its gate (the paper's closed-world classifier, kept for `piaa eval`'s comparison rows)."""
    m = np.asarray(evidence, dtype=np.float64)
    e = np.asarray(support, dtype=np.float64)
    return (m >= decisions.thresholds[None, :]) & (e >= decisions.support_gate[None, :])


def _robust_scale(x: np.ndarray) -> tuple[float, float]:
    """(median, scale) of 1-D values: 1.4826·MAD, or the std where most values are equal."""
    if x.size == 0:
        return 0.0, 1.0
    center = float(np.median(x))
    scale = 1.4826 * float(np.median(np.abs(x - center)))
    if not scale > 1e-9:
        scale = float(x.std())
    return center, scale if scale > 1e-9 else 1.0


def _upper_mode(x: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """(slope, intercept) of the posterior of the upper of two equal-variance Gaussians fitted
    to 1-D values by EM (started from the minimum-error split), as a logistic in x."""
    from piaa_index.method.thresholds import split_scores

    x = np.asarray(x, dtype=np.float64)
    sp = split_scores(x, "met", 3) if x.size >= 6 else None
    if sp is None:  # too few images, or all equal: the standardised score itself
        return 1.0, 0.0
    upper = (x > sp.threshold).astype(np.float64)
    slope = intercept = 0.0
    for _ in range(iters):
        w1 = upper.sum()
        w0 = x.size - w1
        if w1 < 1e-9 or w0 < 1e-9:
            break
        pi1 = w1 / x.size
        mu0 = float(((1 - upper) * x).sum() / w0)
        mu1 = float((upper * x).sum() / w1)
        var = float((((1 - upper) * (x - mu0) ** 2) + upper * (x - mu1) ** 2).sum() / x.size)
        var = max(var, 1e-6)
        slope = (mu1 - mu0) / var
        intercept = math.log(pi1 / (1 - pi1)) - (mu1**2 - mu0**2) / (2 * var)
        new = 0.5 * (1.0 + np.tanh(0.5 * (slope * x + intercept)))
        if np.max(np.abs(new - upper)) < 1e-7:
            upper = new
            break
        upper = new
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope <= 0:
        return 1.0, 0.0
    return float(slope), float(intercept)


def calibrate(E: np.ndarray, C: np.ndarray, alpha: float = 0.9) -> Calibration:
    """Each label's calibration from its own column of the collection's scores (`Calibration`).

    A column at a time, in float64: whole [N, C] float64 copies were ~4 GB at 1M images."""
    E, Cs = np.asarray(E), np.asarray(C)
    n_labels = E.shape[1]
    cal = Calibration(
        e_center=np.zeros(n_labels),
        e_scale=np.ones(n_labels),
        c_center=np.zeros(n_labels),
        c_scale=np.ones(n_labels),
        slope=np.ones(n_labels),
        intercept=np.zeros(n_labels),
        alpha=alpha,
    )
    for c in range(n_labels):
        e, k = E[:, c].astype(np.float64), Cs[:, c].astype(np.float64)
        cal.e_center[c], cal.e_scale[c] = _robust_scale(e)
        cal.c_center[c], cal.c_scale[c] = _robust_scale(k)
        cal.slope[c], cal.intercept[c] = _upper_mode(cal.fused(e, k, c))
    return cal


def open_decisions(
    evidence: np.ndarray,
    cls: np.ndarray,
    support: np.ndarray,
    fit_support: dict[str, Any],
    params: DecisionParams | None = None,
    alpha: float = 0.9,
) -> Decisions:
    """The tag rule of an open-world classifier: per-label calibration (`calibrate`), the
    label's status and gate from the fit's banks (`label_status`). A tag is a confidence of at
    least one half. No small-library gate: it would be the pooled matching level, which depends
    on the other labels; a present label's confidence must not."""
    st = label_status(support, fit_support, params)
    cal = calibrate(evidence, cls, alpha)
    thresholds = np.where(np.isinf(st.gate) & (st.gate > 0), np.inf, PRESENT_AT)
    records = []
    for c in range(len(st.status)):
        record = st.record(c, thresholds[c], "calibrated")
        record["calibration"] = {"slope": round(float(cal.slope[c]), 4)}
        records.append(record)
    return Decisions(thresholds, st.gate, records, _info(len(support), st), cal)
