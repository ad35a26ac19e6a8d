"""PVCL and PAA on synthetic Gaussian worlds with a modality gap: recovery, accuracy, scale, tags.

Run: ``python benchmarks/bench_pvcl_synthetic.py [--quick] [--only fit|scale|tags]``.
Prints markdown tables (the numbers quoted in docs/method.md):

1. fit: recovery of the class means (cosine), patch accuracy of the text classifier vs PVCL,
   Stage II kept fraction, fit time and peak RSS, for several (C, K, pool size), including a pool
   of ~1M patches generated and streamed chunk by chunk (never held in memory).
2. scale: Stage II kept fraction and accuracy for K ∈ {32, 512, 4096}, C ∈ {3, 20, 80}, with the
   authors' fixed temperatures on raw GDA logits vs the calibrated scale.
3. tags: image-level mAP of each branch and CF1/OF1 of the decision rule on m and on S.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

from piaa_index.eval.metrics import f1_scores, mean_average_precision
from piaa_index.method.fusion import PaaParams, fuse, patch_text_evidence, score_images
from piaa_index.method.pvcl import BankBuilder, PvclParams, fit_from_banks, fit_pvcl
from piaa_index.method.thresholds import decide, decision_thresholds

# tools/ (development only, not shipped) sits beside benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.synthetic import PatchWorld, image_world, unit  # noqa: E402


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_fit(quick: bool) -> None:
    """Table 1: recovery, accuracy, kept fraction, time, memory."""
    settings = [(3, 512, 30_000), (20, 512, 200_000), (80, 512, 400_000), (20, 4096, 1_000_000)]
    if quick:
        settings = [(3, 512, 30_000), (20, 512, 100_000)]
    print("\n### 1. PVCL fit (d = 64; pool streamed in chunks of 50k)\n")
    print(
        "| C | K | pool | cos(text, μ) | cos(PVCL, μ) mean / min | patch acc text | "
        "patch acc PVCL | Stage II kept | weak | pass s | stages s | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for C, K, n in settings:
        w = PatchWorld(C, seed=C + K)
        clf = fit_pvcl(w.stream(n, 50_000), w.T, bank_size=K)
        # The pass includes generating the synthetic patches; the stages run on the banks only.
        t_pass, t_fit = clf.params["stream_seconds"], clf.params["fit_seconds"]
        Xt, yt = w.sample(50_000, np.random.default_rng(123))
        obj = yt >= 0
        acc_text = float(((Xt[obj] @ w.T.T).argmax(1) == yt[obj]).mean())
        acc = float((clf.logits(Xt[obj]).argmax(1) == yt[obj]).mean())
        cos = (unit(clf.means) * w.means).sum(1)
        cos_t = (w.T * w.means).sum(1).mean()
        kept = sum(clf.kept_sizes) / max(1, sum(clf.bank_sizes))
        print(
            f"| {C} | {K} | {n:,} | {cos_t:.3f} | {cos.mean():.3f} / {cos.min():.3f} | "
            f"{acc_text:.3f} | {acc:.3f} | {kept:.3f} | {len(clf.weak_labels)} | {t_pass:.1f} | "
            f"{t_fit:.2f} | "
            f"{peak_rss_mb():.0f} |"
        )


SCALE_RULES = [
    (
        "raw, τ=100, paper fallback",
        PvclParams(calibration="none", tau=100.0, purified_fallback="text"),
    ),
    ("raw, τ=100 (VOC)", PvclParams(calibration="none", tau=100.0)),
    ("raw, τ=0.01 (COCO)", PvclParams(calibration="none", tau=0.01)),
    ("raw, τ=500 (NUS)", PvclParams(calibration="none", tau=500.0)),
    ("calibrated, τ=1 (default)", PvclParams()),
    ("calibrated, τ=2", PvclParams(tau=2.0)),
    ("calibrated, τ=2, log-odds", PvclParams(tau=2.0, keep_domain="logodds")),
]


def bench_scale(quick: bool) -> None:
    """Table 2: Stage II kept fraction and accuracy under each temperature rule."""
    Cs, Ks = ((3, 20), (32, 512)) if quick else ((3, 20, 80), (32, 512, 4096))
    print("\n### 2. Stage II under fixed vs calibrated temperature (d = 64, 3,000 patches/class)\n")
    print("Cell: kept fraction overall [min–max over classes with ≥ 20 assigned] / patch acc.\n")
    print("| C | K | raw median margin | " + " | ".join(r for r, _ in SCALE_RULES) + " |")
    print("|---|---|---|" + "---|" * len(SCALE_RULES))
    for C in Cs:
        w = PatchWorld(C, seed=7 + C)
        X, y = w.sample(int(3000 * C * 1.5), np.random.default_rng(C))
        obj = y >= 0
        acc_text = float(((X[obj] @ w.T.T).argmax(1) == y[obj]).mean())
        for K in Ks:
            bb = BankBuilder(w.T, K)
            for i in range(0, len(X), 50_000):
                bb.update(X[i : i + 50_000])
            banks = bb.banks()
            cells, raw_margin = [], np.nan
            for _, prm in SCALE_RULES:
                clf = fit_from_banks(banks, w.T, PvclParams(**{**prm.__dict__, "bank_size": K}))
                if prm.calibration != "none":
                    raw_margin = clf.params["stage1_scale"]
                a = np.array(clf.params["stage2_assigned"])
                k = np.array(clf.kept_sizes)
                big = a >= 20
                f = k[big] / a[big] if big.any() else np.array([np.nan])
                kept = k.sum() / max(1, a.sum())
                acc = float((clf.logits(X[obj]).argmax(1) == y[obj]).mean())
                cells.append(f"{kept:.2f} [{f.min():.2f}–{f.max():.2f}] / {acc:.3f}")
            print(f"| {C} | {K} | {raw_margin:.3g} | " + " | ".join(cells) + " |")
        print(
            f"| {C} | text classifier | | patch acc {acc_text:.3f} |"
            + " |" * (len(SCALE_RULES) - 1)
        )


def oracle_f1(scores: np.ndarray, Y: np.ndarray) -> dict[str, float]:
    """F1 scores with each label's best threshold chosen on the ground truth (upper bound)."""
    pred = np.zeros_like(Y)
    for c in range(Y.shape[1]):
        s, y = scores[:, c], Y[:, c]
        order = np.argsort(-s)
        tp = np.cumsum(y[order])
        f1 = 2 * tp / (np.arange(1, s.size + 1) + max(1, y.sum()))
        k = int(np.argmax(f1)) + 1 if y.any() else 0
        pred[order[:k], c] = True
    return f1_scores(pred, Y)


