"""Tiny valid DNG files written from scratch (little-endian TIFF with the DNG tags), so that the
RAW path is tested through LibRaw on real files without shipping camera samples.

A DNG holds a colour-filter-array (Bayer RGGB) mosaic; `preview` adds the embedded preview a
camera writes beside it, as IFD0 with the mosaic in a SubIFD: a JPEG (what cameras embed) or an
uncompressed RGB bitmap.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

_FORMATS = {1: "B", 3: "H", 4: "I", 5: "I", 10: "i"}  # BYTE SHORT LONG RATIONAL SRATIONAL
WHITE = 4095
BLACK = 64


class _TiffWriter:
    """Blobs first, IFDs after them, IFD0's offset patched into the header at the end."""

    def __init__(self) -> None:
        self.buf = bytearray(b"II*\0\0\0\0\0")

    def blob(self, data: bytes) -> int:
        if len(self.buf) % 2:
            self.buf += b"\0"  # TIFF offsets are word-aligned
        offset = len(self.buf)
        self.buf += data
        return offset

    def ifd(self, entries: dict[int, tuple[int, object]]) -> int:
        fields = []
        for tag in sorted(entries):
            typ, values = entries[tag]
            if typ == 2:
                raw, count = str(values).encode() + b"\0", len(str(values)) + 1
            else:
                vals = list(values) if isinstance(values, (list, tuple)) else [values]
                raw = struct.pack(f"<{len(vals)}{_FORMATS[typ]}", *vals)
                count = len(vals) // 2 if typ in (5, 10) else len(vals)
            field = raw.ljust(4, b"\0") if len(raw) <= 4 else struct.pack("<I", self.blob(raw))
            fields.append(struct.pack("<HHI", tag, typ, count) + field)
        return self.blob(struct.pack("<H", len(fields)) + b"".join(fields) + b"\0\0\0\0")

    def finish(self, first_ifd: int) -> None:
        struct.pack_into("<I", self.buf, 4, first_ifd)


def mosaic(rgb: np.ndarray) -> np.ndarray:
    """The RGGB sensor values a camera would record for an sRGB-ish scene (12-bit, linear)."""
    lin = (rgb.astype(np.float32) / 255.0) ** 2.2 * (WHITE - BLACK) + BLACK
    cfa = np.empty(rgb.shape[:2], np.uint16)
    cfa[0::2, 0::2] = lin[0::2, 0::2, 0]
    cfa[0::2, 1::2] = lin[0::2, 1::2, 1]
    cfa[1::2, 0::2] = lin[1::2, 0::2, 1]
    cfa[1::2, 1::2] = lin[1::2, 1::2, 2]
    return cfa


def write_dng(
    path: str | Path,
    scene: Image.Image,
    preview: Image.Image | None = None,
    preview_format: str = "jpeg",
    orientation: int = 1,
    data_last: bool = False,
    preview_jpeg: bytes | None = None,
) -> Path:
    """Write `scene` (RGB, even width and height) as a DNG mosaic, with `preview` embedded.

    With `data_last`, the IFDs come first and the pixel data (mosaic, then preview) after them,
    as cameras write their files: cutting such a file short loses pixels, not its header.
    `preview_jpeg` stores those bytes as the preview's JPEG instead of encoding `preview`
    (which still gives its size): a damaged preview, as written.
    """
    path = Path(path)
    rgb = np.asarray(scene.convert("RGB"))
    cfa_data = mosaic(rgb).astype("<u2").tobytes()
    preview_data = b""
    if preview is not None:
        if preview_jpeg is not None:
            preview_data = preview_jpeg
        elif preview_format == "jpeg":
            buf = io.BytesIO()
            preview.convert("RGB").save(buf, "JPEG", quality=90)
            preview_data = buf.getvalue()
        else:
            preview_data = np.asarray(preview.convert("RGB")).tobytes()
    if not data_last:
        tiff = _TiffWriter()
        cfa, strip = tiff.blob(cfa_data), tiff.blob(preview_data) if preview_data else 0
        _dng_ifds(
            tiff, rgb.shape[:2], cfa, preview, preview_format, strip, preview_data, orientation
        )
        path.write_bytes(bytes(tiff.buf))
        return path
    # Two passes: the IFDs' size does not depend on the offsets they hold (LONGs, inline).
    sizes = _TiffWriter()
    _dng_ifds(sizes, rgb.shape[:2], 0, preview, preview_format, 0, preview_data, orientation)
    cfa = len(sizes.buf) + len(sizes.buf) % 2
    strip = cfa + len(cfa_data) + len(cfa_data) % 2
    tiff = _TiffWriter()
    _dng_ifds(tiff, rgb.shape[:2], cfa, preview, preview_format, strip, preview_data, orientation)
    assert len(tiff.buf) == len(sizes.buf)
    tiff.blob(cfa_data)
    tiff.blob(preview_data)
    assert tiff.buf[cfa : cfa + 2] == cfa_data[:2]
    path.write_bytes(bytes(tiff.buf))
    return path


