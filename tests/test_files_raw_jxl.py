"""Files that decode to nothing real (issue 22, item 3): stub and truncated RAWs are recorded
failures with their reason, never black or striped frames in the index; what LibRaw prints
goes into the file's record, not the terminal.

The stubs are made the way exiftool's and exiv2's test RAWs are: a DNG written as cameras lay
theirs out (header and IFDs first, pixels after) cut short, as an interrupted copy leaves it or
with its byte counts cut to match (a stub's header: only reading the pixels finds them
missing), one whose mosaic is all zeros, and a RAW-named file holding a bare TIFF header.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piaa_index.ingest.images import ImageDecodeError, load_image
from tests.dng_files import cut_short, mosaic_offset, write_dng

BARE_TIFF = b"II*\0\x08\0\0\0" + struct.pack("<H", 0) + b"\0\0\0\0"  # IFD0 with no entries


def photo(width: int = 640, height: int = 480, seed: int = 3) -> Image.Image:
    """A photo-like scene: smooth random colour fields (no two rows alike)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def truncated(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def zeroed_mosaic(src: Path, dst: Path) -> Path:
    """The same DNG, its header intact and every mosaic byte zero."""
    data = bytearray(src.read_bytes())
    offset, length = mosaic_offset(src)
    data[offset : offset + length] = bytes(length)
    dst.write_bytes(bytes(data))
    return dst


def stub_raws(folder: Path) -> dict[Path, str]:
    """Stub RAWs (path -> a part of the reason each must fail with) beside a good DNG."""
    folder.mkdir(parents=True, exist_ok=True)
    bare = write_dng(folder / "src_bare.dng", photo(), data_last=True)
    small_preview = write_dng(
        folder / "src_small_preview.dng",
        photo(),
        preview=photo(80, 60),
        data_last=True,
    )
    big = write_dng(folder / "src_big.dng", photo(1600, 1200), data_last=True)
    jpeg_preview = write_dng(
        folder / "src_jpeg_preview.dng", photo(), preview=photo(), data_last=True
    )
    stubs = {
        cut_short(bare, folder / "cut_half.dng", 0.5): "RAW file is truncated: its image data",
        cut_short(bare, folder / "stub_half.dng", 0.5, relabel=True): (
            "it ends before its image data (truncated, or a stub) [LibRaw: Unexpected end of file]"
        ),
        cut_short(big, folder / "stub_header_only.dng", 0.01, relabel=True): (
            "too small for its 1600x1200 sensor"
        ),
        cut_short(small_preview, folder / "cut_preview.dng", 0.995): "RAW file is truncated",
        cut_short(jpeg_preview, folder / "stub_preview.dng", 0.995, relabel=True): (
            "embedded preview is unreadable (truncated image data)"
        ),
        zeroed_mosaic(bare, folder / "zeroed.dng"): "blank frame",
        zeroed_mosaic(small_preview, folder / "zeroed_small_preview.dng"): "blank frame",
    }
    for name in ("P1000001.RW2", "DSCF0001.RAF", "IMG_0001.dng"):
        (folder / name).write_bytes(BARE_TIFF)
        stubs[folder / name] = "ends before its image data"
    for src in (bare, small_preview, big, jpeg_preview):
        src.unlink()
    return stubs


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, str]:
    return stub_raws(tmp_path_factory.mktemp("stubs"))


def test_stub_raws_fail_with_a_reason_and_print_nothing(
    stubs: dict[Path, str], capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    for path, reason in stubs.items():
        with pytest.raises(ImageDecodeError, match=re.escape(reason)) as caught:
            load_image(path, draft_size=224)
        assert "Input/output error" not in caught.value.reason, path
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)  # LibRaw's "Unexpected end of file" captured


def test_libraw_messages_end_in_the_reason(tmp_path: Path) -> None:
    """LibRaw prints "<path>: Unexpected end of file" itself; it is the file's record now."""
    whole = write_dng(tmp_path / "whole.dng", photo(), data_last=True)
    path = cut_short(whole, tmp_path / "cut.dng", 0.7, relabel=True)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(path)
    assert caught.value.reason == (
        "cannot decode RAW file: it ends before its image data (truncated, or a stub) "
        "[LibRaw: Unexpected end of file]"
    )


def test_a_truncated_embedded_jpeg_preview_is_a_failure(tmp_path: Path) -> None:
    """Cut short, the file's IFDs say so before LibRaw reads (it would read past the end into
    whatever memory holds, and sometimes "decode" that); cut with its counts, the preview's
    JPEG is short and Pillow says so."""
    whole = write_dng(tmp_path / "whole.dng", photo(), preview=photo(), data_last=True)
    path = cut_short(whole, tmp_path / "cut.dng", 0.995)  # the preview is the last blob
    with pytest.raises(ImageDecodeError, match=r"RAW file is truncated: .* \(0\.5% missing\)"):
        load_image(path, draft_size=224)
    path = cut_short(whole, tmp_path / "stub.dng", 0.995, relabel=True)
    with pytest.raises(ImageDecodeError, match=r"preview is unreadable .*truncated or damaged"):
        load_image(path, draft_size=224)


