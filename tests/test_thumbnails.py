"""Thumbnails: EXIF-upright JPEGs of indexed images by id, cached on disk by content hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from piaa_index.errors import NotFoundError, UserInputError
from piaa_index.library.core import Library
from piaa_index.library.thumbnails import SIZES, Thumbnails

ORIENTATION = 0x0112


def _rotated_jpeg(path: Path) -> None:
    """A 160x80 JPEG, red left half, blue right half, whose EXIF says "rotate 90° CW" (6)."""
    arr = np.zeros((80, 160, 3), np.uint8)
    arr[:, :80] = (220, 20, 20)
    arr[:, 80:] = (20, 20, 220)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(arr).save(path, quality=95, exif=exif)


@pytest.fixture(scope="module")
def library(tiny_model_config: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("thumbs")
    photos = base / "photos"
    photos.mkdir()
    _rotated_jpeg(photos / "rotated.jpg")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(
            photos / f"plain_{i}.png"
        )
    lib = Library.open(
        home=base / "home", model=str(tiny_model_config), pretrained="none", device="cpu"
    )
    lib.index([photos])
    yield lib, photos
    lib.close()


def test_exif_orientation_is_honoured(library):
    lib, photos = library
    source = photos / "rotated.jpg"
    thumb = Thumbnails(lib.store, lib.settings.layout.thumbnails).get(lib.image_id(source), 128)
    got = Image.open(thumb.path)
    assert got.format == "JPEG"
    assert got.size == (64, 128)  # stored landscape 160x80, shown portrait
    upright = ImageOps.exif_transpose(Image.open(source)).convert("RGB").resize((64, 128))
    a, b = np.asarray(got, np.float64), np.asarray(upright, np.float64)
    # Top is red and bottom blue (the stored left half is turned to the top).
    assert a[:50].mean(axis=(0, 1))[0] > 150 and a[-50:].mean(axis=(0, 1))[2] > 150
    assert np.abs(a - b).mean() < 8


def test_sizes_and_cache(library):
    lib, photos = library
    image_id = lib.image_id(photos / "plain_0.png")
    thumbs = Thumbnails(lib.store, lib.settings.layout.thumbnails)
    for size in SIZES:
        t = thumbs.get(image_id, size)
        w, h = Image.open(t.path).size
        assert max(w, h) == min(size, 120)  # never upscaled
        assert t.etag == f'"{t.content_hash}-{size}"'
        assert t.path.parent.parent == lib.settings.home / "thumbnails"
    first = thumbs.get(image_id, 256)
    # A cache hit does not touch the file: replace its bytes and get them back unchanged.
    cached = b"\xff\xd8cached\xff\xd9"
    first.path.write_bytes(cached)
    again = Thumbnails(lib.store, lib.settings.layout.thumbnails).get(image_id, 256)
    assert again.path == first.path and again.path.read_bytes() == cached
    # Written without fsync: after a power cut one can be empty or cut short; made again.
    whole = thumbs.get(image_id, 512).path.read_bytes()
    for damaged in (b"", whole[: len(whole) // 2]):
        first.path.write_bytes(damaged)
        made = Thumbnails(lib.store, lib.settings.layout.thumbnails).get(image_id, 256)
        assert made.path == first.path
        with Image.open(made.path) as img:
            img.load()  # decodes to the end
            assert max(img.size) == 120
    first.path.unlink()
    assert (
        Thumbnails(lib.store, lib.settings.layout.thumbnails)
        .get(image_id, 256)
        .path.read_bytes()[:2]
        == b"\xff\xd8"
    )
    # Atomic writes leave no temp files behind.
    leftovers = [
        p for p in (lib.settings.home / "thumbnails").rglob("*") if p.name.startswith(".tmp")
    ]
    assert leftovers == []


def test_unknown_id_bad_size_and_vanished_file(library, tmp_path):
    lib, photos = library
    thumbs = Thumbnails(lib.store, lib.settings.layout.thumbnails)
    with pytest.raises(NotFoundError, match="no indexed image with id 4242"):
        thumbs.get(4242)
    with pytest.raises(UserInputError, match="128, 256, 512"):
        thumbs.get(lib.image_id(photos / "plain_1.png"), 400)
    gone = photos / "plain_2.png"
    gone_id = lib.image_id(gone)
    moved = tmp_path / "elsewhere.png"
    gone.rename(moved)
    try:
        with pytest.raises(NotFoundError, match="cannot be read now"):
            thumbs.get(gone_id, 128)
    finally:
        moved.rename(gone)


def test_concurrent_first_requests_agree(library):
    """Eight threads asking for the same new thumbnail at once (as a gallery page does) all get
    a whole JPEG, and the cache holds one file and no temp files."""
    import threading

    lib, photos = library
    image_id = lib.image_id(photos / "plain_1.png")
    thumbs = Thumbnails(lib.store, lib.settings.layout.thumbnails)
    target = thumbs.locate(image_id, 512)[0].path
    target.unlink(missing_ok=True)
    got: list[bytes] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker() -> None:
        try:
            start.wait()
            got.append(thumbs.make(*thumbs.locate(image_id, 512)).path.read_bytes())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(got) == 8
    assert all(b[:2] == b"\xff\xd8" and b[-2:] == b"\xff\xd9" for b in got)
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".tmp")] == []
