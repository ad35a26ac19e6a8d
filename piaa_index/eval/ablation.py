"""`piaa eval`: the paper's ablation (cls, patch-text, pvcl, piaa) on a labelled folder.

Labels are read only to score the results: the classifier is fitted on the images of the fit
folder (or the test folder) without them, and the decision thresholds come from the test
collection's score distribution, as they would in a user's library.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from piaa_index.eval.datasets import Dataset, missing_files
from piaa_index.eval.metrics import f1_scores, mean_average_precision
from piaa_index.library.keywords import (
    complete_rows,
    learn_labels,
    learnt_decisions,
    summary,
    with_learnt,
)
from piaa_index.method import fusion
from piaa_index.method import thresholds as rule
from piaa_index.method.decisions import Decisions, apply_decisions, label_decisions, open_decisions
from piaa_index.method.pvcl import BankBuilder, PvclParams, fit_from_banks, paper_bank_size

if TYPE_CHECKING:
    from piaa_index.library.core import Library

# The product's rows (pvcl: open-world per-label patch evidence; piaa: the calibrated confidence
# that search ranks by and tags decide on) and the paper's closed-world formula beside them.
METHODS = ("cls", "patch-text", "patch-text-raw", "pvcl", "piaa", "pvcl-paper", "piaa-paper")
DECIDED_ON = {"piaa-paper": "pvcl-paper"}  # the paper's fusion decides on its patch evidence
SUPPORT = "support"  # max patch–text cosine, [N, C]: what the product's tag rule gates on
PRODUCT = ("pvcl", "piaa")  # tagged by the product's rule (decisions.open_decisions)


def _locations_for(
    library: Library, dataset: Dataset
) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Live (id, shard, row) for the dataset's images, and each item's image id (-1: failed)."""
    paths = [str(item.path) for item in dataset.items]
    ids = library.store.image_ids_by_path(paths)
    live = {loc[0]: loc for loc in library.store.live_locations()}
    order = [ids.get(p, -1) if ids.get(p, -1) in live else -1 for p in paths]
    return [live[i] for i in order if i != -1], order


def fit_paper_classifier(
    library: Library,
    T: np.ndarray,
    locations: list[tuple[int, int, int]],
    bank_size: int | None = None,
) -> Any:
    """The paper's closed-world PVCL (pvcl.py: banks by argmax and entropy across the
    vocabulary, GDA classes that explain every patch), for the comparison rows."""

    if bank_size is None:
        bank_size = paper_bank_size(len(locations) * library.vectors.n_patches, len(T))
    params = PvclParams(bank_size=bank_size)
    builder = BankBuilder(T, bank_size=params.bank_size, text_scale=params.text_scale)
    for chunk in library.vectors.iter_live(locations):
        n, M, d = chunk.patches.shape
        builder.update(np.asarray(chunk.patches, np.float32).reshape(n * M, d))
    return fit_from_banks(builder.banks(), T, params)


