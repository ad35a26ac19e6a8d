"""JPEG thumbnails of indexed images, cached on disk.

Only ids are accepted: the file's path comes from SQL, so a client can never make the server
open a path of its choosing. Thumbnails are EXIF-upright (decoded by `images.load_image`,
draft-decoded near the wanted size under a memory budget) and cached under
HOME/thumbnails/<hash[:2]>/<content hash>-<size>.jpg: keyed by content, so a re-encoded or
moved file reuses or replaces its entry by itself, and written atomically (temp file +
rename), so a reader never sees half a JPEG.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from piaa_index.errors import NotFoundError, UserInputError

if TYPE_CHECKING:
    from piaa_index.images import MemoryBudget
    from piaa_index.library import Library

SIZES = (128, 256, 512)  # longer side, pixels
DEFAULT_SIZE = 256
JPEG_QUALITY = 85
DECODE_BUDGET = 512 << 20  # decoded bytes in flight across a server's threads


@dataclass(frozen=True)
class Thumbnail:
    image_id: int
    content_hash: str
    size: int
    path: Path  # the cached JPEG

    @property
    def etag(self) -> str:
        return f'"{self.content_hash}-{self.size}"'


class Thumbnails:
    """Thumbnails of one library's images; one per server, so decodes share one budget."""

    def __init__(self, library: Library, budget: MemoryBudget | None = None):
        from piaa_index.images import MemoryBudget

        self.library = library
        self.root = library.settings.home / "thumbnails"
        self.budget = budget or MemoryBudget(DECODE_BUDGET)

    def get(self, image_id: int, size: int = DEFAULT_SIZE) -> Thumbnail:
        """The cached thumbnail of an indexed image, made on first request."""
        return self.make(*self.locate(image_id, size))

    def locate(self, image_id: int, size: int = DEFAULT_SIZE) -> tuple[Thumbnail, str]:
        """(the thumbnail, its source file) from SQL alone; `make` then needs no database, so
        a server can decode outside the lock that guards its Library."""
        from piaa_index.schema import INDEXED

        if size not in SIZES:
            allowed = ", ".join(map(str, SIZES))
            raise UserInputError(f"thumbnail size must be one of {allowed}, not {size}")
        row = self.library.store.image_by_id(int(image_id))
        if row is None or row.status != INDEXED or not row.content_hash:
            raise NotFoundError(f"no indexed image with id {image_id}")
        key = row.content_hash
        target = self.root / key[:2] / f"{key}-{size}.jpg"
        return Thumbnail(int(image_id), key, size, target), row.path

    def make(self, thumb: Thumbnail, source: str) -> Thumbnail:
        """Render `thumb` from `source` unless it is cached."""
        if not thumb.path.is_file():
            self._render(source, thumb.size, thumb.path, thumb.image_id)
        return thumb

    def _render(self, source: str, size: int, target: Path, image_id: int) -> None:
        from PIL import Image

        from piaa_index.images import ImageDecodeError, load_image

        try:
            img = load_image(source, draft_size=size, budget=self.budget)
        except ImageDecodeError as exc:  # moved or deleted since it was indexed
            raise NotFoundError(f"image {image_id} cannot be read now: {exc.reason}") from None
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jpg", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                img.save(fh, format="JPEG", quality=JPEG_QUALITY, optimize=True)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def thumbnail(library: Library, image_id: int, size: int = DEFAULT_SIZE) -> Thumbnail:
    """The cached JPEG thumbnail of an indexed image (see `Thumbnails`)."""
    return Thumbnails(library).get(image_id, size)
