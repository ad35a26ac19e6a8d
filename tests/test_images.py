"""Decoding real image files written with Pillow: orientation, modes, HEIC and failures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piaa_index.images import IMAGE_EXTENSIONS, ImageDecodeError, file_hash, load_image

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
    assert load_image(png, draft_size=64).size == (800, 400)  # draft is JPEG-only


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
