"""The base of `Library`'s parts (vocabulary, tagging, searching, maintenance)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from piaa_index.catalog.store import Store
    from piaa_index.library.core import Library
    from piaa_index.model.encoder import Encoder
    from piaa_index.vectors.shards import VectorStore


class Part:
    """One job of a library. Collaborators come through the façade, so the model and the
    vector store still load lazily and once, whichever part needs them first."""

    def __init__(self, library: Library):
        self.library = library

    @property
    def store(self) -> Store:
        return self.library.store

    @property
    def vectors(self) -> VectorStore:
        return self.library.vectors

    @property
    def vectors_dir(self) -> Path:
        return self.library.vectors_dir

    @property
    def encoder(self) -> Encoder:
        return self.library.encoder
