"""Every code path that takes a list, at the size users give it: 5,000 items, not 40.

Index roots (5,000 explicit files as arguments, and as a `--from -` list), an eval dataset, search
results and exports, on 5,000 ShapesWorld scenes indexed once with the shipped model. The index
run's SQL statements are counted: their number must not grow with the number of paths.
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import event

from piaa_index.cli import cli
from piaa_index.errors import UserInputError
from piaa_index.eval.ablation import run_ablation
from piaa_index.eval.datasets import Dataset, load_dataset
from piaa_index.library.core import Library
from piaa_index.shapes.dataset import generate_dataset

N = 5000


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """5,000 labelled ShapesWorld scenes at the shipped model's input size."""
    root = tmp_path_factory.mktemp("scale") / "scenes"
    generate_dataset(root, N, seed=23, size=96, progress=False)
    return load_dataset(root)


def image_paths(scenes: Dataset) -> list[str]:
    return [str(item.path) for item in scenes.items]


def open_library(home: Path, db: str) -> Library:
    return Library.open(home=home, db=db, model="shapesworld", device="cpu")


@pytest.fixture(scope="module")
def indexed(
    scenes: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Library, dict]]:
    """The 5,000 scenes indexed as 5,000 explicit files (one root each), then fitted."""
    home = tmp_path_factory.mktemp("scale-home")
    lib = open_library(home, f"sqlite:///{home / 'piaa.sqlite3'}")
    report = lib.index(image_paths(scenes)).as_dict()
    lib.set_vocabulary(scenes.classes)
    lib.fit()
    try:
        yield lib, report
    finally:
        lib.close()


@contextmanager
def counting_statements(lib: Library) -> Iterator[list[int]]:
    """Count the SQL statements `lib` sends while the block runs (executemany counts once)."""
    count = [0]

    def one(*_args: object) -> None:
        count[0] += 1

    event.listen(lib.store.engine, "before_cursor_execute", one)
    try:
        yield count
    finally:
        event.remove(lib.store.engine, "before_cursor_execute", one)


def assert_statements_do_not_grow(lib: Library, paths: list[str]) -> None:
    """A rerun over all paths sends as many statements as a rerun over 50 of them."""
    with counting_statements(lib) as few:
        assert lib.index(paths[:50]).unchanged == 50
    with counting_statements(lib) as many:
        assert lib.index(paths).unchanged == len(paths)
    assert many[0] == few[0], f"{many[0]} statements for {len(paths)} paths, {few[0]} for 50"


def test_index_5000_explicit_files(indexed: tuple[Library, dict], scenes: Dataset) -> None:
    """The demo's and `piaa index *.jpg`'s case: every file is a root (SQLite used to fail with
    "Expression tree is too large" at 1,000)."""
    lib, first = indexed
    assert first["indexed"] == N and first["failed"] == []
    assert_statements_do_not_grow(lib, image_paths(scenes))


def test_index_5000_explicit_files_on_postgres(
    scenes: Dataset, postgres_database: Callable[[], str], tmp_path: Path
) -> None:
    lib = open_library(tmp_path / "home", postgres_database())
    try:
        assert lib.store.engine.dialect.name == "postgresql"
        paths = image_paths(scenes)
        report = lib.index(paths)
        assert report.indexed == N and report.failed == []
        assert_statements_do_not_grow(lib, paths)
        # A folder root and a file root inside it, mixed with explicit files, select each
        # image once: nothing is re-encoded and nothing is counted twice.
        folder = str(scenes.root / "images")
        again = lib.index([folder, paths[0], *paths[:100]])
        assert (again.unchanged, again.indexed) == (N, 0)
    finally:
        lib.close()


def test_index_from_stdin_list(indexed: tuple[Library, dict], scenes: Dataset) -> None:
    """`find … -print0 | piaa index --from -` with 5,000 names, global options after the command."""
    lib, _ = indexed
    listing = "\0".join(image_paths(scenes)) + "\0"
    result = CliRunner().invoke(
        cli,
        ["index", "--from", "-", "--json", "-q", "--home", str(lib.settings.home)]
        + ["--db", lib.settings.db_url],
        input=listing,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["unchanged"], summary["indexed"], summary["failed"]) == (N, 0, [])


def test_eval_on_a_5000_image_dataset(indexed: tuple[Library, dict], scenes: Dataset) -> None:
    """`piaa eval` reads, indexes (here: finds unchanged) and scores all 5,000 items; the shipped
    model's patch classifier beats [CLS] as in the demo."""
    lib, _ = indexed
    report = run_ablation(lib, scenes)
    assert report["dataset"]["test"]["images"] == N
    assert report["index"]["test"]["unchanged"] == N
    results = report["results"]
    assert results["cls"]["mAP"] > 50
    assert results["piaa"]["mAP"] > results["cls"]["mAP"] + 3


