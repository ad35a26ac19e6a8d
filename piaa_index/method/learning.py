"""Learning from the keywords people already have, on the stored embeddings (issue 21).

The training-free classifier scores label c on an image from two things: its best patch's
log-odds E = max_t (W_c·x_t + b_c − background(x_t)) / scale (PVCL, open world) and its [CLS]
cosine C = z·T_c, which the collection's calibration turns into a confidence
sigmoid(slope·(α·zE + (1 − α)·zC) + intercept) (decisions.Calibration). User labels (imported
keywords, confirmed or rejected tags, taught examples) train exactly those per-label parameters:
the patch row (W_c, b_c), a [CLS] prototype (T_c plus a learnt offset) and the calibration's
slope and intercept. The learnt label is the same kind of object as a training-free one, so
search, tags, evidence maps (still *where*: the row scores every patch), XMP and the API need
nothing new.

How it learns (DCLIP's and CAPNET's ideas, small enough for seconds on a CPU):
- multiple-instance over patches: the image's score is its best patch's, as at inference;
- DCLIP's asymmetric loss (easy negatives down-weighted, shifted probability margin; off by
  default, where it ranked worse), and its MFI idea as a shared text projector whose outputs
  are pushed apart (off too);
- CAPNET's distribution-balanced weighting: each label's positives weigh as much as its
  negatives, so rare labels are not drowned;
- anchored to the training-free patch rows (L2 to them), so a few labels move them a little;
- shrinkage chosen per label by held-out AP: the learnt offsets whole, ¾ or ½ of them;
- bagging: the rows installed are the mean of the final model's and the held-out folds'.

A learnt label is used only where it beats the training-free score on the user's own labels,
held out (k-fold, out-of-fold average precision): `learn` reports which labels it chose and why.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from piaa_index.spill import SpilledArray

__all__ = ["Examples", "LearnParams", "Learnt", "learn", "average_precision"]


@dataclass(frozen=True)
class LearnParams:
    """Every constant of the learning, with its default (none is tuned per collection)."""

    # A label learns only with at least this many labelled images on each side.
    min_positives: int = 4
    min_negatives: int = 4
    folds: int = 3  # held-out validation: k-fold over the labelled images
    # Out-of-fold AP points the learnt head must gain over the training-free score: a label
    # the keywords say nothing about must not switch on held-out noise.
    min_gain: float = 0.5
    steps: int = 120  # Adam steps
    batch_images: int = 1024  # labelled images per step (all of them when fewer)
    # Labelled images each training reads at most (a random subset beyond): bounds time and
    # memory at tens of thousands of labels; every labelled image is still scored held out.
    max_train_images: int = 3000
    # Training rows are widened to float32 once where they take at most this many bytes
    # (3,000 ViT-B/16 images: 1.2 GB), else a batch per step, 3x slower at that geometry.
    widen_bytes: int = 1_500_000_000
    lr: float = 0.002  # Adam's step: a few thousandths of a row's norm (~0.6)
    anchor: float = 1.0  # L2 weight pulling the patch rows to their start (relative)
    # The same for the [CLS] prototypes, on the z-scored cosine's scale. Off: on that scale
    # any weight that mattered (≥ 0.01) froze them, and freed they learn (docs/results.md).
    cls_anchor: float = 0.0
    # DCLIP's asymmetric loss: focusing on negatives (DCLIP: 4 on full labels) and a margin
    # below which negatives cost nothing. Off (plain balanced cross-entropy): with the balanced
    # weights below it ranked worse at 10 % and 50 % keywords on both stand-ins
    # (docs/results.md; 2 and 0.05 before).
    gamma_neg: float = 0.0
    gamma_pos: float = 0.0
    clip: float = 0.0
    # Shared text projector's rank (0: none). Off: with it, rows learnt from 200 labelled
    # images ranked worse (mAP 81.8 vs 82.4 without; docs/results.md).
    projector_rank: int = 0
    mfi: float = 0.1  # weight of the loss pushing projected label features apart
    # Candidate shares of the learnt offsets, chosen per label on held-out AP: part-way back
    # to the training-free parameters is shrinkage, often better with few labels.
    shrinks: tuple[float, ...] = (0.5, 0.75, 1.0)
    alpha: float = 0.9  # the patch branch's weight (PAA), as in decisions.calibrate
    device: str = "auto"  # torch device: a GPU when there is one, else the CPU
    seed: int = 0


@dataclass
class Examples:
    """The labelled images' stored vectors and what the label rows read of them."""

    # [n, M, d] float32, or float16 (half the memory; used as float32), in memory or spilled
    # to a file (keywords.read_examples): learning reads the rows it works on.
    patches: np.ndarray | SpilledArray
    background: np.ndarray  # [n, M] float32: the background mixture's log-density per patch
    cls: np.ndarray  # [n, d] float32
    Y: np.ndarray  # [n, C] int8: 1 present, 0 absent, -1 not labelled


