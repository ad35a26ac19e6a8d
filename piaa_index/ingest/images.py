"""Decoding image files for indexing: EXIF orientation, RGB, HEIC, RAW, bomb guard, content hash."""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import io
import os
import re
import stat
import struct
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

from piaa_index.durable import stream_digest

# Photo formats Pillow (with pillow-heif) decodes. Video is not among them: the scan counts
# what it skips as unsupported, by extension, so nothing is skipped silently.
PILLOW_EXTENSIONS: frozenset[str] = frozenset(
    {
        *(".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib"),
        *(".tif", ".tiff", ".heic", ".heif", ".avif", ".avifs", ".qoi", ".tga", ".psd"),
        *(".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx"),  # JPEG 2000
        *(".pnm", ".pbm", ".pgm", ".ppm", ".pcx"),
    }
)
# Camera RAW files LibRaw (through rawpy) reads.
RAW_EXTENSIONS: frozenset[str] = frozenset(
    {
        *(".nef", ".nrw", ".cr2", ".cr3", ".arw", ".srf", ".sr2", ".dng", ".raf", ".orf"),
        *(".rw2", ".pef", ".srw", ".iiq", ".3fr", ".erf", ".kdc", ".dcr", ".mef", ".mos", ".mrw"),
    }
)
# JPEG XL, through imagecodecs (libjxl): Pillow has no JPEG XL decoder of its own.
JXL_EXTENSIONS: frozenset[str] = frozenset({".jxl"})
IMAGE_EXTENSIONS: frozenset[str] = PILLOW_EXTENSIONS | RAW_EXTENSIONS | JXL_EXTENSIONS
# Without a draft size, a RAW's embedded preview is used from this short side up (a model's
# input is 224 px; a camera's preview is 1,000-6,000 px, a tiny EXIF thumbnail 160 px).
RAW_PREVIEW_MIN = 224

# Pillow raises DecompressionBombError above 2 x MAX_IMAGE_PIXELS (~179 Mpx); same default here.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

# No photo is this big (a 100 Mpx 16-bit TIFF is ~600 MB); a file over it is refused before any
# byte is read, so a runaway file (a growing log named .jpg, a sparse disk image) costs nothing.
MAX_FILE_BYTES = 4 << 30
_heif_lock = threading.Lock()
_heif_registered = False


