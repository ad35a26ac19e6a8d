"""A personal concept from a few examples (`piaa teach`): "Rex, our dog", a product, a place,
anything with no text name the model knows (issue 21).

The concept's prototype stands in for a text prototype: the direction, in the model's joint
space, of the patches its examples share and other images lack. From there it is a label like
any other: PVCL mines its bank from the library's patches nearest the prototype, the tag rule
calibrates it, and the examples are user labels the fit learns from (keywords.py). Nothing but
stored vectors is read.
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


def concept_prototype(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """[d] unit prototype from the patches of the examples [P, M, d] and of images without
    the concept [N, M, d]: per example, the patches most alike across the other examples and
    least alike anything in the negatives; their mean, refined once by taking each example's
    patches nearest that mean."""
    P, M, d = positives.shape
    X = _unit(positives.reshape(P * M, d))
    neg = _unit(negatives.reshape(-1, d)) if negatives.size else np.zeros((0, d), np.float32)
    sims = (X @ X.T).reshape(P, M, P, M).max(axis=3)  # [P, M, P]: best match in each example
    if P > 1:
        own = np.arange(P)
        sims[own, :, own] = np.nan
        shared = np.nanmean(sims, axis=2)  # [P, M]
    else:
        shared = np.zeros((P, M), np.float32)
    if len(neg):
        k = min(5, len(neg))
        top = np.partition(X @ neg.T, len(neg) - k, axis=1)[:, -k:]
        contrast = top.mean(axis=1).reshape(P, M)
    else:
        contrast = np.zeros((P, M), np.float32)
    score = shared - contrast
    k = min(PATCHES_PER_EXAMPLE, M)
    Xp = X.reshape(P, M, d)
    picked = np.take_along_axis(Xp, np.argsort(-score, axis=1)[:, :k, None], axis=1)
    proto = _unit(picked.reshape(-1, d).mean(axis=0, keepdims=True))[0]
    # Refine: each example's patches nearest the first estimate.
    nearest = np.argsort(-(Xp @ proto), axis=1)[:, :k]
    picked = np.take_along_axis(Xp, nearest[:, :, None], axis=1)
    return _unit(picked.reshape(-1, d).mean(axis=0, keepdims=True))[0]


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
