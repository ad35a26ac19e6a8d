"""Open-world PVCL: each label's patch classifier against a background learnt from the collection.

The paper's PVCL (pvcl.py) is closed-world: Stage I banks are chosen by argmax and entropy
across the vocabulary, and the GDA's classes must explain every patch, so with four labels every
patch of every other object is forced into one of them. Here nothing about a label depends on
the other labels:

- **Bank** (Stage I): the K pool patches nearest the label's text prototype (raw cosine), a
  streaming top-K per label (`LabelBanks`); ties break on the patch id, so chunking, engine and
  index order do not matter.
- **Background** (`fit_background`): k-means clusters of a sample of the pool, one Gaussian
  each with a shared (within-cluster) covariance: the unnamed things of the collection. The
  sample is chosen by content hash (`sample_keys`), never by the vocabulary, the engine, the
  image ids or the order of the shards.
- **Classifier** (`fit_open`): the label's Gaussian (bank mean, the same precision) against the
  background mixture; its logit is the log-odds "this label rather than anything the collection
  holds". A patch of an unnamed object is explained by its own cluster, not by the label.

No Stage II: purifying the bank by its own log-odds (keep >= median, or mean + std, as the paper
does with its softmax) lost 2.5-5 mAP on ShapesWorld (docs/results.md).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from piaa_index.method.pvcl import Classifier

__all__ = [
    "Background",
    "HashKeys",
    "LabelBanks",
    "OpenParams",
    "default_bank_size",
    "fit_background",
    "fit_open",
    "cluster_agreement",
    "gaussian_rows",
    "label_discriminants",
    "padded_cosines",
    "unpadded_cosines",
    "sample_keys",
    "sample_mask",
]


@dataclass(frozen=True)
class OpenParams:
    """Every constant of the open-world fit (stored with the classifier)."""

    bank_size: int = 512  # K patches per label (the paper's K), fewer in a small pool
    min_bank_size: int = 16
    bank_fraction: float = 1 / 100  # at most this share of the pool per label
    clusters: int = 128  # background clusters (fewer when the sample is small)
    patches_per_cluster: int = 40  # the sample needs this many patches per cluster
    sample: int = 100_000  # pool patches sampled for the background
    kmeans_iters: int = 20
    seed: int = 1234
    # The shared precision is the paper's shrunk estimate d·pinv((n-1)S + tr(S)I) at this n,
    # whatever the library size: n sets how soft the background's logsumexp is, and a label's
    # ranking should not change because the library grew. (64,000 = 1,000 ShapesWorld images.)
    reference_pool: int = 64_000


def default_bank_size(pool_patches: int, params: OpenParams | None = None) -> int:
    """K: the paper's 512, or 1/100 of the pool when the pool is small (never per vocabulary)."""
    prm = params or OpenParams()
    return max(prm.min_bank_size, min(prm.bank_size, int(pool_patches * prm.bank_fraction)))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class HashKeys:
    """`sample_keys`' number of every image with a content hash, as two sorted arrays: 16 bytes
    an image, where the store's {id: hex hash} dict takes ~150 (a fit holds it for its pass)."""

    def __init__(self, content_hashes: Mapping[int, str]) -> None:
        n = len(content_hashes)
        ids = np.fromiter(content_hashes.keys(), np.int64, n)
        keys = np.fromiter(
            (int(h[:13], 16) / float(1 << 52) if h else np.nan for h in content_hashes.values()),
            np.float64,
            n,
        )
        ids, keys = ids[~np.isnan(keys)], keys[~np.isnan(keys)]  # no hash: keyed by its id
        order = np.argsort(ids)
        self.ids, self.keys = ids[order], keys[order]


