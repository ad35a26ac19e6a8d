"""`piaa eval`: the paper's ablation (cls, patch-text, pvcl, piaa) on a labelled folder.

Labels are read only to score the results: the classifier is fitted on the images of the fit
folder (or the test folder) without them, and the decision thresholds come from the test
collection's score distribution, as they would in a user's library.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from piaa_index.decisions import apply_decisions, label_decisions
from piaa_index.eval.datasets import Dataset, missing_files
from piaa_index.eval.metrics import f1_scores, mean_average_precision

if TYPE_CHECKING:
    from piaa_index.library import Library

METHODS = ("cls", "patch-text", "pvcl", "piaa")
DECIDED_ON = {"piaa": "pvcl"}  # present/absent for the fused ranking comes from patch evidence
SUPPORT = "support"  # max patch–text cosine, [N, C]: what the product's tag rule gates on


def _locations_for(
    library: Library, dataset: Dataset
) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Live (id, shard, row) for the dataset's images, and each item's image id (-1: failed)."""
    paths = [str(item.path) for item in dataset.items]
    ids = library.store.image_ids_by_path(paths)
    live = {loc[0]: loc for loc in library.store.live_locations()}
    order = [ids.get(p, -1) if ids.get(p, -1) in live else -1 for p in paths]
    return [live[i] for i in order if i != -1], order


