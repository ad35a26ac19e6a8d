"""Open-vocabulary text search: precision@20 per vocabulary, and ties in the top 20.

Generates ShapesWorld scenes, indexes them with the shipped model through `Library`, and runs
`Library.text_search` for every class name as the phrase, with no vocabulary, the VOC preset and
the ShapesWorld classes set. A result is relevant when the scene holds that class. Prints mean
precision@20 per vocabulary and the number of tied scores inside the top 20:

    python benchmarks/bench_text_search.py --images 200 --seed 21
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--model", default="shapesworld")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from piaa_index.eval.datasets import load_dataset
    from piaa_index.library.core import Library
    from piaa_index.library.presets import preset_classes
    from piaa_index.shapes.dataset import generate_dataset
    from piaa_index.shapes.world import CLASSES

    work = args.workdir or Path(tempfile.mkdtemp(prefix="piaa-text-"))
    data = work / "scenes"
    if not (data / "labels.txt").exists():
        generate_dataset(data, args.images, seed=args.seed, progress=False)
    ds = load_dataset(data)
    truth = {str(item.path): item.labels for item in ds.items}
    home = work / "home"
    vocabularies: list[tuple[str, list[str] | None]] = [
        ("none", None),
        ("voc", preset_classes("voc")),
        ("shapesworld", list(CLASSES)),
    ]
    print(f"{'vocabulary':<12} {'P@20':>6} {'min':>5} {'ties in top 20':>15}")
    with Library.open(home=home, db=f"sqlite:///{home / 'piaa.sqlite3'}", model=args.model) as lib:
        lib.index([str(item.path) for item in ds.items])
        for name, labels in vocabularies:
            if labels is not None:
                lib.set_vocabulary(labels)
            precisions, ties = [], 0
            for c, phrase in enumerate(CLASSES):
                hits = lib.text_search(phrase, limit=20)
                rel = [c in truth[h["path"]] for h in hits]
                precisions.append(sum(rel) / max(1, len(rel)))
                scores = [h["score"] for h in hits]
                ties += len(scores) - len(set(scores))
            mean = 100 * sum(precisions) / len(precisions)
            print(f"{name:<12} {mean:>6.1f} {100 * min(precisions):>5.0f} {ties:>15d}")


if __name__ == "__main__":
    main()
