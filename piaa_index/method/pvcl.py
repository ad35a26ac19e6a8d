"""PVCL: the closed-form patch classifier of paper §3.3 (numpy only), with a calibrated scale.

Stage I streams the patch pool once and keeps, per class, the K lowest-entropy patches under the
text classifier; a temporary GDA is fitted on that bank. Stage II re-scores the bank with the
temporary GDA and keeps the patches above mean + std of their class's probability. Stage III fits
the final GDA on the purified bank.

Unlike the authors' scripts, logits are divided by a scale calibrated on the bank (see
``calibrate_scale`` and docs/method.md), so one fixed temperature works for any K, C and d.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Bank",
    "BankBuilder",
    "Classifier",
    "PvclParams",
    "calibrate_scale",
    "fit_from_banks",
    "fit_pvcl",
    "gda",
    "gemm_rows",
    "log_odds",
    "pack",
    "paper_bank_size",
    "softmax",
    "unpack",
]

Chunk = np.ndarray | tuple[np.ndarray, np.ndarray]


# Input floats per BLAS call in `gemm_rows` (16 MB): 8,192 rows at d = 512 (ViT-B/16, ~42
# images), 32,768 at d = 128. Smaller calls ran up to 5x slower with 2 OpenBLAS threads on busy
# cores (thread hand-offs per call); padding one image up to a block costs ~10 ms.
GEMM_BLOCK = 1 << 22
ROW_TILE = 384  # 3 x 128: a multiple of each GEMM micro-kernel's row count


def gemm_rows(X: np.ndarray, B: np.ndarray, rows: int | None = None) -> np.ndarray:
    """X [n, d] @ B [d, k] in float32, where a row's result does not depend on n.

    BLAS picks its kernel by shape (gemv for one row, small-matrix kernels, then blocked GEMM)
    and those round float32 sums differently, so the same patch could score differently alone
    and in a batch. Every call here has the same shape for a given d and k (GEMM_BLOCK // d
    rows, the last block zero-padded), and GEMM sums each output along d in an order that does
    not depend on the row (tests/test_fusion.py checks it). `rows` overrides the block height
    (fixed by the caller too: [CLS] vectors come a few thousand per chunk, not 400k).
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    B = np.ascontiguousarray(B, dtype=np.float32)
    n, d = X.shape
    rows = rows or max(1, GEMM_BLOCK // max(1, d))
    # A whole number of every BLAS micro-tile height (8 to 128 rows, 24 and 48 on some CPUs):
    # rows in a partial tile go through an edge kernel that rounds differently (OpenBLAS on
    # AMD EPYC: 100-row calls gave 32 of 370 scores a last-bit difference by row position).
    rows = -(-rows // ROW_TILE) * ROW_TILE
    out = np.empty((n, B.shape[1]), np.float32)
    full = n - n % rows
    for a in range(0, full, rows):
        np.matmul(X[a : a + rows], B, out=out[a : a + rows])
    if full < n:
        pad = np.zeros((rows, d), np.float32)
        pad[: n - full] = X[full:]
        out[full:] = (pad @ B)[: n - full]
    return out


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along `axis`."""
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


@dataclass(frozen=True)
class PvclParams:
    """All constants of the fit; stored in `Classifier.params` for provenance."""

    bank_size: int = 512  # K, paper default
    text_scale: float = 60.0  # softmax scale of the Stage I text classifier (authors: 60)
    tau: float = 1.0  # ONE temperature on the calibrated scale (Stage II and inference)
    calibration: str = "margin"  # how the logit scale is measured: "margin", "spread" or "none"
    keep_std: float = 1.0  # Stage II keeps q >= mean + keep_std * std (paper: 1)
    keep_domain: str = "prob"  # Stage II statistic: "prob" (q, the paper) or "logodds" of q
    min_bank: int = 3  # a class with fewer bank patches falls back to its text prototype
    purified_fallback: str = "stage1"  # class emptied by Stage II: "stage1" mean, or "text" (paper)


@dataclass
class Bank:
    """One class's Stage I bank: vectors, their text probabilities, entropies and ids."""

    X: np.ndarray  # [k, d] float32
    P: np.ndarray  # [k, C] float32 text probabilities
    H: np.ndarray  # [k] float64 entropies, ascending
    ids: np.ndarray  # [k] int64, caller ids or the running index in the stream


class BankBuilder:
    """Streaming Stage I: per class, the K lowest-entropy patches whose text argmax is that class.

    Memory is O(C·K·(d + C)) whatever the pool size; ties in entropy break on the id, so the
    banks do not depend on how the pool is chunked.
    """

    def __init__(
        self, text_protos: np.ndarray, bank_size: int = 512, text_scale: float = 60.0
    ) -> None:
        T = np.asarray(text_protos, dtype=np.float32)
        if T.ndim != 2:
            raise ValueError(f"text_protos must be [C, d], got {T.shape}")
        if bank_size < 1:
            raise ValueError("bank_size must be >= 1")
        self.T = T
        self.K = int(bank_size)
        self.text_scale = float(text_scale)
        C, d = T.shape
        self._X = [np.empty((0, d), np.float32) for _ in range(C)]
        self._P = [np.empty((0, C), np.float32) for _ in range(C)]
        self._H = [np.empty(0, np.float64) for _ in range(C)]
        self._ids = [np.empty(0, np.int64) for _ in range(C)]
        self.n_seen = 0
        self.argmax_counts = np.zeros(C, np.int64)  # pool patches whose text argmax is c

    def text_probs(
        self, X: np.ndarray, sims: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Text probabilities, entropies and argmax classes of patch vectors [n, d] (`sims`:
        their cosines to the text prototypes, when the caller has them)."""
        if sims is None:
            sims = gemm_rows(X, np.ascontiguousarray(self.T.T))
        z = sims.astype(np.float64) * self.text_scale
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        H = -(p * logp).sum(axis=1)
        return p, H, z.argmax(axis=1)

    def update(
        self, X: np.ndarray, ids: np.ndarray | None = None, sims: np.ndarray | None = None
    ) -> None:
        """Process one chunk of patch vectors ([n, d] or [N, M, d]); `ids` default to a counter;
        `sims`, their [n, C] text cosines if already computed (fusion.patch_text_cosines)."""
        X = np.asarray(X, dtype=np.float32)
        X = X.reshape(-1, self.T.shape[1])
        n = X.shape[0]
        if ids is None:
            ids = np.arange(self.n_seen, self.n_seen + n, dtype=np.int64)
        else:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if ids.shape[0] != n:
                raise ValueError(f"ids has {ids.shape[0]} entries for {n} patches")
        self.n_seen += n
        if n == 0:
            return
        p, H, cls = self.text_probs(X, None if sims is None else sims.reshape(n, -1))
        counts = np.bincount(cls, minlength=len(self._X))
        self.argmax_counts += counts
        order = np.argsort(cls, kind="stable")
        starts = np.r_[0, np.cumsum(counts)]
        for c in np.flatnonzero(counts):
            idx = order[starts[c] : starts[c + 1]]
            # Cheap prefilter: only candidates that could enter the bank are copied and merged.
            Hc = H[idx]
            if idx.size > self.K:
                kth = np.partition(Hc, self.K - 1)[self.K - 1]
                idx = idx[Hc <= kth]
                Hc = H[idx]
            if self._H[c].size == self.K and Hc.min() > self._H[c][-1]:
                continue
            self._merge(int(c), X[idx], p[idx].astype(np.float32), Hc, ids[idx])

    def _merge(self, c: int, X: np.ndarray, P: np.ndarray, H: np.ndarray, ids: np.ndarray) -> None:
        """Merge candidates into class c's bank, keeping the K smallest (entropy, id)."""
        Hm = np.concatenate([self._H[c], H])
        idm = np.concatenate([self._ids[c], ids])
        keep = np.lexsort((idm, Hm))[: self.K]
        self._X[c] = np.concatenate([self._X[c], X])[keep]
        self._P[c] = np.concatenate([self._P[c], P])[keep]
        self._H[c] = Hm[keep]
        self._ids[c] = idm[keep]

    def banks(self) -> list[Bank]:
        """Per-class banks, each sorted by ascending entropy."""
        return [
            Bank(X.copy(), P.copy(), H.copy(), i.copy())
            for X, P, H, i in zip(self._X, self._P, self._H, self._ids, strict=True)
        ]


@dataclass
class Classifier:
    """A fitted PVCL classifier: raw GDA (W, b) plus the calibrated scale of its logits."""

    W: np.ndarray  # [C, d] float32
    b: np.ndarray  # [C] float32
    bank_sizes: list[int]  # Stage I bank size per class
    kept_sizes: list[int]  # Stage II survivors per class (after reassignment)
    weak_labels: list[int]  # classes whose final mean is the text prototype
    params: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0  # raw logits are divided by this (calibrated on the bank)
    means: np.ndarray | None = None  # [C, d] final class means (diagnostics, provenance)
    # The open-world classifier (piaa_index/method/open_pvcl.py): the collection's background mixture
    # (one Gaussian per cluster of the patch pool, the same precision), so each label's logit
    # is its own log-odds against the background, whatever other labels exist. None: the
    # paper's closed-world classifier, whose labels compete in a softmax.
    background_W: np.ndarray | None = None  # [k, d] float32
    background_b: np.ndarray | None = None  # [k] float32
    # What an open-world fit needs to add a label alone later (`piaa vocab add`): the shared
    # precision and each label's bank cosines (the pooled matching level reads them).
    precision: np.ndarray | None = None  # [d, d] float32
    bank_cosines: np.ndarray | None = None  # [C, K] float32, NaN past a label's bank size
    background_means: np.ndarray | None = None  # [k, d] float32: the clusters' centres
    # The [CLS] branch's prototype per label where users' labels taught one (piaa_index/
    # learning.py); None: the text prototypes, as for every label never taught.
    cls_protos: np.ndarray | None = None  # [C, d] float32

    @property
    def n_classes(self) -> int:
        """Number of labels C."""
        return int(self.W.shape[0])

    @property
    def open_world(self) -> bool:
        """Per-label log-odds against the background (True) or the paper's softmax (False)."""
        return self.background_W is not None

    def raw_logits(self, X: np.ndarray) -> np.ndarray:
        """Uncalibrated GDA logits W x + b, shape [..., C]; open-world: minus the background
        mixture's log-density (logsumexp over its clusters), i.e. per-label log-odds."""
        X = np.asarray(X, dtype=np.float32)
        rows = X.reshape(-1, X.shape[-1])
        flat = gemm_rows(rows, np.ascontiguousarray(self.W.T, np.float32))
        flat += np.asarray(self.b, np.float32)
        if self.background_W is not None:
            flat -= self.background_logdensity(rows)[:, None]
        return flat.reshape(*X.shape[:-1], flat.shape[-1])

    def background_logdensity(self, rows: np.ndarray) -> np.ndarray:
        """[n] float32: the background mixture's log-density (logsumexp over its clusters) of
        patch rows [n, d], what every open-world label's log-odds subtract; 0 closed-world."""
        rows = np.asarray(rows, dtype=np.float32)
        if self.background_W is None or self.background_b is None:
            return np.zeros(len(rows), np.float32)
        bg = gemm_rows(rows, np.ascontiguousarray(self.background_W.T, np.float32))
        bg += np.asarray(self.background_b, np.float32)
        top = bg.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(bg - top).sum(axis=1, keepdims=True)))[:, 0]

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Normalised logits (W x + b) / scale, shape [..., C]; softmax at temperature 1 is sane."""
        return self.raw_logits(X) / np.float32(self.scale)

    def probs(self, X: np.ndarray, tau: float = 1.0) -> np.ndarray:
        """Patch probabilities softmax(tau * normalised logits)."""
        return softmax(tau * self.logits(X))

    def to_bytes(self) -> bytes:
        """Serialise with np.savez (arrays + JSON params) for storage in SQL."""

        buf = io.BytesIO()
        meta = {
            "bank_sizes": list(map(int, self.bank_sizes)),
            "kept_sizes": list(map(int, self.kept_sizes)),
            "weak_labels": list(map(int, self.weak_labels)),
            "params": self.params,
            "scale": float(self.scale),
        }
        meta_bytes = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        arrays = {"meta": meta_bytes, "W": self.W, "b": self.b}
        optional = {
            "means": self.means,
            "background_W": self.background_W,
            "background_b": self.background_b,
            "precision": self.precision,
            "bank_cosines": self.bank_cosines,
            "background_means": self.background_means,
            "cls_protos": self.cls_protos,
        }
        arrays.update({k: v for k, v in optional.items() if v is not None})
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Classifier:
        """Inverse of `to_bytes`."""

        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return cls(
                W=z["W"].astype(np.float32),
                b=z["b"].astype(np.float32),
                bank_sizes=meta["bank_sizes"],
                kept_sizes=meta["kept_sizes"],
                weak_labels=meta["weak_labels"],
                params=meta["params"],
                scale=meta["scale"],
                means=z["means"].astype(np.float32) if "means" in z.files else None,
                background_W=(
                    z["background_W"].astype(np.float32) if "background_W" in z.files else None
                ),
                background_b=(
                    z["background_b"].astype(np.float32) if "background_b" in z.files else None
                ),
                precision=z["precision"] if "precision" in z.files else None,
                bank_cosines=z["bank_cosines"] if "bank_cosines" in z.files else None,
                background_means=(z["background_means"] if "background_means" in z.files else None),
                cls_protos=z["cls_protos"] if "cls_protos" in z.files else None,
            )


def gda(
    X: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    fallback_means: np.ndarray,
    min_bank: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Shared-covariance GDA with trace shrinkage; returns (W, b, means, weak classes).

    Means are `weights`-weighted; a class with fewer than `min_bank` vectors uses its fallback
    mean and is left out of the covariance. Precision P = d·pinv((n−1)Σ̂ + tr(Σ̂) I) as in the
    paper (Eq. 10), in float64.
    """
    C, d = fallback_means.shape
    X = np.asarray(X, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    mu = np.asarray(fallback_means, dtype=np.float64).copy()
    counts = np.bincount(labels, minlength=C) if labels.size else np.zeros(C, np.int64)
    weak = [c for c in range(C) if counts[c] < min_bank]
    strong = np.isin(labels, np.flatnonzero(counts >= min_bank))
    for c in range(C):
        if counts[c] < min_bank:
            continue
        sel = labels == c
        wc = w[sel]
        # A class whose weights are all zero still has a visual mean: fall back to uniform.
        mu[c] = (wc @ X[sel]) / wc.sum() if wc.sum() > 0 else X[sel].mean(axis=0)
    Xc = X[strong] - mu[labels[strong]]
    n = Xc.shape[0]
    if n >= 2:
        S = np.cov(Xc, rowvar=False)  # unbiased, re-centred, as torch .cov() in the authors' code
    else:  # no visual statistics at all: an isotropic covariance keeps W, b defined
        S = np.eye(d) / d
        n = 2
    A = (n - 1) * S + np.trace(S) * np.eye(d)
    P = d * np.linalg.pinv(A, hermitian=True)
    W = mu @ P
    b = np.log(1.0 / C) - 0.5 * np.einsum("cd,cd->c", W, mu)
    return W, b, mu, weak


def calibrate_scale(raw_logits: np.ndarray, rule: str = "margin") -> float:
    """Scale s of raw logits [n, C] so that the normalised logits have a fixed typical size.

    - "margin": s = median over rows of (top-1 − top-2 logit): the median bank patch then wins
      by exactly one logit unit, whatever n, C, d or the spectrum of the covariance.
    - "spread": s = median over rows of the std of the logits across classes.
    - "none": s = 1 (raw GDA logits, as the authors).
    """
    y = np.asarray(raw_logits, dtype=np.float64)
    if rule == "none" or y.size == 0 or y.shape[1] < 2:
        return 1.0
    if rule == "margin":
        top2 = np.partition(y, y.shape[1] - 2, axis=1)[:, -2:]
        stat = np.median(top2[:, 1] - top2[:, 0])
    elif rule == "spread":
        stat = np.median(y.std(axis=1))
    else:
        raise ValueError(f"unknown calibration rule {rule!r}")
    return float(stat) if np.isfinite(stat) and stat > 1e-12 else 1.0


def log_odds(y: np.ndarray) -> np.ndarray:
    """log(p / (1 − p)) of p = softmax(y) per entry, exact even where p rounds to 1."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape[-1] < 2:
        return np.full(y.shape, np.inf)
    top_i = y.argmax(axis=-1)[..., None]
    top = np.take_along_axis(y, top_i, axis=-1)
    e = np.exp(y - top)
    # Non-top class c: the others include the top, so their sum is ≥ 1 and log is stable.
    with np.errstate(divide="ignore"):  # the top entry may be -inf here; it is replaced below
        out = y - (top + np.log(e.sum(axis=-1, keepdims=True) - e))
    # Top class: sum the others relative to the runner-up, so nothing underflows.
    rest = y.copy()
    np.put_along_axis(rest, top_i, -np.inf, axis=-1)
    second = rest.max(axis=-1, keepdims=True)
    lse_rest = second + np.log(np.exp(rest - second).sum(axis=-1, keepdims=True))
    np.put_along_axis(out, top_i, top - lse_rest, axis=-1)
    return out


def _stage2_keep(
    y: np.ndarray, tau: float, keep_std: float, domain: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reassign to argmax q; keep score ≥ mean + keep_std·std within each class.

    Returns (assignment, keep mask, q). The score is q itself (``domain="prob"``, the paper) or
    its log-odds (``domain="logodds"``), which is unbounded, so the rule cannot ask for q > 1.
    """
    q = softmax(tau * y)
    a = q.argmax(axis=1)
    rows = np.arange(q.shape[0])
    if domain == "prob":
        v_all = q[rows, a]
    elif domain == "logodds":
        v_all = log_odds(tau * y)[rows, a]
    else:
        raise ValueError(f"unknown Stage II domain {domain!r}")
    keep = np.zeros(q.shape[0], bool)
    for c in np.unique(a):
        sel = np.flatnonzero(a == c)
        if sel.size < 2:  # no spread to measure: keep the lone patch
            keep[sel] = True
            continue
        v = v_all[sel]
        keep[sel] = v >= v.mean() + keep_std * v.std(ddof=1)
    return a, keep, q


def fit_from_banks(
    banks: list[Bank], text_protos: np.ndarray, params: PvclParams | None = None
) -> Classifier:
    """Stages I (temporary GDA), II (purify) and III (final GDA) on prebuilt Stage I banks."""
    prm = params or PvclParams()
    t0 = time.perf_counter()
    T = np.asarray(text_protos, dtype=np.float64)
    C, d = T.shape
    if len(banks) != C:
        raise ValueError(f"{len(banks)} banks for {C} classes")
    bank_sizes = [int(bk.X.shape[0]) for bk in banks]
    X = (
        np.concatenate([bk.X for bk in banks]).astype(np.float64)
        if sum(bank_sizes)
        else np.empty((0, d))
    )
    labels = np.repeat(np.arange(C), bank_sizes)
    P_text = np.concatenate([bk.P for bk in banks]) if sum(bank_sizes) else np.empty((0, C))
    w_text = P_text[np.arange(labels.size), labels] if labels.size else np.empty(0)

    # Stage I: temporary GDA on the text-selected bank, means weighted by text probabilities.
    W0, b0, mu0, weak0 = gda(X, labels, w_text, T, prm.min_bank)
    y0 = X @ W0.T + b0
    s0 = calibrate_scale(y0, prm.calibration)

    # Stage II: vision-driven purification on the calibrated scale.
    a, keep, q = _stage2_keep(y0 / s0, prm.tau, prm.keep_std, prm.keep_domain)
    kept_sizes = np.bincount(a[keep], minlength=C).tolist() if keep.any() else [0] * C

    # Stage III: final GDA on the purified bank, means weighted by the Stage II probabilities.
    Xk, ak = X[keep], a[keep]
    # A class that purification emptied keeps its Stage I visual mean; only classes that never
    # had a visual bank fall back to the text prototype (as the paper does for empty banks).
    fallback = mu0.copy() if prm.purified_fallback == "stage1" else T.copy()
    weak_set = set(weak0) if prm.purified_fallback == "stage1" else set(range(C))
    Wk = q[keep, ak] if keep.any() else np.empty(0)
    W, b, mu, thin = gda(Xk, ak, Wk, fallback, prm.min_bank)
    weak = [c for c in thin if c in weak_set]
    # The final scale is measured on the whole Stage I bank: a broad sample of object patches.
    s = calibrate_scale(X @ W.T + b, prm.calibration) if X.shape[0] else 1.0

    # Collection-level test of the banks (decisions.py): do they match their labels' text?
    from piaa_index.method.decisions import bank_support

    support = bank_support([bk.X.astype(np.float64) @ T[c] for c, bk in enumerate(banks)])
    meta = {
        **prm.__dict__,
        "support": support,
        "n_classes": C,
        "dim": d,
        "stage1_weak": weak0,
        "stage2_assigned": np.bincount(a, minlength=C).tolist() if a.size else [0] * C,
        "stage3_used_stage1_mean": [c for c in thin if c not in weak_set],
        "stage1_scale": s0,
        "fit_seconds": time.perf_counter() - t0,
    }
    return Classifier(
        W=W.astype(np.float32),
        b=b.astype(np.float32),
        bank_sizes=bank_sizes,
        kept_sizes=[int(k) for k in kept_sizes],
        weak_labels=weak,
        params=meta,
        scale=s,
        means=mu.astype(np.float32),
    )


def fit_pvcl(
    chunks: Iterable[Chunk],
    text_protos: np.ndarray,
    bank_size: int | None = None,
    params: PvclParams | None = None,
    **overrides: Any,
) -> Classifier:
    """One streaming pass over the patch pool (Stage I), then Stages I–III; returns the classifier.

    `chunks` yields patch arrays [n, d] (or [N, M, d]) or (patches, ids) pairs. `bank_size`
    (K, default 512) and keyword `overrides` (e.g. ``tau=2.0``) replace fields of `params`.
    """
    base = params or PvclParams()
    if bank_size is not None:
        overrides["bank_size"] = bank_size
    prm = PvclParams(**{**base.__dict__, **overrides})
    t0 = time.perf_counter()
    builder = BankBuilder(text_protos, prm.bank_size, prm.text_scale)
    for chunk in chunks:
        if isinstance(chunk, tuple):
            builder.update(chunk[0], chunk[1])
        else:
            builder.update(chunk)
    t1 = time.perf_counter()
    clf = fit_from_banks(builder.banks(), text_protos, prm)
    clf.params["n_pool"] = builder.n_seen
    clf.params["stream_seconds"] = t1 - t0
    return clf


# The paper's K = 512 patches per class is ~1% of a VOC-sized pool (5k images x 196 patches
# over 20 classes). Small libraries keep that proportion: with K = 512 on a 400-image pool the
# banks held half of all patches, background included, and the class means blurred.
PAPER_BANK_SIZE = 512
BANK_FRACTION = 1 / 50  # of the pool per class, at most
MIN_BANK_SIZE = 16


def paper_bank_size(pool_patches: int, n_classes: int) -> int:
    """K per class: the paper's 512, or 1/50 of the pool per class when the pool is small."""
    per_class = int(pool_patches * BANK_FRACTION / max(1, n_classes))
    return max(MIN_BANK_SIZE, min(PAPER_BANK_SIZE, per_class))


def pack(classifier: Classifier, T: np.ndarray) -> bytes:
    """A classifier and its text prototypes as one blob (the stored weights; a Ray object)."""
    buf = io.BytesIO()
    np.savez(buf, classifier=np.frombuffer(classifier.to_bytes(), dtype=np.uint8), text_protos=T)
    return buf.getvalue()


def unpack(data: bytes) -> tuple[Classifier, np.ndarray]:
    """`pack`'s blob back: (classifier, text prototypes)."""
    with np.load(io.BytesIO(data)) as z:
        return Classifier.from_bytes(z["classifier"].tobytes()), z["text_protos"]
