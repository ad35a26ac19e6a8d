"""Synthetic Gaussian patch and image worlds with a simulated vision–language modality gap.

Each class has a visual mean (unit vectors sharing a common component, so classes are not
orthogonal); its text prototype is that mean pushed by one gap vector common to all classes plus
per-class noise, so the text classifier alone is visibly wrong on the patches while the visual
structure is still there to be found. Background patches come from a few clusters of their own.

These worlds check the mechanics of PVCL (banks, Stage I/II, calibration, crossing the gap) and
of the PAA scores and decision rule, in tests and in ``benchmarks/bench_pvcl_synthetic.py``. They
are not a model of real CLIP features: numbers measured on them say whether the code does what it
should, not how accurate tagging will be on photos.

Everything is drawn from ``numpy.random.default_rng(seed)`` in a fixed order, so a world and its
samples are reproducible from the parameters and the seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["PatchWorld", "image_world", "patch_world", "unit"]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _classes_and_text(
    rng: np.random.Generator, C: int, d: int, text_noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """Visual class means [C, d] and text prototypes [C, d] across a common gap (both float64)."""
    means = unit(0.3 * unit(rng.normal(size=d)) + unit(rng.normal(size=(C, d))))
    gap = unit(rng.normal(size=d))
    T = unit(means + gap + text_noise * unit(rng.normal(size=(C, d))))
    return means, T


class PatchWorld:
    """C visual class means, 5 background clusters, and text prototypes across a modality gap.

    Patches are a class mean (or a background centre) plus isotropic noise of norm about `noise`,
    renormalised. Attributes: `means` [C, d], `T` [C, d] float32, `bg` [5, d]. Sampling methods
    take a generator; without one they continue the world's own generator (`seed`), after the
    draws that made the world.
    """

    def __init__(
        self, C: int, d: int = 64, noise: float = 1.5, text_noise: float = 1.5, seed: int = 0
    ) -> None:
        self.C, self.d, self.noise, self.seed = C, d, noise, seed
        self._rng = np.random.default_rng(seed)
        self.means, T = _classes_and_text(self._rng, C, d, text_noise)
        self.T = T.astype(np.float32)
        self.bg = unit(self._rng.normal(size=(5, d)))

    def _patches(self, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noisy unit patches (float32) around the given centres."""
        X = unit(centres + self.noise * rng.normal(size=centres.shape) / np.sqrt(self.d))
        return X.astype(np.float32)

    def sample(
        self, n: int, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """n patches: 2/3 objects of uniformly drawn classes, 1/3 background (label −1)."""
        rng = self._rng if rng is None else rng
        y = rng.integers(self.C, size=n)
        y[rng.random(n) < 1 / 3] = -1
        centres = np.where(
            y[:, None] >= 0, self.means[np.maximum(y, 0)], self.bg[rng.integers(5, size=n)]
        )
        return self._patches(centres, rng), y

    def balanced(
        self, n_per_class: int, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exactly n_per_class patches of each class plus half as many background ones in all
        (label −1), shuffled."""
        rng = self._rng if rng is None else rng
        y = np.repeat(np.arange(self.C), n_per_class)
        n_bg = self.C * n_per_class // 2
        centres = np.concatenate([self.means[y], self.bg[rng.integers(5, size=n_bg)]])
        X = self._patches(centres, rng)
        labels = np.concatenate([y, -np.ones(n_bg, int)])
        perm = rng.permutation(labels.size)
        return X[perm], labels[perm]

    def stream(self, n: int, chunk: int) -> Iterator[np.ndarray]:
        """n patches from `sample`, generated chunk by chunk (deterministic, seeded with
        seed + 1), never all in memory."""
        rng = np.random.default_rng(self.seed + 1)
        for start in range(0, n, chunk):
            yield self.sample(min(chunk, n - start), rng)[0]


def patch_world(
    C: int,
    d: int = 64,
    n_per_class: int = 1500,
    noise: float = 1.5,
    text_noise: float = 1.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A balanced pool from a fresh `PatchWorld`: patches [n, d] float32, labels [n] (−1 =
    background), true visual means [C, d], text prototypes [C, d] float32.
    """
    w = PatchWorld(C, d=d, noise=noise, text_noise=text_noise, seed=seed)
    X, labels = w.balanced(n_per_class)
    return X, labels, w.means, w.T


def image_world(
    N: int, C: int, d: int = 64, M: int = 49, seed: int = 3, absent: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images of 0–4 objects (Zipf-like label frequencies, areas 1..M/2 patches, a third of
    object patches blended with the background) on one of 6 backgrounds; [CLS] is an
    area^1.5-weighted blend, so small objects barely show in it. Text prototypes carry a modality
    gap; `absent` extra labels (random prototypes) never occur in any image.
    Returns patches [N, M, d], cls [N, d], targets [N, C + absent], prototypes [C + absent, d].
    """
    rng = np.random.default_rng(seed)
    means, T = _classes_and_text(rng, C, d, 1.5)
    if absent:
        T = np.concatenate([T, unit(rng.normal(size=(absent, d)))])
    bgs = unit(rng.normal(size=(6, d)))
    freq = 1.0 / np.arange(1, C + 1)
    freq = freq[rng.permutation(C)] / freq.sum()
    Y = np.zeros((N, C + absent), bool)
    P = np.empty((N, M, d), np.float32)
    Z = np.empty((N, d), np.float32)
    for n in range(N):
        k = min(rng.poisson(1.8), 4)
        cs = rng.choice(C, size=k, replace=False, p=freq)
        Y[n, cs] = True
        bg = bgs[rng.integers(6)]
        lab = np.full(M, -1)
        slots = rng.permutation(M)
        areas, pos = [], 0
        for c in cs:
            a = int(np.clip(np.round(np.exp(rng.uniform(0, np.log(M / 2)))), 1, M // 2))
            a = min(a, M - pos)
            lab[slots[pos : pos + a]] = c
            pos += a
            areas.append(a)
        centres = np.where(lab[:, None] >= 0, means[np.maximum(lab, 0)], bg)
        mixed = (lab >= 0) & (rng.random(M) < 0.33)
        centres[mixed] = 0.5 * centres[mixed] + 0.5 * bg
        P[n] = unit(centres + 1.5 * rng.normal(size=(M, d)) / np.sqrt(d))
        w = np.array(areas, float) ** 1.5
        glob = w @ means[cs] / w.sum() if k else np.zeros(d)
        Z[n] = unit(glob + 0.25 * bg + 0.2 * rng.normal(size=d) / np.sqrt(d))
    return P, Z, Y, T.astype(np.float32)