class ImageDecodeError(Exception):
    """A file could not be decoded as an image; `reason` is short and human-readable."""

    def __init__(self, reason: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = None if path is None else Path(path)


def raw_supported() -> bool:
    """Whether RAW files can be decoded here (rawpy installed), without importing it."""
    return importlib.util.find_spec("rawpy") is not None


class NotARegularFile(OSError):
    """The path is a FIFO, socket or device now (the scan saw a regular file), or too big."""


def open_regular(path: str | os.PathLike[str], max_bytes: int | None = None) -> BinaryIO:
    """Open a file for reading only if it is a regular file within `max_bytes`.

    The scan already skips special files, but a file can be replaced between the scan and the
    read: opened non-blocking and checked with fstat on the open descriptor, a FIFO with no
    writer (or one that never writes) is refused instead of blocking the run forever.
    """
    max_bytes = MAX_FILE_BYTES if max_bytes is None else max_bytes
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file (FIFO, socket or device)")
        if st.st_size > max_bytes:
            raise NotARegularFile(
                errno.EFBIG,
                f"file too large: {st.st_size / 2**30:.1f} GiB exceeds the per-file limit of "
                f"{max_bytes / 2**30:.1f} GiB",
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _register_heif() -> None:
    """Register the pillow_heif opener once, on first use (import costs ~50 ms)."""
    global _heif_registered
    if _heif_registered:
        return
    with _heif_lock:
        if not _heif_registered:
            try:
                import pillow_heif
            except ImportError:  # HEIC files then fail as "cannot identify"
                pass
            else:
                pillow_heif.register_heif_opener()
            _heif_registered = True


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's own I->L conversion clips at 255, which turns 16-bit images white.
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        if top > 255.0:
            arr = arr * (255.0 / 65535.0) if top <= 65535.0 else arr * (255.0 / top)
        elif img.mode == "F" and 0.0 < top <= 1.0:
            arr = arr * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _libraw_said(exc: BaseException) -> str:
    """LibRaw's own message: they arrive as bytes (b'Unsupported file format or not RAW file')."""
    arg = exc.args[0] if exc.args else type(exc).__name__
    return "LibRaw: " + (arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg))


def _reason_for(exc: BaseException) -> str:
    """Turn a Pillow/OS exception into a short message for logs and the CLI."""
    text = str(exc)
    low = text.lower()
    if type(exc).__module__.startswith("rawpy"):
        said = _libraw_said(exc)
        name = type(exc).__name__
        if name == "LibRawIOError":  # LibRaw's name for reading past the end: not a disk fault
            return "cannot decode RAW file: it ends before its image data (truncated, or a stub)"
        if name == "LibRawDataError":
            return "cannot decode RAW file: its image data is corrupt or in an unsupported variant"
        return f"cannot decode RAW file: {said.removeprefix('LibRaw: ')}"
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file (not an image?)"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, NotARegularFile):
        return exc.strerror or text
    if "truncated" in low or "broken data stream" in low or "premature end" in low:
        return "truncated image data"
    if isinstance(exc, Image.DecompressionBombError):
        return "image too large (decompression-bomb guard)"
    if isinstance(exc, ValueError) and "conversion" in low:
        return f"unsupported colour mode ({text})"
    if isinstance(exc, MemoryError):
        return "image too large to decode (out of memory)"
    return f"cannot decode image: {text or type(exc).__name__}"


# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def decoded_bytes(im: Image.Image) -> int:
    """Bytes a full decode of `im` takes, from its header (before any pixel is read)."""
    per_band = 2 if im.mode in _SIXTEEN_BIT else 4 if im.mode in ("I", "F") else 1
    return im.size[0] * im.size[1] * len(im.getbands()) * per_band


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_heap_limited = False


def return_freed_pixels_to_os() -> None:
    """Make glibc serve allocations of 1 MiB and more with mmap, once per process.

    By default glibc raises its mmap threshold after the first big free, so the 16 MiB blocks of
    a decoded 13,000 x 13,000 scan come from the heap afterwards and stay there when freed: two
    such scans one after the other then cost two images of RSS, not one. No-op off glibc.
    """
    global _heap_limited
    if _heap_limited:
        return
    _heap_limited = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


class MemoryBudget:
    """Bytes of decoded pixels in flight across decode threads. An image needing more than the
    whole budget waits until it can decode alone, so a few huge scans never run together."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cv = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.limit)
        with self._cv:
            self._cv.wait_for(lambda: self.used + nbytes <= self.limit)
            self.used += nbytes
        try:
            yield
        finally:
            with self._cv:
                self.used -= nbytes
                self._cv.notify_all()


def _shrink(im: Image.Image, shorter_side: int) -> Image.Image:
    """Box-reduce a decoded image to about `shorter_side` (never below), in its own mode, so
    that no full-size converted copy (16-bit as float, palette as RGB) is ever made."""
    factor = min(im.size) // shorter_side
    if factor < 2:
        return im
    if im.mode in _SIXTEEN_BIT:  # `reduce` has no 16-bit path; a box resize does the same
        return im.resize((im.width // factor, im.height // factor), Image.Resampling.BOX)
    if im.mode == "1":  # one byte per pixel already: grey is no bigger, and box-reduces well
        im = im.convert("L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    return Image.Image.reduce(im, factor)  # JPEG 2000 files shadow `reduce` with an int


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    budget: MemoryBudget | None = None,
) -> Image.Image:
    """Decode a file to an upright RGB image, or raise ImageDecodeError.

    With `draft_size` (the model's input size), a large image is decoded at reduced size:
    JPEGs at 1/2..1/8 scale in the decoder, HEIC from an embedded thumbnail at least that
    large, RAW from the camera's embedded preview (else a half-size demosaic), others
    box-reduced right after decoding, keeping the shorter side at least twice `draft_size`.
    `budget` bounds the decoded bytes in flight across threads. `info["original_size"]`
    always holds the full upright size.
    """
    _register_heif()
    p = Path(path)
    messages: list[str] = []  # what the decoders said meanwhile: into the reason, or info
    try:
        with open_regular(p) as fh, _collect_warnings(messages):
            if os.fstat(fh.fileno()).st_size == 0:
                raise ImageDecodeError("file is empty", p)
            if p.suffix.lower() in RAW_EXTENSIONS:
                rgb, orientation, (width, height) = _load_raw(
                    p, max_pixels, draft_size, budget, messages
                )
            elif p.suffix.lower() in JXL_EXTENSIONS and _is_jxl(fh):
                rgb, orientation, (width, height) = _load_jxl(fh, p, max_pixels, draft_size, budget)
            else:
                # Our own limit decides: Pillow's DecompressionBombWarning, which fires on
                # legitimate 100 Mpx cameras, is dropped by _collect_warnings.
                with Image.open(fh) as im:
                    width, height = im.size
                    _check_pixels(width, height, max_pixels, p)
                    if draft_size is not None and im.format in ("JPEG", "HEIF"):
                        im.draft("RGB", (draft_size, draft_size))
                    elif draft_size is not None and im.format == "JPEG2000":
                        _drop_j2k_levels(im, p, 2 * draft_size)
                    rgb, orientation = _decode(im, None, draft_size, budget)
    except ImageDecodeError as exc:
        if messages:
            raise ImageDecodeError(_with_noise(exc.reason, messages), p) from exc
        raise
    except Exception as exc:  # Pillow plugins raise many types (struct.error, IndexError, ...)
        raise ImageDecodeError(_with_noise(_reason_for(exc), messages), p) from exc
    if messages:
        rgb.info["decoder_messages"] = messages
    rgb.info["exif_orientation"] = orientation
    # Orientations 5-8 swap the axes; draft decoding may have shrunk rgb itself.
    rgb.info["original_size"] = (height, width) if orientation >= 5 else (width, height)
    return rgb


_JXL_CONTAINER = b"\0\0\0\x0cJXL \r\n\x87\n"  # the ISO BMFF box form; a bare codestream: FF 0A
_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


def _is_jxl(fh: BinaryIO) -> bool:
    """Whether the file starts as JPEG XL does (else Pillow gets it: a misnamed JPEG)."""
    head = fh.read(len(_JXL_CONTAINER))
    fh.seek(0)
    return head.startswith(b"\xff\x0a") or head == _JXL_CONTAINER


def _jxl_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG XL file's SizeHeader, before any pixel is decoded; None when
    the header cannot be found. The size is the stored one (before the orientation)."""
    stream = data
    if data.startswith(_JXL_CONTAINER):  # the codestream is in a jxlc box, or jxlp parts
        pos, stream = 0, b""
        while pos + 8 <= len(data):
            size, kind = struct.unpack(">I4s", data[pos : pos + 8])
            head = 8
            if size == 1 and pos + 16 <= len(data):
                size, head = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
            elif size == 0:
                size = len(data) - pos
            if size < head:
                return None
            if kind in (b"jxlc", b"jxlp"):
                stream = data[pos + head + (4 if kind == b"jxlp" else 0) : pos + size]
                break
            pos += size
    if not stream.startswith(b"\xff\x0a") or len(stream) < 12:
        return None
    bits, at = int.from_bytes(stream[2:12], "little"), 0

    def u(n: int) -> int:  # the spec's u(n): n bits, least significant first
        nonlocal at
        value = (bits >> at) & ((1 << n) - 1)
        at += n
        return value

    def u32() -> int:  # U32(Bits(9), Bits(13), Bits(18), Bits(30)), then + 1
        return u((9, 13, 18, 30)[u(2)]) + 1

    small = u(1)
    height = (u(5) + 1) * 8 if small else u32()
    ratio = u(3)
    if ratio:
        num, den = _JXL_RATIOS[ratio]
        return height * num // den, height
    return ((u(5) + 1) * 8 if small else u32()), height


def _load_jxl(
    fh: BinaryIO,
    p: Path,
    max_pixels: int | None,
    draft_size: int | None,
    budget: MemoryBudget | None,
) -> tuple[Image.Image, int, tuple[int, int]]:
    """A JPEG XL file through imagecodecs (libjxl), which applies the file's orientation:
    (upright RGB, orientation 1, upright size). Sized from its header first (the bomb guard),
    decoded whole within the budget (libjxl has no reduced-size decode here), then reduced."""
    data = fh.read()
    size = _jxl_size(data)
    if size is None:
        raise ImageDecodeError("truncated image data (no JPEG XL size header)", p)
    _check_pixels(*size, max_pixels, p)
    try:
        import imagecodecs
    except ImportError:
        raise ImageDecodeError(
            "JPEG XL files need imagecodecs: pip install imagecodecs (or reinstall piaa-index)",
            p,
        ) from None
    need = size[0] * size[1] * 8  # up to 4 channels of 16 bits
    with budget.hold(need) if budget else nullcontext():
        try:
            arr = imagecodecs.jpegxl_decode(data, index=0)  # an animation: its first frame
        except imagecodecs.JpegxlError as exc:
            said = "truncated image data" if "NEED_MORE_INPUT" in str(exc) else "cannot decode"
            raise ImageDecodeError(f"{said} (JPEG XL: {exc})", p) from exc
        img = _array_image(arr)
        upright = img.size
        small = _shrink(img, 2 * draft_size) if draft_size else img
        return _to_rgb(small), 1, upright


def _array_image(arr: Any) -> Image.Image:
    """A decoded array (H x W [x C], 8/16-bit or float 0..1) as an 8-bit Pillow image."""
    import numpy as np

    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = np.clip(np.rint(np.nan_to_num(arr) * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"unsupported sample type {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2 or arr.shape[2] == 2:  # L or LA, from the shape
        return Image.fromarray(np.ascontiguousarray(arr))
    channels = arr.shape[2]
    return Image.fromarray(np.ascontiguousarray(arr[:, :, :4] if channels >= 4 else arr[:, :, :3]))


def _drop_j2k_levels(im: Image.Image, p: Path, shorter_side: int) -> None:
    """JPEG 2000 stores each image at halving resolutions: decode only the smallest level
    whose shorter side is still at least `shorter_side` (12 MP: 8.4 s -> 0.26 s)."""
    factor = min(im.size) // shorter_side
    levels = min(factor.bit_length() - 1, _j2k_levels(p)) if factor >= 2 else 0
    if levels > 0:
        setattr(im, "reduce", levels)  # noqa: B010 - Pillow's JPEG 2000 property, not a method


def _j2k_levels(p: Path) -> int:
    """How many resolution levels the codestream can drop (its COD decomposition count);
    asking OpenJPEG for more fails the decode. 0 when the header cannot be read."""
    with open(p, "rb") as fh:
        head = fh.read(1 << 16)
    pos = head.find(b"\xff\x4f\xff\x51")  # SOC then SIZ: the codestream, also inside a .jp2
    if pos < 0:
        return 0
    pos += 2
    while pos + 4 <= len(head):
        marker, length = struct.unpack(">HH", head[pos : pos + 4])
        if marker == 0xFF52:  # COD: Lcod, Scod, progression, layers (2), MCT, then levels
            return head[pos + 9] if pos + 9 < len(head) else 0
        if marker in (0xFF90, 0xFF93) or length < 2:  # a tile or data: past the main header
            return 0
        pos += 2 + length
    return 0


def _check_pixels(width: int, height: int, max_pixels: int | None, p: Path) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} = {width * height / 1e6:.0f} Mpx "
            f"exceeds the limit of {max_pixels / 1e6:.0f} Mpx (decompression-bomb guard)",
            p,
        )


def _exif_orientation(im: Image.Image) -> int:
    orientation = im.getexif().get(0x0112, 1)
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _decode(
    im: Image.Image, orientation: int | None, draft_size: int | None, budget: MemoryBudget | None
) -> tuple[Image.Image, int]:
    """Load `im` within the budget, shrink, turn upright (by `orientation`, or by the file's
    own EXIF when None), convert to RGB: (a new image, never `im` itself; the orientation)."""
    with budget.hold(decoded_bytes(im)) if budget else nullcontext():
        im.load()  # decode fully here so that truncated files fail here, not later
        if orientation is None:
            # After load, inside the budget: a PNG's getexif() decodes the whole image to
            # find an eXIf chunk after the pixels.
            orientation = _exif_orientation(im)
        small = _shrink(im, 2 * draft_size) if draft_size else im
        if orientation in _UPRIGHT:
            small = small.transpose(_UPRIGHT[orientation])
        rgb = _to_rgb(small)
        return (im.copy() if rgb is im else rgb), orientation  # outlive the file


# LibRaw's `flip` (sizes.flip) -> the EXIF orientation it stands for.
_FLIP_TO_EXIF = {0: 1, 1: 2, 3: 3, 2: 4, 4: 5, 6: 6, 7: 7, 5: 8}
# A camera's RAW holds at least this many bits per pixel of its sensor: lossless compression
# keeps 6-14, lossy (Sony ARW, Canon C-RAW, lossy DNG) 2-8. Below a quarter of a bit the file
# cannot hold the picture: a truncated file or a stub (exiftool's and exiv2's test RAWs are a
# 10 Mpx header in 12 KB), which LibRaw would still "decode" into a black or striped frame.
RAW_MIN_BITS_PER_PIXEL = 0.25
# A decoded frame whose every channel varies less than this (0-255, on a 64 px copy) is one
# flat colour: zeroed or missing image data, not a photograph.
BLANK_FRAME_STD = 2.0


def _load_raw(
    p: Path,
    max_pixels: int | None,
    draft_size: int | None,
    budget: MemoryBudget | None,
    noise: list[str],
) -> tuple[Image.Image, int, tuple[int, int]]:
    """A camera RAW: its embedded preview when at least the model's input on the short side
    (decoded at reduced size), else LibRaw's half-size demosaic; the RAW's orientation applied.
    Returns (upright RGB, EXIF orientation, stored size).

    A RAW that cannot hold or did not give a picture is an ImageDecodeError with its reason,
    never a blank or striped frame: a file too small for its sensor, a damaged preview, a
    decode that gives one flat colour. What LibRaw prints meanwhile (it writes straight to the
    process's stderr) is captured: it ends in the reason, or in `info["decoder_messages"]`."""
    try:
        import rawpy
    except ImportError:
        raise ImageDecodeError(
            "RAW files need rawpy: pip install rawpy (or reinstall piaa-index)", p
        ) from None
    _check_not_cut_short(p)
    raw = rawpy.RawPy()
    try:
        with capture_decoder_messages(noise, str(p)):
            raw.open_file(str(p))
        width, height = raw.sizes.width, raw.sizes.height
        _check_pixels(width, height, max_pixels, p)
        orientation = _FLIP_TO_EXIF.get(raw.sizes.flip, 1)
        short = draft_size or RAW_PREVIEW_MIN
        preview = _raw_preview(raw, short, draft=draft_size is not None, p=p, noise=noise)
        if preview is not None:
            # A camera stores its preview as the sensor sees it, like the mosaic: the RAW's
            # orientation turns it upright (the preview's own EXIF, if any, is the camera's).
            try:  # Pillow's libjpeg prints nothing: no capture (nor its lock) needed here
                rgb = _decode(preview, orientation, draft_size, budget)[0]
            except Exception as exc:
                raise ImageDecodeError(
                    (
                        f"RAW's embedded preview is unreadable ({_reason_for(exc)}): "
                        "truncated or damaged file"
                    ),
                    p,
                ) from exc
            _reject_blank(rgb, p, "its embedded preview")
        else:
            _check_raw_size(p, width, height)
            # Half size skips interpolation (each 2x2 Bayer cell gives a pixel): 4x fewer
            # pixels, and LibRaw applies the orientation itself. LibRaw holds the 16-bit mosaic.
            need = width * height * 2 + (width // 2) * (height // 2) * 3
            with budget.hold(need) if budget else nullcontext():
                with capture_decoder_messages(noise, str(p)):
                    raw.unpack()  # reading the file: where LibRaw reports damaged data
                pixels = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
            img = Image.fromarray(pixels)
            small = _shrink(img, 2 * draft_size) if draft_size else img
            rgb = _to_rgb(small)
            _reject_blank(rgb, p, "its image data")
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(_reason_for(exc), p) from exc
    finally:
        raw.close()
    return rgb, orientation, (width, height)


_TIFF_TYPE_SIZES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
}
# (offsets tag, byte counts tag): strips, tiles, an embedded JPEG (old-style thumbnail)
_TIFF_DATA_TAGS = ((273, 279), (324, 325), (513, 514))
_TIFF_SUB_IFDS = (330, 34665)  # SubIFDs (a DNG's mosaic, a NEF's preview), the EXIF IFD


def _tiff_data_end(fh: BinaryIO) -> int:
    """Where the last image data that a TIFF-based RAW's IFDs declare ends (DNG, NEF, CR2,
    ARW, PEF, ...: strips, tiles, JPEG previews of IFD0's chain, its SubIFDs and
    EXIF IFD); 0 when the file is not TIFF-based or its IFDs are unreadable. A file shorter
    than that was cut short: LibRaw would read past its end into whatever memory holds."""
    fh.seek(0)
    head = fh.read(8)
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        return 0
    order = "<" if head[:2] == b"II" else ">"
    if struct.unpack(order + "H", head[2:4])[0] != 42:  # RW2 (85), ORF: their own tag meanings
        return 0
    ifds: list[int] = [struct.unpack(order + "I", head[4:8])[0]]
    seen: set[int] = set()
    end = 0

    def values(typ: int, count: int, field: bytes) -> list[int]:
        size = _TIFF_TYPE_SIZES.get(typ, 0)
        if typ not in (3, 4, 13) or not 0 < count <= 4096:
            return []
        raw = field[: size * count]
        if size * count > 4:
            fh.seek(struct.unpack(order + "I", field)[0])
            raw = fh.read(size * count)
            if len(raw) < size * count:
                return []
        fmt = "H" if typ == 3 else "I"
        return list(struct.unpack(f"{order}{count}{fmt}", raw))

    while ifds and len(seen) < 64:
        at = ifds.pop()
        if at in seen or at < 8:
            continue
        seen.add(at)
        fh.seek(at)
        count_bytes = fh.read(2)
        if len(count_bytes) < 2:
            continue
        (n,) = struct.unpack(order + "H", count_bytes)
        entries = fh.read(12 * n + 4)
        if len(entries) < 12 * n:
            continue
        tags: dict[int, list[int]] = {}
        for k in range(n):
            tag, typ, count = struct.unpack(order + "HHI", entries[12 * k : 12 * k + 8])
            field = entries[12 * k + 8 : 12 * k + 12]
            if tag in _TIFF_SUB_IFDS or any(tag in pair for pair in _TIFF_DATA_TAGS):
                tags[tag] = values(typ, count, field)
        for offsets_tag, counts_tag in _TIFF_DATA_TAGS:
            for offset, length in zip(
                tags.get(offsets_tag, []), tags.get(counts_tag, []), strict=False
            ):
                end = max(end, offset + length)
        for tag in _TIFF_SUB_IFDS:
            ifds.extend(tags.get(tag, []))
        if len(entries) == 12 * n + 4:
            ifds.append(struct.unpack(order + "I", entries[12 * n :])[0])
    return end


def _check_not_cut_short(p: Path) -> None:
    """Refuse a TIFF-based RAW whose declared image data runs past the end of the file."""
    with open_regular(p) as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            end = _tiff_data_end(fh)
        except (OSError, struct.error):
            return
    if end > size:
        raise ImageDecodeError(
            f"RAW file is truncated: its image data runs to byte {end:,}, the file ends at "
            f"byte {size:,} ({(end - size) / end:.1%} missing)",
            p,
        )


def _with_noise(reason: str, noise: list[str]) -> str:
    return f"{reason} [{'; '.join(noise)}]" if noise else reason


def _check_raw_size(p: Path, width: int, height: int) -> None:
    """Refuse a RAW file too small to hold its sensor's pixels (see RAW_MIN_BITS_PER_PIXEL)."""
    size = p.stat().st_size
    if size * 8 < width * height * RAW_MIN_BITS_PER_PIXEL:
        raise ImageDecodeError(
            (
                f"RAW file too small for its {width}x{height} sensor ({size / 1024:.0f} KiB): "
                "truncated, or a stub with no image data"
            ),
            p,
        )


def _reject_blank(rgb: Image.Image, p: Path, what: str) -> None:
    """Refuse a decoded RAW frame that is one flat colour (zeroed or missing image data)."""
    import numpy as np

    small = rgb.copy()
    small.thumbnail((64, 64), Image.Resampling.BOX)
    spread = np.asarray(small, dtype=np.float32).reshape(-1, 3).std(axis=0)
    if float(spread.max()) < BLANK_FRAME_STD:
        raise ImageDecodeError(
            (
                f"RAW decoded to a blank frame ({what} is one flat colour): "
                "truncated or unsupported file"
            ),
            p,
        )


def _raw_preview(
    raw: Any, short_side: int, draft: bool, p: Path, noise: list[str]
) -> Image.Image | None:
    """The embedded preview (not yet decoded; a JPEG in draft mode with `draft`) if its short
    side is at least `short_side`; None when there is none, it is too small, or LibRaw does not
    support its format. A preview that is there but damaged (LibRaw reads past the end of the
    file, or libjpeg complains while LibRaw unpacks it) is an ImageDecodeError: the file is
    truncated or damaged, and its mosaic would decode to garbage if it decodes at all."""
    import rawpy

    before = len(noise)
    try:
        with capture_decoder_messages(noise, str(p)):
            thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError) as exc:
        if len(noise) == before:  # no preview, or one in a format LibRaw does not extract
            return None
        raise ImageDecodeError(
            (
                f"RAW's embedded preview is unreadable ({_libraw_said(exc)}): "
                "truncated or damaged file"
            ),
            p,
        ) from exc
    except rawpy.LibRawError as exc:
        raise ImageDecodeError(
            (
                f"RAW's embedded preview is unreadable ({_libraw_said(exc)}): "
                "truncated or damaged file"
            ),
            p,
        ) from exc
    try:
        if thumb.format == rawpy.ThumbFormat.JPEG:
            jpeg = Image.open(io.BytesIO(thumb.data))
            if jpeg.format != "JPEG" or min(jpeg.size) < short_side:
                return None
            if draft:
                jpeg.draft("RGB", (short_side, short_side))
            return jpeg
        bitmap = Image.fromarray(thumb.data)  # an uncompressed RGB bitmap
    except (OSError, ValueError, TypeError):
        return None
    return bitmap if min(bitmap.size) >= short_side else None


# Python warnings (Pillow's "Corrupt EXIF data", "Truncated File Read", ...) of a decode go to
# the file's record: warnings.showwarning is wrapped once, and sends a warning raised in a
# thread that is decoding (warnings are shown in the thread that raises them) to that thread's
# list; any other warning goes where it went before. Pillow's UserWarnings are shown "always"
# (a filter added once), not once per source line, so that each file's record has its own;
# nothing here enters warnings.catch_warnings, which swaps process-wide state and is not
# thread-safe.
_PILLOW_MODULES = r"(PIL|pillow_heif)(\..*)?$"
_warning_sink = threading.local()
_warning_hook_lock = threading.Lock()
_shown_before: list[Any] = []


def _show_or_collect(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    into = getattr(_warning_sink, "into", None)
    if into is None:
        previous = _shown_before[-1] if _shown_before else warnings._showwarning_orig  # type: ignore[attr-defined]
        previous(message, category, filename, lineno, file, line)
        return
    if issubclass(category, Image.DecompressionBombWarning):
        return  # our own limit decides (see load_image)
    origin = "Pillow" if f"{os.sep}PIL{os.sep}" in filename else category.__name__
    said = " ".join(str(message).split())
    if f"{origin}: {said}" not in into:
        into.append(f"{origin}: {said}")


def _pillow_always() -> bool:
    return any(
        f[0] == "always" and f[3] is not None and f[3].pattern == _PILLOW_MODULES
        for f in warnings.filters
    )


@contextmanager
def _collect_warnings(into: list[str]) -> Iterator[None]:
    """Warnings raised in this thread meanwhile go to `into`, not to stderr."""
    if warnings.showwarning is not _show_or_collect or not _pillow_always():
        with _warning_hook_lock:  # first use, or replaced since (pytest does, for each test)
            if warnings.showwarning is not _show_or_collect:
                _shown_before[:] = [warnings.showwarning]
                warnings.showwarning = _show_or_collect
            if not _pillow_always():
                warnings.filterwarnings("always", category=UserWarning, module=_PILLOW_MODULES)
    outer = getattr(_warning_sink, "into", None)
    _warning_sink.into = into
    try:
        yield
    finally:
        _warning_sink.into = outer


# What a C library prints itself: LibRaw's data-error callback ("<path>: Unexpected end of
# file", "<path>: data corrupted at 1378") and the messages of the libjpeg inside it.
_LIBJPEG_MESSAGE = re.compile(
    r"^(Corrupt JPEG data|Premature end of JPEG file|Invalid JPEG file structure|"
    r"Not a JPEG file|Bogus |Huffman table|Inconsistent progression|Unsupported JPEG|"
    r"Warning: |JPEG datastream|Quantization table|Unsupported marker|Ignoring )"
)
_stderr_lock = threading.Lock()


@contextmanager
def capture_decoder_messages(into: list[str], path: str) -> Iterator[None]:
    """Capture what C decoders print to the process's stderr (fd 2) meanwhile into `into`.

    A C library's fprintf(stderr) cannot be told apart by thread, and fd 2 is one per process:
    so the redirect is held by one caller at a time (a lock, held only around LibRaw's calls
    that read the file: open, unpack, the preview), and whatever else reached fd 2 in that
    window (another thread's Python output, a progress bar) is written back to the real stderr
    afterwards. Lines naming `path` (LibRaw's own format) lose that prefix and gain "LibRaw:".
    """
    with _stderr_lock:
        for stream in (sys.stderr, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all (a daemon with closed stdio): nothing to capture
            yield
            return
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                _sort_messages(tmp.read(), into, path)


def _sort_messages(text: bytes, into: list[str], path: str) -> None:
    """Decoder lines of a capture into `into`; the rest back to the real stderr."""
    other: list[str] = []
    prefix = f"{path}: "
    for line in text.decode(errors="replace").splitlines(keepends=True):
        said = line.strip()
        if said.startswith(prefix):
            into.append(f"LibRaw: {said[len(prefix) :]}")
        elif said and _LIBJPEG_MESSAGE.match(said):
            into.append(f"libjpeg: {said}")
        else:
            other.append(line)
    if other:
        try:
            os.write(2, "".join(other).encode())
        except OSError:
            pass


def file_hash(path: str | os.PathLike[str]) -> str:
    """Content hash of a file: BLAKE2b-128, hex, streamed in 1 MiB chunks."""
    with open_regular(path) as fh:
        return stream_digest(fh)
