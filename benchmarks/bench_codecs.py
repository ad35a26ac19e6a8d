"""Patch-vector codecs: bytes per image vs accuracy lost (fp32 / fp16 / sq8 / sq4 / pq4 / opq4).

Generates a ShapesWorld test split and an unlabelled fit split, runs the ablation once per
codec (each in its own index) with the shipped model, and prints a table:

    python benchmarks/bench_codecs.py --images 1000 --fit-images 1000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--fit-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model", default="shapesworld")
    parser.add_argument("--codecs", default="fp32,fp16,sq8,sq4,pq4,opq4")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from piaa_index.eval.ablation import run_ablation
    from piaa_index.eval.datasets import load_dataset
    from piaa_index.library.core import Library
    from piaa_index.shapes.dataset import generate_dataset

    work = args.workdir or Path(tempfile.mkdtemp(prefix="piaa-codecs-"))
    test_dir, fit_dir = work / "test", work / "fit"
    if not (test_dir / "labels.txt").exists():
        generate_dataset(test_dir, args.images, seed=args.seed, progress=False)
    if not (fit_dir / "labels.txt").exists():
        generate_dataset(fit_dir, args.fit_images, seed=args.seed + 1, progress=False)
    test, fit = load_dataset(test_dir), load_dataset(fit_dir)

    print(
        f"{'codec':<6} {'bytes/img':>10} {'index s':>8} "
        + " ".join(f"{m + ' mAP':>14}" for m in ("cls", "patch-text", "pvcl", "piaa"))
    )
    for codec in args.codecs.split(","):
        os.environ["PIAA_VECTOR_CODEC"] = codec
        home = work / f"home-{codec}"
        started = time.perf_counter()
        with Library.open(
            home=home, db=f"sqlite:///{home / 'piaa.sqlite3'}", model=args.model
        ) as lib:
            report = run_ablation(lib, test, fit)
            per_image = lib.vectors.disk_bytes() / max(1, len(test.items) + len(fit.items))
        seconds = time.perf_counter() - started
        r = report["results"]
        print(
            f"{codec:<6} {per_image:>10.0f} {seconds:>8.1f} "
            + " ".join(f"{r[m]['mAP']:>14.2f}" for m in ("cls", "patch-text", "pvcl", "piaa"))
        )


if __name__ == "__main__":
    main()
