"""Decoding image files for indexing: EXIF orientation, RGB, HEIC, bomb guard, content hash."""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif"}
)

# Pillow raises DecompressionBombError above 2 x MAX_IMAGE_PIXELS (~179 Mpx); same default here.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

_HASH_CHUNK = 1 << 20
_heif_lock = threading.Lock()
_heif_registered = False


class ImageDecodeError(Exception):
    """A file could not be decoded as an image; `reason` is short and human-readable."""

    def __init__(self, reason: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = None if path is None else Path(path)


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

        arr = np.asarray(img, dtype=np.float64)
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


def _reason_for(exc: BaseException) -> str:
    """Turn a Pillow/OS exception into a short message for logs and the CLI."""
    text = str(exc)
    low = text.lower()
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file (not an image?)"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if "truncated" in low or "broken data stream" in low or "premature end" in low:
        return "truncated image data"
    if isinstance(exc, Image.DecompressionBombError):
        return "image too large (decompression-bomb guard)"
    if isinstance(exc, ValueError) and "conversion" in low:
        return f"unsupported colour mode ({text})"
    if isinstance(exc, MemoryError):
        return "image too large to decode (out of memory)"
    return f"cannot decode image: {text or type(exc).__name__}"


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode a file to an upright RGB image, or raise ImageDecodeError.

    `draft_size` lets JPEGs decode at 1/2, 1/4 or 1/8 scale while both sides stay >= it (much
    faster for a 224 px model); `info["original_size"]` always holds the full upright size.
    """
    _register_heif()
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            raise ImageDecodeError("file is empty", p)
        # Our own limit decides; Pillow's warning fires on legitimate 100 Mpx camera files.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                width, height = im.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageDecodeError(
                        f"image too large: {width}x{height} = {width * height / 1e6:.0f} Mpx "
                        f"exceeds the limit of {max_pixels / 1e6:.0f} Mpx "
                        "(decompression-bomb guard)",
                        p,
                    )
                if draft_size is not None and im.format == "JPEG":
                    im.draft("RGB", (draft_size, draft_size))
                im.load()  # decode fully here so that truncated files fail here, not later
                orientation = im.getexif().get(0x0112, 1)
                if not isinstance(orientation, int) or not 1 <= orientation <= 8:
                    orientation = 1
                try:
                    upright = ImageOps.exif_transpose(im)
                except Exception:  # a broken EXIF block should not make a photo unindexable
                    upright = im.copy()
                rgb = _to_rgb(upright)  # exif_transpose copied, so rgb outlives the file
    except ImageDecodeError:
        raise
    except Exception as exc:  # Pillow plugins raise many types (struct.error, IndexError, ...)
        raise ImageDecodeError(_reason_for(exc), p) from exc
    rgb.info["exif_orientation"] = orientation
    # Orientations 5-8 swap the axes; draft decoding may have shrunk rgb itself.
    rgb.info["original_size"] = (height, width) if orientation >= 5 else (width, height)
    return rgb


def file_hash(path: str | os.PathLike[str]) -> str:
    """Content hash of a file: BLAKE2b-128, hex, streamed in 1 MiB chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
