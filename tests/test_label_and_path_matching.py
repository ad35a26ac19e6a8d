"""Bugs found while reading the code for issue 20, each driven as a user meets it: labels matched
one way everywhere, a linked photo answered as itself, one thumbnail maker per server."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from piaa_index.cli import cli
from piaa_index.cli.common import run_guarded
from piaa_index.shapes.dataset import generate_dataset


def run(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def vocabulary(opts: list[str]) -> list[str]:
    return json.loads(run(["vocab", "list", "--json", *opts]))["labels"]


def test_labels_match_as_queries_match_them(tmp_path: Path) -> None:
    """`vocab remove dog` removes "Dog"; "Straße" and "STRASSE" are one label; adding "DOG"
    when "Dog" is there adds nothing: the query language's casefolded key, everywhere."""
    opts = ["--home", str(tmp_path / "home")]
    run(["vocab", "set", "Dog", "Straße", "STRASSE", "cat", *opts])
    assert vocabulary(opts) == ["Dog", "Straße", "cat"]
    run(["vocab", "add", "DOG", "  Cat ", "bird", *opts])
    assert vocabulary(opts) == ["Dog", "Straße", "cat", "bird"]
    run(["vocab", "remove", "dog", "strasse", *opts])
    assert vocabulary(opts) == ["cat", "bird"]
    # Still a clear error, exit 2, for a label the vocabulary does not hold.
    with pytest.raises(SystemExit) as exited:
        run_guarded(cli, ["vocab", "remove", "fish", *opts])
    assert exited.value.code == 2
    assert vocabulary(opts) == ["cat", "bird"]


def test_a_photo_reached_through_a_link_is_answered_as_itself(tmp_path: Path) -> None:
    """A link to a photo in an indexed folder is its own row; asking for the link's tags must
    answer for the link's row, not for the photo it points to."""
    generate_dataset(tmp_path / "scenes", 2, seed=3, size=96, progress=False)
    folder = tmp_path / "scenes" / "images"
    target = sorted(folder.iterdir())[0]
    link = folder / "zz-link.jpg"
    os.symlink(target.name, link)
    opts = ["--home", str(tmp_path / "home"), "-q"]
    run(["index", str(folder), "--model", "shapesworld", *opts])
    run(["vocab", "set", "car", "sun", *opts])
    query = ["search", "car OR sun", "--all-images", "--limit", "0", "--json", *opts]
    paths = {r["path"] for r in json.loads(run(query))}
    assert {str(link), str(target)} <= paths  # two rows
    for path in (link, target):
        rows = json.loads(run(["tags", str(path), "--json", *opts]))
        assert rows and {r["path"] for r in rows} == {str(path)}


def test_two_first_thumbnail_requests_share_one_thumbnail_maker(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """One Thumbnails per server (one decode budget), even when the first requests race: the
    served Library makes its one maker, under a lock, on the first request."""
    from piaa_index.library import thumbnails
    from piaa_index.library.core import Library

    made = []
    real_init = thumbnails.Thumbnails.__init__

    def slow_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(self)
        time.sleep(0.05)  # the window in which a second request would make its own
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(thumbnails.Thumbnails, "__init__", slow_init)

    library = Library.open(home=tmp_path / "home", model="shapesworld", pretrained="default")
    start = threading.Barrier(16)
    got: list[object] = []

    def first_request() -> None:
        start.wait()
        got.append(library.thumbnails)

    try:
        threads = [threading.Thread(target=first_request) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        library.close()
    assert len(made) == 1
    assert len(got) == 16 and all(g is got[0] for g in got)
