"""File names are bytes on POSIX: Latin-1, Shift-JIS and invalid UTF-8 names are indexed, found
again, shown as valid JSON and exported, on SQLite and Postgres (an old Samba share is full of them).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from piaa_index.cli import cli
from piaa_index.library.core import Library
from tests.image_files import shapes_image

RAW_NAMES = [
    "café".encode("latin-1") + b".jpg",  # b"caf\xe9.jpg": not UTF-8
    "日本語の写真".encode("shift_jis") + b".jpg",
    b"broken-\xff\xfe-utf8.jpg",
    "ok-ü.jpg".encode(),  # valid UTF-8, for comparison
]


@pytest.fixture
def odd_names(tmp_path: Path) -> list[str]:
    """Four photos (in a sub-folder with a Latin-1 name too), as Python sees their paths."""
    folder = os.path.join(os.fsencode(tmp_path), b"fotos-\xe9t\xe9")
    os.mkdir(folder)
    paths = []
    for k, name in enumerate(RAW_NAMES):
        raw = os.path.join(folder, name)
        shapes_image(np.random.default_rng(k), (64, 48)).save(os.fsdecode(raw), format="JPEG")
        paths.append(os.fsdecode(raw))
    return paths


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, piaa_home: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{piaa_home / 'piaa.sqlite3'}"
    else:
        factory: Callable[[], str] = request.getfixturevalue("postgres_database")
        yield factory()


def run(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_odd_names_round_trip(
    odd_names: list[str], db_url: str, piaa_home: Path, tiny_model_config: Path, tmp_path: Path
) -> None:
    opts = ["--home", str(piaa_home), "--db", db_url, "-q"]
    folder = os.path.dirname(odd_names[0])
    model = ["--model", str(tiny_model_config), "--pretrained", "none"]
    first = json.loads(run(["index", folder, "--json", *model, *opts]))
    assert (first["indexed"], first["failed"]) == (4, [])
    again = json.loads(run(["index", folder, "--json", *opts]))
    assert (again["unchanged"], again["indexed"]) == (4, 0)

    run(["vocab", "set", "red circle", "blue square", *opts])
    rows = json.loads(run(["search", "red circle OR blue square", "--all-images", "--json", *opts]))
    # Valid JSON whose paths name the very files: the escapes decode to the same strings.
    assert sorted(r["path"] for r in rows) == sorted(odd_names)
    for path in odd_names:  # each one is found again by its own name
        tags = json.loads(run(["tags", path, "--json", *opts]))
        assert {t["path"] for t in tags} == {path}

    with Library.open(home=piaa_home, db=db_url) as lib:
        out = tmp_path / "tags.csv"
        lib.plugins.exporters["csv"].run(lib, output=str(out))
        with out.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
            assert {row["path"] for row in csv.DictReader(fh)} <= set(odd_names)
        os.unlink(odd_names[0])
        pruned = lib.index([folder], prune=True)
        assert pruned.removed == 1
        assert lib.status()["images"]["indexed"] == 3
