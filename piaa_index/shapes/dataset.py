"""Write a ShapesWorld dataset folder in the project's own layout (see docs/architecture.md)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from piaa_index.shapes.world import CLASSES, render_scene


def generate_dataset(
    outdir: Path,
    n_images: int,
    seed: int,
    size: int = 224,
    fmt: str = "jpg",
    progress: bool = True,
    classes_allowed: Sequence[int] | None = None,
) -> Path:
    """Render n_images scenes into outdir/images/, plus classes.json and labels.txt; return outdir.

    classes.json always lists the whole world's 24 classes (the vocabulary); with
    `classes_allowed` only those classes appear in the scenes, so the others are absent labels
    (the open-vocabulary protocol of `piaa eval`).
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("jpg", "jpeg", "png"):
        raise ValueError(f"fmt must be 'jpg' or 'png', not {fmt!r}")
    ext = "jpg" if fmt == "jpeg" else fmt
    outdir = Path(outdir)
    (outdir / "images").mkdir(parents=True, exist_ok=True)
    (outdir / "classes.json").write_text(json.dumps(CLASSES, indent=1) + "\n")
    lines = []
    for i in range(n_images):
        # One generator per image: image i is the same whatever n_images is.
        rng = np.random.default_rng([seed, i])
        scene = render_scene(rng, size, classes_allowed)
        rel = f"images/{i:05d}.{ext}"
        if ext == "jpg":
            scene.image.save(outdir / rel, quality=92)
        else:
            scene.image.save(outdir / rel)
        lines.append(" ".join([rel, *map(str, scene.labels)]))
        if progress and (i + 1) % 500 == 0:
            print(f"{i + 1}/{n_images} images", file=sys.stderr, flush=True)
    (outdir / "labels.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    return outdir
