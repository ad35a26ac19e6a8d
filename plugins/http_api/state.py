"""What every request shares: the server's settings, the reading Library behind one lock, the
key checker and the job runner."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from piaa_index_plugins.http_api.errors import mapped

from piaa_index.errors import UserInputError
from piaa_index.plugins import PLUGIN_API

if TYPE_CHECKING:
    from piaa_index_plugins.http_api.jobs import JobRunner

    from piaa_index.library.core import Library

T = TypeVar("T")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MAX_IMAGE_ID = 2**63 - 1  # the largest id a database integer holds


@dataclass(frozen=True)
class ServerConfig:
    """How `piaa serve` was started; the defaults are the safe ones."""

    host: str = "127.0.0.1"
    allow_hosts: tuple[str, ...] = ()  # Host header names beside the loopback ones and `host`
    cors_origins: tuple[str, ...] = ()  # cross-site origins allowed to call the API (none)
    public_read: bool = False  # reads without a key
    session_key: str | None = None  # a write key valid for this run only (printed at start)
    index_roots: tuple[str, ...] = ()  # index jobs only under these folders (empty: anywhere)
    max_body_bytes: int = 256 * 1024
    max_bulk_body_bytes: int = 16 * 1024 * 1024  # POST /api/user-labels: thousands of labels
    max_bulk_labels: int = 100_000
    max_json_depth: int = 32
    max_labels: int = 1000
    max_label_length: int = 200
    max_paths: int = 1000

    def allowed_hosts(self) -> set[str]:
        return {h.lower() for h in (*LOOPBACK_NAMES, self.host, *self.allow_hosts)}


class ApiState:
    """The reading Library is used by one request at a time (the encoder and the caches are
    not shared between threads); jobs run on their own Library, so reads never wait on them."""

    def __init__(self, library: Library, config: ServerConfig, jobs: JobRunner):
        self.library = library
        self.config = config
        self.jobs = jobs
        self.lock = threading.Lock()
        self.served = ServedLibrary(library)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call into the library under the read lock; its exceptions become API errors."""
        with self.lock:
            return mapped(lambda: fn(*args, **kwargs))


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.piaa
    return state


class ServedLibrary:
    """The Library as queries see it over HTTP: the plugin API (`PLUGIN_API`, docs/plugins.md)
    and nothing else, so no query reaches the store, the vectors or anything private.

    An image argument names an indexed image (its id, or its path exactly as stored), never a
    file the server would open or stat; so `similar?image=/etc/hostname` is "not an indexed
    image", whether that file exists or not. `auto_fit` is read-only here (the server's)."""

    __slots__ = ("_library",)

    def __init__(self, library: Library):
        self._library = library

    @property
    def auto_fit(self) -> bool:
        return self._library.auto_fit

    def indexed_path(self, ref: str | int | Path) -> str:
        library = self._library
        text = str(ref)
        # ASCII digits only: str.isdigit() also accepts "²" and other Unicode digits, which
        # int() refuses; an id past the database's integer range names no image.
        if text.isascii() and text.isdigit():
            number = int(text) if len(text.lstrip("0")) <= 19 else MAX_IMAGE_ID + 1
            info = library.image_info(number) if number <= MAX_IMAGE_ID else None
        else:
            found = library.image_refs([text]).get(text)
            info = library.image_info(found[0]) if found else None
        if info is not None:
            return str(info["path"])
        raise UserInputError(
            f"not an indexed image: {text!r} (give an image id or the path of an indexed image)"
        )

    def image_id(self, path: str | Path) -> int:
        return self._library.image_id(self.indexed_path(path))

    def tags(self, path: str | Path, progress: bool = False) -> list[dict[str, Any]]:
        return self._library.tags(self.indexed_path(path))

    def similar(
        self, path: str | Path, limit: int | None = 20, progress: bool = False
    ) -> list[dict[str, Any]]:
        return self._library.similar(self.indexed_path(path), limit=limit, progress=progress)


def _forward(name: str) -> Callable[..., Any]:
    def call(self: ServedLibrary, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._library, name)(*args, **kwargs)

    call.__name__ = name
    call.__qualname__ = f"ServedLibrary.{name}"
    call.__doc__ = f"`Library.{name}` (the plugin API, docs/plugins.md)."
    return call


# The rest of the plugin API, each call passed to the Library as it is.
for _name in PLUGIN_API:
    if _name not in vars(ServedLibrary):
        setattr(ServedLibrary, _name, _forward(_name))
