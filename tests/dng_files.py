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

    def finish(self, path: Path, first_ifd: int) -> None:
        struct.pack_into("<I", self.buf, 4, first_ifd)
        path.write_bytes(bytes(self.buf))


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
) -> Path:
    """Write `scene` (RGB, even width and height) as a DNG mosaic, with `preview` embedded."""
    path = Path(path)
    rgb = np.asarray(scene.convert("RGB"))
    h, w = rgb.shape[:2]
    tiff = _TiffWriter()
    camera = {
        50706: (1, (1, 4, 0, 0)),  # DNGVersion
        50707: (1, (1, 1, 0, 0)),  # DNGBackwardVersion
        50708: (2, "piaa test camera"),  # UniqueCameraModel
        50721: (10, (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1)),  # ColorMatrix1
        50778: (3, 21),  # CalibrationIlluminant1: D65
        50728: (5, (1, 1, 1, 1, 1, 1)),  # AsShotNeutral
        274: (3, orientation),
    }
    cfa = tiff.blob(mosaic(rgb).astype("<u2").tobytes())
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
        tiff.finish(path, tiff.ifd({**raw, **camera}))
        return path
    raw_ifd = tiff.ifd(raw)
    pw, ph = preview.size
    if preview_format == "jpeg":
        buf = io.BytesIO()
        preview.convert("RGB").save(buf, "JPEG", quality=90)
        data, compression, photometric = buf.getvalue(), 7, 6
    else:
        data, compression, photometric = np.asarray(preview.convert("RGB")).tobytes(), 1, 2
    strip = tiff.blob(data)
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
        279: (4, len(data)),
        330: (4, raw_ifd),  # SubIFDs
        **camera,
    }
    tiff.finish(path, tiff.ifd(ifd0))
    return path