def bench_tags(quick: bool) -> None:
    """Table 3: ranking (mAP) and decisions (CF1/OF1) at image level."""
    worlds = [(5, 600), (20, 1500)] if quick else [(5, 600), (20, 1500), (80, 3000)]
    print("\n### 3. Image level (d = 64, 7×7 patches, one extra label absent from the images)\n")
    print(
        "| C | N | mAP [CLS] | mAP patch-text | mAP PVCL m | mAP fused S | "
        "rule on m: CF1 / OF1 | rule on S: CF1 / OF1 | Otsu on m | best-F1 m* | best-F1 S* | "
        "all-present | absent label tagged |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for C, N in worlds:
        P, Z, Y, T = image_world(N, C, M=49, absent=1)
        t0 = time.perf_counter()
        clf = fit_pvcl((P[i : i + 500] for i in range(0, N, 500)), T, bank_size=512)
        sc = score_images(Z, P, T, clf)
        dt = time.perf_counter() - t0
        valid = Y.any(0)
        maps = [
            mean_average_precision(s[:, valid], Y[:, valid])[0]
            for s in (sc.cls, patch_text_evidence(P, T), sc.patch, sc.fused)
        ]
        dm = decide(sc.patch, decision_thresholds(sc.patch))
        ds = decide(sc.fused, decision_thresholds(sc.fused))
        do = decide(sc.patch, decision_thresholds(sc.patch, PaaParams(split_method="otsu")))
        fm, fs, fo = f1_scores(dm, Y), f1_scores(ds, Y), f1_scores(do, Y)
        om, os_, triv = oracle_f1(sc.patch, Y), oracle_f1(sc.fused, Y), f1_scores(Y | True, Y)
        cells = " | ".join(f"{m:.1f}" for m in maps)
        print(
            f"| {C} | {N} | {cells} | {fm['CF1']:.1f} / {fm['OF1']:.1f} | "
            f"{fs['CF1']:.1f} / {fs['OF1']:.1f} | {fo['CF1']:.1f} / {fo['OF1']:.1f} | "
            f"{om['CF1']:.1f} / {om['OF1']:.1f} | {os_['CF1']:.1f} / {os_['OF1']:.1f} | "
            f"{triv['CF1']:.1f} / {triv['OF1']:.1f} | {int(dm[:, -1].sum())} of {N} |"
        )
        sys.stdout.flush()
        if C == 20:
            tau_sweep = {
                (a, t): mean_average_precision(fuse(sc.cls, sc.patch, a, t)[:, valid], Y[:, valid])[
                    0
                ]
                for a in (0.5, 0.9)
                for t in (1.0, 2.0, 5.0, 20.0, 200.0)
            }
        print(f"<!-- C={C}: fit + scoring {dt:.2f} s -->")
    print("\n\\* per-label threshold maximising that label's F1, chosen with the ground truth.")
    print("\nFused mAP vs (α, τ_patch) at C = 20:\n")
    print("| α \\ τ_patch | 1 | 2 | 5 | 20 | 200 |\n|---|---|---|---|---|---|")
    for a in (0.5, 0.9):
        row = " | ".join(f"{tau_sweep[(a, t)]:.1f}" for t in (1.0, 2.0, 5.0, 20.0, 200.0))
        print(f"| {a} | {row} |")


def main() -> None:
    """Parse arguments and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small settings only (about 20 s)")
    ap.add_argument("--only", choices=["fit", "scale", "tags"], help="one table only")
    args = ap.parse_args()
    for name, fn in (("fit", bench_fit), ("scale", bench_scale), ("tags", bench_tags)):
        if args.only in (None, name):
            fn(args.quick)
    print(f"\npeak RSS of the whole run: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