@pytest.mark.parametrize("preview", [None, "jpeg", "bitmap", "small"])
def test_good_dngs_still_decode(tmp_path: Path, preview: str | None) -> None:
    """The checks refuse no real picture: each kind of DNG, laid out either way."""
    scene = photo()
    for data_last in (False, True):
        kwargs: dict = {"data_last": data_last}
        if preview == "small":
            kwargs.update(preview=scene.resize((80, 60)))
        elif preview:
            kwargs.update(preview=scene, preview_format=preview)
        path = write_dng(tmp_path / f"{preview}_{data_last}.dng", scene, **kwargs)
        img = load_image(path, draft_size=224)
        assert min(img.size) >= 224 and "decoder_messages" not in img.info
        assert np.asarray(img).std() > 20


def test_a_zeroed_mosaic_behind_a_good_preview_is_the_preview(tmp_path: Path) -> None:
    """A camera's own preview is the picture: the mosaic is not read when it is usable."""
    whole = write_dng(tmp_path / "whole.dng", photo(), preview=photo(), data_last=True)
    img = load_image(zeroed_mosaic(whole, tmp_path / "zeroed.dng"), draft_size=224)
    assert np.asarray(img).std() > 20


def test_piaa_index_records_stub_raws_as_failures(
    tmp_path: Path, piaa_home: Path, stubs: dict[Path, str], capfd: pytest.CaptureFixture[str]
) -> None:
    """The must-show: `piaa index` indexes the good DNG and records every stub as failed,
    with its reason; LibRaw's messages reach the report, not the terminal."""
    import shutil

    from click.testing import CliRunner

    from piaa_index.cli import cli
    from piaa_index.library.core import Library

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in stubs:
        shutil.copy(path, folder / path.name)
    write_dng(folder / "good.dng", photo(), preview=photo(), data_last=True)
    capfd.readouterr()
    args = ["index", str(folder), "--model", "shapesworld", "--device", "cpu", "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["indexed"] == 1, report
    failed = {Path(f["path"]).name: f["error"] for f in report["failed"]}
    assert set(failed) == {p.name for p in stubs}, report
    for path, reason in stubs.items():
        assert reason in failed[path.name], failed[path.name]
    assert "LibRaw: Unexpected end of file" in failed["stub_half.dng"]
    _, err = capfd.readouterr()
    assert "Unexpected end of file" not in err and "JPEG" not in err, err
    with Library.open(model="shapesworld") as lib:
        assert lib.status()["images"]["indexed"] == 1


def test_a_thumbnail_of_an_undecodable_raw_says_why(
    tmp_path: Path, tiny_model_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blank RAW indexed before these checks existed: its thumbnail names the file and the
    reason, not "Input/output error" (which reads like a disk fault)."""
    import piaa_index.ingest.images as images
    from piaa_index.errors import NotFoundError
    from piaa_index.library.core import Library

    photos = tmp_path / "photos"
    photos.mkdir()
    whole = write_dng(tmp_path / "whole.dng", photo(), data_last=True)
    zeroed = zeroed_mosaic(whole, photos / "zeroed.dng")
    lib = Library.open(
        home=tmp_path / "home", model=str(tiny_model_config), pretrained="none", device="cpu"
    )
    try:
        with monkeypatch.context() as m:  # as before: a blank frame was indexed
            m.setattr(images, "_reject_blank", lambda *a, **k: None)
            lib.index([photos])
        image_id = lib.image_id(zeroed)
        with pytest.raises(NotFoundError) as caught:
            lib.thumbnail(image_id, 128)
    finally:
        lib.close()
    said = str(caught.value)
    assert f"image {image_id} cannot be shown: cannot decode zeroed.dng: " in said
    assert "RAW decoded to a blank frame" in said and "Input/output" not in said


# --- JPEG XL (imagecodecs: libjxl) ---------------------------------------------------------


def save_jxl(img: Image.Image, path: Path, container: bool = False, **options: object) -> Path:
    import imagecodecs

    arr = np.asarray(img)
    path.write_bytes(imagecodecs.jpegxl_encode(arr, usecontainer=container, **options))
    return path


def _cls_vector(lib: object, path: Path) -> np.ndarray:
    """An indexed image's stored [CLS] embedding."""
    location = lib.store.location(lib.image_id(path))  # type: ignore[attr-defined]
    assert location is not None, path
    shard, row = location
    return lib.vectors.read_shard(shard, [row], with_patches=False).cls[0]  # type: ignore[attr-defined]


def test_the_scan_takes_jpeg_xl(tmp_path: Path) -> None:
    from piaa_index.ingest.scan import scan

    save_jxl(photo(64, 48), tmp_path / "a.JXL")
    found = scan([tmp_path])
    assert [Path(f.path).name for f in found.files] == ["a.JXL"] and not found.unsupported


@pytest.mark.parametrize("container", [False, True])
@pytest.mark.parametrize("size", [(640, 480), (123, 457), (1920, 1080), (64, 64)])
def test_jpeg_xl_size_header_is_read_before_decoding(
    tmp_path: Path, size: tuple[int, int], container: bool
) -> None:
    """The bomb guard needs the size before any pixel: read from the codestream's SizeHeader,
    bare or in its ISO BMFF container."""
    from piaa_index.ingest.images import _jxl_size

    path = save_jxl(photo(*size), tmp_path / "a.jxl", container, effort=1)
    assert _jxl_size(path.read_bytes()) == size
    with pytest.raises(ImageDecodeError, match="decompression-bomb guard"):
        load_image(path, max_pixels=size[0] * size[1] - 1)


def test_jpeg_xl_decodes_reduced_with_its_full_size(tmp_path: Path) -> None:
    scene = photo(1600, 1200)
    path = save_jxl(scene, tmp_path / "big.jxl", lossless=True)
    img = load_image(path, draft_size=224)
    assert img.mode == "RGB" and img.size == (800, 600)
    assert img.info["original_size"] == (1600, 1200)
    full = load_image(path)
    assert np.array_equal(np.asarray(full), np.asarray(scene))  # lossless: the same pixels


@pytest.mark.parametrize("channels", ["L", "LA", "RGBA", "I;16"])
def test_jpeg_xl_grey_alpha_and_16_bit(tmp_path: Path, channels: str) -> None:
    import imagecodecs

    rgb = np.asarray(photo(64, 48))
    arrays = {
        "L": rgb[:, :, 0],
        "LA": np.dstack([rgb[:, :, 0], np.full((48, 64), 255, np.uint8)]),
        "RGBA": np.dstack([rgb, np.full((48, 64), 255, np.uint8)]),
        "I;16": rgb.astype(np.uint16) * 257,
    }
    path = tmp_path / "a.jxl"
    path.write_bytes(imagecodecs.jpegxl_encode(arrays[channels], lossless=True))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 48)
    got = np.asarray(img)[:, :, 0]
    assert np.abs(got.astype(int) - rgb[:, :, 0]).max() <= 1


def test_truncated_jpeg_xl_and_a_misnamed_jpeg(tmp_path: Path) -> None:
    whole = save_jxl(photo(), tmp_path / "whole.jxl")
    truncated(whole, tmp_path / "cut.jxl", 0.5)
    with pytest.raises(ImageDecodeError, match=r"truncated image data \(JPEG XL"):
        load_image(tmp_path / "cut.jxl")
    photo().save(tmp_path / "really_a.jxl", "JPEG")  # Pillow's, by its signature
    assert load_image(tmp_path / "really_a.jxl").size == (640, 480)


def test_a_jpeg_xl_indexes_like_the_same_picture_as_png(tmp_path: Path, piaa_home: Path) -> None:
    """The must-show: `piaa index` indexes a .jxl, and its [CLS] vector is the PNG's."""
    from click.testing import CliRunner

    from piaa_index.cli import cli
    from piaa_index.library.core import Library

    folder = tmp_path / "photos"
    folder.mkdir()
    scene = photo(640, 480, seed=11)
    save_jxl(scene, folder / "scene.jxl", distance=1.0)
    scene.save(folder / "scene.png")
    for seed in range(4):
        photo(640, 480, seed=100 + seed).save(folder / f"other_{seed}.png")
    args = ["index", str(folder), "--model", "shapesworld", "--device", "cpu", "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["indexed"] == 6 and report["failed"] == [], report
    with Library.open(model="shapesworld") as lib:
        a, b = (_cls_vector(lib, folder / name) for name in ("scene.jxl", "scene.png"))
        nearest = lib.similar(folder / "scene.jxl", limit=1)[0]
    assert Path(nearest["path"]).name == "scene.png", nearest
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(f"[CLS] cosine .jxl vs .png: {cosine:.5f}")
    assert cosine > 0.99, cosine


# --- Decoder noise: into the file's record, not the terminal ------------------------------


def jpeg_bytes(img: Image.Image, exif: bytes | None = None) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **({"exif": exif} if exif else {}))
    return buf.getvalue()


def with_junk_before_sof(jpeg: bytes) -> bytes:
    """Three stray bytes before the frame header: libjpeg's "Corrupt JPEG data: 3 extraneous
    bytes before marker 0xc0" (the JPEG still decodes whole)."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[:at] + b"\x00\x11\x22" + jpeg[at:]


def with_corrupt_exif(jpeg: bytes) -> bytes:
    """An EXIF IFD that claims more entries than it holds: Pillow warns "Corrupt EXIF data"."""
    data = bytearray(jpeg)
    ifd0 = data.index(b"Exif\0\0") + 6 + 8
    data[ifd0 : ifd0 + 2] = b"\xff\x00"
    return bytes(data)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "piaa test camera"
    return exif.tobytes()


def test_libraw_libjpeg_message_goes_to_the_record(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A RAW whose embedded JPEG has stray bytes: LibRaw's libjpeg prints "Corrupt JPEG data"
    on fd 2 itself; the picture decodes, and the message is in its info, not on the terminal."""
    scene = photo()
    path = write_dng(
        tmp_path / "junk_preview.dng",
        scene,
        preview=scene,
        preview_jpeg=with_junk_before_sof(jpeg_bytes(scene)),
        data_last=True,
    )
    capfd.readouterr()
    img = load_image(path, draft_size=224)
    assert img.info["decoder_messages"] == [
        "libjpeg: Corrupt JPEG data: 3 extraneous bytes before marker 0xc0"
    ]
    assert capfd.readouterr().err == ""


def test_pillow_warnings_go_to_the_record_of_their_own_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Pillow's "Corrupt EXIF data" warnings, from decode threads at once: each lands in the
    info of the file that raised it, none on stderr, and a good file's info has none."""
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for k in range(24):
        data = jpeg_bytes(photo(seed=k), exif_rotated())
        path = tmp_path / f"{k:02d}.jpg"
        path.write_bytes(with_corrupt_exif(data) if k % 2 else data)
        paths.append(path)
    capfd.readouterr()
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda p: load_image(p, draft_size=224), paths))
    for k, img in enumerate(images):
        said = img.info.get("decoder_messages", [])
        if k % 2:
            assert len(said) == 1 and said[0].startswith("Pillow: Corrupt EXIF data"), (k, said)
        else:
            assert said == [], (k, said)
    assert capfd.readouterr().err == ""