def exported(lib: Library, tmp_path: Path) -> dict[str, set[str]]:
    """path → labels decided present, from `piaa export json`."""
    out = tmp_path / "tags.json"
    result = CliRunner().invoke(
        cli,
        ["export", "json", "--output", str(out), "--home", str(lib.settings.home)]
        + ["--db", lib.settings.db_url],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return {row["path"]: {t["label"] for t in row["labels"]} for row in json.loads(out.read_text())}


def test_search_returns_every_match(indexed: tuple[Library, dict], tmp_path: Path) -> None:
    """`--limit 0` gives every match, ranked, and exactly the images the export tags with them."""
    lib, _ = indexed
    a, b = lib.labels()[:2]
    result = CliRunner().invoke(
        cli,
        ["search", f'"{a}" OR "{b}"', "--limit", "0", "--json"]
        + ["--home", str(lib.settings.home), "--db", lib.settings.db_url],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    tags = exported(lib, tmp_path)
    expected = {p for p, labels in tags.items() if {a, b} & labels}
    assert len(expected) > 500  # frequent labels: a real list, not a handful
    assert {r["path"] for r in rows} == expected
    assert len(rows) == len(expected)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    both = lib.search(f'"{a}" AND "{b}"', limit=None)
    assert {r["path"] for r in both} == {p for p, labels in tags.items() if {a, b} <= labels}


def test_tag_matrix_agrees_with_tags_and_exports(
    indexed: tuple[Library, dict], tmp_path: Path
) -> None:
    """The plugins' bulk read: one row per indexed image (all 5,000), decisions equal to the
    exported tags, scores equal to `tags IMAGE`'s."""
    lib, _ = indexed
    matrix = lib.tag_matrix()
    tags = exported(lib, tmp_path)
    paths = lib.store.paths([int(i) for i in matrix.image_ids])
    assert len(matrix.image_ids) == len(tags) == N
    assert matrix.scores.shape == matrix.present.shape == (N, len(lib.labels()))
    for row, image_id in enumerate(matrix.image_ids):
        on = {matrix.labels[j] for j in np.nonzero(matrix.present[row])[0]}
        assert on == tags[paths[int(image_id)]]
    row = len(matrix.image_ids) // 2
    by_label = {t["label"]: t["score"] for t in lib.tags(paths[int(matrix.image_ids[row])])}
    for j, name in enumerate(matrix.labels):
        assert matrix.scores[row, j] == pytest.approx(by_label[name], abs=1e-6)
    two = lib.tag_matrix(matrix.labels[:2][::-1])
    assert two.labels == matrix.labels[:2][::-1]
    np.testing.assert_array_equal(two.present[:, 0], matrix.present[:, 1])
    with pytest.raises(UserInputError, match="no-such-label"):
        lib.tag_matrix(["no-such-label"])


def test_search_limit_must_not_be_negative(indexed: tuple[Library, dict]) -> None:
    lib, _ = indexed
    result = CliRunner().invoke(
        cli,
        ["search", f'"{lib.labels()[0]}"', "--limit", "-5"]
        + ["--home", str(lib.settings.home), "--db", lib.settings.db_url],
    )
    assert result.exit_code != 0
    assert "--limit must be 0 (all) or a positive number" in str(result.exception or "")


def test_exports_cover_all_5000_images(
    indexed: tuple[Library, dict], scenes: Dataset, tmp_path: Path
) -> None:
    """CSV, JSON and XMP agree on every tagged image of the 5,000."""
    lib, _ = indexed
    tags = exported(lib, tmp_path)
    tagged = {p for p, labels in tags.items() if labels}
    assert len(tagged) > 0.9 * N  # nearly every scene holds a vocabulary object
    assert set(tags) <= set(image_paths(scenes))

    out = tmp_path / "tags.csv"
    CliRunner().invoke(
        cli,
        ["export", "csv", "--output", str(out), "--home", str(lib.settings.home)]
        + ["--db", lib.settings.db_url],
        catch_exceptions=False,
    )
    with out.open(newline="", encoding="utf-8") as fh:
        by_path: dict[str, set[str]] = {}
        for row in csv.DictReader(fh):
            by_path.setdefault(row["path"], set()).add(row["label"])
    assert by_path == {p: labels for p, labels in tags.items() if labels}

    result = lib.plugins.exporters["xmp"].run(lib)
    assert result["written"] == len(tagged) and result["failed"] == 0
    assert "paths" not in result  # a summary, not 5,000 paths
    ns = {"rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}
    for path in sorted(tagged)[:: N // 50]:  # parse a spread of the sidecars
        root = ET.parse(path + ".xmp").getroot()
        subjects = {li.text for li in root.iterfind(".//{*}subject/rdf:Bag/rdf:li", ns)}
        assert subjects == tags[path]
    # Undo takes every one of them away again (we created them all).
    undone = lib.plugins.exporters["xmp"].run(lib, undo=True)
    assert undone["removed"] == len(tagged) and undone["failed"] == 0
    assert not [p for p in tagged if Path(p + ".xmp").exists()]