def score_methods(
    library: Library,
    locations: list[tuple[int, int, int]],
    classifier: Any,
    T: np.ndarray,
    paper: Any = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image ids and [N, C] scores of each method, streamed shard by shard. The product's
    confidence is not known until the whole collection is scored (`product_tags`): "piaa"
    holds the [CLS] cosine here."""

    params = fusion.PaaParams()
    ids: list[np.ndarray] = []
    names = ["cls", "patch-text", "patch-text-raw", "pvcl", "piaa", SUPPORT]
    if paper is not None:
        names += ["pvcl-paper", "piaa-paper"]
    parts: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for chunk in library.vectors.iter_live(locations):
        ids.append(chunk.image_ids)
        scores = fusion.score_images(chunk.cls, chunk.patches, T, classifier, params)
        assert scores.support is not None
        parts[SUPPORT].append(scores.support)
        parts["pvcl"].append(scores.patch)
        parts["piaa"].append(scores.cls)
        parts["cls"].append(fusion.cls_scores(chunk.cls, T, params.tau_cls))
        parts["patch-text"].append(
            fusion.patch_text_evidence(chunk.patches, T, params.text_scale, params.batch_images)
        )
        parts["patch-text-raw"].append(scores.support)
        if paper is not None:
            closed = fusion.score_images(chunk.cls, chunk.patches, T, paper, params)
            parts["pvcl-paper"].append(closed.patch)
            parts["piaa-paper"].append(closed.fused)
    return np.concatenate(ids), {m: np.concatenate(v) for m, v in parts.items()}


def product_tags(
    scores: dict[str, np.ndarray], fit_support: dict[str, Any]
) -> tuple[Decisions, np.ndarray, np.ndarray]:
    """The product's rule on a collection's scores: (decisions, confidence S, tags)."""
    decisions = open_decisions(scores["pvcl"], scores["piaa"], scores[SUPPORT], fit_support)
    S, present = decisions.apply(scores["pvcl"], scores["piaa"], scores[SUPPORT])
    assert S is not None
    return decisions, S, present


def _in_order(
    scores: dict[str, np.ndarray], ids: np.ndarray, order: list[int], n_labels: int
) -> dict[str, np.ndarray]:
    """Rows back in dataset order; images that failed to index score 0 (counted as misses)."""
    row_of = {int(i): r for r, i in enumerate(ids)}
    out = {}
    for method, S in scores.items():
        full = np.zeros((len(order), n_labels), dtype=S.dtype)
        for k, image_id in enumerate(order):
            if image_id != -1:
                full[k] = S[row_of[image_id]]
        out[method] = full
    return out


def _tag_metrics(pred: np.ndarray, targets: np.ndarray, held: np.ndarray) -> dict[str, Any]:
    f1 = f1_scores(pred[:, held], targets[:, held])
    absent = pred[:, ~held]
    return {
        **{k: round(v, 2) for k, v in f1.items()},
        # Share of image × absent-label pairs tagged, and absent labels tagging anything.
        "absent_false_tag_rate": round(100.0 * float(absent.mean()), 3) if absent.size else 0.0,
        "absent_labels_tagging": int(absent.any(axis=0).sum()),
    }


def run_ablation(
    library: Library,
    test: Dataset,
    fit: Dataset | None = None,
    progress: bool = False,
    bank_size: int | None = None,
    vocab_size: int | None = None,
    vocab_draws: int = 4,
    seed: int = 0,
    keywords: dict[str, set[str]] | None = None,
) -> dict[str, Any]:
    """Index, fit on `fit` (or `test`) without labels, and score every method on `test`.

    With `keywords` (labels by path of some fit images, complete for each image listed: a
    user's keywords), also the `learned` row: the product after learning from them
    (piaa_index/library/keywords.py).

    With `vocab_size`, also the open-world protocol (`open_world`): vocabularies of that many
    random labels against the same labels under the full vocabulary, and tag stability when
    one label is removed."""

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
    paper = fit_paper_classifier(library, T, fit_locations, bank_size)

    test_locations, order = _locations_for(library, test)
    ids, raw = score_methods(library, test_locations, classifier, T, paper)
    targets = test.targets()
    in_dataset_order = _in_order(raw, ids, order, len(test.classes))
    support = in_dataset_order.pop(SUPPORT)
    product, confidence, tags = product_tags(
        {**in_dataset_order, SUPPORT: support}, classifier.params["support"]
    )
    in_dataset_order["piaa"] = confidence.astype(np.float32)  # what search ranks by
    # The paper's rows decide with the rule of the closed-world product (decisions.py's
    # label_decisions on their patch evidence); cls and the patch-text rows have no fit, so
    # they keep the per-label split of their own scores (no absent status).
    paper_rule = label_decisions(in_dataset_order["pvcl-paper"], support, paper.params["support"])
    paper_tags = apply_decisions(in_dataset_order["pvcl-paper"], support, paper_rule)
    held = np.asarray(np.asarray(targets, dtype=bool).sum(axis=0) > 0)  # labels the test set holds
    methods = list(METHODS)
    learning: dict[str, Any] | None = None
    learned_tags = None
    if keywords is not None:
        fit_locations_all, _ = _locations_for(library, fit_set)
        S_learned, learned_tags, learning = learned_scores(
            library, classifier, T, fit_locations_all, keywords, test_locations, order,
            test.classes,
        )  # fmt: skip
        in_dataset_order["learned"] = S_learned.astype(np.float32)
        methods.append("learned")
    results: dict[str, Any] = {}
    per_class: dict[str, dict[str, float | None]] = {}
    for method in methods:
        full = in_dataset_order[method]
        mAP, ap = mean_average_precision(full, targets)
        if method == "learned":
            assert learned_tags is not None
            pred = learned_tags
        elif method in PRODUCT:
            pred = tags
        elif DECIDED_ON.get(method, method) == "pvcl-paper":
            pred = paper_tags
        else:
            # Without return_info, decision_thresholds returns the [C] array alone.
            cuts = cast(np.ndarray, rule.decision_thresholds(full))
            pred = rule.decide(full, cuts)
        results[method] = {"mAP": round(float(mAP), 2), **_tag_metrics(pred, targets, held)}
        per_class[method] = {
            name: (None if np.isnan(a) else round(float(a), 2))
            for name, a in zip(test.classes, ap, strict=True)
        }
    report: dict[str, Any] = {
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
            "weak_labels": [test.classes[c] for c in classifier.weak_labels],
        },
        "model": library.store.get_setting("model"),
        "index": index_reports,
        "by_frequency": by_frequency(per_class, fit_set, held, test.classes),
    }
    if learning is not None:
        report["learning"] = learning
    if vocab_size is not None:
        full_run = {
            "S": confidence,
            "tags": tags,
            "status": [r["status"] for r in product.status],
        }
        report["open_world"] = open_world_protocol(
            library, test, fit_set, full_run, vocab_size, vocab_draws, seed, bank_size
        )
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def learned_scores(
    library: Library,
    classifier: Any,
    T: np.ndarray,
    fit_locations: list[tuple[int, int, int]],
    keywords: dict[str, set[str]],
    test_locations: list[tuple[int, int, int]],
    order: list[int],
    names: list[str],
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The product after learning from `keywords` (labels by path, each image listed
    completely): (confidence S, tags) on the test set in dataset order, and what was learnt."""

    paths = {str(Path(p).resolve()): p for p in keywords}
    fit_ids = set(loc[0] for loc in fit_locations)
    stored = library.store.paths([loc[0] for loc in fit_locations])
    labelled = {
        i: keywords[paths[str(Path(p).resolve())]]
        for i, p in stored.items()
        if i in fit_ids and str(Path(p).resolve()) in paths
    }
    rows = complete_rows(labelled, names)
    locations = [loc for loc in fit_locations if loc[0] in rows]
    learnt = learn_labels(
        library.vectors, classifier, T, locations, rows, fit_locations,
        folder=library.tagger.scores_dir,
    )  # fmt: skip
    learnt_classifier = with_learnt(classifier, learnt, T)
    ids, raw = score_methods(library, test_locations, learnt_classifier, T)
    scores = _in_order(raw, ids, order, len(names))
    decisions = open_decisions(
        scores["pvcl"], scores["piaa"], scores[SUPPORT], classifier.params["support"]
    )
    decisions = learnt_decisions(decisions, learnt)
    S, present = decisions.apply(scores["pvcl"], scores["piaa"], scores[SUPPORT])
    assert S is not None
    info = summary(learnt, names)
    info["labelled_images"] = len(locations)
    return S, present, info


def by_frequency(
    per_class: dict[str, dict[str, float | None]],
    fit_set: Dataset,
    held: np.ndarray,
    names: list[str],
) -> dict[str, Any]:
    """mAP of each method over head / medium / tail labels: the test set's labels in thirds by
    how many fit images hold them (VOC-LT / COCO-LT report the same split)."""
    counts = np.asarray(fit_set.targets(), bool).sum(axis=0)
    labels = [c for c in np.argsort(-counts, kind="stable") if held[c]]
    k = len(labels)
    groups = {
        "head": labels[: round(k / 3)],
        "medium": labels[round(k / 3) : round(2 * k / 3)],
        "tail": labels[round(2 * k / 3) :],
    }
    out: dict[str, Any] = {
        "groups": {g: {names[c]: int(counts[c]) for c in cols} for g, cols in groups.items()}
    }
    for method, aps in per_class.items():
        row = {}
        for g, cols in groups.items():
            vals = [float(v) for c in cols if (v := aps[names[c]]) is not None]
            row[g] = round(float(np.mean(vals)), 2) if vals else None
        out[method] = row
    return out


def _fit_and_tag(
    library: Library,
    labels: list[str],
    fit_locations: list[tuple[int, int, int]],
    test_locations: list[tuple[int, int, int]],
    order: list[int],
    bank_size: int | None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The product on `labels` alone: fit, score the test set, decide. (S, tags, statuses),
    dataset order."""
    vocab = library.set_vocabulary(labels)
    classifier, T, _ = library.fit_classifier(vocab, fit_locations, False, bank_size)
    ids, raw = score_methods(library, test_locations, classifier, T)
    scores = _in_order(raw, ids, order, len(labels))
    decisions, S, tags = product_tags(scores, classifier.params["support"])
    return S, tags, [r["status"] for r in decisions.status]


def open_world_protocol(
    library: Library,
    test: Dataset,
    fit_set: Dataset,
    full_run: dict[str, Any],
    vocab_size: int,
    draws: int,
    seed: int,
    bank_size: int | None = None,
) -> dict[str, Any]:
    """Users name a few labels in a library of everything. Per draw, `vocab_size` random labels
    of the class list: mAP and OP/OR/OF1 of those labels fitted alone, against the same labels
    under the full vocabulary. Stability: for `draws` random labels, the full vocabulary less
    that one label; how many of the other labels' tags change."""
    C = len(test.classes)
    if not 1 <= vocab_size <= C:
        raise ValueError(f"--vocab-size must be between 1 and {C}, not {vocab_size}")
    rng = np.random.default_rng(seed)
    targets = np.asarray(test.targets(), dtype=bool)
    fit_locations, _ = _locations_for(library, fit_set)
    test_locations, order = _locations_for(library, test)
    rows = []
    for _ in range(draws):
        cols = sorted(int(c) for c in rng.choice(C, vocab_size, replace=False))
        S, tags, status = _fit_and_tag(
            library, [test.classes[c] for c in cols], fit_locations, test_locations, order,
            bank_size,
        )  # fmt: skip
        y = targets[:, cols]
        held = y.any(axis=0)
        alone = f1_scores(tags[:, held], y[:, held])
        full = f1_scores(full_run["tags"][:, cols][:, held], y[:, held])
        rows.append(
            {
                "labels": [test.classes[c] for c in cols],
                "mAP": round(float(mean_average_precision(S, y)[0]), 2),
                "mAP_full": round(float(mean_average_precision(full_run["S"][:, cols], y)[0]), 2),
                **{k: round(alone[k], 2) for k in ("OP", "OR", "OF1")},
                **{f"{k}_full": round(full[k], 2) for k in ("OP", "OR", "OF1")},
                # Labels whose held / weak / absent status differs from the full run's: the
                # one decision that reads the pooled matching level (decisions.bank_support).
                "status_changed": sum(
                    s != full_run["status"][c] for s, c in zip(status, cols, strict=True)
                ),
            }
        )
    removed = []
    for c in sorted(int(c) for c in rng.choice(C, min(draws, C), replace=False)):
        keep = [k for k in range(C) if k != c]
        _, tags, status = _fit_and_tag(
            library, [test.classes[k] for k in keep], fit_locations, test_locations, order,
            bank_size,
        )  # fmt: skip
        before = full_run["tags"][:, keep]
        removed.append(
            {
                "removed": test.classes[c],
                "tags_changed": int((tags != before).sum()),
                "tags_before": int(before.sum()),
                "changed_percent": round(
                    100.0 * float((tags != before).sum()) / max(1, before.sum()), 3
                ),
                "status_changed": sum(
                    s != full_run["status"][k] for s, k in zip(status, keep, strict=True)
                ),
            }
        )
    library.set_vocabulary(test.classes)
    mean = {
        k: round(float(np.mean([r[k] for r in rows])), 2)
        for k in ("mAP", "mAP_full", "OP", "OP_full", "OR", "OR_full", "OF1", "OF1_full")
    }
    return {"vocab_size": vocab_size, "draws": rows, "mean": mean, "removal": removed}


def format_table(report: dict[str, Any]) -> str:
    """The ablation as a Markdown table (absent-label columns when the test set has any)."""
    n_absent = len(report["dataset"].get("absent_labels", []))
    methods = [m for m in report["results"]]
    if not n_absent:
        lines = ["| method | mAP | CF1 | OF1 |", "|---|---:|---:|---:|"]
        for method in methods:
            r = report["results"][method]
            lines.append(f"| {method} | {r['mAP']:.1f} | {r['CF1']:.1f} | {r['OF1']:.1f} |")
        return "\n".join(lines) + _frequency_table(report) + _open_world_table(report)
    lines = [
        "| method | mAP | CF1 | OF1 | OP | OR | false tags on absent labels | absent labels tagging |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in methods:
        r = report["results"][method]
        lines.append(
            f"| {method} | {r['mAP']:.1f} | {r['CF1']:.1f} | {r['OF1']:.1f} | {r['OP']:.1f} | "
            f"{r['OR']:.1f} | {r['absent_false_tag_rate']:.2f} % | "
            f"{r['absent_labels_tagging']} of {n_absent} |"
        )
    return "\n".join(lines) + _frequency_table(report) + _open_world_table(report)


def _frequency_table(report: dict[str, Any]) -> str:
    """mAP over head / medium / tail labels (by fit-set frequency), when keywords were given."""
    freq = report.get("by_frequency")
    if not freq or "learning" not in report:
        return ""
    groups = freq["groups"]
    lines = [
        "",
        "",
        "| method | mAP head | mAP medium | mAP tail |",
        "|---|---:|---:|---:|",
    ]
    for method in ("cls", "pvcl", "piaa", "learned"):
        row = freq.get(method)
        if row:
            cells = " | ".join("—" if row[g] is None else f"{row[g]:.1f}" for g in groups)
            lines.append(f"| {method} | {cells} |")
    learning = report["learning"]
    lines += [
        "",
        f"learned from the keywords of {learning['labelled_images']} fit images in "
        f"{learning['seconds']} s; labels using what was learnt: "
        + (
            ", ".join(learning["learnt"])
            or "none (the training-free score won on held-out keywords)"
        ),
    ]
    return "\n".join(lines)


def _open_world_table(report: dict[str, Any]) -> str:
    """The open-world protocol's tables, when it ran."""
    ow = report.get("open_world")
    if not ow:
        return ""
    k = ow["vocab_size"]
    lines = [
        "",
        "",
        f"| {k} random labels | mAP | mAP (full vocabulary) | OP | OR | OF1 | OF1 (full) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in [*ow["draws"], {**ow["mean"], "labels": ["mean"]}]:
        lines.append(
            f"| {', '.join(r['labels'])} | {r['mAP']:.1f} | {r['mAP_full']:.1f} | {r['OP']:.1f} | "
            f"{r['OR']:.1f} | {r['OF1']:.1f} | {r['OF1_full']:.1f} |"
        )
    lines += ["", "| label removed | other labels' tags changed |", "|---|---:|"]
    for r in ow["removal"]:
        lines.append(
            f"| {r['removed']} | {r['tags_changed']} of {r['tags_before']} "
            f"({r['changed_percent']:.2f} %) |"
        )
    return "\n".join(lines)