def test_other_output_during_a_capture_still_reaches_stderr(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """fd 2 is the process's: what is not a decoder's (another thread's progress line) is
    written back to the real stderr after the capture."""
    import os

    from piaa_index.ingest.images import capture_decoder_messages

    said: list[str] = []
    with capture_decoder_messages(said, "/photos/a.nef"):
        os.write(2, b"/photos/a.nef: data corrupted at 1378\n")
        os.write(2, b"indexing: 50%\n")
        os.write(2, b"Premature end of JPEG file\n")
    assert said == ["LibRaw: data corrupted at 1378", "libjpeg: Premature end of JPEG file"]
    assert capfd.readouterr().err == "indexing: 50%\n"


def test_piaa_index_keeps_decoder_noise_off_the_terminal(
    tmp_path: Path, piaa_home: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A corrupt JPEG (stray bytes, a corrupt EXIF), a RAW whose preview has stray bytes and a
    truncated RAW: the first three index, the last fails with LibRaw's words in its reason,
    and nothing of theirs is printed."""
    from click.testing import CliRunner

    from piaa_index.cli import cli

    folder = tmp_path / "photos"
    folder.mkdir()
    scene = photo(seed=5)
    (folder / "stray.jpg").write_bytes(with_junk_before_sof(jpeg_bytes(scene)))
    bad_exif = with_corrupt_exif(jpeg_bytes(photo(seed=6), exif_rotated()))
    (folder / "bad_exif.jpg").write_bytes(bad_exif)
    write_dng(
        folder / "junk_preview.dng",
        scene,
        preview=scene,
        preview_jpeg=with_junk_before_sof(jpeg_bytes(scene)),
        data_last=True,
    )
    whole = write_dng(tmp_path / "whole.dng", photo(seed=7), data_last=True)
    cut_short(whole, folder / "cut.dng", 0.6, relabel=True)
    capfd.readouterr()
    args = ["index", str(folder), "--model", "shapesworld", "--device", "cpu", "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["indexed"] == 3, report
    [failed] = report["failed"]
    assert Path(failed["path"]).name == "cut.dng"
    assert failed["error"].endswith("[LibRaw: Unexpected end of file]"), failed
    _, err = capfd.readouterr()
    for noise in ("Corrupt JPEG", "Corrupt EXIF", "Unexpected end of file", "Warning"):
        assert noise not in err and noise not in result.stderr, (noise, err, result.stderr)
    # What the decoders said about the files that indexed is in the run's report, per file.
    said = {Path(w["path"]).name: " ".join(w["messages"]) for w in report["warnings"]}
    assert "Corrupt EXIF" in said.get("bad_exif.jpg", ""), report["warnings"]
    assert "Corrupt JPEG" in said.get("junk_preview.dng", ""), report["warnings"]
