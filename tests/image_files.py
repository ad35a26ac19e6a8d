"""A realistic photo folder for indexing tests: nested folders, JPEG/PNG/HEIC, EXIF rotations,
a non-ASCII name, and two broken files (a text file named .jpg and an empty .png)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ORIENTATION = 0x0112
UNICODE_NAME = "Zürich_café_東京.jpg"
SUBFOLDERS = ("", "2023", "2023/summer", "2024/trip/day 1", "2024/trip/day 2", "scans")


@dataclass
class PhotoFolder:
    """What `make_photo_folder` wrote; every path is absolute and resolved."""

    root: Path
    good: list[Path] = field(default_factory=list)  # decodable images, sorted
    broken: dict[Path, str] = field(default_factory=dict)  # path -> why it cannot decode
    rotated: dict[Path, tuple[int, int]] = field(default_factory=dict)  # path -> stored (w, h)
    heic: Path | None = None
    unicode: Path | None = None

    @property
    def n_good(self) -> int:
        return len(self.good)


def shapes_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random background with 2-4 random coloured circles/rectangles (distinct per seed)."""
    w, h = size
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
        x1, y1 = x0 + int(rng.integers(12, w // 2 + 12)), y0 + int(rng.integers(12, h // 2 + 12))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    # A little noise so that two images never share bytes, even with equal shapes.
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def save_heic(img: Image.Image, path: Path) -> None:
    import pillow_heif

    pillow_heif.from_pillow(img).save(str(path), quality=90)


def make_photo_folder(root: str | os.PathLike[str], n: int = 60, seed: int = 0) -> PhotoFolder:
    """Write `n` decodable images (JPEG, PNG, one HEIC, two EXIF-rotated JPEGs, one with a
    non-ASCII name) in nested folders under `root`, plus `notes.jpg` (text) and `empty.png`."""
    if n < 6:
        raise ValueError("need n >= 6 for the special files")
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    base = base.resolve()
    for sub in SUBFOLDERS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    folder = PhotoFolder(root=base)

    def size() -> tuple[int, int]:
        return int(rng.integers(64, 97)), int(rng.integers(64, 97))

    # Two sideways JPEGs: stored landscape (w > h), displayed portrait after EXIF rotation.
    for k, orientation in enumerate((6, 8)):
        path = base / "2023/summer" / f"rotated_{orientation}.jpg"
        stored = (96, 64 + 4 * k)
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        shapes_image(rng, stored).save(path, quality=90, exif=exif)
        folder.rotated[path] = stored
        folder.good.append(path)

    folder.heic = base / "2024/trip/day 1" / "iphone.heic"
    save_heic(shapes_image(rng, size()), folder.heic)
    folder.good.append(folder.heic)

    folder.unicode = base / "2024/trip/day 2" / UNICODE_NAME
    shapes_image(rng, size()).save(folder.unicode, quality=90)
    folder.good.append(folder.unicode)

    i = 0
    while len(folder.good) < n:
        sub = SUBFOLDERS[i % len(SUBFOLDERS)]
        ext = ".png" if i % 3 == 0 else ".jpg"
        path = base / sub / f"img_{i:03d}{ext}"
        img = shapes_image(rng, size())
        if ext == ".png":
            img.save(path)
        else:
            img.save(path, quality=90)
        folder.good.append(path)
        i += 1

    notes = base / "scans" / "notes.jpg"
    notes.write_text("shopping list: milk, eggs\n", encoding="utf-8")
    empty = base / "2023" / "empty.png"
    empty.write_bytes(b"")
    folder.broken = {notes: "cannot identify image file", empty: "file is empty"}
    # Not images: must be ignored by the scanner, not reported as failures.
    (base / "scans" / "README.txt").write_text("not an image\n", encoding="utf-8")
    (base / ".hidden.jpg").write_bytes(b"hidden files are skipped")
    folder.good.sort()
    return folder


def rewrite_with_new_pixels(path: Path, seed: int) -> None:
    """Overwrite an image with different pixels (same format), with a later mtime."""
    old = os.stat(path)
    img = shapes_image(np.random.default_rng(10_000 + seed), (80, 72))
    if path.suffix.lower() == ".heic":
        save_heic(img, path)
    elif path.suffix.lower() == ".png":
        img.save(path)
    else:
        img.save(path, quality=90)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 5_000_000_000))


def copy_photo_folder(folder: PhotoFolder, dest: str | os.PathLike[str]) -> PhotoFolder:
    """A copy of a folder made by `make_photo_folder` (mtimes kept), with paths remapped."""
    import shutil

    target = Path(dest).resolve()
    shutil.copytree(folder.root, target, copy_function=shutil.copy2)

    def move(p: Path) -> Path:
        return target / p.relative_to(folder.root)

    return PhotoFolder(
        root=target,
        good=[move(p) for p in folder.good],
        broken={move(p): why for p, why in folder.broken.items()},
        rotated={move(p): size for p, size in folder.rotated.items()},
        heic=move(folder.heic) if folder.heic else None,
        unicode=move(folder.unicode) if folder.unicode else None,
    )
