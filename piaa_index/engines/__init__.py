"""Engines: the local indexer and the Ray Data engine (scan, decode, encode, write).

Both run an `IndexJob` (piaa_index/engines/base.py) through the `Engine` protocol; `engine_for`
names them. Each engine's module is imported only when asked for (Ray's stays unloaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from piaa_index.errors import UserInputError

if TYPE_CHECKING:
    from piaa_index.engines.base import Engine

ENGINES = ("local", "ray")


def engine_for(name: str) -> Engine:
    """The engine called `name` (`local`, `ray`); another name is the user's mistake."""
    if name == "local":
        from piaa_index.engines.indexer import LocalEngine

        return LocalEngine()
    if name == "ray":
        from piaa_index.engines.ray_engine import RayEngine

        return RayEngine()
    raise UserInputError(f"unknown engine {name!r}; choose local or ray")
