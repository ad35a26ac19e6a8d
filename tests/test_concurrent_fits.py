"""Two `piaa fit` processes at once, and a search that refits while a fit runs, on SQLite and
Postgres: every process ends cleanly (exit 0, no traceback) and the library holds exactly the
tags of one uninterrupted fit. Real processes on the shipped shapesworld model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.piaa_processes import PiaaProcesses

pytestmark = [pytest.mark.slow, pytest.mark.reliability]  # ~1 min of real processes

N_IMAGES = 160


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from piaa_index.shapes.dataset import generate_dataset

    root = generate_dataset(
        tmp_path_factory.mktemp("scenes"), N_IMAGES, seed=21, size=96, progress=False
    )
    return root / "images", json.loads((root / "classes.json").read_text())


def run_concurrent_fits(tmp_path: Path, make_db: Callable[[], str | None], scenes) -> None:
    photos, labels = scenes
    ref = PiaaProcesses(tmp_path / "ref", make_db())
    lib = PiaaProcesses(tmp_path / "lib", make_db())
    for p in (ref, lib):
        p.run("index", str(photos))
        p.run("vocab", "set", *labels)
    ref.run("fit")
    expected = ref.tags()
    assert any(expected.values())

    lib.together(["fit"], ["fit"])
    assert lib.tags() == expected
    # A vocabulary change makes the tags stale: a search refits while a fit runs.
    for p in (ref, lib):
        p.run("vocab", "set", *labels[: len(labels) // 2])
    ref.run("fit")
    lib.together(["fit"], ["search", labels[0], "--json"])
    assert lib.tags() == ref.tags()
    assert lib.check()["ok"]


def test_two_fits_at_once_on_sqlite(tmp_path: Path, scenes) -> None:
    run_concurrent_fits(tmp_path, lambda: None, scenes)


@pytest.mark.postgres
def test_two_fits_at_once_on_postgres(
    tmp_path: Path, postgres_database: Callable[[], str], scenes
) -> None:
    run_concurrent_fits(tmp_path, postgres_database, scenes)