@dataclass
class Learnt:
    """Per-label parameters to install where `chosen` (the others keep the training-free ones)."""

    W: np.ndarray  # [C, d] float32 patch rows
    b: np.ndarray  # [C] float32
    cls_protos: np.ndarray  # [C, d] float32: the [CLS] branch's prototype
    e_center: np.ndarray  # [C]: the reference z-scores the calibration below is on
    e_scale: np.ndarray
    c_center: np.ndarray
    c_scale: np.ndarray
    slope: np.ndarray  # [C]
    intercept: np.ndarray  # [C]
    chosen: np.ndarray  # [C] bool
    report: dict[str, dict[str, Any]] = field(default_factory=dict)  # by label index
    seconds: float = 0.0


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """AP in points of one label's scores against 0/1 truth; NaN without positives
    (`eval.metrics.average_precision`, ties grouped)."""
    from piaa_index.eval.metrics import average_precision as ap

    return 100.0 * ap(scores, np.asarray(truth, bool))


def _robust(x: np.ndarray) -> tuple[float, float]:
    from piaa_index.method.decisions import _robust_scale

    return _robust_scale(np.asarray(x, np.float64))


class _Model:
    """The per-label parameters as torch tensors, and the scores they give."""

    def __init__(
        self,
        W0: np.ndarray,
        b0: np.ndarray,
        T: np.ndarray,
        scale: float,
        ref: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        slope0: np.ndarray,
        intercept0: np.ndarray,
        params: LearnParams,
    ) -> None:
        import torch

        self.torch = torch
        self.p = params
        dev = self.device = _device(params.device)
        t = lambda a: torch.as_tensor(np.asarray(a, np.float32), device=dev)  # noqa: E731
        self.W0, self.b0, self.T = t(W0), t(b0), t(T)
        self.scale = float(scale)
        self.ec, self.es, self.cc, self.cs = (t(a) for a in ref)
        C, d = self.W0.shape
        gen = torch.Generator().manual_seed(params.seed)
        self.dW = torch.zeros(C, d, device=dev, requires_grad=True)
        self.db = torch.zeros(C, device=dev, requires_grad=True)
        self.du = torch.zeros(C, d, device=dev, requires_grad=True)
        # softplus(raw) = slope: start from the training-free calibration.
        slope = np.maximum(np.asarray(slope0, np.float64), 1e-3)
        inverse_softplus = slope + np.log(-np.expm1(-slope))  # stable for large slopes
        self.raw_slope = t(inverse_softplus).clone().requires_grad_(True)
        self.intercept = t(intercept0).clone().requires_grad_(True)
        self.tensors = [self.dW, self.db, self.du, self.raw_slope, self.intercept]
        self.rank = min(params.projector_rank, d)
        if self.rank:
            # Shared text projector P = A Bᵀ (rank r): W_c gains P T_c, so what labelled labels
            # teach moves every label's row (DCLIP's projectors, folded into the rows).
            A = 0.01 * torch.randn(d, self.rank, generator=gen)
            self.A = A.to(dev).requires_grad_(True)
            self.B = torch.zeros(d, self.rank, device=dev, requires_grad=True)
            self.tensors += [self.A, self.B]

    def rows(self, shrink: float = 1.0) -> tuple[Any, Any, Any]:
        """(W [C, d], b [C], [CLS] prototypes [C, d]), the learnt offsets scaled by `shrink`
        (1: as learnt; 0.5: half-way back to the training-free parameters)."""
        dW = self.dW
        if self.rank:
            dW = dW + (self.T @ self.B) @ self.A.T
        return self.W0 + shrink * dW, self.b0 + shrink * self.db, self.T + shrink * self.du

    def logits(self, X: Any, bg: Any, Z: Any) -> Any:
        """[n, C] confidence logits of images: patches X [n, M, d], background bg [n, M],
        [CLS] Z [n, d]."""
        torch = self.torch
        return torch.nn.functional.softplus(self.raw_slope) * self.fused(X, bg, Z) + self.intercept

    def fused(self, X: Any, bg: Any, Z: Any, shrink: float = 1.0) -> Any:
        """[n, C] the fused z-score F of the calibration (decisions.Calibration.fused)."""
        torch = self.torch
        W, b, U = self.rows(shrink)
        n, M, d = X.shape

        def patch_scores() -> Any:
            # float16-stored patches (keywords.read_examples) become float32 a batch at a time.
            return (X.reshape(n * M, d).float() @ W.T + b).reshape(n, M, -1) - bg[:, :, None]

        if torch.is_grad_enabled():
            # The max's gradient reaches only each image's best patch per label: find it
            # without a graph, then score those patches alone with one. Half the arithmetic of
            # differentiating every patch, and the widened batch is not kept for the backward.
            with torch.no_grad():
                best = patch_scores().argmax(dim=1)  # [n, C]
            chosen = X[torch.arange(n, device=X.device)[:, None], best].float()  # [n, C, d]
            E = ((chosen * W[None]).sum(dim=2) + b - bg.gather(1, best)) / self.scale
        else:
            E = torch.amax(patch_scores(), dim=1) / self.scale
        Cos = Z @ U.T
        a = self.p.alpha
        return a * (E - self.ec) / self.es + (1 - a) * (Cos - self.cc) / self.cs

    def loss(self, X: Any, bg: Any, Z: Any, Y: Any, weights: Any) -> Any:
        torch = self.torch
        p = self.p
        z = self.logits(X, bg, Z)
        known = Y >= 0
        pos = (Y == 1).float()
        prob = torch.sigmoid(z)
        # Asymmetric loss (DCLIP, after Ridnik et al.): shifted, focused negatives.
        p_neg = torch.clamp(prob - p.clip, min=0.0)
        loss_pos = -((1 - prob) ** p.gamma_pos) * torch.nn.functional.logsigmoid(z)
        loss_neg = -(p_neg**p.gamma_neg) * torch.log(torch.clamp(1 - p_neg, min=1e-8))
        per = torch.where(pos > 0, loss_pos * weights[0], loss_neg * weights[1])
        # Per label, then summed: a label's gradient never depends on which other labels are
        # learnt beside it (the open world; Adam's steps are per parameter too).
        kf = known.float()
        data = ((per * kf).sum(dim=0) / kf.sum(dim=0).clamp(min=1.0)).sum()
        W, _b, U = self.rows()
        anchor = (
            p.anchor
            * (((W - self.W0) ** 2).sum(dim=1) / self.W0.pow(2).sum(dim=1).clamp(1e-8)).sum()
            + p.cls_anchor * ((self.du**2).sum(dim=1) / self.cs**2).sum()
        )
        total = data + anchor
        if self.rank and p.mfi > 0 and len(self.T) > 1:
            # MFI: projected label features apart (off-diagonal cosines towards zero).
            Pn = torch.nn.functional.normalize(W, dim=1)
            G = Pn @ Pn.T
            off = G - torch.diag(torch.diag(G))
            total = total + p.mfi * (off**2).sum() / (len(G) * (len(G) - 1))
        return total

    def fit(self, X: Any, bg: Any, Z: Any, Y: Any) -> None:
        torch = self.torch
        known = (Y >= 0).float()
        n_pos = ((Y == 1).float() * known).sum(dim=0)
        n_neg = ((Y == 0).float() * known).sum(dim=0)
        # Distribution-balanced (CAPNET): a label's positives weigh as much as its negatives.
        total = (n_pos + n_neg).clamp(min=1.0)
        w_pos = (0.5 * total / n_pos.clamp(min=1.0)).clamp(max=50.0)
        w_neg = 0.5 * total / n_neg.clamp(min=1.0)
        opt = torch.optim.Adam(self.tensors, lr=self.p.lr)
        n, batch = len(X), self.p.batch_images
        gen = torch.Generator().manual_seed(self.p.seed)
        order = torch.randperm(n, generator=gen)
        for step in range(self.p.steps):
            if n > batch:  # mini-batches in epoch order: each step costs `batch` images
                start = (step * batch) % n
                rows = order[start : start + batch].to(X.device)
                x, b, z, y = X[rows], bg[rows], Z[rows], Y[rows]
            else:
                x, b, z, y = X, bg, Z, Y
            opt.zero_grad()
            loss = self.loss(x, b, z, y, (w_pos[None, :], w_neg[None, :]))
            loss.backward()
            opt.step()

    def predict(self, X: Any, bg: Any, Z: Any, shrink: float = 1.0) -> np.ndarray:
        """[n, C] fused z-scores F (float64) of one batch of images (`learn` reads the held-out
        images a batch at a time)."""
        with self.torch.no_grad():
            return self.fused(X, bg, Z, shrink).double().cpu().numpy()


