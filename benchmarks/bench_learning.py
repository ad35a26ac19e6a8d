"""Time of learning from users' labels on stored vectors (issue 21), synthetic vectors:

    python benchmarks/bench_learning.py [--images 10000] [--geometry shapesworld|vit-b-16]

ShapesWorld geometry: 64 patches x 128 dims; ViT-B/16: 196 x 512. 24 labels, 10 % of images
holding each, every image labelled (the worst case: every label learns and is validated).
Prints the seconds of `learning.learn` (3-fold held-out validation and the final training)
and the peak of the process's memory (the labelled patches wait in a file, as in the library). No image is read: learning works on stored vectors.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

GEOMETRIES = {"shapesworld": (64, 128), "vit-b-16": (196, 512)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="shapesworld")
    ap.add_argument("--labels", type=int, default=24)
    ap.add_argument(
        "--folder", type=Path, default=None, help="where the patches' file goes (default: TMPDIR)"
    )
    args = ap.parse_args()

    import torch

    from piaa_index.method.learning import Examples, learn
    from piaa_index.spill import SpilledArray

    M, d = GEOMETRIES[args.geometry]
    n, C = args.images, args.labels
    rng = np.random.default_rng(0)
    Y = (rng.random((n, C)) < 0.1).astype(np.int8)
    # As the library gives them (keywords.read_examples): float16 in an unnamed file in
    # --folder, made a block at a time so that the benchmark's own data does not set the peak.
    X = SpilledArray((M, d), np.float16, args.folder)
    cls = np.empty((n, d), np.float32)
    for i in range(0, n, 500):
        blk = rng.standard_normal(size=(min(500, n - i), M, d), dtype=np.float32)
        for c in range(C):  # each label's images hold one patch along its own direction
            blk[Y[i : i + 500, c] == 1, c % M, c] += 3.0
        blk = (blk / np.linalg.norm(blk, axis=2, keepdims=True)).astype(np.float16)
        X.append(blk)
        cls[i : i + 500] = blk.astype(np.float32).mean(axis=1)
    ex = Examples(X, np.zeros((n, M), np.float32), cls, Y)
    W0 = (0.1 * rng.normal(size=(C, d))).astype(np.float32)
    T = np.eye(C, d, dtype=np.float32)
    started = time.perf_counter()
    learnt = learn(ex, W0, np.zeros(C, np.float32), T, 1.0)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.geometry}: {n} labelled images x {M} patches x {d} dims, {C} labels: "
        f"{seconds:.1f} s to learn ({int(learnt.chosen.sum())} labels learnt), peak RSS "
        f"{peak:.0f} MB, torch threads {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
