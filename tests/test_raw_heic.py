"""Camera RAW through LibRaw (embedded JPEG or bitmap preview, else a half-size demosaic; the
RAW's orientation applied) and HEIC from its embedded thumbnail, on files written here; and a
folder of every common format indexed end to end with the shipped shapesworld model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image

from piaa_index.ingest.images import RAW_EXTENSIONS, ImageDecodeError, load_image
from piaa_index.ingest.scan import scan
from tests.dng_files import write_dng

pillow_heif.register_heif_opener()  # the tests write HEIC through Pillow
RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def scene(width: int = 320, height: int = 240) -> Image.Image:
    """Left half red, right half blue, a green band along the top: orientation is visible."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = RED
    arr[:, width // 2 :] = BLUE
    arr[: height // 5] = GREEN
    return Image.fromarray(arr)


def hue(px: tuple[int, ...]) -> str:
    return "rgb"[int(np.argmax(px[:3]))]


def test_raw_extensions_cover_the_common_cameras() -> None:
    names = ".NEF .CR2 .CR3 .ARW .DNG .RAF .ORF .RW2 .PEF .SRW".lower().split()
    assert set(names) <= RAW_EXTENSIONS


def test_dng_with_a_jpeg_preview_decodes_the_preview_at_reduced_size(tmp_path: Path) -> None:
    """A camera's embedded JPEG, decoded in draft mode, turned upright by the RAW's tag (6)."""
    big = scene(640, 480)
    path = write_dng(tmp_path / "IMG_0001.DNG", big, preview=big, orientation=6)

    img = load_image(path, draft_size=96)

    # 480x640 JPEG, draft to 1/2 (short side 240 >= 96, 1/4 would be 120 >= 96 too: Pillow
    # keeps the scale whose size is still >= the request on both sides), then rotated.
    assert img.mode == "RGB" and min(img.size) >= 96 and img.width < img.height
    assert img.size[0] < 240  # decoded smaller than the preview, never the mosaic
    assert img.info["original_size"] == (480, 640)  # upright size of the RAW itself
    assert img.info["exif_orientation"] == 6
    # Rotated clockwise: the green top band is now the right edge, red (left) is on top.
    w, h = img.size
    assert hue(img.getpixel((w - 2, h // 2))) == "g"
    assert hue(img.getpixel((w // 3, 2))) == "r"
    assert hue(img.getpixel((w // 3, h - 3))) == "b"
    assert load_image(path).size == (480, 640)  # no draft size: the whole preview, upright


def test_dng_with_a_small_preview_is_demosaiced_at_half_size(tmp_path: Path) -> None:
    """A preview below the model's input is not used: LibRaw demosaics the mosaic (half size),
    applying the orientation itself; colours survive the camera pipeline."""
    big = scene(640, 480)
    path = write_dng(tmp_path / "small_preview.dng", big, preview=big.resize((80, 60)))

    img = load_image(path, draft_size=96)

    assert img.size == (320, 240)  # half of 640x480
    assert hue(img.getpixel((40, 150))) == "r"
    assert hue(img.getpixel((280, 150))) == "b"
    assert hue(img.getpixel((160, 10))) == "g"


def test_dng_without_preview_and_rotated_180(tmp_path: Path) -> None:
    path = write_dng(tmp_path / "bare.dng", scene(640, 480), orientation=3)
    img = load_image(path, draft_size=96)
    assert img.size == (320, 240)
    assert hue(img.getpixel((40, 150))) == "b"  # left and right swapped
    assert hue(img.getpixel((160, 235))) == "g"  # the top band is at the bottom
    assert img.info["exif_orientation"] == 3


def test_dng_with_a_bitmap_preview_rotated_90_counterclockwise(tmp_path: Path) -> None:
    big = scene(640, 480)
    path = write_dng(tmp_path / "b.dng", big, big.resize((320, 240)), "bitmap", orientation=8)
    img = load_image(path, draft_size=96)
    assert img.size == (240, 320)
    assert hue(img.getpixel((2, 160))) == "g"  # top band -> left edge
    assert hue(img.getpixel((120, 310))) == "r"  # left half -> bottom


def test_broken_raw_is_one_clear_reason(tmp_path: Path) -> None:
    (tmp_path / "IMG_0002.NEF").write_bytes(b"not a raw file" * 20)
    with pytest.raises(ImageDecodeError, match="cannot decode RAW file: Unsupported file format"):
        load_image(tmp_path / "IMG_0002.NEF")


def test_raw_bomb_guard(tmp_path: Path) -> None:
    path = write_dng(tmp_path / "x.dng", scene(640, 480))
    with pytest.raises(ImageDecodeError, match="image too large"):
        load_image(path, max_pixels=100_000)


def test_heic_decodes_its_embedded_thumbnail_when_large_enough(tmp_path: Path) -> None:
    """pillow-heif's draft picks the smallest embedded thumbnail at least the model's input."""
    path = tmp_path / "IMG_0003.HEIC"
    scene(800, 600).save(path, quality=70, thumbnails=[160, 400])
    assert load_image(path, draft_size=96).size == (160, 120)
    assert load_image(path, draft_size=150).size == (400, 300)  # 160x120 is too small
    full = load_image(path)
    assert full.size == (800, 600) and full.info["original_size"] == (800, 600)
    big_enough = load_image(path, draft_size=96)
    assert big_enough.info["original_size"] == (800, 600)
    assert hue(big_enough.getpixel((20, 100))) == "r"


def test_heic_without_thumbnail_is_decoded_then_reduced(tmp_path: Path) -> None:
    path = tmp_path / "plain.heic"
    scene(800, 600).save(path, quality=70)
    assert load_image(path, draft_size=96).size == (267, 200)  # decoded, then box-reduced by 3


def every_format_folder(root: Path) -> dict[str, str]:
    """One photo per format a photographer meets (names -> format), plus a video."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(7)
    made: dict[str, str] = {}

    def photo(seed_shift: int) -> Image.Image:
        arr = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(arr).resize((160, 120), Image.Resampling.BICUBIC)
        return img.rotate(seed_shift)

    for k, (name, kind) in enumerate(
        {
            "a.jpg": "JPEG",
            "b.png": "PNG",
            "c.heic": "HEIF",
            "d.tif": "TIFF",
            "e.webp": "WEBP",
            "f.jp2": "JPEG2000",
            "g.ppm": "PPM",
            "h.pgm": "PGM",
            "i.pbm": "PBM",
        }.items()  # fmt: skip
    ):
        img = photo(k * 7)
        img = img.convert("L") if kind == "PGM" else img.convert("1") if kind == "PBM" else img
        img.save(root / name)
        made[name] = kind
    write_dng(root / "j.dng", photo(70).resize((192, 144)), preview=photo(77).resize((192, 144)))
    made["j.dng"] = "DNG"
    if Image.registered_extensions().get(".avif"):
        photo(80).save(root / "k.avif")
        made["k.avif"] = "AVIF"
    (root / "clip.mp4").write_bytes(b"\0\0\0\x18ftypmp42" + b"\0" * 64)
    return made


def test_a_folder_of_every_format_indexes_them_all_and_names_the_video(
    tmp_path: Path, piaa_home: Path
) -> None:
    """The must-show: JPEG, PNG, HEIC, TIFF, WebP, JP2, PPM/PGM/PBM and a DNG are all indexed
    with the shipped model; the .mp4 is reported as unsupported, by extension."""
    from click.testing import CliRunner

    from piaa_index.cli import cli
    from piaa_index.library.core import Library

    made = every_format_folder(tmp_path / "photos")
    args = ["index", str(tmp_path / "photos"), "--model", "shapesworld", "--device", "cpu"]
    start = time.monotonic()
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    print(f"indexed {len(made)} formats in {time.monotonic() - start:.1f} s")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["indexed"] == len(made), report
    assert report["failed"] == [], report
    assert report["skipped"]["unsupported"] == {".mp4": 1}
    with Library.open(model="shapesworld") as lib:
        status = lib.status()
        assert status["images"]["indexed"] == len(made)
        similar = lib.similar(tmp_path / "photos" / "j.dng", limit=3)
        assert len(similar) == 3
    text = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert "not images (skipped): 1 .mp4" in text.stderr


def test_scan_counts_raw_as_unsupported_without_rawpy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where rawpy cannot be installed, RAW files are named as needing it, not lost."""
    import piaa_index.ingest.scan as scan_module

    write_dng(tmp_path / "a.dng", scene(64, 48))
    (tmp_path / "b.NEF").write_bytes(b"x" * 10)
    monkeypatch.setattr(scan_module, "_raw_ok", lambda: False)
    found = scan([tmp_path])
    assert found.files == []
    assert found.unsupported == {".dng (needs rawpy)": 1, ".nef (needs rawpy)": 1}


@pytest.mark.parametrize(("resolutions", "size"), [(None, (400, 300)), (2, (267, 200))])
def test_jpeg_2000_decodes_only_the_resolution_levels_it_needs(
    tmp_path: Path, resolutions: int | None, size: tuple[int, int]
) -> None:
    """A 1600x1200 JPEG 2000 at draft 96: two levels dropped (400x300, shorter side >= 192);
    a file written with one decomposition level can drop only that one, then box-reduces."""
    path = tmp_path / "scan.jp2"
    options = {} if resolutions is None else {"num_resolutions": resolutions}
    scene(1600, 1200).save(path, **options)
    img = load_image(path, draft_size=96)
    assert img.size == size and img.info["original_size"] == (1600, 1200)
    assert hue(img.getpixel((20, size[1] - 5))) == "r"
    assert load_image(path).size == (1600, 1200)
