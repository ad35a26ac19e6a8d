"""Thumbnails and evidence maps on camera-sized photos: a ShapesWorld library whose images are
upscaled to WIDTHxHEIGHT JPEGs (EXIF-rotated half of them), indexed with the shipped model and
fitted; then per image: a first thumbnail at each size (decode + resize + atomic write), a
cached one, the evidence grid (Library.evidence) and its PNG overlay. Prints one JSON object of
medians in ms.

    python benchmarks/bench_media.py --images 12 --size 6000x4000 --home /tmp/bench-media
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from PIL import Image

from piaa_index.library.core import Library
from piaa_index.library.evidence import evidence_png
from piaa_index.library.thumbnails import SIZES
from piaa_index.shapes.dataset import generate_dataset


def _ms(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--size", default="6000x4000")
    ap.add_argument("--home", type=Path, default=Path("/tmp/bench-media"))
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    shutil.rmtree(args.home, ignore_errors=True)
    data = generate_dataset(args.home / "scenes", args.images, seed=3, progress=False)
    photos = args.home / "photos"
    photos.mkdir()
    for i, src in enumerate(sorted((data / "images").glob("*.jpg"))):
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 2 else 1
        Image.open(src).resize((w, h)).save(photos / src.name, quality=90, exif=exif)
    with Library.open(home=args.home / "index", model="shapesworld", pretrained="default") as lib:
        t = time.perf_counter()
        lib.index([photos])
        index_s = time.perf_counter() - t
        lib.set_vocabulary(json.loads((data / "classes.json").read_text()))
        lib.fit()
        thumbs = lib.thumbnails
        ids = [lib.image_id(p) for p in sorted(photos.glob("*.jpg"))]
        label = lib.labels()[0]
        cold = {s: [_ms(lambda i=i, s=s: thumbs.get(i, s)) for i in ids] for s in SIZES}
        warm = [_ms(lambda i=i: thumbs.get(i, 256)) for i in ids]
        grids = [_ms(lambda i=i: lib.evidence(i, label)) for i in ids]
        evs = [lib.evidence(i, label) for i in ids]
        pngs = [_ms(lambda e=e: evidence_png(e, 512)) for e in evs]
    out = {
        "images": len(ids),
        "photo": args.size,
        "index_seconds": round(index_s, 2),
        "thumbnail_first_ms": {s: round(statistics.median(v), 1) for s, v in cold.items()},
        "thumbnail_cached_ms": round(statistics.median(warm), 2),
        "evidence_grid_ms": round(statistics.median(grids), 2),
        "evidence_png_512_ms": round(statistics.median(pngs), 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
