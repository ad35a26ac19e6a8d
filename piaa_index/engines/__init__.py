"""Engines: the local indexer and the Ray Data engine (scan, decode, encode, write).

Both run an `IndexJob` (piaa_index/engines/base.py) through the `Engine` protocol; `engine_for`
names them. Each engine's module is imported only when asked for (Ray's stays unloaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from piaa_index.errors import UserInputError

if TYPE_CHECKING:
    from piaa_index.engines.base import Engine

ENGINES = ("local", "ray")


def check_engine(name: str) -> str:
    """`name` if it names an engine, else the user's mistake, said once for index and fit."""
    if name not in ENGINES:
        raise UserInputError(f"unknown engine {name!r}; choose {' or '.join(ENGINES)}")
    return name


def engine_for(name: str) -> Engine:
    """The engine called `name` (`local`, `ray`); another name is the user's mistake."""
    check_engine(name)
    if name == "local":
        from piaa_index.engines.indexer import LocalEngine

        return LocalEngine()
    from piaa_index.engines.ray_engine import RayEngine

    return RayEngine()