def score_methods(
    library: Library, locations: list[tuple[int, int, int]], classifier: Any, T: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image ids and [N, C] scores of each ablation method, streamed shard by shard."""
    from piaa_index import fusion

    params = fusion.PaaParams()
    ids: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {m: [] for m in (*METHODS, SUPPORT)}
    for chunk in library.vectors.iter_live(locations):
        ids.append(chunk.image_ids)
        scores = fusion.score_images(chunk.cls, chunk.patches, T, classifier, params)
        assert scores.support is not None
        parts[SUPPORT].append(scores.support)
        parts["cls"].append(scores.cls)
        parts["patch-text"].append(
            fusion.patch_text_evidence(chunk.patches, T, params.text_scale, params.batch_images)
        )
        parts["pvcl"].append(scores.patch)
        parts["piaa"].append(scores.fused)
    return np.concatenate(ids), {m: np.concatenate(v) for m, v in parts.items()}


def run_ablation(
    library: Library,
    test: Dataset,
    fit: Dataset | None = None,
    progress: bool = False,
    bank_size: int | None = None,
) -> dict[str, Any]:
    """Index, fit on `fit` (or `test`) without labels, and score the four methods on `test`."""
    from piaa_index import fusion

    started = time.perf_counter()
    fit_set = fit or test
    if fit is not None and fit.classes != test.classes:
        raise ValueError("the fit and test folders have different class lists")
    index_reports = {}
    for name, dataset in (("test", test), ("fit", fit)):
        if dataset is None:
            continue
        present = [str(item.path) for item in dataset.items if item.path.exists()]
        index_reports[name] = library.index(present, progress=progress).as_dict()
    vocab = library.set_vocabulary(test.classes)
    fit_locations, _ = _locations_for(library, fit_set)
    fit_started = time.perf_counter()
    classifier, T, n_patches = library.fit_classifier(vocab, fit_locations, progress, bank_size)
    fit_seconds = time.perf_counter() - fit_started

    test_locations, order = _locations_for(library, test)
    ids, scores = score_methods(library, test_locations, classifier, T)
    # Back to dataset order; images that failed to index score 0 (counted as misses).
    row_of = {int(i): r for r, i in enumerate(ids)}
    targets = test.targets()
    results: dict[str, Any] = {}
    per_class: dict[str, dict[str, float | None]] = {}
    in_dataset_order = {}
    for method, S in scores.items():
        full = np.zeros((len(order), len(test.classes)), dtype=np.float32)
        for k, image_id in enumerate(order):
            if image_id != -1:
                full[k] = S[row_of[image_id]]
        in_dataset_order[method] = full
    support = in_dataset_order.pop(SUPPORT)
    # pvcl and piaa decide exactly as the product's tags do (decisions.py): label status from
    # the fit's banks, thresholds on the PVCL patch evidence, support gates. cls and patch-text
    # have no fit, so they keep the per-label split of their own scores (no absent status).
    product = label_decisions(in_dataset_order["pvcl"], support, classifier.params["support"])
    product_tags = apply_decisions(in_dataset_order["pvcl"], support, product)
    held = np.asarray(np.asarray(targets, dtype=bool).sum(axis=0) > 0)  # labels the test set holds
    for method, full in in_dataset_order.items():
        mAP, ap = mean_average_precision(full, targets)
        if DECIDED_ON.get(method, method) == "pvcl":
            pred = product_tags
        else:
            decision_scores = in_dataset_order[method]
            # Without return_info, decision_thresholds returns the [C] array alone.
            thresholds = cast(np.ndarray, fusion.decision_thresholds(decision_scores))
            pred = fusion.decide(decision_scores, thresholds)
        f1 = f1_scores(pred[:, held], targets[:, held])
        absent = pred[:, ~held]
        results[method] = {
            "mAP": round(float(mAP), 2),
            **{k: round(v, 2) for k, v in f1.items()},
            # Share of image × absent-label pairs tagged, and absent labels tagging anything.
            "absent_false_tag_rate": round(100.0 * float(absent.mean()), 3) if absent.size else 0.0,
            "absent_labels_tagging": int(absent.any(axis=0).sum()),
        }
        per_class[method] = {
            name: (None if np.isnan(a) else round(float(a), 2))
            for name, a in zip(test.classes, ap, strict=True)
        }
    return {
        "results": results,
        "per_class_AP": per_class,
        "dataset": {
            "test": {
                "root": str(test.root),
                "layout": test.layout,
                "images": len(test.items),
                "missing_files": len(missing_files(test)),
            },
            "fit": {
                "root": str(fit_set.root),
                "layout": fit_set.layout,
                "images": len(fit_set.items),
            },
            "classes": test.classes,
            "absent_labels": [n for c, n in enumerate(test.classes) if not held[c]],
        },
        "decisions": {
            "info": product.info,
            "status": dict(zip(test.classes, product.status, strict=True)),
        },
        "fit": {
            "n_patches": n_patches,
            "seconds": round(fit_seconds, 2),
            "bank_sizes": dict(zip(test.classes, classifier.bank_sizes, strict=True)),
            "kept_sizes": dict(zip(test.classes, classifier.kept_sizes, strict=True)),
            "weak_labels": [test.classes[c] for c in classifier.weak_labels],
        },
        "model": library.store.get_setting("model"),
        "index": index_reports,
        "seconds": round(time.perf_counter() - started, 2),
    }


def format_table(report: dict[str, Any]) -> str:
    """The ablation as a Markdown table (absent-label columns when the test set has any)."""
    n_absent = len(report["dataset"].get("absent_labels", []))
    if not n_absent:
        lines = ["| method | mAP | CF1 | OF1 |", "|---|---:|---:|---:|"]
        for method in METHODS:
            r = report["results"][method]
            lines.append(f"| {method} | {r['mAP']:.1f} | {r['CF1']:.1f} | {r['OF1']:.1f} |")
        return "\n".join(lines)
    lines = [
        "| method | mAP | CF1 | OF1 | OP | OR | false tags on absent labels | absent labels tagging |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        r = report["results"][method]
        lines.append(
            f"| {method} | {r['mAP']:.1f} | {r['CF1']:.1f} | {r['OF1']:.1f} | {r['OP']:.1f} | "
            f"{r['OR']:.1f} | {r['absent_false_tag_rate']:.2f} % | "
            f"{r['absent_labels_tagging']} of {n_absent} |"
        )
    return "\n".join(lines)
