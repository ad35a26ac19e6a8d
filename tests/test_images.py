"""Decoding real image files written with Pillow: orientation, modes, HEIC and failures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piaa_index.ingest.images import IMAGE_EXTENSIONS, ImageDecodeError, file_hash, load_image

RED = (255, 0, 0)


def _marked(width: int = 40, height: int = 20) -> Image.Image:
    """A grey image with a red 4x4 marker in its top-left corner."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    img.paste(RED, (0, 0, 4, 4))
    return img


def _is_red(px: tuple[int, ...]) -> bool:
    return px[0] > 200 and px[1] < 60 and px[2] < 60


def test_extensions_are_lowercase_with_dot() -> None:
    assert {".jpg", ".jpeg", ".png", ".heic", ".heif", ".tif", ".gif"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display = rotate 90 degrees clockwise
    _marked(40, 20).save(path, quality=95, exif=exif.tobytes())

    img = load_image(path)

    assert img.mode == "RGB"
    assert img.size == (20, 40)
    # Clockwise rotation moves the stored top-left corner to the displayed top-right.
    assert _is_red(img.getpixel((18, 1)))
    assert not _is_red(img.getpixel((1, 1)))
    assert img.info["exif_orientation"] == 6
    assert img.info["original_size"] == (20, 40)


def test_draft_decodes_jpeg_smaller_and_keeps_original_size(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _marked(800, 400).resize((800, 400)).save(path, quality=95, exif=exif.tobytes())

    img = load_image(path, draft_size=64)

    assert img.size == (100, 200)  # 1/4 scale keeps both sides >= 64; then rotated
    assert img.info["original_size"] == (400, 800)
    assert load_image(path).size == (400, 800)
    png = tmp_path / "big.png"
    _marked(800, 400).save(png)
    # Other formats are box-reduced after decoding, the shorter side kept >= 2 x draft_size.
    small = load_image(png, draft_size=64)
    assert small.size == (267, 134) and small.info["original_size"] == (800, 400)
    assert load_image(png).size == (800, 400)


def test_huge_images_decode_within_memory(tmp_path: Path) -> None:
    """A 16-bit and a palette image of 40 Mpx decode straight to model-sized RGB, upright and
    with their tones (a 16-bit image must not turn white), without full-size float copies."""
    import numpy as np

    grey = np.full((5000, 8000), 30000, np.uint16)
    grey[:, :4000] = 60000  # left half brighter
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the bright half ends up on top
    Image.fromarray(grey).save(tmp_path / "g16.png", exif=exif.tobytes())
    img = load_image(tmp_path / "g16.png", draft_size=224)
    assert img.mode == "RGB" and img.info["original_size"] == (5000, 8000)
    assert 448 <= min(img.size) < 3 * 448 and img.width < img.height
    top, bottom = img.getpixel((img.width // 2, 5)), img.getpixel((img.width // 2, img.height - 5))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert abs(top[0] - 233) <= 2 and abs(bottom[0] - 117) <= 2  # 60000/65535, 30000/65535

    Image.new("P", (8000, 5000), 3).save(tmp_path / "p.png")
    assert min(load_image(tmp_path / "p.png", draft_size=224).size) >= 448


def test_memory_budget_serialises_what_does_not_fit() -> None:
    import threading

    from piaa_index.ingest.images import MemoryBudget

    budget = MemoryBudget(100)
    peak, inside, lock = [0], [0], threading.Lock()

    def work(n: int) -> None:
        alone = n >= budget.limit
        with budget.hold(n):
            with lock:
                inside[0] += budget.limit + 1 if alone else n
                peak[0] = max(peak[0], inside[0])
            threading.Event().wait(0.01)
            with lock:
                inside[0] -= budget.limit + 1 if alone else n

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 500, 30, 30) * 20]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Never above the limit together; an oversized image (counted as limit + 1) runs alone.
    assert peak[0] <= budget.limit + 1
    assert budget.used == 0


def test_plain_jpeg_keeps_size_and_orientation_1(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    _marked(40, 20).save(path, quality=95)
    img = load_image(path)
    assert img.size == (40, 20)
    assert _is_red(img.getpixel((1, 1)))
    assert img.info["exif_orientation"] == 1


def test_png_alpha_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    img = Image.new("RGBA", (8, 8), (0, 0, 255, 0))  # fully transparent blue
    img.putpixel((0, 0), (0, 0, 255, 255))
    img.save(path)

    out = load_image(path)

    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    img = Image.new("P", (6, 6), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    img.putpixel((1, 1), 1)
    img.save(path, transparency=0)

    out = load_image(path)

    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (0, 200, 0)
    assert out.getpixel((4, 4)) == (255, 255, 255)  # transparent index -> white


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    ramp = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(2, axis=0)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")

    out = np.asarray(load_image(path))

    assert out.shape == (2, 4, 3)
    assert list(out[0, :, 0]) == [0, 64, 128, 255]  # Pillow's own convert would give 0, 255, ...


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # red in CMYK
    out = load_image(path)
    assert out.mode == "RGB"
    assert _is_red(out.getpixel((4, 4)))


def test_heic_written_with_pillow_heif(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    path = tmp_path / "photo.heic"
    pillow_heif.from_pillow(_marked(64, 32)).save(path, quality=95)

    out = load_image(path)

    assert out.mode == "RGB"
    assert out.size == (64, 32)
    assert _is_red(out.getpixel((1, 1)))


def test_non_ascii_filename(tmp_path: Path) -> None:
    path = tmp_path / "Ünïcødé 写真 📷.png"
    _marked().save(path)
    assert load_image(path).size == (40, 20)
    assert len(file_hash(path)) == 32


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: eggs, milk\n")
    with pytest.raises(ImageDecodeError, match="cannot identify image file") as info:
        load_image(path)
    assert info.value.path == path


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="file is empty"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    full = tmp_path / f"full.{fmt.lower()}"
    rng = np.random.default_rng(0)  # noise so that the compressed data is long
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageDecodeError, match="truncated image data"):
        load_image(cut)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "gone.jpg")


def test_decompression_bomb_guard(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("L", (200, 100)).save(path)
    with pytest.raises(ImageDecodeError, match="decompression-bomb guard"):
        load_image(path, max_pixels=10_000)
    assert load_image(path, max_pixels=20_000).size == (200, 100)
    assert load_image(path, max_pixels=None).size == (200, 100)


def test_file_hash_matches_blake2b_and_streams(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9000  # > 2 MiB, so several chunks
    path.write_bytes(data)
    assert file_hash(path) == hashlib.blake2b(data, digest_size=16).hexdigest()
    other = tmp_path / "other.bin"
    other.write_bytes(data[:-1] + b"x")
    assert file_hash(other) != file_hash(path)


def test_every_common_photo_format_is_read(tmp_path: Path) -> None:
    """JPEG 2000, the PNM family, TIFF, WebP, AVIF, TGA and QOI are indexed, not skipped (rclip's
    test photos hold .jp2 .pnm .pbm .pgm .ppm); each decodes to upright RGB of its size."""
    from piaa_index.ingest.images import IMAGE_EXTENSIONS
    from piaa_index.ingest.scan import scan

    src = _marked(40, 30)
    formats = {
        "a.jp2": {}, "b.j2k": {}, "c.ppm": {}, "d.pgm": {"mode": "L"}, "e.pbm": {"mode": "1"},
        "f.pnm": {}, "g.tiff": {}, "h.webp": {}, "i.avif": {}, "j.tga": {}, "k.qoi": {},
    }  # fmt: skip
    for name, how in formats.items():
        img = src.convert(how["mode"]) if "mode" in how else src
        img.save(tmp_path / name)
        assert Path(name).suffix in IMAGE_EXTENSIONS
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 32)
    found = scan([tmp_path])
    assert sorted(Path(f.path).name for f in found.files) == sorted(formats)
    assert found.unsupported == {".mp4": 1}
    for f in found.files:
        img = load_image(f.path)
        assert img.mode == "RGB" and img.size == (40, 30), f.path


def _finishes(fn, seconds: float = 20.0):  # type: ignore[no-untyped-def]
    """fn()'s exception (or None), failing the test if fn blocks for `seconds`."""
    import threading

    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (handed back to the test)
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"blocked for {seconds} s"
    return outcome[0]


def test_a_file_replaced_by_a_fifo_after_the_scan_never_blocks(tmp_path: Path) -> None:
    """The scan skips FIFOs, but a file can become one before it is read: a FIFO whose writer
    never writes must be refused at once, by the hash and by the decoder."""
    import os

    from piaa_index.ingest.images import ImageDecodeError, file_hash, load_image

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer that never writes
    try:
        error = _finishes(lambda: file_hash(fifo))
        assert isinstance(error, OSError) and "not a regular file" in str(error)
        error = _finishes(lambda: load_image(fifo))
        assert isinstance(error, ImageDecodeError) and "not a regular file" in error.reason
    finally:
        os.close(writer)


def test_a_file_over_the_size_cap_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import piaa_index.ingest.images as images

    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 100)
    with pytest.raises(images.ImageDecodeError, match="per-file limit"):
        images.load_image(path)
    with pytest.raises(OSError, match="per-file limit"):
        images.file_hash(path)
