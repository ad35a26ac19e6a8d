"""First-party plugins use only the plugin API (docs/plugins.md): the Library's public calls,
never its parts. A plugin that reaches into `library.store` (SQLAlchemy), `library.tagger` or
`library.vectors` breaks when their layout changes; the built-in plugins are the examples third
parties copy, so they must not."""

from __future__ import annotations

import re
from pathlib import Path

from piaa_index.library.core import Library

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


def test_every_documented_call_exists() -> None:
    """The table of calls in docs/plugins.md names only what Library has."""
    text = DOCS.read_text(encoding="utf-8")
    table = text[text.index("| group | calls |") : text.index("`tag_matrix(labels=None)` is")]
    names = set(re.findall(r"`([a-z_]+)\(", table)) | {"auto_fit"}
    assert {"image_page", "user_labels_of", "sidecars", "teach", "is_fitted"} <= names
    missing = sorted(n for n in names if not hasattr(Library, n))
    assert not missing, f"documented but not on Library: {missing}"


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
