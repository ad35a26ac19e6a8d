"""A library written by an earlier release opens and answers the same.

tests/fixtures/library-0.1.0/ holds a small ShapesWorld library made by `piaa` 0.1.0 before the
code was rearranged into packages (tools/make_compat_fixture.py: 60 indexed images, six labels,
a fit, three of the user's own labels, a taught concept and its fit), and what that release
answered. Today's `piaa` must open it (its schema, vector shards, score segments, checksums and
settings as they are on disk) and give the same status, vocabulary, user labels, tags, searches,
similar images and evidence. The images themselves are not in the fixture: an image the index
holds is found by its stored path even when the file is gone.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from piaa_index.catalog.readonly import head_revision
from tests.cli_main import run_main

FIXTURE = Path(__file__).parent / "fixtures" / "library-0.1.0"


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((FIXTURE / "answers.json").read_text())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE / "library.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "home"


def _same_home(value, home: Path, root: str):  # type: ignore[no-untyped-def]
    """The answer with this copy's folder written as the recorded one's."""
    text = json.dumps(value).replace(str(home), f"{root}/home")
    return json.loads(text)


def test_an_earlier_release_library_answers_the_same(
    home: Path, recorded: dict, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def piaa(*args: str) -> str:
        code, out, err = run_main(
            ["--home", str(home), "--model", "shapesworld", *args], monkeypatch, capsys
        )
        assert code == 0, err
        return out

    def answer(*args: str):  # type: ignore[no-untyped-def]
        return _same_home(json.loads(piaa(*args)), home, recorded["root"])

    status = answer("status", "--json")
    # Opening upgraded its schema (0006 -> head); everything else is as that release said.
    assert status.pop("schema_revision") == head_revision()
    assert status == {k: v for k, v in recorded["status"].items() if k != "schema_revision"}
    assert status["stale"] is False and status["images"]["indexed"] == 60
    assert answer("vocab", "list", "--json") == recorded["vocab"]
    assert piaa("labels", "export") == recorded["labels_export"]
    for path, tags in recorded["tags"].items():
        assert answer("tags", path, "--json") == tags, path
    for query, results in recorded["search"].items():
        assert answer("search", query, "--json", "--limit", "100") == results, query
    first, second = sorted(recorded["tags"])[:2]
    assert answer("similar", first, "--json", "--limit", "10") == recorded["similar"]
    assert answer("tags", second, "--evidence", "car", "--json") == recorded["evidence"]
    # Its vectors and segments pass today's check as they were written.
    check = answer("db", "check", "--json")
    assert check["ok"] is True, check
