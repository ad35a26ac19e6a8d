"""JPEG thumbnails of indexed images, cached on disk.

Only ids are accepted: the file's path comes from SQL, so a client can never make the server
open a path of its choosing. Thumbnails are EXIF-upright (decoded by `images.load_image`,
draft-decoded near the wanted size under a memory budget) and cached under
HOME/thumbnails/<hash[:2]>/<content hash>-<size>.jpg: keyed by content, so a re-encoded or
moved file reuses or replaces its entry by itself, and written atomically (temp file +
rename), so a reader never sees half a JPEG; one cut short by a power cut (no fsync: it is a
cache) is made again.

The key must be the content actually shown. Files change under an index (edited, replaced,
swapped for a symlink to another picture), so a thumbnail is only ever made from bytes whose
hash is the indexed content hash: before decoding, the file is hashed through one open
descriptor, and after decoding its identity (device, inode, size, mtime) must still be that
descriptor's. A file that is no longer the indexed content raises `SourceChanged` (the HTTP
API answers 409 "changed since indexing": re-index to see the new picture) rather than
rendering another picture under the indexed image's hash and id. A cached thumbnail is served
without reading the file while the file's size and mtime are those the index recorded; when
they differ, the file is hashed again first (a `touch` keeps its thumbnail, an edit is
refused). A file that is gone (an unmounted disk) keeps its cached thumbnail: that is still
the indexed picture.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from piaa_index.durable import atomic_write, stream_digest
from piaa_index.errors import LibraryError, NotFoundError, UserInputError

if TYPE_CHECKING:
    from piaa_index.catalog.store import Store
    from piaa_index.ingest.images import MemoryBudget

SIZES = (128, 256, 512, 2048)  # longer side, pixels; 2048: the gallery's zoom (never upscaled)
DEFAULT_SIZE = 256
JPEG_QUALITY = 85
DECODE_BUDGET = 512 << 20  # decoded bytes in flight across a server's threads


class SourceChanged(LibraryError):
    """The file at an indexed image's path is no longer the content that was indexed (edited,
    replaced, or swapped for a link to another picture): re-index it to see the new one."""


@dataclass(frozen=True)
class Thumbnail:
    image_id: int
    content_hash: str
    size: int
    path: Path  # the cached JPEG
    # What the index recorded of the source file (None: not known, hash it on every render).
    source_size: int | None = None
    source_mtime: float | None = None

    @property
    def etag(self) -> str:
        return f'"{self.content_hash}-{self.size}"'


class Thumbnails:
    """Thumbnails of one library's images (`store`), cached under `root` (the home's
    `Layout.thumbnails`); one per server (`Library.thumbnails`), so decodes share one budget."""

    def __init__(self, store: Store, root: Path, budget: MemoryBudget | None = None):
        from piaa_index.ingest.images import MemoryBudget

        self.store = store
        self.root = root
        self.budget = budget or MemoryBudget(DECODE_BUDGET)

    def get(self, image_id: int, size: int = DEFAULT_SIZE) -> Thumbnail:
        """The cached thumbnail of an indexed image, made on first request."""
        return self.make(*self.locate(image_id, size))

    def locate(self, image_id: int, size: int = DEFAULT_SIZE) -> tuple[Thumbnail, str]:
        """(the thumbnail, its source file) from SQL alone; `make` then needs no database, so
        a server can decode outside the lock that guards its Library."""
        from piaa_index.catalog.schema import INDEXED

        if size not in SIZES:
            allowed = ", ".join(map(str, SIZES))
            raise UserInputError(f"thumbnail size must be one of {allowed}, not {size}")
        row = self.store.image_by_id(int(image_id))
        if row is None or row.status != INDEXED or not row.content_hash:
            raise NotFoundError(f"no indexed image with id {image_id}")
        key = row.content_hash
        target = self.root / key[:2] / f"{key}-{size}.jpg"
        thumb = Thumbnail(int(image_id), key, size, target, int(row.size), float(row.mtime))
        return thumb, row.path

    def make(self, thumb: Thumbnail, source: str) -> Thumbnail:
        """Render `thumb` from `source` unless it is cached; raise `SourceChanged` when the
        file is not the indexed content any more (see the module's docstring)."""
        if _complete(thumb.path):
            if self._as_indexed(thumb, source):
                return thumb
            self._verify(thumb, source)  # changed size or mtime: the same content still?
            return thumb
        self._render(thumb, source)
        return thumb

    @staticmethod
    def _as_indexed(thumb: Thumbnail, source: str) -> bool:
        """Size and mtime as indexed, or the file unreachable (its thumbnail is still right)."""
        if thumb.source_size is None or thumb.source_mtime is None:
            return False
        try:
            st = os.stat(source)
        except OSError:
            return True
        return st.st_size == thumb.source_size and st.st_mtime == thumb.source_mtime

    def _verify(self, thumb: Thumbnail, source: str) -> os.stat_result:
        """Hash `source` through one descriptor; its fstat if the hash is the indexed one."""
        from piaa_index.ingest.images import open_regular

        try:
            with open_regular(source) as fh:
                st = os.fstat(fh.fileno())
                digest = stream_digest(fh)  # as images.file_hash, which made the index
        except OSError as exc:  # moved or deleted since it was indexed
            reason = exc.strerror or str(exc)
            raise NotFoundError(f"image {thumb.image_id} cannot be read now: {reason}") from None
        if digest != thumb.content_hash:
            raise SourceChanged(
                f"image {thumb.image_id} changed since it was indexed ({source} is not the "
                "indexed content any more): re-index it"
            )
        return st

    def _render(self, thumb: Thumbnail, source: str) -> None:
        from PIL import Image

        from piaa_index.ingest.images import ImageDecodeError, load_image

        size, target, image_id = thumb.size, thumb.path, thumb.image_id
        hashed = self._verify(thumb, source)
        try:
            img = load_image(source, draft_size=size, budget=self.budget)
            now = os.stat(source)
        except ImageDecodeError as exc:  # the indexed bytes, but they do not decode (now)
            raise NotFoundError(
                f"image {image_id} cannot be shown: cannot decode {Path(source).name}: {exc.reason}"
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise NotFoundError(f"image {image_id} cannot be read now: {reason}") from None
        if _identity(now) != _identity(hashed):  # swapped between the hash and the decode
            raise SourceChanged(f"image {image_id} changed while it was read: try again")
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A hidden, unique temporary name (as tempfile.mkstemp: owner-only, 0600), removed on
        # failure. No fsync: a cache, made again from the image when it is missing or cut short.
        tmp = target.parent / f".tmp-{secrets.token_hex(4)}.jpg"
        with atomic_write(target, tmp=tmp, exclusive=True, create_mode=0o600, fsync=False) as fh:
            img.save(fh, format="JPEG", quality=JPEG_QUALITY, optimize=True)


def _complete(path: Path) -> bool:
    """A cached JPEG that ends as a JPEG ends (EOI, FF D9). Thumbnails are written without
    fsync, so after a power cut one can be there but empty or cut short: it is made again."""
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, os.SEEK_END) < 4:
                return False
            fh.seek(-2, os.SEEK_END)
            return fh.read(2) == b"\xff\xd9"
    except OSError:  # missing (or unreadable: rendered again, which says why if it fails)
        return False


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def thumbnail(store: Store, root: Path, image_id: int, size: int = DEFAULT_SIZE) -> Thumbnail:
    """The cached JPEG thumbnail of an indexed image of `store`, cached under `root` (see
    `Thumbnails`; `Library.thumbnail` uses the library's one maker)."""
    return Thumbnails(store, root).get(image_id, size)
