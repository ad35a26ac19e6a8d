"""Decode time of a 12 MP photo per format, full size vs the reduced decode the indexer uses.

Writes a 4032x3024 scene as JPEG, JPEG 2000, as HEIC with the thumbnail phones embed (and without), and
as a DNG with and without an embedded JPEG preview, then times `load_image` (median of
--repeats) at full size and with `draft_size` = the model's input (224 for ViT-B/16):

    python benchmarks/bench_decode.py --workdir /tmp/bench-decode

Writing the HEIC files takes a minute or two (x265 encoding); they are kept in --workdir.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def scene(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def write_files(workdir: Path, width: int, height: int) -> dict[str, Path]:
    import pillow_heif

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.dng_files import write_dng

    pillow_heif.register_heif_opener()
    workdir.mkdir(parents=True, exist_ok=True)
    img = scene(width, height)
    files = {
        "jpeg": workdir / "photo.jpg",
        "jpeg 2000": workdir / "photo.jp2",
        "heic (thumbnail 320)": workdir / "photo_thumb.heic",
        "heic (no thumbnail)": workdir / "photo.heic",
        "dng (jpeg preview)": workdir / "photo_preview.dng",
        "dng (mosaic only)": workdir / "photo.dng",
    }
    if not files["jpeg"].exists():
        img.save(files["jpeg"], quality=90)
    if not files["jpeg 2000"].exists():
        img.save(files["jpeg 2000"])
    if not files["heic (thumbnail 320)"].exists():
        img.save(files["heic (thumbnail 320)"], quality=80, thumbnails=[320])
    if not files["heic (no thumbnail)"].exists():
        img.save(files["heic (no thumbnail)"], quality=80, thumbnails=[])
    if not files["dng (jpeg preview)"].exists():
        write_dng(files["dng (jpeg preview)"], img, preview=img.resize((1616, 1080)))
    if not files["dng (mosaic only)"].exists():
        write_dng(files["dng (mosaic only)"], img)
    return files


def timed(path: Path, draft: int | None, repeats: int) -> tuple[float, tuple[int, int]]:
    from piaa_index.ingest.images import load_image

    times, size = [], (0, 0)
    for _ in range(repeats):
        start = time.perf_counter()
        size = load_image(path, draft_size=draft).size
        times.append(time.perf_counter() - start)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/piaa-bench-decode"))
    parser.add_argument("--width", type=int, default=4032)
    parser.add_argument("--height", type=int, default=3024)
    parser.add_argument("--draft", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    files = write_files(args.workdir, args.width, args.height)
    print(f"{'file':24} {'full s':>8} {'full size':>11} {'draft s':>8} {'draft size':>11}")
    for name, path in files.items():
        full, full_size = timed(path, None, args.repeats)
        small, small_size = timed(path, args.draft, args.repeats)
        full_wh, small_wh = "x".join(map(str, full_size)), "x".join(map(str, small_size))
        print(f"{name:24} {full:8.3f} {full_wh:>11} {small:8.3f} {small_wh:>11}")


if __name__ == "__main__":
    main()