def _training_free(
    ex: Examples, W0: np.ndarray, b0: np.ndarray, T: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """(E, C) [n, C] of the labelled images under the training-free parameters."""
    n, M, d = ex.patches.shape
    E = np.empty((n, len(W0)), np.float64)
    Wt = np.ascontiguousarray(W0.T, np.float32)
    for i in range(0, n, 1024):  # a block at a time: the patches may be float16, and many
        blk = ex.patches[i : i + 1024]
        flat = blk.reshape(-1, d).astype(np.float32)
        patch = (flat @ Wt + b0).reshape(len(blk), M, -1) - ex.background[i : i + 1024, :, None]
        E[i : i + 1024] = patch.max(axis=1) / scale
    C = (ex.cls.astype(np.float32) @ np.asarray(T, np.float32).T).astype(np.float64)
    return E, C


def learn(
    ex: Examples,
    W0: np.ndarray,
    b0: np.ndarray,
    T: np.ndarray,
    scale: float,
    reference: tuple[np.ndarray, np.ndarray] | None = None,
    params: LearnParams | None = None,
) -> Learnt:
    """Learn each label's parameters from the labelled images, and choose per label.

    `W0, b0` are the training-free patch rows (raw: before `scale`), `T` the text prototypes,
    `reference` the (E, C) scores of a sample of the collection under the training-free rows,
    for the z-scores (default: the labelled images')."""
    import torch

    p = params or LearnParams()
    started = time.perf_counter()
    torch.manual_seed(p.seed)
    n, C = ex.Y.shape
    E0, C0 = _training_free(ex, W0, b0, T, scale)
    refE, refC = reference if reference is not None else (E0, C0)
    centres = [_robust(refE[:, c]) for c in range(C)]
    ccentres = [_robust(refC[:, c]) for c in range(C)]
    ec = np.array([v[0] for v in centres])
    es = np.array([v[1] for v in centres])
    cc = np.array([v[0] for v in ccentres])
    cs = np.array([v[1] for v in ccentres])
    F0 = p.alpha * (E0 - ec) / es + (1 - p.alpha) * (C0 - cc) / cs
    # Start from a logistic fit of the training-free score where labels allow, else slope 1.
    slope0, intercept0 = np.ones(C), np.zeros(C)
    Y = ex.Y
    n_pos = (Y == 1).sum(axis=0)
    n_neg = (Y == 0).sum(axis=0)
    eligible = (n_pos >= p.min_positives) & (n_neg >= p.min_negatives)
    for k in (int(i) for i in np.flatnonzero(eligible)):
        known = Y[:, k] >= 0
        slope0[k], intercept0[k] = _logistic_1d(F0[known, k], Y[known, k] == 1)

    dev = _device(p.device)
    background = np.asarray(ex.background, np.float32)
    cls = np.asarray(ex.cls, np.float32)
    Yt = torch.as_tensor(np.where(eligible[None, :], Y, -1).astype(np.int64), device=dev)

    def t(a: np.ndarray) -> Any:
        return torch.as_tensor(np.ascontiguousarray(a), device=dev)

    def images(rows: np.ndarray, widen: bool) -> tuple[Any, Any, Any]:
        """The images `rows` (sorted) on the device: only these patches are read (from memory
        or the spilled file). `widen`: as float32, converted once here, a block at a time;
        else float16 stays so and `fused` widens a batch per step (at ViT-B/16 geometry the
        widening took 2/3 of a step's time)."""
        if not widen:
            return t(ex.patches[rows]), t(background[rows]), t(cls[rows])
        x = torch.empty((len(rows), *ex.patches.shape[1:]), dtype=torch.float32, device=dev)
        for i in range(0, len(rows), 256):
            x[i : i + 256] = t(ex.patches[rows[i : i + 256]])
        return x, t(background[rows]), t(cls[rows])

    def widen_training(rows: np.ndarray) -> bool:
        return len(rows) * int(np.prod(ex.patches.shape[1:])) * 4 <= p.widen_bytes

    def model() -> _Model:
        return _Model(W0, b0, T, scale, (ec, es, cc, cs), slope0, intercept0, p)

    def trained(rows: np.ndarray) -> _Model:
        m = model()
        m.fit(*images(rows, widen_training(rows)), Yt[torch.as_tensor(rows, device=dev)])
        return m

    # Held-out validation: out-of-fold fused scores of every labelled image, at each shrink,
    # a batch of held-out images at a time (memory: the training rows and one batch).
    shrinks = tuple(p.shrinks)
    fold_models: list[_Model] = []
    oof = np.full((len(shrinks), n, C), np.nan)
    if eligible.any():
        rng = np.random.default_rng(p.seed)
        fold = rng.permutation(n) % max(2, p.folds)
        for k in range(max(2, p.folds)):
            m = trained(_at_most(np.flatnonzero(fold != k), p.max_train_images, rng))
            fold_models.append(m)
            held = np.flatnonzero(fold == k)
            for i in range(0, len(held), p.batch_images):
                rows = held[i : i + p.batch_images]
                x, bg, z = images(rows, widen=True)  # one batch, scored at every shrink
                for j, s in enumerate(shrinks):
                    oof[j, rows] = m.predict(x, bg, z, s)
    final = model()
    if eligible.any():
        final = trained(_at_most(np.arange(n), p.max_train_images, np.random.default_rng(p.seed)))
    # Bagged: each label's rows are the mean of the final model's and the fold models' (each
    # trained on another part of the labels), steadier than one model on a few labels. The
    # choice and the calibration below stay on the fold models' held-out scores.
    learnt_rows = []
    with torch.no_grad():
        for s in shrinks:
            parts = [[r.cpu().numpy() for r in m.rows(s)] for m in (final, *fold_models)]
            W_s, b_s, U_s = (
                np.mean(a, axis=0).astype(np.float32) for a in zip(*parts, strict=True)
            )
            learnt_rows.append((W_s, b_s, U_s))
    W, b, U = (a.copy() for a in learnt_rows[-1])
    # The confidence of a learnt label is calibrated on held-out scores (the out-of-fold F):
    # the training loss alone makes it overconfident (confidences tie at 1.0 and rank nothing).
    slope, intercept = slope0.copy(), intercept0.copy()
    chosen = np.zeros(C, bool)
    report: dict[str, dict[str, Any]] = {}
    for c in range(C):
        known = Y[:, c] >= 0
        rec: dict[str, Any] = {"positives": int(n_pos[c]), "negatives": int(n_neg[c])}
        if not eligible[c]:
            rec["used"] = "training-free"
            rec["why"] = (
                f"too few labels (needs {p.min_positives} images with it and "
                f"{p.min_negatives} without)"
            )
        else:
            truth = Y[known, c] == 1
            ap_free = average_precision(F0[known, c], truth)
            aps = [average_precision(oof[j, known, c], truth) for j in range(len(shrinks))]
            best = int(np.argmax(aps))  # the first of equals: the least learnt
            ap_learnt = aps[best]
            rec["held_out_AP"] = {"training_free": round(ap_free, 2), "learnt": round(ap_learnt, 2)}
            chosen[c] = ap_learnt >= ap_free + p.min_gain
            if chosen[c]:
                rec["shrink"] = shrinks[best]
                W[c], b[c], U[c] = (a[c] for a in learnt_rows[best])
                slope[c], intercept[c] = _logistic_1d(oof[best, known, c], truth, ridge=1.0)
            rec["used"] = "learnt" if chosen[c] else "training-free"
            rec["why"] = f"held-out AP {ap_learnt:.1f} vs {ap_free:.1f} training-free" + (
                "" if chosen[c] else f" (needs +{p.min_gain:g})"
            )
        report[str(c)] = rec
    return Learnt(
        W=W,
        b=b,
        cls_protos=U,
        e_center=ec,
        e_scale=es,
        c_center=cc,
        c_scale=cs,
        slope=slope,
        intercept=intercept,
        chosen=chosen,
        report=report,
        seconds=time.perf_counter() - started,
    )


def _device(name: str) -> Any:
    """The torch device to learn on: `auto` is the GPU when torch sees one."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _at_most(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """`rows` (sorted), or a random `limit` of them (sorted)."""
    if len(rows) > limit:
        rows = np.sort(rng.choice(rows, limit, replace=False))
    return rows


def _logistic_1d(
    x: np.ndarray, y: np.ndarray, iters: int = 50, ridge: float = 1e-2
) -> tuple[float, float]:
    """(slope, intercept) of a 1-D logistic regression (Newton, L2 `ridge`), with the slope
    kept positive: the score must still rank present above absent. The ridge keeps labels
    that the scores separate from a huge slope, whose confidences would all round to 0 or 1
    and rank nothing."""
    x = np.asarray(x, np.float64)
    t = np.asarray(y, np.float64)
    A = np.stack([x, np.ones_like(x)], axis=1)

    def loss(w: np.ndarray) -> float:
        z = A @ w
        return float(np.sum(np.logaddexp(0.0, z) - t * z) + 0.5 * ridge * w @ w)

    w = np.array([1.0, 0.0])
    current = loss(w)
    for _ in range(iters):
        pr = 0.5 * (1.0 + np.tanh(0.5 * (A @ w)))
        g = A.T @ (pr - t) + ridge * w
        H = (A * (pr * (1 - pr))[:, None]).T @ A + ridge * np.eye(2)
        step = np.linalg.solve(H, g)
        # Damped: halve the Newton step until the loss goes down (plain Newton overshoots
        # on well-separated scores).
        for _halving in range(30):
            trial = w - step
            value = loss(trial)
            if value <= current:
                break
            step = step / 2
        else:
            break
        w, current = trial, value
        if np.max(np.abs(step)) < 1e-8:
            break
    slope = float(w[0]) if math.isfinite(w[0]) and w[0] > 1e-3 else 1.0
    intercept = float(w[1]) if math.isfinite(w[1]) else 0.0
    return slope, intercept
