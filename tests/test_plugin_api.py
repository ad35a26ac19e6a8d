"""First-party plugins use only the plugin API (docs/plugins.md): the Library's public calls,
never its parts. A plugin that reaches into `library.store` (SQLAlchemy), `library.tagger` or
`library.vectors` breaks when their layout changes; the built-in plugins are the examples third
parties copy, so they must not."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from piaa_index_plugins.http_api.state import ServedLibrary

from piaa_index.library.core import Library
from piaa_index.plugins import PLUGIN_API

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
# `x.store`, `x.tagger`, `x.vectors` on any object (a library, the served library, a state's
# library), and private attributes of a library.
REACH = re.compile(r"\.(store|tagger|vectors|searcher|maintenance|vocab)\b(?!\s*import)|library\._")


def test_no_plugin_reaches_into_the_library() -> None:
    found = []
    for path in sorted(PLUGINS.rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if REACH.search(code) and "from piaa_index." not in code and '"' not in code:
                found.append(f"{path.relative_to(PLUGINS.parent)}:{n}: {line.strip()}")
    assert not found, "plugins reach past the plugin API:\n" + "\n".join(found)


def documented_calls() -> set[str]:
    """The names in the table of calls of docs/plugins.md."""
    text = DOCS.read_text(encoding="utf-8")
    table = text[text.index("| group | calls |") : text.index("`tag_matrix(labels=None)` is")]
    return set(re.findall(r"`([a-z_]+)\(", table)) | {"auto_fit"}


def test_every_documented_call_exists() -> None:
    """The table of calls in docs/plugins.md names only what Library has."""
    names = documented_calls()
    assert {"image_page", "user_labels_of", "sidecars", "teach", "is_fitted"} <= names
    missing = sorted(n for n in names if not hasattr(Library, n))
    assert not missing, f"documented but not on Library: {missing}"


def test_the_plugin_api_list_is_the_documented_table() -> None:
    """`PLUGIN_API` (what a server's queries get) is the docs' table, each name once."""
    assert len(PLUGIN_API) == len(set(PLUGIN_API))
    assert set(PLUGIN_API) == documented_calls()


class Recorder:
    """A stand-in Library: every attribute exists, and calls are recorded."""

    auto_fit = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> str:
            self.calls.append((name, args, kwargs))
            return f"{name} answered"

        return call


def test_the_served_library_is_exactly_the_plugin_api() -> None:
    """Over HTTP a query gets the plugin API and the served library's own `indexed_path`:
    every other attribute of a Library, public or private, is an AttributeError."""
    served = ServedLibrary(Recorder())  # type: ignore[arg-type]
    public = {n for n in dir(served) if not n.startswith("_")}
    assert public == set(PLUGIN_API) | {"indexed_path"}
    hidden = {n for n in dir(Library) if n not in PLUGIN_API} | {
        "store", "vectors", "vectors_dir", "tagger", "searcher", "maintenance", "vocab",
        "settings", "spec", "plugins", "_encoder", "_vectors", "_plugins", "_encoder_factory",
    }  # fmt: skip
    for name in sorted(n for n in hidden if not n.startswith("__")):
        with pytest.raises(AttributeError):
            getattr(served, name)
    with pytest.raises(AttributeError):
        served.anything_else = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        served.auto_fit = True  # type: ignore[misc]  # the server's setting, read-only


def test_the_served_library_passes_plugin_api_calls_on() -> None:
    library = Recorder()
    served = ServedLibrary(library)  # type: ignore[arg-type]
    assert served.image_page(0, 10, since=3) == "image_page answered"
    assert served.search("dog", limit=5) == "search answered"
    assert library.calls == [
        ("image_page", (0, 10), {"since": 3}),
        ("search", ("dog",), {"limit": 5}),
    ]
    assert served.auto_fit is False
    assert (
        ServedLibrary.feed_version.__doc__
        == "`Library.feed_version` (the plugin API, docs/plugins.md)."
    )


def test_the_docs_example_is_short_and_public() -> None:
    """The example query plugin is under 30 lines and imports only the plugin API (it runs in
    tests/test_plugins.py)."""
    text = DOCS.read_text(encoding="utf-8")
    block = re.search(r"```python\n(# piaa_largest\.py.*?)```", text, flags=re.S)
    assert block is not None
    source = block.group(1)
    assert len(source.strip().splitlines()) < 30
    imports = re.findall(r"^from (\S+) import", source, flags=re.M)
    assert set(imports) <= {"piaa_index", "piaa_index.plugins"}
    assert not REACH.search(source)