def sample_keys(image_ids: np.ndarray, content_hashes: Mapping[int, str] | HashKeys) -> np.ndarray:
    """Per image, a number in [0, 1) from its content hash (from its id where it has none): the
    same photo gets the same number whichever engine, order or id indexed it."""
    table = content_hashes if isinstance(content_hashes, HashKeys) else HashKeys(content_hashes)
    ids = np.asarray(image_ids, dtype=np.uint64)
    out = ((ids * _GOLDEN) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    if len(table.ids) and len(ids):
        wanted = np.asarray(image_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(table.ids, wanted), len(table.ids) - 1)
        found = table.ids[pos] == wanted
        out[found] = table.keys[pos[found]]
    return out


def sample_mask(keys: np.ndarray, rate: float) -> np.ndarray:
    """Which images' patches go into the background sample (`sample_keys` below `rate`)."""
    if rate >= 1.0:
        return np.ones(len(keys), bool)
    return np.asarray(keys) < rate


class LabelBanks:
    """Streaming Stage I: per label, the K pool patches with the highest cosine to its text.

    Memory is O(C·K·d) whatever the pool size; ties break on the patch id.
    """

    def __init__(self, n_labels: int, dim: int, bank_size: int) -> None:
        self.K = int(bank_size)
        self._X = [np.empty((0, dim), np.float32) for _ in range(n_labels)]
        self._cos = [np.empty(0, np.float32) for _ in range(n_labels)]
        self._ids = [np.empty(0, np.int64) for _ in range(n_labels)]
        self.n_seen = 0

    def update(self, X: np.ndarray, ids: np.ndarray, sims: np.ndarray) -> None:
        """One chunk: patches [n, d], their ids [n] and text cosines [n, C]."""
        n = X.shape[0]
        self.n_seen += n
        if n == 0:
            return
        for c in range(len(self._X)):
            col = sims[:, c]
            idx = np.arange(n)
            if n > self.K:
                kth = np.partition(col, n - self.K)[n - self.K]
                idx = np.flatnonzero(col >= kth)
            if self._cos[c].size == self.K and col[idx].max() < self._cos[c][-1]:
                continue
            cos = np.concatenate([self._cos[c], col[idx]])
            pid = np.concatenate([self._ids[c], ids[idx]])
            keep = np.lexsort((pid, -cos))[: self.K]
            self._X[c] = np.concatenate([self._X[c], X[idx]])[keep]
            self._cos[c] = cos[keep]
            self._ids[c] = pid[keep]

    def banks(self) -> list[np.ndarray]:
        """Per label, its bank's patch vectors [k, d], best cosine first."""
        return [x.copy() for x in self._X]

    def cosines(self) -> list[np.ndarray]:
        """Per label, its bank's cosines to the label's text prototype."""
        return [c.astype(np.float64) for c in self._cos]


@dataclass
class Background:
    """The collection's unnamed things: cluster means, their priors and the shared precision."""

    means: np.ndarray  # [k, d] float64
    priors: np.ndarray  # [k]
    precision: np.ndarray  # [d, d] float64
    n_sample: int

    def discriminants(self) -> tuple[np.ndarray, np.ndarray]:
        """(W [k, d], b [k]) of each cluster's Gaussian, up to the term every class shares."""
        W = self.means @ self.precision
        b = -0.5 * np.einsum("kd,kd->k", W, self.means) + np.log(np.maximum(self.priors, 1e-12))
        return W, b


def fit_background(sample: np.ndarray, params: OpenParams | None = None) -> Background:
    """k-means on the pool sample, then the within-cluster covariance, shrunk (paper Eq. 10)."""
    import faiss  # itself, not vectors/faiss_lib.py: method/ sits below vectors/ in the layers

    prm = params or OpenParams()
    X = np.ascontiguousarray(sample, dtype=np.float32)
    n, d = X.shape
    k = max(1, min(prm.clusters, n // max(1, prm.patches_per_cluster)))
    if k > 1:
        km = faiss.Kmeans(d, k, niter=prm.kmeans_iters, seed=prm.seed, verbose=False)
        km.train(X)
        _, assign = km.index.search(X, 1)
        assign = assign[:, 0]
    else:
        assign = np.zeros(n, np.int64)
    X64 = X.astype(np.float64)
    counts = np.bincount(assign, minlength=k).astype(np.float64)
    sums = np.zeros((k, d))
    np.add.at(sums, assign, X64)
    used = counts > 0
    # float32, as the classifier stores them (`cluster_agreement` of a label added later).
    means = (sums[used] / counts[used, None]).astype(np.float32).astype(np.float64)
    priors = counts[used] / n
    remap = np.cumsum(used) - 1
    centred = X64 - means[remap[assign]]
    S = centred.T @ centred / max(1, n - 1) if n > 1 else np.eye(d) / d
    m = prm.reference_pool
    precision = d * np.linalg.pinv((m - 1) * S + np.trace(S) * np.eye(d), hermitian=True)
    # Rounded to what the classifier stores: a label fitted alone later (`fit_open` with the
    # stored precision) gets the same discriminant as in a fit of the whole vocabulary.
    precision = precision.astype(np.float32).astype(np.float64)
    return Background(means=means, priors=priors, precision=precision, n_sample=n)


def label_discriminants(
    banks: list[np.ndarray], text_protos: np.ndarray, precision: np.ndarray, n_clusters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W [C, d], b [C], means [C, d]) float64: each label's Gaussian (its bank's mean, the
    background's precision), label by label: a label added later alone gets what it would get
    in a fit of the whole vocabulary. An empty bank (an empty library) uses the text prototype."""
    T = np.asarray(text_protos, dtype=np.float64)
    mu = np.stack(
        [b.astype(np.float64).mean(axis=0) if len(b) else T[c] for c, b in enumerate(banks)]
    ).reshape(len(T), T.shape[1])
    W, b = gaussian_rows(mu, precision, n_clusters)
    return W, b, mu


def gaussian_rows(
    means: np.ndarray, precision: np.ndarray, n_clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    """(W [C, d], b [C]) float64 of labels' Gaussians (their means, the background's
    precision): the training-free rows, also re-derived from a stored classifier's means where
    learning replaced its rows (`Tagger._fit_changed_labels`)."""
    mu = np.asarray(means, dtype=np.float64)
    P = np.asarray(precision, dtype=np.float64)
    W = np.stack([row @ P for row in mu]).reshape(mu.shape)
    # A label's prior is that of one more cluster: its log-odds are then comparable across
    # labels and libraries, and never depend on how many labels there are.
    b = -0.5 * np.einsum("cd,cd->c", W, mu) + np.log(1.0 / (n_clusters + 1))
    return W, b


def fit_open(
    banks: list[np.ndarray],
    bank_cosines: list[np.ndarray],
    text_protos: np.ndarray,
    background: Background,
    params: OpenParams | None = None,
) -> Classifier:
    """Each label's Gaussian (its bank's mean) against the background mixture, in closed form.

    A label with an empty bank (an empty library) uses its text prototype as mean.
    """
    from piaa_index.method.decisions import bank_support

    prm = params or OpenParams()
    t0 = time.perf_counter()
    T = np.asarray(text_protos, dtype=np.float64)
    C, d = T.shape
    P = background.precision
    k = len(background.priors)
    W, b, mu = label_discriminants(banks, T, P, k)
    bW, bb = background.discriminants()
    sizes = [int(len(x)) for x in banks]
    agreement = [
        cluster_agreement(bank, cos, T[c], background.means)
        for c, (bank, cos) in enumerate(zip(banks, bank_cosines, strict=True))
    ]
    meta = {
        **asdict(prm),
        "method": "open-world",
        "support": bank_support(bank_cosines, agreement=agreement),
        "n_classes": C,
        "dim": d,
        "background_clusters": k,
        "background_sample": background.n_sample,
        "fit_seconds": time.perf_counter() - t0,
    }
    return Classifier(
        W=W.astype(np.float32),
        b=b.astype(np.float32),
        bank_sizes=sizes,
        kept_sizes=sizes,
        weak_labels=[c for c in range(C) if sizes[c] == 0],
        params=meta,
        scale=1.0,
        means=mu.astype(np.float32),
        background_W=bW.astype(np.float32),
        background_b=bb.astype(np.float32),
        precision=P.astype(np.float32),
        bank_cosines=padded_cosines(bank_cosines),
        background_means=background.means.astype(np.float32),
    )


def cluster_agreement(
    bank: np.ndarray, bank_cos: np.ndarray, text: np.ndarray, cluster_means: np.ndarray
) -> float | None:
    """Whether a label's bank is made of things of its own or of the text-side tail of other
    things: the mean cosine to the label's text of the (normalised) background cluster that
    holds each bank patch, over the bank's own mean cosine. A depicted object's patches form
    clusters of their own, whose centres match the text as well as the patches do (about 1 or
    more); a ghost bank's patches are the fringe of clusters of other things, whose centres
    match it far less (docs/results.md: held labels 0.80-1.17, absent ones 0.02-0.87 on both
    ShapesWorld models). It reads only this label's bank, its text and the collection's
    clusters: never another label. None: an empty bank or no positive cosine."""
    if len(bank) == 0:
        return None
    m = np.asarray(cluster_means, np.float64)
    X = np.asarray(bank, np.float64)
    nearest = np.argmax(X @ m.T - 0.5 * np.einsum("kd,kd->k", m, m), axis=1)
    centres = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    own = float(np.mean(bank_cos))
    if not own > 1e-6:
        return None
    return float(np.mean(centres[nearest] @ np.asarray(text, np.float64)) / own)


def padded_cosines(bank_cosines: list[np.ndarray]) -> np.ndarray:
    """Per-label bank cosines as one [C, K] float32 array, NaN past a label's bank size."""
    width = max((len(v) for v in bank_cosines), default=0)
    out = np.full((len(bank_cosines), width), np.nan, np.float32)
    for c, v in enumerate(bank_cosines):
        out[c, : len(v)] = v
    return out


def unpadded_cosines(padded: np.ndarray) -> list[np.ndarray]:
    """Inverse of `padded_cosines` (float64, as `LabelBanks.cosines` gives them)."""
    return [row[~np.isnan(row)].astype(np.float64) for row in np.asarray(padded)]
