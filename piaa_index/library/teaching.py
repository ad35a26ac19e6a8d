"""A personal concept from a few examples (`piaa teach`): "Rex, our dog", a product, a place,
anything with no text name the model knows (issue 21).

The concept's prototype stands in for a text prototype: the direction, in the model's joint
space, of the patches its examples share and most other images lack. From there it is a label
like any other: PVCL mines its bank from the library's patches nearest the prototype, the tag
rule calibrates it, and the examples are user labels the fit learns from (keywords.py; without
`--not` images, against library images presumed absent). Nothing but stored vectors is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.errors import UserInputError
from piaa_index.query.language import normalize_label

if TYPE_CHECKING:
    from piaa_index.catalog.store import Store
    from piaa_index.vectors.shards import VectorStore

# The setting holding every taught concept's prototype, by label key (normalize_label).
SETTING = "taught"
# Patches per example that make the prototype, and library images that stand for "elsewhere".
PATCHES_PER_EXAMPLE = 3
BACKGROUND_IMAGES = 512
# Example patches tried as detectors at once: a block's cosines to 512 images of 196 patches
# are 100k floats per candidate.
CANDIDATES_PER_BLOCK = 64
# An example's patches are the concept's where they score within this of its best patch: as
# detectors (the share of image pairs ranked right), then by cosine to the first estimate.
PICK_MARGIN = 0.05
REFINE_MARGIN = 0.1


def concept_prototype(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """[d] unit prototype from the patches of the examples [P, M, d] and of other images
    [N, M, d] (library images, most of which lack the concept, and any counter-examples).

    Each example patch is tried as a detector (an image's score: its best patch's cosine to
    it): the concept's patches are those that score the other examples above the other
    images, by the share of (example, other image) pairs ranked right (the detector's AUC).
    A library holds the concept too, so "unlike every other image" would reject the concept
    itself; "above most other images" does not. The prototype is the mean of each example's
    best patches, refined once by taking each example's patches nearest that mean."""
    P, M, d = positives.shape
    U = _unit(positives)
    X = U.reshape(P * M, d)
    negs = _unit(negatives) if negatives.size else np.zeros((0, M, d), np.float32)
    score = np.zeros(P * M, np.float64)
    for a in range(0, P * M, CANDIDATES_PER_BLOCK):  # bounded memory: a block of candidates
        x = X[a : a + CANDIDATES_PER_BLOCK]
        on_neg = _best_match(x, negs)  # [k, N]
        if P > 1:
            on_pos = _best_match(x, U)  # [k, P]
            own = np.arange(a, a + len(x)) // M
            on_pos[np.arange(len(x)), own] = np.nan  # not the example it comes from
            if on_neg.shape[1]:
                ranked = np.sort(on_neg, axis=1)
                rows = zip(ranked, on_pos, strict=True)
                below = np.stack([np.searchsorted(r, v) for r, v in rows]).astype(np.float64)
                below[np.isnan(on_pos)] = np.nan
                score[a : a + len(x)] = np.nanmean(below / on_neg.shape[1], axis=1)
            else:
                score[a : a + len(x)] = np.nanmean(on_pos, axis=1)
        elif on_neg.shape[1]:  # one example: its patches least like the other images
            score[a : a + len(x)] = -np.quantile(on_neg, 0.9, axis=1)
    proto = _mean_of_best(U, score.reshape(P, M), PICK_MARGIN)
    # Refine: each example's patches nearest the first estimate.
    return _mean_of_best(U, U @ proto, REFINE_MARGIN)


def _mean_of_best(U: np.ndarray, score: np.ndarray, margin: float) -> np.ndarray:
    """[d] unit mean, over the examples U [P, M, d], of each one's best-scoring patches: up to
    PATCHES_PER_EXAMPLE of them, those within `margin` of its best (an object covers a few
    patches; a small one a single patch, and its neighbours are background)."""
    k = min(PATCHES_PER_EXAMPLE, U.shape[1])
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(score, order, axis=1)
    keep = top >= top[:, :1] - margin
    picked = np.take_along_axis(U, order[:, :, None], axis=1)[keep]
    return _unit(picked.mean(axis=0, keepdims=True))[0]


def _best_match(x: np.ndarray, images: np.ndarray) -> np.ndarray:
    """[k, N]: for each of the k unit vectors, its best cosine over each image's patches."""
    N, M, d = images.shape
    if not N:
        return np.zeros((len(x), 0), np.float32)
    return (x @ images.reshape(N * M, d).T).reshape(len(x), N, M).max(axis=2)


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12)


def teach(
    store: Store,
    vectors: VectorStore,
    name: str,
    examples: Sequence[int],
    counter_examples: Sequence[int] = (),
) -> dict[str, Any]:
    """Learn the concept `name` from indexed images (ids): its prototype is stored, the
    examples are stored as the user's labels (source "teach"). Returns what was done."""

    if not examples:
        raise UserInputError("teach needs at least one example image")
    both = set(examples) & set(counter_examples)
    if both:
        raise UserInputError(f"{len(both)} images are given both as examples and with --not")
    live = {loc[0]: loc for loc in store.live_locations()}
    missing = [i for i in [*examples, *counter_examples] if i not in live]
    if missing:
        raise UserInputError(f"{len(missing)} of the images are not indexed (yet): index them")
    pos = _patches(vectors, [live[i] for i in examples])
    rng = np.random.default_rng(0)
    others = [loc for i, loc in live.items() if i not in set(examples)]
    sample = [others[i] for i in sorted(rng.permutation(len(others))[:BACKGROUND_IMAGES])]
    chosen = {loc[0] for loc in sample} | set(counter_examples)
    neg = _patches(vectors, [live[i] for i in sorted(chosen)])
    proto = concept_prototype(pos, neg)
    key = normalize_label(name)
    taught = dict(store.get_setting(SETTING) or {})
    taught[key] = {
        "name": name,
        "prototype": [round(float(v), 7) for v in proto],
        "examples": len(examples),
        "counter_examples": len(counter_examples),
    }
    store.set_user_labels(
        [(i, name, True) for i in examples] + [(i, name, False) for i in counter_examples],
        "teach",
    )
    store.set_setting(SETTING, taught)
    return {
        "label": name,
        "examples": len(examples),
        "counter_examples": len(counter_examples),
    }


def _patches(vectors: VectorStore, locations: list[tuple[int, int, int]]) -> np.ndarray:
    parts = [np.asarray(c.patches, np.float32) for c in vectors.iter_live(locations)]
    if not parts:
        return np.zeros((0, vectors.n_patches, vectors.dim), np.float32)
    return np.concatenate(parts)


def taught_prototypes(store: Store) -> dict[str, np.ndarray]:
    """Every taught concept's prototype, by label key."""
    taught = store.get_setting(SETTING) or {}
    return {k: np.asarray(v["prototype"], np.float32) for k, v in taught.items()}
