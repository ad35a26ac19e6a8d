"""Present / absent / weak: which labels a collection holds, and which images to tag (numpy).

The single place for the tag rule (issue 8, "Tags you can trust"). Two questions:

1. **Does the collection hold the label at all?** PVCL fills every label's Stage I bank, even a
   label that is in no image: its bank is then the patches (background, distractors, parts of
   other classes) that happen to sit nearest its text prototype, and PVCL learns that cluster.
   What gives a ghost bank away is how well its patches match the label's text: a real class's
   bank patches reach the cosine level at which this model's patches match text they depict; a
   ghost bank's do not. ``bank_support`` splits the cosines of all bank patches to their own
   label's prototype, pooled over labels, into a "matching" and a "non-matching" mode (the same
   minimum-error split as the per-label thresholds), and a label whose bank is mostly below the
   cut is not held by the collection: ``absent`` when no image in the collection has a patch at
   the matching level, ``weak`` when a few have (a rare label: its bank is mostly ghosts, but the
   images that reach the level are real candidates).
2. **Which images?** Present labels keep the paper's ranking core and the per-label split of the
   patch evidence m (``fusion.decision_thresholds``), computed on the present labels only (ghost
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
    "Decisions",
    "apply_decisions",
    "bank_support",
    "label_decisions",
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
    # per-label splits of fusion.decision_thresholds must.
    min_separation: float = 2.0
    min_gain: float = 0.0
    min_excess: float = 3.0


@dataclass
class Decisions:
    """The tag rule fitted to one collection: enough to tag its images and any added later."""

    thresholds: np.ndarray  # [C] on the patch evidence m
    support_gate: np.ndarray  # [C] on the text support; -inf: no gate, +inf: never (absent)
    status: list[dict[str, Any]]  # per label, JSON-serialisable
    info: dict[str, Any] = field(default_factory=dict)  # collection-level facts and warnings

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (infinities as strings) for storage next to the classifier."""
        return {
            "thresholds": [float(t) for t in self.thresholds],
            "support_gate": [_enc(float(g)) for g in self.support_gate],
            "status": self.status,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decisions:
        """Inverse of ``to_json``."""
        return cls(
            thresholds=np.asarray(data["thresholds"], dtype=np.float64),
            support_gate=np.asarray([_dec(g) for g in data["support_gate"]], dtype=np.float64),
            status=list(data["status"]),
            info=dict(data["info"]),
        )


def _enc(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _dec(x: float | str) -> float:
    return float(x)


def bank_support(
    bank_cosines: Sequence[np.ndarray], params: DecisionParams | None = None
) -> dict[str, Any]:
    """Collection-level test of the Stage I banks; JSON-serialisable, stored with the classifier.

    ``bank_cosines[c]`` holds the cosines of label c's bank patches to its text prototype. All of
    them, pooled, are split in two (minimum-error cut). If the split is credible, ``level`` is the
    cut (the cosine at which a patch matches a label's text in this collection) and each label's
    ``matching_fraction`` is the share of its bank at or above it; otherwise every bank counts as
    matching (``level`` None), which is what a vocabulary fully held by the collection gives.
    """
    from piaa_index.fusion import _excess, split_scores

    prm = params or DecisionParams()
    cos = [np.asarray(v, dtype=np.float64).ravel() for v in bank_cosines]
    pooled = np.concatenate(cos) if cos else np.empty(0)
    sp = split_scores(pooled, "met", 3) if pooled.size else None
    credible = bool(
        sp is not None
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
    }


def label_decisions(
    evidence: np.ndarray,
    support: np.ndarray,
    fit_support: dict[str, Any],
    params: DecisionParams | None = None,
    paa_params: Any = None,
) -> Decisions:
    """The tag rule for a collection: per-label status, thresholds on m and support gates.

    evidence: [N, C] patch evidence m (``PaaScores.patch``); support: [N, C] max patch–text cosine
    (``PaaScores.support``); fit_support: ``Classifier.params["support"]`` (``bank_support``).
    """
    from piaa_index.fusion import PaaParams, decision_thresholds

    prm = params or DecisionParams()
    m = np.asarray(evidence, dtype=np.float64)
    e = np.asarray(support, dtype=np.float64)
    if m.ndim != 2 or e.shape != m.shape:
        raise ValueError(f"evidence and support must be [N, C] alike, got {m.shape}, {e.shape}")
    N, C = m.shape
    frac = list(fit_support.get("matching_fraction", [1.0] * C))
    sizes = list(fit_support.get("bank_sizes", [1] * C))
    if len(frac) != C:
        raise ValueError(f"fit support covers {len(frac)} labels, evidence {C}")
    level = fit_support.get("level")
    # Weak labels and small libraries tag only images as sure as a typical matching bank patch:
    # the mean of the pooled split's upper mode (at least the cut itself).
    sure = fit_support.get("sure_level", level)
    small = N < prm.small_library
    n_support = (
        (e >= level).sum(axis=0) if level is not None and N else np.full(C, N, dtype=np.int64)
    )

    status: list[str] = []
    for c in range(C):
        if sizes[c] == 0:
            status.append("weak")  # no visual bank at all: too little evidence
        elif frac[c] >= prm.min_matching_fraction:
            status.append("present")
        elif n_support[c] >= prm.min_support_images:
            status.append("weak")
        else:
            status.append("absent")

    thr = np.full(C, np.inf)
    kept = [c for c in range(C) if status[c] != "absent"]
    split_info: list[dict] = [{} for _ in range(C)]
    if kept and N:
        found, info = decision_thresholds(m[:, kept], paa_params or PaaParams(), return_info=True)
        found = np.asarray(found, dtype=np.float64)
        for j, c in enumerate(kept):
            thr[c] = found[j]
            split_info[c] = {"source": info[j]["source"]}
    gate = np.full(C, -np.inf)
    surer = level is not None
    for c in range(C):
        if status[c] == "absent":
            gate[c] = np.inf
        elif surer and status[c] == "weak":
            gate[c] = float(sure)  # type: ignore[arg-type]
        elif surer and small:
            gate[c] = float(level)  # type: ignore[arg-type]
        elif status[c] == "weak":
            gate[c] = np.inf  # no visual bank and no matching level to vouch for any image
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

    records = []
    for c in range(C):
        records.append(
            {
                "status": status[c],
                "matching_fraction": round(float(frac[c]), 4),
                "bank_size": int(sizes[c]),
                "images_at_level": int(n_support[c]),
                "threshold": _enc(float(thr[c])),
                "support_gate": _enc(float(gate[c])),
                "threshold_source": split_info[c].get("source", "none"),
            }
        )
    info = {
        "n_images": int(N),
        "level": level,
        "small_library": bool(small),
        "warnings": (
            [f"small library ({N} images < {prm.small_library}): fewer, surer tags"]
            if small
            else []
        )
        + ([] if level is not None else ["no matching level: no label can be called absent"]),
        "counts": {s: status.count(s) for s in STATUSES},
    }
    return Decisions(thresholds=thr, support_gate=gate, status=records, info=info)


def apply_decisions(evidence: np.ndarray, support: np.ndarray, decisions: Decisions) -> np.ndarray:
    """Present/absent [N, C] bool: m ≥ the label's threshold and support ≥ its gate."""
    m = np.asarray(evidence, dtype=np.float64)
    e = np.asarray(support, dtype=np.float64)
    return (m >= decisions.thresholds[None, :]) & (e >= decisions.support_gate[None, :])