def _dng_ifds(
    tiff: _TiffWriter,
    shape: tuple[int, ...],
    cfa: int,
    preview: Image.Image | None,
    preview_format: str,
    strip: int,
    preview_data: bytes,
    orientation: int,
) -> None:
    """The DNG's IFDs (IFD0 the preview when there is one, the mosaic in its SubIFD)."""
    h, w = shape
    camera = {
        50706: (1, (1, 4, 0, 0)),  # DNGVersion
        50707: (1, (1, 1, 0, 0)),  # DNGBackwardVersion
        50708: (2, "piaa test camera"),  # UniqueCameraModel
        50721: (10, (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1)),  # ColorMatrix1
        50778: (3, 21),  # CalibrationIlluminant1: D65
        50728: (5, (1, 1, 1, 1, 1, 1)),  # AsShotNeutral
        274: (3, orientation),
    }
    raw = {
        254: (4, 0),  # NewSubFileType: the main image
        256: (4, w),
        257: (4, h),
        258: (3, 16),
        259: (3, 1),
        262: (3, 32803),  # PhotometricInterpretation: CFA
        273: (4, cfa),
        277: (3, 1),
        278: (4, h),
        279: (4, w * h * 2),
        33421: (3, (2, 2)),  # CFARepeatPatternDim
        33422: (1, (0, 1, 1, 2)),  # CFAPattern: RGGB
        50714: (3, BLACK),
        50717: (3, WHITE),
    }
    if preview is None:
        tiff.finish(tiff.ifd({**raw, **camera}))
        return
    raw_ifd = tiff.ifd(raw)
    pw, ph = preview.size
    compression, photometric = (7, 6) if preview_format == "jpeg" else (1, 2)
    ifd0 = {
        254: (4, 1),  # NewSubFileType: a reduced-resolution copy
        256: (4, pw),
        257: (4, ph),
        258: (3, (8, 8, 8)),
        259: (3, compression),
        262: (3, photometric),
        273: (4, strip),
        277: (3, 3),
        278: (4, ph),
        279: (4, len(preview_data)),
        330: (4, raw_ifd),  # SubIFDs
        **camera,
    }
    tiff.finish(tiff.ifd(ifd0))


def mosaic_offset(path: str | Path) -> tuple[int, int]:
    """(offset, length) of the mosaic's pixel data in a DNG written by `write_dng`."""
    data = Path(path).read_bytes()
    # The mosaic's IFD holds PhotometricInterpretation = CFA (SHORT 32803, inline).
    at = data.index(struct.pack("<HHIH", 262, 3, 1, 32803))
    pos = at
    while struct.unpack_from("<H", data, pos)[0] != 254:  # back to its first entry
        pos -= 12
    count = struct.unpack_from("<H", data, pos - 2)[0]
    fields = {}
    for k in range(count):
        tag, _typ, _n, value = struct.unpack_from("<HHII", data, pos + 12 * k)
        fields[tag] = value
    return fields[273], fields[279]


def cut_short(src: str | Path, dst: str | Path, fraction: float, relabel: bool = False) -> Path:
    """`src` cut to `fraction` of its bytes, as an interrupted copy leaves it. With `relabel`,
    every strip's byte count is also cut to what is left of it, as a stub's header says: the
    file then looks whole, and only reading its pixels finds them missing."""
    data = bytearray(Path(src).read_bytes()[: int(Path(src).stat().st_size * fraction)])
    if relabel:
        counts, offsets = struct.pack("<HHI", 279, 4, 1), struct.pack("<HHI", 273, 4, 1)
        at = data.find(counts)
        while at >= 0:
            offset_at = data.rfind(offsets, 0, at)
            (offset,) = struct.unpack_from("<I", data, offset_at + 8)
            (count,) = struct.unpack_from("<I", data, at + 8)
            struct.pack_into("<I", data, at + 8, max(0, min(count, len(data) - offset)))
            at = data.find(counts, at + 12)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)
