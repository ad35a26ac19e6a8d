"""Labels the library does not hold: `fit`, `status` and `tags` say so by name, and they are never
tagged (issue 8). A ShapesWorld library holding only the kitchen and fun groups, tagged with the
vocabulary of all 24 classes, through the CLI as a user runs it, on SQLite and on Postgres (whose
JSON refuses the infinite threshold of an absent label unless it is stored as text, issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from piaa_index.cli import cli
from piaa_index.eval.datasets import load_dataset
from piaa_index.shapes.dataset import generate_dataset
from piaa_index.shapes.world import CLASSES, GROUPS


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("absent-scenes")
    held = [CLASSES.index(n) for g in ("kitchen", "fun") for n in GROUPS[g]]
    generate_dataset(base / "scenes", 600, seed=57, size=96, progress=False, classes_allowed=held)
    return base / "scenes"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def subset_library(
    request: pytest.FixtureRequest, scenes: Path
) -> tuple[list[str], Path, set[str]]:
    base = scenes.parent
    truth = load_dataset(base / "scenes")
    in_scenes = {truth.classes[c] for item in truth.items for c in item.labels}
    opts = ["--home", str(base / f"home-{request.param}"), "-q"]
    if request.param == "postgres":
        opts += ["--db", request.getfixturevalue("postgres_database")()]
    run(["index", str(base / "scenes" / "images"), "--model", "shapesworld", *opts])
    run(["vocab", "set", *CLASSES, *opts])
    return opts, base, in_scenes


def run(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_absent_labels_are_named_and_never_tagged(
    subset_library: tuple[list[str], Path, set[str]],
) -> None:
    opts, base, in_scenes = subset_library
    fit = json.loads(run(["fit", "--json", *opts]))
    absent = set(fit["absent_labels"])
    not_held = set(CLASSES) - in_scenes
    assert len(not_held) >= 8
    # Most labels the library lacks are found absent (or weak); no held label is called absent.
    assert absent <= not_held
    assert len(absent | (set(fit["weak_labels"]) & not_held)) >= len(not_held) // 2
    assert {fit["labels"][n]["status"] for n in absent} == {"absent"}
    for name in absent:
        assert fit["tagged_present"].get(name, 0) == 0
        assert json.loads(run(["search", f'"{name}"', "--json", *opts])) == []

    status = json.loads(run(["status", "--json", *opts]))["classifier"]
    assert set(status["absent_labels"]) == absent  # names, as fit gives them
    assert set(status["weak_labels"]) == set(fit["weak_labels"])

    image = sorted((base / "scenes" / "images").iterdir())[0]
    rows = json.loads(run(["tags", str(image), "--json", *opts]))
    by_label = {r["label"]: r for r in rows}
    for name in absent:
        assert by_label[name]["present"] is False
        assert by_label[name]["label_status"] == "absent"
        assert by_label[name]["why"] == "label absent from the collection"
        assert by_label[name]["threshold"] is None
