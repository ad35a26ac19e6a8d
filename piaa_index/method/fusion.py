"""PAA (paper §3.4) on the calibrated PVCL scale, and per-label present/absent decisions (numpy).

Scores: S_cls = softmax(τ_cls · z Tᵀ); patch evidence m_c = max_i softmax(τ_e · ỹ_i)_c over an
image's patches, on the calibrated PVCL logits ỹ; S = α softmax(τ_patch · m) + (1 − α) S_cls.

S ranks images per label but sums to one over labels, so it cannot say present or absent: the
thresholds on the patch evidence m are `thresholds.py`'s (with the constants of both,
`PaaParams`), and the tag rule built on them is `decisions.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from piaa_index.method.pvcl import Classifier, gemm_rows, softmax
from piaa_index.method.thresholds import PaaParams

__all__ = [
    "PaaParams",
    "PaaScores",
    "cls_cosines",
    "cls_scores",
    "fuse",
    "open_vocabulary_scores",
    "patch_evidence",
    "patch_probabilities",
    "patch_text_cosines",
    "patch_text_evidence",
    "score_images",
    "text_support",
]


@dataclass
class PaaScores:
    """Per-image scores [N, C] of each branch and of the fusion."""

    cls: np.ndarray  # S_cls
    patch: np.ndarray  # m: max-pooled patch probabilities (presence evidence)
    fused: np.ndarray  # S
    support: np.ndarray | None = None  # max patch–text cosine: what decisions.py gates on


# [CLS] rows per GEMM call in cls_scores: one call per read chunk (2,048 images); the patch
# block (8k-32k rows) would be mostly padding, and 512-row calls paid OpenBLAS thread hand-offs.
CLS_ROWS = 2048
# Images per GEMM in the patch scoring: a read chunk (VectorStore.iter_live), whose patches fill
# whole gemm_rows blocks at ViT-B/16 (2048 x 196 = 49 x 8192 rows) and ShapesWorld (4 x 32768).
GEMM_IMAGES = 2048


def cls_cosines(cls: np.ndarray, T: np.ndarray) -> np.ndarray:
    """[CLS] cosines z Tᵀ to the text prototypes (or phrases), shape [N, C] float64."""
    # gemm_rows: one image's row alone (a gemv) would round differently than in a batch.
    z = gemm_rows(cls, np.ascontiguousarray(np.asarray(T, np.float32).T), rows=CLS_ROWS)
    return z.astype(np.float64)


def cls_scores(cls: np.ndarray, T: np.ndarray, tau_cls: float = 80.0) -> np.ndarray:
    """[CLS] zero-shot scores softmax(τ_cls · z Tᵀ), shape [N, C] (the paper's, closed-world)."""
    return softmax(tau_cls * cls_cosines(cls, T))


def _blocks(patches: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """Yield [b, M, d] float32 blocks of a [N, M, d] array (or memmap)."""
    for i in range(0, patches.shape[0], max(1, batch)):
        yield np.asarray(patches[i : i + batch], dtype=np.float32)


def patch_probabilities(patches: np.ndarray, clf: Classifier, tau: float = 1.0) -> np.ndarray:
    """Each patch's softmax(τ · calibrated PVCL logits), [b, M, C] float64: the per-patch
    evidence that `patch_evidence` max-pools for the paper's classifier (and
    piaa_index/library/evidence.py maps; an open-world map is `Calibration.relative_evidence`)."""
    # float64 softmax so that confident patches do not all round to exactly 1.0 (ties).
    return softmax(tau * clf.logits(np.asarray(patches, np.float32)).astype(np.float64))


def patch_evidence(
    patches: np.ndarray, clf: Classifier, tau: float = 1.0, batch_images: int = 256
) -> np.ndarray:
    """m_c = max over an image's patches of softmax(τ · calibrated PVCL logits), [N, C] float64."""
    return _patch_scores(patches, clf, None, tau, batch_images)[0]


def _patch_scores(
    patches: np.ndarray,
    clf: Classifier,
    T: np.ndarray | None,
    tau: float,
    batch_images: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per image, the patch evidence m ([N, C] float64) and, with T, the text support (`patch_
    text_cosines` max-pooled, [N, C] float64), block by block so each patch is read once.

    Both GEMMs are float32 through `gemm_rows` (batch-independent): the old float64 logits and
    numpy's batched [b, M, d] @ [d, C] (b small products) were 4/5 of the re-tag. The softmax
    stays in float64 so that confident patches do not round to exactly 1.0 together."""
    if patches.ndim != 3:
        raise ValueError(f"patches must be [N, M, d], got shape {patches.shape}")
    C = clf.n_classes
    N, M = patches.shape[:2]
    m = np.empty((N, C), np.float64)
    support = np.empty((N, C), np.float64) if T is not None else None
    # GEMMs over up to GEMM_IMAGES images at a time (whole gemm_rows blocks: a 256-image block
    # of 64 patches is half a block, so half of its GEMM was padding), the float64 softmax in
    # blocks of batch_images (its [b·M, C] temporaries bound memory).
    b = max(1, batch_images)
    for start, blk in zip(range(0, N, GEMM_IMAGES), _blocks(patches, GEMM_IMAGES), strict=True):
        n = blk.shape[0]
        flat = blk.reshape(n * M, -1)
        logits = clf.logits(flat).reshape(n, M, C)
        if clf.open_world:  # per-label log-odds already: the best patch, no softmax over labels
            m[start : start + n] = logits.max(axis=1)
        else:
            for a in range(0, n, b):
                z = (tau * logits[a : a + b]).astype(np.float64)
                z -= z.max(axis=2, keepdims=True)
                np.exp(z, out=z)
                z /= z.sum(axis=2, keepdims=True)
                m[start + a : start + a + len(z)] = z.max(axis=1)
        if support is not None and T is not None:
            support[start : start + n] = patch_text_cosines(flat, T).reshape(n, M, C).max(axis=1)
    return m, support


def patch_text_cosines(flat: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Cosines [n, C] float32 of patches [n, d] to the text prototypes: what the fit's
    streaming pass computes for its banks and the re-tag max-pools into text support, the same
    bits in both and in any batch (`gemm_rows`), so the re-tag takes the pass's."""
    return gemm_rows(flat, np.ascontiguousarray(np.asarray(T, np.float32).T))


def _max_over_patches(
    patches: np.ndarray,
    T: np.ndarray,
    batch_images: int,
    per_patch: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """[N, C] float64: per image, the max over its patches of `per_patch(patch-text cosines)`,
    computed in blocks of images so that [N, M, C] is never in memory."""
    if patches.ndim != 3:
        raise ValueError(f"patches must be [N, M, d], got shape {patches.shape}")
    T32 = np.asarray(T, dtype=np.float32)
    out = np.empty((patches.shape[0], T32.shape[0]), np.float64)
    b = max(1, batch_images)
    T32t = np.ascontiguousarray(T32.T)
    for i, blk in enumerate(_blocks(patches, b)):
        n, M, d = blk.shape
        # gemm_rows: a patch's cosine must not depend on which images share its block (the
        # text search re-ranks candidates in other blocks than the exact scan does).
        sims = gemm_rows(blk.reshape(n * M, d), T32t).reshape(n, M, -1)
        out[i * b : i * b + n] = per_patch(sims).max(axis=1)
    return out


def patch_text_evidence(
    patches: np.ndarray, T: np.ndarray, text_scale: float = 60.0, batch_images: int = 256
) -> np.ndarray:
    """Patch-text ablation: max over patches of softmax(text_scale · x Tᵀ), shape [N, C]."""
    return _max_over_patches(
        patches, T, batch_images, lambda z: softmax(text_scale * z.astype(np.float64))
    )


def text_support(patches: np.ndarray, T: np.ndarray, batch_images: int = 256) -> np.ndarray:
    """Max over an image's patches of the cosine to each text prototype, [N, C] float64.

    Raw cosines, not a softmax over the vocabulary: how well the image's best patch matches a
    label's text does not depend on which other labels are in the vocabulary.
    """
    return _max_over_patches(patches, T, batch_images, lambda z: z)


def open_vocabulary_scores(
    cls: np.ndarray,
    patches: np.ndarray,
    phrase: np.ndarray,
    alpha: float = 0.9,
    batch_images: int = 256,
) -> np.ndarray:
    """[N] scores of a free-text phrase: α · max patch cosine + (1 − α) · [CLS] cosine.

    PAA's weighting of the two branches, on raw cosines to the phrase's prototype [d]. No
    softmax over the vocabulary: a phrase's score (and so the ranking) does not depend on which
    labels happen to be set, and cosines do not saturate into ties the way a softmax at scale
    60–80 does. Both branches are cosines in the same joint space, so the score is on one scale
    for every phrase; the max patch cosine is the quantity decisions.py compares to the fit's
    matching level.
    """
    t = np.asarray(phrase, dtype=np.float32).reshape(-1)
    m = text_support(patches, t[None, :], batch_images)[:, 0]
    c = cls_cosines(np.asarray(cls, dtype=np.float32), t[None, :])[:, 0]
    return alpha * m + c * (1 - alpha)


def phrase_scores(
    cls: np.ndarray, patches: np.ndarray, phrase: np.ndarray, _others: np.ndarray | None
) -> np.ndarray:
    """Text search's exact scorer (`vectors.text_search.Scorer`): `open_vocabulary_scores` with
    PAA's default weighting; the Library and the read-only path (catalog/readonly_vectors.py)
    both rank with it."""
    prm = PaaParams()
    return open_vocabulary_scores(
        cls, patches, np.asarray(phrase).reshape(-1), prm.alpha, prm.batch_images
    )


def fuse(
    cls_s: np.ndarray, m: np.ndarray, alpha: float = 0.9, tau_patch: float = 2.0
) -> np.ndarray:
    """S = α softmax(τ_patch · m) + (1 − α) S_cls, shape [N, C]; rows sum to one."""
    return alpha * softmax(tau_patch * np.asarray(m, np.float64)) + (1 - alpha) * np.asarray(
        cls_s, np.float64
    )


def score_images(
    cls: np.ndarray,
    patches: np.ndarray,
    T: np.ndarray,
    clf: Classifier,
    params: PaaParams | None = None,
    support: np.ndarray | None = None,
) -> PaaScores:
    """All PAA scores for a block of images: [CLS] [N, d] and patches [N, M, d]; `support`, the
    images' text support when already known (it is computed otherwise).

    With an open-world classifier every column is per label: `patch` is the best patch's
    log-odds, `cls` the raw [CLS] cosine, and `fused` is left at zero: the fused confidence
    needs the collection's calibration (decisions.Decisions.confidence)."""
    prm = params or PaaParams()
    if clf.open_world:  # a label taught from users' labels has its own [CLS] prototype
        s_cls = cls_cosines(cls, T if clf.cls_protos is None else clf.cls_protos)
    else:
        s_cls = cls_scores(cls, T, prm.tau_cls)
    if support is None:
        m, support = _patch_scores(patches, clf, T, prm.tau_evidence, prm.batch_images)
    else:  # the fit's pass computed it (tagging.Tagger.fit): only the logits are left
        m = _patch_scores(patches, clf, None, prm.tau_evidence, prm.batch_images)[0]
    fused = np.zeros_like(m) if clf.open_world else fuse(s_cls, m, prm.alpha, prm.tau_patch)
    return PaaScores(cls=s_cls, patch=m, fused=fused, support=support)
