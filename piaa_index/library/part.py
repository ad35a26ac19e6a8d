"""The base of `Library`'s parts (vocabulary, tagging, searching, maintenance)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from piaa_index.catalog.store import Store
    from piaa_index.library.resources import Resources
    from piaa_index.model.encoder import Encoder
    from piaa_index.vectors.shards import VectorStore


class Part:
    """One job of a library. The shared collaborators come in one `Resources` (the Library's),
    so the model and the vector store still load lazily and once, whichever part needs them
    first; the other parts a part uses are passed to it by name."""

    def __init__(self, resources: Resources):
        self.resources = resources

    @property
    def store(self) -> Store:
        return self.resources.store

    @property
    def vectors(self) -> VectorStore:
        return self.resources.vectors

    @property
    def vectors_dir(self) -> Path:
        return self.resources.vectors_dir

    @property
    def encoder(self) -> Encoder:
        return self.resources.encoder
