"""`piaa vocab check`: label pairs whose text features are entangled (DCLIP's diagnosis: CLIP's
text features of different classes sit close, inter-class cosine ~0.77 on VOC), with how often
they fire together in this collection, and what to do about it. Training-free, numpy only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# A pair is entangled when its text cosine stands this many robust deviations above the
# vocabulary's typical pair (a property of the model's text space, not a fixed cosine).
ENTANGLED_Z = 2.0
# Co-firing: of the images tagged with the rarer label of the pair, the share also tagged with
# the other, against what independent labels would give.
COFIRE_LIFT = 2.0


def entangled_pairs(
    names: Sequence[str], T: np.ndarray, present: np.ndarray, top: int = 10
) -> dict[str, Any]:
    """The `top` most entangled label pairs: text cosine, its z-score among all pairs, tag
    counts and co-firing in the collection (`present` [N, C] bool), and advice."""
    C = len(names)
    Tn = np.asarray(T, np.float64)
    Tn = Tn / np.maximum(np.linalg.norm(Tn, axis=1, keepdims=True), 1e-12)
    cos = Tn @ Tn.T
    iu = np.triu_indices(C, k=1)
    values = cos[iu]
    if values.size == 0:
        return {"labels": C, "pairs": [], "typical_cosine": None}
    centre = float(np.median(values))
    spread = float(1.4826 * np.median(np.abs(values - centre))) or 1e-6
    P = np.asarray(present, bool)
    N = max(1, len(P))
    counts = P.sum(axis=0)
    both = P.T.astype(np.int64) @ P.astype(np.int64)
    order = np.argsort(-values)[:top]
    pairs = []
    for k in order:
        a, b = int(iu[0][k]), int(iu[1][k])
        z = (float(values[k]) - centre) / spread
        rarer = min(int(counts[a]), int(counts[b]))
        shared = int(both[a, b])
        expected = counts[a] * counts[b] / N
        lift = shared / expected if expected > 0 else None
        entangled = z >= ENTANGLED_Z
        cofire = lift is not None and lift >= COFIRE_LIFT and rarer > 0
        pairs.append(
            {
                "labels": [names[a], names[b]],
                "text_cosine": round(float(values[k]), 4),
                "z": round(z, 2),
                "entangled": entangled,
                "tagged": [int(counts[a]), int(counts[b])],
                "tagged_together": shared,
                "share_of_rarer": round(shared / rarer, 3) if rarer else None,
                "lift": None if lift is None else round(float(lift), 2),
                "advice": _advice(entangled, cofire, names[a], names[b]),
            }
        )
    return {
        "labels": C,
        "images": int(len(P)),
        "typical_cosine": round(centre, 4),
        "pairs": pairs,
    }


def _advice(entangled: bool, cofire: bool, a: str, b: str) -> str:
    if entangled and cofire:
        return (
            f"the model's text for {a!r} and {b!r} is close and they are tagged together more "
            "than chance: check a few of those images; name them more specifically, or confirm/"
            f"reject tags (`piaa labels set`) or `piaa teach` so the fit learns them apart"
        )
    if entangled:
        return "close in the text space, but tagged apart in this collection: nothing to do"
    if cofire:
        return "tagged together often, but their text is distinct: they likely co-occur"
    return "fine"
