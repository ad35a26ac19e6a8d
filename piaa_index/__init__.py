"""piaa-index: tag and search photo collections by what is in them.

Importing this package is cheap: torch, open_clip and faiss are imported only where used.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # `from piaa_index import hookimpl` for plugin authors, without importing pluggy at startup.
    if name == "hookimpl":
        from piaa_index.plugins.hookspecs import hookimpl

        return hookimpl
    if name == "Library":
        from piaa_index.library.core import Library

        return Library
    raise AttributeError(name)
