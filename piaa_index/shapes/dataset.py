"""Write a ShapesWorld dataset folder in the project's own layout (see docs/architecture.md)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from piaa_index.shapes.world import (
    CLASSES,
    NOVEL,
    long_tail_order,
    long_tail_weights,
    render_scene,
)


def generate_dataset(
    outdir: Path,
    n_images: int,
    seed: int,
    size: int = 224,
    fmt: str = "jpg",
    progress: bool = True,
    classes_allowed: Sequence[int] | None = None,
    long_tail: float | None = None,
    novel: int = 0,
) -> Path:
    """Render n_images scenes into outdir/images/, plus classes.json and labels.txt; return outdir.

    classes.json always lists the whole world's 24 classes (the vocabulary); with
    `classes_allowed` only those classes appear in the scenes, so the others are absent labels
    (the open-vocabulary protocol of `piaa eval`).

    `long_tail=RATIO` (>= 1) draws the classes with weights RATIO**(-rank/(C-1)) along a
    permutation of the (held) classes drawn from the seed (`long_tail_order`), so per-class image
    counts fall from head to tail by about RATIO; outdir/long_tail.json records
    {"ratio", "order": [names head..tail], "counts": {name: images holding it}}.

    `novel=K` appends the novel kinds novel-1..novel-K to classes.json (ids 24, 25, ...) and adds
    each to a scene with probability NOVEL_P. Defaults write exactly today's scenes.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("jpg", "jpeg", "png"):
        raise ValueError(f"fmt must be 'jpg' or 'png', not {fmt!r}")
    if not 0 <= novel <= len(NOVEL):
        raise ValueError(f"novel must be 0..{len(NOVEL)}, not {novel}")
    ext = "jpg" if fmt == "jpeg" else fmt
    order: list[int] = []
    weights = None
    if long_tail is not None:
        order = long_tail_order(seed, classes_allowed)
        weights = long_tail_weights(order, long_tail)
    outdir = Path(outdir)
    (outdir / "images").mkdir(parents=True, exist_ok=True)
    names = CLASSES + NOVEL[:novel]
    (outdir / "classes.json").write_text(json.dumps(names, indent=1) + "\n")
    lines = []
    counts = np.zeros(len(names), dtype=np.int64)
    for i in range(n_images):
        # One generator per image: image i is the same whatever n_images is.
        rng = np.random.default_rng([seed, i])
        scene = render_scene(rng, size, classes_allowed, weights=weights, novel=novel)
        rel = f"images/{i:05d}.{ext}"
        if ext == "jpg":
            scene.image.save(outdir / rel, quality=92)
        else:
            scene.image.save(outdir / rel)
        lines.append(" ".join([rel, *map(str, scene.labels)]))
        counts[scene.labels] += 1
        if progress and (i + 1) % 500 == 0:
            print(f"{i + 1}/{n_images} images", file=sys.stderr, flush=True)
    (outdir / "labels.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    if long_tail is not None:
        info = {
            "ratio": float(long_tail),
            "order": [CLASSES[c] for c in order],
            "counts": {CLASSES[c]: int(counts[c]) for c in order},
        }
        (outdir / "long_tail.json").write_text(json.dumps(info, indent=1) + "\n")
    else:  # a stale file from an earlier long-tail run would describe other scenes
        (outdir / "long_tail.json").unlink(missing_ok=True)
    return outdir
