"""`piaa teach` on object kinds the shipped model never saw (issue 21): AP of a concept taught
from a few examples, against the same name as a text label, on a fresh test split.

    python benchmarks/bench_teach.py --home /tmp/teach [--examples 10] [--seed 41] [--known 6]

Generates a fit and a test split with `--novel 2` (novel-1 and novel-2, ids 24 and 25),
indexes both in one library with the shipped `shapesworld` model, and for each novel kind:
(1) the vocabulary's 24 classes plus the kind's name as text, fit, AP on the test split;
(2) `teach` from EXAMPLES random fit images that hold it, fit, AP on the test split.
Then the same for --known kinds the model did learn (evenly spread over the 24), each taught
under a name of its own with its text label left out of the vocabulary: what teaching gives
where the model encodes the concept, against the kind's text name.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--images", type=int, default=1000, help="per split")
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=41)
    ap.add_argument("--known", type=int, default=6, help="known kinds taught too")
    args = ap.parse_args()

    from piaa_index.eval.datasets import load_dataset
    from piaa_index.eval.metrics import average_precision
    from piaa_index.library.core import Library
    from piaa_index.library.teaching import teach
    from piaa_index.shapes.dataset import generate_dataset

    root = args.home
    splits = {}
    for name, seed in (("fit", args.seed), ("test", args.seed + 1)):
        folder = root / name
        if not (folder / "labels.txt").is_file():
            generate_dataset(folder, args.images, seed=seed, progress=False, novel=2)
        splits[name] = load_dataset(folder)
    base = splits["fit"].classes[:24]
    library = Library.open(
        home=root / "index", db=f"sqlite:///{root / 'index' / 'piaa.sqlite3'}", model="shapesworld"
    )
    with library:
        for ds in splits.values():
            library.index([str(item.path) for item in ds.items])
        ids = library.store.image_ids_by_path([str(i.path) for i in splits["test"].items])
        test_ids = np.array([ids[str(i.path)] for i in splits["test"].items])
        fit_ids = library.store.image_ids_by_path([str(i.path) for i in splits["fit"].items])
        rng = np.random.default_rng(args.seed)
        rows = []
        known = np.linspace(0, 23, args.known).round().astype(int).tolist() if args.known else []
        for k in (24, 25, *known):
            kind = splits["fit"].classes[k]
            truth = np.array([k in i.labels for i in splits["test"].items])

            def test_ap(label: str, truth: np.ndarray = truth) -> float:
                m = library.tag_matrix([label])
                col = dict(zip(m.image_ids.tolist(), m.scores[:, 0].tolist(), strict=True))
                return float(average_precision(np.array([col[i] for i in test_ids]), truth))

            others = [c for c in base if c != kind]
            library.set_vocabulary([*others, kind])
            library.fit()
            text_ap = test_ap(kind)
            holders = [i for i in splits["fit"].items if k in i.labels]
            pick = rng.choice(len(holders), args.examples, replace=False)
            examples = [fit_ids[str(holders[j].path)] for j in pick]
            label = f"my {kind}"  # a name the text tower never learnt either
            started = time.perf_counter()
            teach(library.store, library.vectors, label, examples)
            library.set_vocabulary([*others, label])
            report = library.fit()
            seconds = time.perf_counter() - started
            rows.append(
                {
                    "kind": kind,
                    "test_positives": int(truth.sum()),
                    "text_name_AP": round(text_ap, 2),
                    "taught_AP": round(test_ap(label), 2),
                    "examples": args.examples,
                    "teach_and_fit_seconds": round(seconds, 1),
                    "status": report.labels[label]["status"],
                    "learning": report.learning.get("labels", {}).get(label),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for group, kinds in (("novel", rows[:2]), ("known", rows[2:])):
            if kinds:
                mean = {
                    f: round(float(np.mean([r[f] for r in kinds])), 2)
                    for f in ("text_name_AP", "taught_AP")
                }
                print(json.dumps({"mean": group, "kinds": len(kinds), **mean}), flush=True)


if __name__ == "__main__":
    main()
